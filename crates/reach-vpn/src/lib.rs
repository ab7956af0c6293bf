//! reach vpn: a virtual IP network across NATs and firewalls.
//!
//! Each member gets a TUN device with a virtual IPv4 address (given, or
//! derived from its NodeId within the network's prefix and checked free
//! through the hubs) and an IPv6 ULA derived from its NodeId. Packets for
//! another member travel over a reach stream to it, set up by whichever
//! module works (Direct, Reverse, Splice, Routed) and moved onto a better
//! path while packets flow; end-to-end encryption is the stream's.
//!
//! - [`address`]: choosing and claiming the IPv4 address;
//! - [`device`]: the TUN device;
//! - [`hello`]: the first message on a vpn stream;
//! - [`packet`]: reading a packet's addresses;
//! - [`vnet`]: the offload header before each packet;
//! - [`frame`]: packets on a stream;
//! - [`outq`]: a peer's queue of outgoing packets;
//! - [`shared`]: a stream shared by a peer's reader and writer;
//! - [`network`]: the driver that carries packets between the device and
//!   the peers.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod address;
pub mod birthday;
pub mod control;
pub mod device;
pub mod frame;
pub mod hello;
pub mod network;
pub mod outq;
pub mod packet;
pub mod shared;
pub mod split;
pub mod udp;
pub mod udp_io;
pub mod vnet;

pub use network::{Membership, Peer, Stats, Vpn, VPORT};

/// The default device MTU: a 1500-byte path less IPv6, TCP and reach's
/// framing, so that the later UDP paths fit too.
pub const DEFAULT_MTU: u16 = 1400;
