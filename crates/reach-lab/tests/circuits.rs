//! Relay circuits across several hubs, in namespaces: the far node cannot
//! reach the offering node's hub, so the hubs carry the circuit on, hub by
//! hub, and splice every leg in the kernel. Needs root, iproute2, nftables
//! and the `reach` binary built beside `reach-lab`.

use std::time::Duration;

use reach_lab::transfer::Bench;
use reach_lab::Lab;

mod common;

/// A hub's circuit counter from its status report.
fn circuits(bench: &Bench, lab: &Lab, hub: &str, counter: &str) -> u64 {
    let status = bench
        .hubs()
        .status(lab, &common::tools_with_reach(), hub)
        .unwrap_or_else(|e| panic!("status of {hub}: {e}"));
    status["circuits"][counter].as_u64().unwrap_or_default()
}

/// Sends 256 MiB routed from `from` to `to` (routed only: the stream's one
/// way off the hub links is a circuit) and checks where it went.
fn across_three_hubs(from: &str, to: &str) {
    // `a` on an open site with hub1; hub2 is the multi-homed front of a
    // site whose LAN holds hub3 and `c`, both non-routed: `c` cannot reach
    // hub1, and `a` cannot reach hub3.
    let t = common::topology("hub-chain");
    let lab = Lab::up(&t).expect("lab up");
    let tools = common::tools_with_reach();
    // The move waits 200 ms, so that some bytes go over the hub links first.
    let bench = Bench::start(&lab, &t, &tools, 256 << 20)
        .expect("hubs")
        .upgrade_after(Duration::from_millis(200))
        .converge_on(1);
    let moved = bench
        .run(&lab, &tools, (from, to), "routed", Duration::from_secs(60))
        .expect("transfer");
    assert!(moved.intact, "{moved:?}");
    assert_eq!(moved.module, "routed", "{moved:?}");
    assert_eq!(
        moved.upgraded.as_deref(),
        Some("routed"),
        "the stream moved onto a circuit: {moved:?}"
    );
    assert!(
        moved.sent_routed.is_some_and(|n| n < moved.bytes),
        "{moved:?}"
    );
    // The answering node joined at its own hub, which carried the circuit
    // on; the middle hub carried it on too; the offering node's hub paired.
    let (first, last) = if from == "a" {
        ("hub1", "hub3")
    } else {
        ("hub3", "hub1")
    };
    assert_eq!(circuits(&bench, &lab, first, "paired"), 1, "{first}");
    assert_eq!(circuits(&bench, &lab, "hub2", "extended"), 1, "hub2");
    assert_eq!(circuits(&bench, &lab, last, "extended"), 1, "{last}");
    for hub in ["hub1", "hub2", "hub3"] {
        assert_eq!(circuits(&bench, &lab, hub, "refused"), 0, "{hub}");
    }
}

#[test]
fn a_circuit_crosses_three_hubs_to_a_node_that_cannot_reach_the_first() {
    across_three_hubs("a", "c");
}

#[test]
fn a_circuit_crosses_three_hubs_from_a_non_routed_node() {
    across_three_hubs("c", "a");
}
