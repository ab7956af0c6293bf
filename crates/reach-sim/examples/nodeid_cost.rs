//! What decoding a NodeId costs with the ed25519 point check, and without
//! it (the reason gossip decodes relayed ids unchecked):
//! `cargo run --release -p reach-sim --example nodeid_cost`.

use reach_proto::{NodeId, SecretKey};

fn main() {
    let ids: Vec<NodeId> = (0..10_000u32)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            SecretKey::from_seed(seed).node_id()
        })
        .collect();
    let bytes = postcard::to_allocvec(&ids).expect("encodes");
    let t = std::time::Instant::now();
    let back: Vec<NodeId> = postcard::from_bytes(&bytes).expect("decodes");
    let checked = t.elapsed();
    let raw: Vec<[u8; 32]> = ids.iter().map(|i| *i.as_bytes()).collect();
    let bytes = postcard::to_allocvec(&raw).expect("encodes");
    let t = std::time::Instant::now();
    let back_raw: Vec<[u8; 32]> = postcard::from_bytes(&bytes).expect("decodes");
    let unchecked = t.elapsed();
    let n = back.len().min(back_raw.len()) as u32;
    println!(
        "{n} ids: {:?} each with the point check, {:?} each without",
        checked / n,
        unchecked / n
    );
}
