//! Network membership: proving, inside a handshake, that a peer holds the
//! same network secret, bound to both NodeIds.
//!
//! A network secret is a shared file that makes a set of nodes one network
//! (`--network-secret-file`). Each side of a stream handshake may carry a
//! proof `HMAC(key, "reach member v1" | prover | verifier)` in its
//! encrypted Noise payload. The proof names both nodes, so it is useless to
//! anyone but the verifier, and only the verifier can read it (it travels
//! encrypted to the verifier's authenticated static key). The key is derived
//! from the secret once, so the options that carry it stay small and `Copy`.

use aws_lc_rs::hmac;

use crate::identity::NodeId;

/// Length of a membership proof.
pub const PROOF_LEN: usize = 32;

/// A network secret, reduced to the key proofs are made with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NetworkKey([u8; 32]);

impl std::fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetworkKey(..)")
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

impl NetworkKey {
    /// The key of the network whose secret is `secret` (the file's bytes).
    pub fn from_secret(secret: &[u8]) -> Self {
        Self(mac(secret, &[b"reach network key v1"]))
    }

    /// The proof `prover` gives `verifier` that it is a member.
    pub fn proof(&self, prover: &NodeId, verifier: &NodeId) -> [u8; PROOF_LEN] {
        mac(
            &self.0,
            &[b"reach member v1", prover.as_bytes(), verifier.as_bytes()],
        )
    }

    /// Whether `proof` is `prover`'s proof to `verifier` (constant time).
    pub fn verify(&self, prover: &NodeId, verifier: &NodeId, proof: &[u8]) -> bool {
        let want = self.proof(prover, verifier);
        aws_lc_rs::constant_time::verify_slices_are_equal(&want, proof).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    #[test]
    fn a_proof_holds_only_for_its_secret_and_its_two_nodes() {
        let (a, b, c) = (
            SecretKey::from_seed([1; 32]).node_id(),
            SecretKey::from_seed([2; 32]).node_id(),
            SecretKey::from_seed([3; 32]).node_id(),
        );
        let key = NetworkKey::from_secret(b"sesame");
        let p = key.proof(&a, &b);
        assert!(key.verify(&a, &b, &p));
        assert!(!key.verify(&b, &a, &p), "the direction is bound");
        assert!(!key.verify(&a, &c, &p), "the verifier is bound");
        assert!(!key.verify(&c, &b, &p), "the prover is bound");
        assert!(!NetworkKey::from_secret(b"other").verify(&a, &b, &p));
        assert!(!key.verify(&a, &b, &p[..31]), "a short proof fails");
    }
}
