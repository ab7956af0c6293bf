//! Bulk transfers over a link that loses 1% of its frames each way
//! (`lab/topologies/lossy.toml`): reach recovers (TCP does, under it) and
//! every byte arrives. Needs root, iproute2, nftables and the `reach`
//! binary built beside `reach-lab`.

use std::time::Duration;

use reach_lab::transfer::Bench;
use reach_lab::Lab;

mod common;

#[test]
fn a_hundred_megabytes_cross_a_lossy_link_intact_direct_and_routed() {
    let t = common::topology("lossy");
    let lab = Lab::up(&t).expect("lab up");
    let tools = common::tools_with_reach();
    let bench = Bench::start(&lab, &t, &tools, 100 << 20).expect("hub");
    for modules in ["direct", "routed"] {
        let moved = bench
            .run(&lab, &tools, ("a", "b"), modules, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{modules}: {e}"));
        assert!(moved.intact, "{modules}: {moved:?}");
        assert_eq!(moved.bytes, 100 << 20, "{modules}: {moved:?}");
        assert_eq!(moved.module, modules, "{moved:?}");
    }
}
