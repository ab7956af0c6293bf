//! reach-lab: a testbed of network namespaces with real kernel NATs and
//! firewalls, for testing, demonstrating and benchmarking reach.
//!
//! A [`topology::Topology`] (TOML) is turned into a [`plan::Plan`] by pure code,
//! then [`lab::Lab::up`] carries it out with `ip` and `nft`. Every lab has a unique
//! name prefix, so labs run side by side; dropping a [`lab::Lab`] (also while a
//! test panics) deletes its namespaces and the processes in them, and
//! `reach-lab down --all` sweeps up after a crash.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod apply;
pub mod boringtun;
pub mod gateway;
pub mod hop;
pub mod hubs;
pub mod impair;
pub mod lab;
pub mod matrix;
pub mod nat;
pub mod plan;
pub mod probe;
pub mod punch;
pub mod rathole;
pub mod rogue;
pub mod soak;
pub mod splice;
pub mod sshd;
pub mod topology;
pub mod transfer;
pub mod verify;
pub mod vpn;
pub mod wait;

pub use apply::LabError;

/// Where the program `name` is installed: `PATH`, then Cargo's bin
/// directory (where `cargo install` puts it, and which `sudo` often drops
/// from `PATH`).
pub fn find_tool(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
pub use lab::{Lab, LabRecord};
pub use topology::Topology;
pub use verify::Check;
