//! The node core against a real hub core in virtual time: how soon nodes
//! are back after their hub restarts. (The lab's crash test checks the same
//! with real processes, but a wall-clock bound there measures the machine's
//! load as much as the protocol; the bound is asserted here.)

use std::time::Duration;

use reach_proto::node_session::Timing;
use reach_proto::rng::Rng;
use reach_proto::SecretKey;
use reach_sim::world::World;

/// One-way latency between the nodes and their hub.
const LATENCY: Duration = Duration::from_millis(20);

/// A hub with `n` nodes, all registered.
fn hub_with_nodes(n: usize, seed: u64) -> World {
    let mut rng = Rng::new(seed);
    let mut world = World::new(rng.fork(), 0.0);
    let hub = world.add_hub(SecretKey::from_seed(rng.bytes32()));
    world.start_hub(hub);
    for _ in 0..n {
        let key = SecretKey::from_seed(rng.bytes32());
        let after = Duration::from_micros(rng.below(1_000_000));
        world.add_node(key, hub, LATENCY, after);
    }
    world.run_until(Duration::from_secs(2));
    assert!(world.nodes.iter().all(|n| n.registered()));
    world
}

/// Steps until every node is registered; returns how long that took.
fn until_all_registered(world: &mut World, limit: Duration) -> Option<Duration> {
    let start = world.now();
    while world.now() - start < limit {
        if world.nodes.iter().all(|n| n.registered()) {
            return Some(world.now() - start);
        }
        let next = world.now() + Duration::from_millis(10);
        world.run_until(next);
    }
    None
}

#[test]
fn nodes_are_back_within_the_longest_backoff_after_their_hub_restarts() {
    let t = Timing::default();
    // However long the hub was down, a node waits at most the longest
    // backoff (+20% jitter) before it dials again, then the dial and the
    // registration take three round trips.
    let bound = t.max_backoff.mul_f64(1.2) + LATENCY * 6 + Duration::from_millis(10);
    assert!(bound < Duration::from_secs(5));
    for (seed, down) in [(1, 1), (2, 5), (3, 30)] {
        let mut world = hub_with_nodes(200, seed);
        world.kill_hub(0);
        world.run_until(world.now() + Duration::from_secs(down));
        assert!(world.nodes.iter().all(|n| !n.registered()));
        world.start_hub(0);
        let took = until_all_registered(&mut world, Duration::from_secs(10))
            .expect("every node re-registers");
        assert!(
            took <= bound,
            "down {down} s: back after {took:?} > {bound:?}"
        );
    }
}

#[test]
fn a_silent_hub_is_left_after_the_idle_timeout() {
    let t = Timing::default();
    let mut world = hub_with_nodes(20, 4);
    // The hub process hangs: its links stay open but nothing comes back.
    world.freeze_hub(0);
    let frozen = world.now();
    let limit = frozen + t.idle_timeout + t.ping_interval;
    while world.nodes.iter().any(|n| n.registered()) && world.now() < limit {
        let next = world.now() + Duration::from_millis(100);
        world.run_until(next);
    }
    let left = world.now() - frozen;
    assert!(
        world.nodes.iter().all(|n| !n.registered()),
        "nodes still registered {left:?} after their hub went silent"
    );
    // Every node heard the hub last just before it froze (keepalives every
    // 15 s are answered), so each leaves within idle_timeout of then.
    assert!(
        left <= t.idle_timeout + Duration::from_millis(100),
        "{left:?}"
    );
    assert!(left >= t.idle_timeout - t.ping_interval, "{left:?}");
}

#[test]
fn a_lookup_answers_with_the_targets_signed_home_claim() {
    let mut world = hub_with_nodes(3, 5);
    let target = world.nodes[1].id;
    let req = world.lookup(0, target).expect("lookup sent");
    world.run_until(world.now() + LATENCY * 4);
    let hub = world.hubs[0].id;
    assert_eq!(world.nodes[0].found.get(&req).map(|f| f.0), Some(Some(hub)));
    assert!(
        world.nodes[0].proved.contains(&req),
        "the answer carries no valid home claim"
    );
}
