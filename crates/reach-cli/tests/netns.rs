//! The `reach` binary between two network namespaces joined by a veth link.
//!
//! Needs root and iproute2 (CI has both; `scripts/test.sh` installs iproute2).
//! The namespaces get unique names and are deleted when the guard drops, also
//! when a test panics.

mod common;

use std::process::Command;

use common::{sha256, Listener};

/// Two namespaces joined by a veth pair, deleted on drop.
struct NetnsPair {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `ip` ({e}): this test needs iproute2 (apt-get install iproute2)")
    });
    assert!(
        out.status.success(),
        "ip {} failed: {} (this test needs root and network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl NetnsPair {
    fn new(tag: &str) -> Self {
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let pair = Self {
            a: format!("rt{id}a"),
            b: format!("rt{id}b"),
        };
        let (va, vb) = (format!("v{id}a"), format!("v{id}b"));
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ]);
        for (ns, dev, addr) in [
            (&pair.a, &va, "10.77.0.1/24"),
            (&pair.b, &vb, "10.77.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn transfer_between_namespaces(tag: &str, size: usize, extra: &[&str]) {
    let net = NetnsPair::new(tag);
    let dir = tempfile::tempdir().expect("tempdir");
    let up = common::random_file(dir.path(), "up.bin", size);
    let down = common::random_file(dir.path(), "down.bin", size);
    let listener = Listener::start(Some(&net.a), &dir.path().join("a"), &down, extra);
    assert!(
        listener.vaddr.contains("/a=10.77.0.1:"),
        "the listener advertises its namespace address: {}",
        listener.vaddr
    );
    let got_down = dir.path().join("got_down.bin");
    let status = common::connect(
        Some(&net.b),
        &dir.path().join("b"),
        &listener.vaddr,
        &up,
        &got_down,
        extra,
    );
    assert!(status.success(), "reach connect failed");
    let got_up = listener.finish();
    assert_eq!(sha256(&got_up), sha256(&up), "connector to listener");
    assert_eq!(sha256(&got_down), sha256(&down), "listener to connector");
}

#[test]
fn hundred_megabytes_cross_both_ways_between_namespaces_encrypted() {
    transfer_between_namespaces("e", 100 << 20, &[]);
}

#[test]
fn hundred_megabytes_cross_both_ways_between_namespaces_plaintext() {
    transfer_between_namespaces("p", 100 << 20, &["--plaintext"]);
}
