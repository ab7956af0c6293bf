//! A site's bandwidth limit caps what crosses its internet link.
//! Needs root, iproute2, nftables and tc.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;

use reach_lab::probe::Bulk;
use reach_lab::{Lab, Topology};

#[test]
fn a_rate_limited_site_sends_no_faster_than_its_limit() {
    let text = r#"
        name = "rate"
        [[site]]
        name = "slow"
        gateway = "nat"
        rate_mbit = 20
        [[site.host]]
        name = "h"
        [[site]]
        name = "fast"
        gateway = "open"
        [[site.host]]
        name = "web"
    "#;
    let lab = Lab::up(&Topology::from_toml(text).expect("topology")).expect("lab up");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_reach-lab"));
    let mut sink = lab
        .command("web", &bin)
        .args(["probe", "sink", "--port", "7100"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sink");
    let mut line = String::new();
    BufReader::new(sink.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready");
    assert_eq!(line.trim(), "ready");
    let to = format!("{}:7100", lab.host("web").lan);
    let out = lab
        .command("h", &bin)
        .args(["probe", "send", &to, "--bytes", &(4u64 << 20).to_string()])
        .output()
        .expect("send");
    let _ = sink.kill();
    let _ = sink.wait();
    let bulk: Bulk = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(bulk.bytes, 4 << 20);
    // The token bucket can only slow the transfer down; its initial burst (one
    // bucket, 5 ms worth) allows a little over the rate on a short transfer.
    assert!(bulk.mbit_s <= 22.0, "{bulk:?} exceeds the 20 Mbit/s limit");
}
