//! The `reach` binary between two network namespaces joined by a veth link.
//!
//! Needs root and iproute2 (CI has both; `scripts/test.sh` installs iproute2).
//! The namespaces get unique names and are deleted when the guard drops, also
//! when a test panics.

mod common;

use std::process::Command;

use common::Side;

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

fn transfer_between_namespaces(tag: &str, size: usize, args: &[&str]) {
    let net = NetnsPair::new(tag);
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = Side {
        netns: Some(&net.a),
        args,
    };
    let connect = Side {
        netns: Some(&net.b),
        args,
    };
    let vaddr = common::exchange(dir.path(), listen, connect, size, size);
    assert!(
        vaddr.contains("/a=10.77.0.1:"),
        "the listener advertises its namespace address: {vaddr}"
    );
}

#[test]
fn hundred_megabytes_cross_both_ways_between_namespaces_encrypted() {
    transfer_between_namespaces("e", 100 << 20, &[]);
}

#[test]
fn hundred_megabytes_cross_both_ways_between_namespaces_plaintext() {
    transfer_between_namespaces("p", 100 << 20, &["--plaintext"]);
}
