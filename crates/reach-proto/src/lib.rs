//! Sans-IO core of reach.
//!
//! Everything here is pure logic: wire codecs, the handshake state machines, the
//! record layer, address classification and candidate ordering, and the
//! scheduling of connection races. Nothing reads a clock, an OS RNG or a socket:
//! time and randomness come in as arguments, bytes come in and go out through
//! caller-owned buffers. The `reach` crate drives these with tokio.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod candidates;
pub mod circuit;
pub mod datagram;
pub mod gateway_query;
pub mod handshake;
pub mod identity;
pub mod link;
pub mod member;
pub mod nat;
pub mod node_session;
mod noise_crypto;
pub mod overlay;
pub mod plain_chunks;
pub mod port_lease;
pub mod punch;
pub mod race;
pub mod record;
pub mod resume;
pub mod rng;
pub mod route_chain;
pub mod routes;
pub mod setup_plan;
pub mod socks;
pub mod vaddr;
pub mod vpn;

pub use handshake::{Cipher, StreamMode};
pub use identity::{NodeId, SecretKey, Signature};
pub use vaddr::{HubAddr, VirtualAddr};
