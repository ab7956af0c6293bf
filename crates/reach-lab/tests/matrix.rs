//! The connectivity matrix of the NAT zoo, with plain sockets and with reach.
//! Needs root, iproute2, nftables, and the `reach` binary built beside
//! `reach-lab` (a workspace test run builds both).

use std::time::Duration;

use reach_lab::matrix::{self, Mode};
use reach_lab::Lab;

mod common;

/// Exactly the pairs towards the one open host connect; everything else needs
/// modules that later steps build.
fn assert_only_open_is_reachable(m: &matrix::Matrix) {
    for c in &m.cells {
        let why = c.error.as_deref().unwrap_or_default();
        assert_eq!(
            c.ok,
            c.to_host == "open",
            "{} -> {}: {why}",
            c.from_host,
            c.to_host
        );
    }
    let n = m.hosts.len();
    assert_eq!(n, 11, "the zoo's matrix hosts");
    assert_eq!(m.score(), (n - 1, n * (n - 1)));
}

#[test]
fn plain_matrix_of_the_nat_zoo_reaches_only_the_open_host() {
    let t = common::topology("nat-zoo");
    let lab = Lab::up(&t).expect("lab up");
    let m = matrix::run(
        &lab,
        &t,
        Mode::Plain,
        Duration::from_secs(1),
        &common::tools_with_reach(),
    )
    .expect("matrix");
    assert_only_open_is_reachable(&m);
    assert!(
        m.render().contains("10 of 110 pairs connected"),
        "{}",
        m.render()
    );
    for c in m.cells.iter().filter(|c| c.ok) {
        assert!(
            c.setup_ms.is_some() && c.module.is_none(),
            "plain TCP has no module: {c:?}"
        );
    }
}

/// The module each pair of the zoo needs, from the setup driver's order
/// (direct, reverse, splice, routed).
fn expected_modules(from: &str, to: &str) -> &'static [&'static str] {
    if to == "open" {
        &["direct"]
    } else if from == "open" {
        // Open sources advertise a public address the target connects back to.
        &["reverse"]
    } else if from == "nat-apdm-rand" || to == "nat-apdm-rand" {
        // Random ports cannot be predicted: splice declines at once.
        &["routed"]
    } else if from.starts_with("nat-apdm-seq") || to.starts_with("nat-apdm-seq") {
        // All 110 pairs run at once here, so other splices through the
        // sequential NAT can shift its ports beyond the predicted window;
        // `splice_success_rates_per_nat_pair` measures it pair by pair.
        &["splice", "routed"]
    } else {
        &["splice"]
    }
}

#[test]
fn reach_matrix_of_the_nat_zoo_connects_every_pair_with_the_module_it_needs() {
    let t = common::topology("nat-zoo");
    let lab = Lab::up(&t).expect("lab up");
    let m = common::reach_matrix(&lab, &t, expected_modules);
    assert_eq!(m.hosts.len(), 11, "the zoo's matrix hosts");
    for c in &m.cells {
        let pair = (c.from_host.as_str(), c.to_host.as_str());
        let module = c.settled_module.as_deref().unwrap_or_default();
        let first = c.module.as_deref().unwrap_or_default();
        assert!(first == module || first == "routed", "{pair:?}: {c:?}");
        assert!(c.setup_ms.is_some_and(|ms| ms > 0.0), "{c:?}");
        // The second connection goes straight to the module that worked,
        // nothing failing first; for a Reverse or Splice, data may flow
        // routed first while it connects (a sequential NAT's splice may fall
        // back to routed, see above).
        let want = expected_modules(pair.0, pair.1);
        let cached = c.cached_settled_module.as_deref().unwrap_or_default();
        let cached_first = c.cached_module.as_deref().unwrap_or_default();
        assert!(
            cached_first == cached || cached_first == "routed",
            "{pair:?}: {c:?}"
        );
        if want.len() == 1 {
            assert_eq!(cached, module, "{pair:?}: {c:?}");
            assert!(c.cached_failed_before.is_empty(), "{pair:?}: {c:?}");
        } else {
            assert!(want.contains(&cached), "{pair:?}: {c:?}");
        }
    }
    let json: serde_json::Value = serde_json::to_value(&m).expect("json");
    let pair = &json["pairs"][0];
    for key in [
        "from",
        "to",
        "ok",
        "module",
        "settled_module",
        "setup_ms",
        "cached_setup_ms",
        "error",
    ] {
        assert!(pair.get(key).is_some(), "JSON pair lacks {key}: {pair}");
    }
    assert_eq!(json["mode"], "reach");
}
