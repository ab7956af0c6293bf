//! The connectivity matrix of the NAT zoo, with plain sockets and with reach.
//! Needs root, iproute2, nftables, and the `reach` binary built beside
//! `reach-lab` (a workspace test run builds both).

use std::path::PathBuf;
use std::time::Duration;

use reach_lab::matrix::{self, Mode};
use reach_lab::{Lab, Topology};

fn zoo() -> Topology {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../lab/topologies/nat-zoo.toml"
    );
    Topology::from_toml(&std::fs::read_to_string(path).expect("read")).expect("valid")
}

fn tools() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_reach-lab"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    assert!(
        dir.join("reach").exists(),
        "no reach binary in {}: run cargo build -p reach-cli (cargo nextest run --workspace builds it)",
        dir.display()
    );
    dir
}

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
    let t = zoo();
    let lab = Lab::up(&t).expect("lab up");
    let m = matrix::run(&lab, &t, Mode::Plain, Duration::from_secs(1), &tools()).expect("matrix");
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
    let t = zoo();
    let lab = Lab::up(&t).expect("lab up");
    let m = matrix::run(&lab, &t, Mode::Reach, Duration::from_secs(2), &tools()).expect("matrix");
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
