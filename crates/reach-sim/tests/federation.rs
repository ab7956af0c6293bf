//! The federation in virtual time: real hub cores, simulated links and
//! nodes. These replace wall-clock waits for protocol timing: convergence,
//! lookups across hubs, recovery from crashed hubs.

use std::time::Duration;

use reach_sim::federation::{run, Params, Report};
use reach_sim::topology::Shape;

fn params(hubs: usize, nodes: usize, topology: Shape) -> Params {
    Params {
        hubs,
        nodes,
        seed: 7,
        topology,
        loss: 0.0,
        attach_window: Duration::from_secs(1),
        limit: Duration::from_secs(120),
        kill: 0.0,
        down: Duration::from_secs(10),
        partition: None,
    }
}

/// The report without what the machine decides (wall time, memory).
fn deterministic(r: &Report) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("a report is JSON");
    let o = v.as_object_mut().expect("an object");
    o.remove("wall_ms");
    o.remove("peak_rss_bytes");
    v
}

#[test]
fn the_same_seed_gives_the_same_report() {
    let mut p = params(20, 400, Shape::Random);
    p.loss = 0.02;
    p.kill = 0.1;
    let (a, b) = (run(&p), run(&p));
    assert!(a.converged);
    assert_eq!(deterministic(&a), deterministic(&b));
    p.seed += 1;
    assert_ne!(
        deterministic(&a),
        deterministic(&run(&p)),
        "the seed matters"
    );
}

#[test]
fn federations_of_every_shape_converge_and_answer_lookups_across_hubs() {
    for shape in [Shape::Random, Shape::Ring, Shape::Tree, Shape::Sites] {
        let r = run(&params(30, 600, shape));
        assert!(r.converged, "{shape:?}: {:?}", r.shortfall);
        assert_eq!(r.max_directory_entries_per_hub, 600, "{shape:?}");
        assert_eq!((r.lookups.ok, r.lookups.sent), (200, 200), "{shape:?}");
    }
}

#[test]
fn a_federation_converges_through_lossy_links() {
    let mut p = params(30, 600, Shape::Random);
    p.loss = 0.05;
    let r = run(&p);
    assert!(r.converged, "{:?}", r.shortfall);
    assert_eq!((r.lookups.ok, r.lookups.sent), (200, 200));
}

/// The bound, from the timers it adds up: a peer hub redials within 3 s
/// (its backoff's cap), nodes reconnect within 2.4 s (2 s cap, +20%
/// jitter), a held directory flood waits 0.5 s, a hub that forgot a
/// directory during the outage asks for it after a quarter of the 10 s
/// route expiry and at its next 2 s tick, and gossip crosses the network in
/// well under a second. Measured: 3.5-7 s.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);

#[test]
fn every_node_is_reachable_again_soon_after_a_tenth_of_the_hubs_restart() {
    for (seed, topology) in [(1, Shape::Random), (2, Shape::Sites), (3, Shape::Tree)] {
        let mut p = params(50, 2000, topology);
        p.seed = seed;
        p.kill = 0.1;
        let r = run(&p);
        assert!(r.converged);
        let f = r.faults.expect("a fault run");
        assert_eq!(f.killed, 5);
        assert!(f.survivors_reconverged, "{topology:?}: survivors, {f:?}");
        assert!(f.recovered, "{topology:?}: {f:?}");
        let took = Duration::from_millis(f.recovery_ms.expect("recovered"));
        assert!(took <= RECOVERY_BOUND, "{topology:?}: {took:?}");
    }
}

#[test]
fn a_federation_cut_in_two_converges_on_each_side_and_again_once_healed() {
    for (seed, topology) in [(4, Shape::Random), (5, Shape::Sites), (6, Shape::Tree)] {
        let mut p = params(50, 2000, topology);
        p.seed = seed;
        p.partition = Some(Duration::from_secs(20));
        let r = run(&p);
        assert!(r.converged);
        let c = r.partition.expect("a partition run");
        assert_eq!(c.cut_off, 25, "{topology:?}: {c:?}");
        assert!(c.links_cut >= 1, "{topology:?}: {c:?}");
        assert!(c.sides_reconverged, "{topology:?}: sides, {c:?}");
        assert!(c.healed, "{topology:?}: {c:?}");
        // Once healed, the hubs that dial across the cut come back within
        // their redial cap, as after a restart: the same bound holds.
        let took = Duration::from_millis(c.heal_ms.expect("healed"));
        assert!(took <= RECOVERY_BOUND, "{topology:?}: {took:?}");
    }
}

#[test]
fn hubs_hold_an_index_entry_per_node_not_a_full_entry() {
    let r = run(&params(10, 1000, Shape::Random));
    assert!(r.converged);
    // 48 bytes per remote node (id and slot/state), a full entry only for
    // the hub's own 100.
    assert!(
        r.max_directory_bytes_per_hub <= 1000 * 48 + 100 * 200,
        "{r:?}"
    );
}
