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

/// Brings up the lab `topology` and sends `bytes` routed from `from` to
/// `to` (routed only: the stream's one way off the hub links is a circuit);
/// checks that every byte arrived and that the stream moved onto a circuit
/// part of the way. The lab and the bench, for the hubs' counters.
fn moved_onto_a_circuit(
    topology: &str,
    bytes: u64,
    (from, to): (&str, &str),
) -> (Lab, Bench, reach_lab::transfer::Transfer) {
    let t = common::topology(topology);
    let lab = Lab::up(&t).expect("lab up");
    let tools = common::tools_with_reach();
    // The move waits 200 ms, so that some bytes go over the hub links first.
    let bench = Bench::start(&lab, &t, &tools, bytes)
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
    (lab, bench, moved)
}

/// Sends 256 MiB routed from `from` to `to` across the three hubs of
/// hub-chain and checks which hubs carried the circuit.
fn across_three_hubs(from: &str, to: &str) {
    // `a` on an open site with hub1; hub2 is the multi-homed front of a
    // site whose LAN holds hub3 and `c`, both non-routed: `c` cannot reach
    // hub1, and `a` cannot reach hub3.
    let (lab, bench, _) = moved_onto_a_circuit("hub-chain", 256 << 20, (from, to));
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
    // Legs go the way the hub links were dialled (hub1 dialled hub2, hub2
    // dialled hub3): carried from hub3 towards hub1, each hub asks the one
    // before it to dial back; carried the other way, each dials the next.
    let pulls = u64::from(from == "a");
    for hub in ["hub3", "hub2"] {
        assert_eq!(circuits(&bench, &lab, hub, "pulls_asked"), pulls, "{hub}");
        assert_eq!(circuits(&bench, &lab, hub, "pulled"), pulls, "{hub}");
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

#[test]
fn a_hub_behind_a_nat_dials_back_for_a_circuit_leg_it_is_asked_to_carry() {
    // hub2 and `c` share a NAT; hub2 dialled hub1. `c` offers a circuit at
    // hub2, which `a` cannot reach: `a` joins at hub1, which cannot dial
    // hub2 either and asks it, over their link, to dial back. Enough bytes
    // that the move (200 ms, then `a`'s 1 s try at hub2) comes before the
    // end.
    let (lab, bench, _) = moved_onto_a_circuit("hub-behind-nat", 512 << 20, ("c", "a"));
    assert_eq!(circuits(&bench, &lab, "hub1", "extended"), 1, "hub1");
    assert_eq!(circuits(&bench, &lab, "hub1", "pulls_asked"), 1, "hub1");
    assert_eq!(circuits(&bench, &lab, "hub1", "pulled"), 1, "hub1");
    assert_eq!(circuits(&bench, &lab, "hub2", "paired"), 1, "hub2");
    for hub in ["hub1", "hub2"] {
        assert_eq!(circuits(&bench, &lab, hub, "refused"), 0, "{hub}");
        assert_eq!(circuits(&bench, &lab, hub, "pulls_refused"), 0, "{hub}");
    }
}
