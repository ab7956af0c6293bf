//! reach: connect any process to any other, across NATs, firewalls and
//! non-routed networks, by a cryptographic identity instead of an IP address.
//!
//! An [`Endpoint`] holds a node's identity (an ed25519 key, see [`keystore`]) and
//! a listening socket. [`Endpoint::connect`] takes a [`VirtualAddr`] (NodeId,
//! virtual port, address hints) and returns a [`ReachStream`]: a tokio
//! `AsyncRead + AsyncWrite` byte stream whose peer is proven by a Noise IK
//! handshake and whose payload is encrypted end to end (unless both sides opt in
//! to plaintext). [`Endpoint::accept`] returns inbound streams with the peer's
//! authenticated NodeId. [`ReachStream::info`] tells how a stream was made.
//!
//! The protocol logic lives in the sans-IO crate `reach_proto`; this crate drives
//! it with tokio sockets.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod accept;
mod circuit;
mod circuit_gate;
mod counters;
mod direct;
pub mod discovery;
pub mod echo;
mod endpoint;
mod error;
pub mod files;
mod handshake;
mod hub_session;
mod inbound;
pub mod keystore;
pub mod link;
mod module_cache;
mod node;
mod offers;
mod plain;
pub mod policy;
mod port_map;
mod port_memory;
mod routed;
mod secure;
mod setup;
pub mod source_slots;
mod splice;
mod stream;
mod tcp_rtt;
mod ticket_store;

pub use circuit::CircuitJoinError;
pub use counters::EndpointCounters;
pub use endpoint::{
    preferred_cipher, Endpoint, EndpointBuilder, ListenPorts, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DIRECT_BUDGET, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_REVERSE_BUDGET,
};
pub use error::{
    Attempt, AttemptError, ConnectBackError, ConnectError, EchoError, EndpointError, ExposeError,
    HubError, ModuleError, ModuleFailure, NatProbeError, SessionError,
};
pub use hub_session::{HubExposure, HubStatus, HubTarget, HubTargetError};
pub use node::ConnectBackWait;
pub use policy::{AccessPolicy, PolicyError};
pub use port_map::{MappingProtocol, PortMapping};
pub use reach_proto::setup_plan::{SetupModule, UnknownModule};
pub use reach_proto::{self as proto, Cipher, NodeId, SecretKey, StreamMode, VirtualAddr};
pub use routed::RoutedStream;
pub use secure::SecureStream;
pub use source_slots::{DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_SOURCE};
pub use splice::NatReport;
pub use stream::track::LiveStream;
pub use stream::upgrade::Upgraded;
pub use stream::{Direction, ReachStream, StreamInfo, LIVENESS};
