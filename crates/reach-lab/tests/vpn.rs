//! reach vpn in the lab: every matrix host joins one virtual IP network
//! (`reach vpn up`), and every ordered pair reaches the other by its
//! virtual address with unmodified `ping`, a TCP connection to a server
//! that names itself, and a transfer checked by sha256. Needs root,
//! iproute2, nftables, iputils-ping, /dev/net/tun and the `reach` binary
//! built beside `reach-lab`.

use std::time::Duration;

use reach_lab::matrix::{self, Mode};
use reach_lab::Lab;

mod common;

/// Every pair connected, over a named module, with a round trip measured.
fn assert_every_pair(m: &matrix::Matrix, hosts: usize) {
    let bad: Vec<String> = m
        .cells
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{} -> {}: {:?}", c.from_host, c.to_host, c.error))
        .collect();
    assert!(bad.is_empty(), "{}\n{}", bad.join("\n"), m.render());
    assert_eq!(m.score(), (hosts * (hosts - 1), hosts * (hosts - 1)));
    for c in &m.cells {
        let module = c.module.as_deref().unwrap_or_default();
        assert!(
            ["direct", "reverse", "splice", "routed"].contains(&module),
            "{} -> {}: the vpn log names no module: {c:?}",
            c.from_host,
            c.to_host
        );
        assert!(c.rtt_ms.is_some_and(|ms| ms > 0.0), "{c:?}");
        assert!(c.setup_ms.is_some_and(|ms| ms > 0.0), "{c:?}");
    }
}

#[test]
fn every_smartsockets_pair_reaches_the_other_by_virtual_address() {
    let t = common::topology("smartsockets");
    let lab = Lab::up(&t).expect("lab up");
    let m = matrix::run(
        &lab,
        &t,
        Mode::Vpn,
        Duration::from_secs(20),
        &common::tools_with_reach(),
    )
    .expect("matrix");
    assert_every_pair(&m, 6);
    let json = serde_json::to_value(&m).expect("json");
    assert_eq!(json["mode"], "vpn");
    assert!(json["pairs"][0].get("rtt_ms").is_some());
}

#[test]
fn every_nat_zoo_pair_reaches_the_other_by_virtual_address_random_ports_included() {
    let t = common::topology("nat-zoo");
    let lab = Lab::up(&t).expect("lab up");
    let m = matrix::run(
        &lab,
        &t,
        Mode::Vpn,
        Duration::from_secs(20),
        &common::tools_with_reach(),
    )
    .expect("matrix");
    assert_every_pair(&m, 11);
    assert!(
        m.cells
            .iter()
            .any(|c| c.to_host == "nat-apdm-rand" && c.from_host == "nat-apdm-seq" && c.ok),
        "{}",
        m.render()
    );
}
