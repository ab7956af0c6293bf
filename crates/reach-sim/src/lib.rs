//! reach-sim: the real hub core ([`reach_hub_core::HubCore`]), route table
//! and node core ([`reach_proto::node_session::NodeSession`]), many of them,
//! joined by simulated links, in deterministic virtual time.
//!
//! ```text
//!  Params --build--> World { hubs: HubCore.., nodes, links } --run--> Report
//!            seed -> Rng: topology, identities, attach times, latencies, loss, victims
//! ```
//! Same parameters, same report (wall time and memory aside).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod federation;
pub mod topology;
pub mod world;
