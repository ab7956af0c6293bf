//! Opt-in LAN discovery: hubs on one LAN find each other by UDP multicast.
//!
//! Every few seconds a hub sends a small announcement (its NodeId and TCP
//! port) to a multicast group, with TTL 1 so it never leaves the LAN. A hub
//! that hears another it has no link to dials the announcement's *source*
//! address (never an address from the payload, so a forged datagram cannot
//! aim the hub at a third party) on the announced port, expecting the
//! announced NodeId: the handshake authenticates the link, and the usual
//! admission policy decides whether it is accepted. Of two hubs that hear each
//! other only the one with the smaller NodeId dials, so they keep one link.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use reach::NodeId;

/// The group and port hubs announce themselves on unless configured otherwise.
pub const DEFAULT_GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 77), 7799);

/// What an announcement starts with.
const MAGIC: &[u8; 8] = b"reachhub";
/// Format version.
const VERSION: u8 = 1;
/// magic, version, NodeId, port.
pub const ANNOUNCE_LEN: usize = MAGIC.len() + 1 + 32 + 2;

/// A hub's announcement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announce {
    /// The hub's NodeId.
    pub hub: NodeId,
    /// Its TCP port.
    pub port: u16,
}

/// Why a datagram is not an announcement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    /// Wrong size.
    #[error("announcement of {0} bytes, expected {ANNOUNCE_LEN}")]
    Length(usize),
    /// Not ours.
    #[error("not a reach hub announcement")]
    Magic,
    /// A version this hub does not speak.
    #[error("announcement version {0} is not supported")]
    Version(u8),
    /// The NodeId is not a valid public key.
    #[error("announcement with an invalid NodeId")]
    NodeId,
    /// Port 0.
    #[error("announcement with port 0")]
    Port,
}

impl Announce {
    /// The datagram.
    pub fn encode(&self) -> [u8; ANNOUNCE_LEN] {
        let mut b = [0u8; ANNOUNCE_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = VERSION;
        b[9..41].copy_from_slice(self.hub.as_bytes());
        b[41..].copy_from_slice(&self.port.to_be_bytes());
        b
    }

    /// Parses a datagram.
    pub fn decode(b: &[u8]) -> Result<Self, AnnounceError> {
        if b.len() != ANNOUNCE_LEN {
            return Err(AnnounceError::Length(b.len()));
        }
        if &b[..8] != MAGIC {
            return Err(AnnounceError::Magic);
        }
        if b[8] != VERSION {
            return Err(AnnounceError::Version(b[8]));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&b[9..41]);
        let hub = NodeId::from_bytes(key).map_err(|_| AnnounceError::NodeId)?;
        let port = u16::from_be_bytes([b[41], b[42]]);
        if port == 0 {
            return Err(AnnounceError::Port);
        }
        Ok(Self { hub, port })
    }

    /// Where to dial the announcing hub: the datagram's source IP.
    pub fn dial_addr(&self, from: SocketAddr) -> SocketAddr {
        SocketAddr::new(from.ip(), self.port)
    }
}

/// The IPv4 addresses of this host's interfaces that can carry multicast
/// (not loopback).
pub fn interfaces() -> Vec<Ipv4Addr> {
    reach::discovery::local_addrs()
        .into_iter()
        .filter_map(|a| match a.ip {
            std::net::IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
        .collect()
}

/// A UDP socket on the group's port, joined to the group on every interface,
/// sending with TTL 1. Several hubs on one host can share the port.
pub fn socket(group: SocketAddrV4) -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, group.port())).into())?;
    s.set_multicast_ttl_v4(1)?;
    s.set_multicast_loop_v4(true)?;
    let mut joined = 0;
    for ip in interfaces() {
        if s.join_multicast_v4(group.ip(), &ip).is_ok() {
            joined += 1;
        }
    }
    if joined == 0 {
        s.join_multicast_v4(group.ip(), &Ipv4Addr::UNSPECIFIED)?;
    }
    tokio::net::UdpSocket::from_std(s.into())
}

/// Sends `announce` to `group` out of every interface.
pub async fn announce(sock: &tokio::net::UdpSocket, group: SocketAddrV4, announce: &Announce) {
    let bytes = announce.encode();
    let ifaces = interfaces();
    if ifaces.is_empty() {
        let _ = sock.send_to(&bytes, group).await;
        return;
    }
    for ip in ifaces {
        if socket2::SockRef::from(sock)
            .set_multicast_if_v4(&ip)
            .is_ok()
        {
            if let Err(e) = sock.send_to(&bytes, group).await {
                tracing::debug!(%ip, "cannot announce on this interface: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> NodeId {
        reach::proto::SecretKey::from_seed([3; 32]).node_id()
    }

    #[test]
    fn announcements_round_trip_and_bad_ones_say_why() {
        let a = Announce {
            hub: hub(),
            port: 7700,
        };
        let b = a.encode();
        assert_eq!(Announce::decode(&b), Ok(a));
        assert_eq!(
            a.dial_addr("10.1.2.3:7799".parse().expect("addr")),
            "10.1.2.3:7700".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(Announce::decode(&b[..10]), Err(AnnounceError::Length(10)));
        let mut m = b;
        m[0] ^= 1;
        assert_eq!(Announce::decode(&m), Err(AnnounceError::Magic));
        let mut v = b;
        v[8] = 9;
        assert_eq!(Announce::decode(&v), Err(AnnounceError::Version(9)));
        let mut p = b;
        p[41] = 0;
        p[42] = 0;
        assert_eq!(Announce::decode(&p), Err(AnnounceError::Port));
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_datagrams_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = Announce::decode(&b);
        }

        #[test]
        fn valid_prefix_with_arbitrary_key_and_port_never_panics(key in proptest::array::uniform32(proptest::num::u8::ANY), port in 0u16..) {
            let mut b = [0u8; ANNOUNCE_LEN];
            b[..8].copy_from_slice(MAGIC);
            b[8] = VERSION;
            b[9..41].copy_from_slice(&key);
            b[41..].copy_from_slice(&port.to_be_bytes());
            if let Ok(a) = Announce::decode(&b) {
                proptest::prop_assert_eq!(a.port, port);
            }
        }
    }
}
