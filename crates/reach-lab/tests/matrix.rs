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
    assert_eq!(n, 10, "the zoo's matrix hosts");
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
        m.render().contains("9 of 90 pairs connected"),
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

#[test]
fn reach_matrix_of_the_nat_zoo_connects_the_same_pairs_directly() {
    let t = common::topology("nat-zoo");
    let lab = Lab::up(&t).expect("lab up");
    let m = matrix::run(
        &lab,
        &t,
        Mode::Reach,
        Duration::from_secs(2),
        &common::tools_with_reach(),
    )
    .expect("matrix");
    assert_only_open_is_reachable(&m);
    for c in m.cells.iter().filter(|c| c.ok) {
        assert_eq!(
            c.module.as_deref(),
            Some("direct"),
            "{} -> {}",
            c.from_host,
            c.to_host
        );
        assert!(c.setup_ms.is_some_and(|ms| ms > 0.0), "{c:?}");
        assert!(
            c.cached_setup_ms.is_some(),
            "a second connection was timed: {c:?}"
        );
    }
    let json: serde_json::Value = serde_json::to_value(&m).expect("json");
    let pair = &json["pairs"][0];
    for key in [
        "from",
        "to",
        "ok",
        "module",
        "setup_ms",
        "cached_setup_ms",
        "error",
    ] {
        assert!(pair.get(key).is_some(), "JSON pair lacks {key}: {pair}");
    }
    assert_eq!(json["mode"], "reach");
}
