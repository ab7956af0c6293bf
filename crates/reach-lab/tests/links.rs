//! Link properties of a site, measured through them: the userspace delay hop
//! adds the declared delay to every round trip, and a bandwidth limit caps
//! what crosses. Needs root, iproute2, nftables and tc.

use std::net::SocketAddr;
use std::time::Duration;

use reach_lab::probe::{self, Bulk, Outcome};
use reach_lab::{Lab, Topology};

mod common;

/// A NAT site with `link` (a `delay_ms` or `rate_mbit` line) and an open site.
fn two_sites(link: &str) -> Lab {
    let text = format!(
        r#"
        name = "link"
        [[site]]
        name = "far"
        gateway = "nat"
        {link}
        [[site.host]]
        name = "h"
        [[site]]
        name = "near"
        gateway = "open"
        [[site.host]]
        name = "web"
    "#
    );
    Lab::up(&Topology::from_toml(&text).expect("topology")).expect("lab up")
}

#[test]
fn a_delayed_site_adds_its_delay_to_every_round_trip() {
    let lab = two_sites("delay_ms = 20");
    let _web = probe::spawn_server(&lab, &common::tools(), "web", &[7000]).expect("server");
    let web = SocketAddr::from((lab.host("web").lan, 7000));
    // A probe takes two round trips (connect, then the greeting), each of which
    // crosses the 20 ms hop twice: at least 80 ms. The delay can only add time,
    // so this lower bound holds however loaded the machine is.
    for _ in 0..3 {
        match probe::connect_from(
            &lab,
            &common::tools(),
            "h",
            web,
            Duration::from_secs(5),
            None,
        ) {
            Outcome::Ok { ms, .. } => {
                assert!(ms >= 78.0, "{ms} ms is less than two delayed round trips")
            }
            other => panic!("probe through the delayed link: {other:?}"),
        }
    }
}

#[test]
fn a_rate_limited_site_sends_no_faster_than_its_limit() {
    let lab = two_sites("rate_mbit = 20");
    let _sink = probe::spawn_sink(&lab, &common::tools(), "web", 7100).expect("sink");
    let to = format!("{}:7100", lab.host("web").lan);
    let out = lab
        .command("h", common::tools().join("reach-lab"))
        .args(["probe", "send", &to, "--bytes", &(4u64 << 20).to_string()])
        .output()
        .expect("send");
    let bulk: Bulk = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(bulk.bytes, 4 << 20);
    // The token bucket can only slow the transfer down; its initial burst (one
    // bucket, 5 ms worth) allows a little over the rate on a short transfer.
    assert!(bulk.mbit_s <= 22.0, "{bulk:?} exceeds the 20 Mbit/s limit");
}
