//! Helpers the lab test binaries share.
#![allow(dead_code)]

use std::path::PathBuf;

use reach_lab::Topology;

/// The directory holding `reach-lab` (and, in a workspace build, `reach`).
pub fn tools() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_reach-lab"))
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

/// [`tools`], checked to hold the `reach` binary too.
pub fn tools_with_reach() -> PathBuf {
    let dir = tools();
    assert!(
        dir.join("reach").exists(),
        "no reach binary in {}: run cargo build -p reach-cli (cargo nextest run --workspace builds it)",
        dir.display()
    );
    dir
}

/// A shipped topology, `lab/topologies/NAME.toml`.
pub fn topology(name: &str) -> Topology {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../lab/topologies")
        .join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    Topology::from_toml(&text).expect("valid topology")
}
