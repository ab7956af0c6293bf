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
pub mod hop;
pub mod hubs;
pub mod lab;
pub mod matrix;
pub mod nat;
pub mod plan;
pub mod probe;
pub mod rathole;
pub mod splice;
pub mod sshd;
pub mod topology;
pub mod transfer;
pub mod verify;
pub mod wait;

pub use apply::LabError;
pub use lab::{Lab, LabRecord};
pub use topology::Topology;
pub use verify::Check;
