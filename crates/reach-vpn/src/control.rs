//! Control messages on a vpn stream, beside the packets: the keys a peer
//! seals its UDP datagrams to this member with, and the addresses it may
//! find this member's UDP socket at. Each frame's first byte says which
//! it is ([`FrameType`]).
//!
//! ```text
//! Keys:       1 | index u32 | key (32) | cipher u8 (1 AES-256-GCM, 2 ChaCha20-Poly1305)
//! Candidates: 2 | count u8 (at most 16) | count x (family u8 (4|6) | address | port u16)
//! Moved:      3 | as Candidates (they replace the sender's earlier ones)
//! Nat:        4 | 0 (ports predictable)
//!               | 1 | family u8 | address (random ports there)
//!               | 2 | family u8 | address | last port u16 | step i16 (sequential)
//!               | 3 | family u8 | address | port u16 (maybe one per address)
//! Ping:       5 | nonce u64     (the stream's round trip)
//! Pong:       6 | nonce u64     (the answer)
//! Interfaces: 7 | as Candidates (those on the sender's own interfaces:
//!               a path to one crosses no NAT on its side)
//! Hub:        8 | node (32) | family u8 | address | port u16 (the hub the
//!               sender is attached to)
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reach_proto::{Cipher, NodeId};

use crate::udp::datagram::Keys;
use crate::udp::paths::PeerNat;

/// What a stream frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameType {
    /// A packet: offload header, then the packet.
    Packet,
    /// A control message.
    Control,
}

impl FrameType {
    /// The frame's first byte.
    pub fn code(self) -> u8 {
        match self {
            FrameType::Packet => 0,
            FrameType::Control => 1,
        }
    }

    /// The type a first byte names.
    pub fn of(b: u8) -> Option<Self> {
        match b {
            0 => Some(FrameType::Packet),
            1 => Some(FrameType::Control),
            _ => None,
        }
    }
}

/// Most candidates one message carries.
pub const MAX_CANDIDATES: usize = 16;

/// A control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Seal UDP datagrams to the sender with these, using `cipher`.
    Keys {
        /// The index and key.
        keys: Keys,
        /// The AEAD.
        cipher: Cipher,
    },
    /// The sender's UDP socket may be reached at these.
    Candidates(Vec<SocketAddr>),
    /// The sender's UDP socket moved (rebound, or the host changed
    /// networks): its earlier candidates and path are gone, these are
    /// where it may be reached now, and both sides punch afresh.
    Moved(Vec<SocketAddr>),
    /// How the sender's NAT maps its socket to new destinations, as the
    /// hub's echoes showed.
    Nat(PeerNat),
    /// Answer with [`Control::Pong`] of this nonce (measures the
    /// stream's round trip, queues included).
    Ping(u64),
    /// The answer to [`Control::Ping`].
    Pong(u64),
    /// Of the sender's candidates, those on its own interfaces (the rest
    /// are its NATs' mappings): a path to one of them crosses no NAT on
    /// the sender's side. Replaces the ones it told before.
    Interfaces(Vec<SocketAddr>),
    /// The hub the sender is attached to: a stream relayed between the
    /// two members crosses it.
    Hub {
        /// The hub's NodeId.
        node: NodeId,
        /// Its address, as the sender dials it.
        addr: SocketAddr,
    },
}

/// A control message that cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Shorter than its fields.
    #[error("control message cut short")]
    Short,
    /// An unknown message, cipher or address family.
    #[error("unknown control message field {0}")]
    Unknown(u8),
    /// More candidates than allowed.
    #[error("{0} candidates; at most {MAX_CANDIDATES}")]
    TooMany(u8),
    /// A hub NodeId that is not an ed25519 public key.
    #[error("the hub's NodeId is not a valid key")]
    BadNode,
    /// Bytes after the message.
    #[error("{0} bytes after the control message")]
    Trailing(usize),
}

impl Control {
    /// Appends the message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Control::Keys { keys, cipher } => {
                out.push(1);
                out.extend_from_slice(&keys.index.to_be_bytes());
                out.extend_from_slice(&keys.key);
                out.push(if *cipher == Cipher::AesGcm { 1 } else { 2 });
            }
            Control::Candidates(addrs) | Control::Moved(addrs) | Control::Interfaces(addrs) => {
                out.push(match self {
                    Control::Moved(_) => 3,
                    Control::Interfaces(_) => 7,
                    _ => 2,
                });
                let addrs = &addrs[..addrs.len().min(MAX_CANDIDATES)];
                out.push(addrs.len() as u8);
                for a in addrs {
                    put_ip(out, a.ip());
                    out.extend_from_slice(&a.port().to_be_bytes());
                }
            }
            Control::Nat(PeerNat::Predictable) => out.extend_from_slice(&[4, 0]),
            Control::Nat(PeerNat::Random(ip)) => {
                out.extend_from_slice(&[4, 1]);
                put_ip(out, *ip);
            }
            Control::Ping(n) => {
                out.push(5);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Control::Pong(n) => {
                out.push(6);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Control::Hub { node, addr } => {
                out.push(8);
                out.extend_from_slice(node.as_bytes());
                put_ip(out, addr.ip());
                out.extend_from_slice(&addr.port().to_be_bytes());
            }
            Control::Nat(PeerNat::Sequential { ip, after, step }) => {
                out.extend_from_slice(&[4, 2]);
                put_ip(out, *ip);
                out.extend_from_slice(&after.to_be_bytes());
                out.extend_from_slice(&step.to_be_bytes());
            }
            Control::Nat(PeerNat::PerAddress { ip, after }) => {
                out.extend_from_slice(&[4, 3]);
                put_ip(out, *ip);
                out.extend_from_slice(&after.to_be_bytes());
            }
        }
    }

    /// The message in `b` (all of it).
    pub fn decode(b: &[u8]) -> Result<Self, ControlError> {
        let mut r = Reader(b);
        let msg = match r.u8()? {
            1 => {
                let index = u32::from_be_bytes(r.array()?);
                let key: [u8; 32] = r.array()?;
                let cipher = match r.u8()? {
                    1 => Cipher::AesGcm,
                    2 => Cipher::ChaChaPoly,
                    c => return Err(ControlError::Unknown(c)),
                };
                Control::Keys {
                    keys: Keys { index, key },
                    cipher,
                }
            }
            code @ (2 | 3 | 7) => {
                let n = r.u8()?;
                if usize::from(n) > MAX_CANDIDATES {
                    return Err(ControlError::TooMany(n));
                }
                let mut addrs = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    let ip = r.ip()?;
                    let port = u16::from_be_bytes(r.array()?);
                    addrs.push(SocketAddr::new(ip, port));
                }
                match code {
                    3 => Control::Moved(addrs),
                    7 => Control::Interfaces(addrs),
                    _ => Control::Candidates(addrs),
                }
            }
            4 => match r.u8()? {
                0 => Control::Nat(PeerNat::Predictable),
                1 => Control::Nat(PeerNat::Random(r.ip()?)),
                2 => Control::Nat(PeerNat::Sequential {
                    ip: r.ip()?,
                    after: u16::from_be_bytes(r.array()?),
                    step: i16::from_be_bytes(r.array()?),
                }),
                3 => Control::Nat(PeerNat::PerAddress {
                    ip: r.ip()?,
                    after: u16::from_be_bytes(r.array()?),
                }),
                k => return Err(ControlError::Unknown(k)),
            },
            5 => Control::Ping(u64::from_be_bytes(r.array()?)),
            6 => Control::Pong(u64::from_be_bytes(r.array()?)),
            8 => {
                let node = NodeId::from_bytes(r.array()?).map_err(|_| ControlError::BadNode)?;
                let ip = r.ip()?;
                let port = u16::from_be_bytes(r.array()?);
                Control::Hub {
                    node,
                    addr: SocketAddr::new(ip, port),
                }
            }
            t => return Err(ControlError::Unknown(t)),
        };
        if !r.0.is_empty() {
            return Err(ControlError::Trailing(r.0.len()));
        }
        Ok(msg)
    }
}

/// Appends an address: family (4 or 6), then its bytes.
fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

/// Reads fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, ControlError> {
        let (first, rest) = self.0.split_first().ok_or(ControlError::Short)?;
        self.0 = rest;
        Ok(*first)
    }

    fn ip(&mut self) -> Result<IpAddr, ControlError> {
        Ok(match self.u8()? {
            4 => Ipv4Addr::from(self.array::<4>()?).into(),
            6 => Ipv6Addr::from(self.array::<16>()?).into(),
            f => return Err(ControlError::Unknown(f)),
        })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ControlError> {
        let head = self.0.get(..N).ok_or(ControlError::Short)?;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        self.0 = &self.0[N..];
        Ok(out)
    }
}

/// Encodes a probe's payload: its id.
pub fn probe(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// Reads a probe's payload.
pub fn read_probe(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Encodes an answer's payload (id, then where the probe came from) into
/// `out`; returns its length.
pub fn ack(id: u64, seen: SocketAddr, out: &mut [u8; 27]) -> usize {
    out[..8].copy_from_slice(&id.to_be_bytes());
    let n = match seen.ip().to_canonical() {
        IpAddr::V4(v4) => {
            out[8] = 4;
            out[9..13].copy_from_slice(&v4.octets());
            13
        }
        IpAddr::V6(v6) => {
            out[8] = 6;
            out[9..25].copy_from_slice(&v6.octets());
            25
        }
    };
    out[n..n + 2].copy_from_slice(&seen.port().to_be_bytes());
    n + 2
}

/// Reads an answer's payload.
pub fn read_ack(b: &[u8]) -> Option<(u64, SocketAddr)> {
    let id = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    let ip: IpAddr = match *b.get(8)? {
        4 => Ipv4Addr::from(<[u8; 4]>::try_from(b.get(9..13)?).ok()?).into(),
        6 => Ipv6Addr::from(<[u8; 16]>::try_from(b.get(9..25)?).ok()?).into(),
        _ => return None,
    };
    let at = if ip.is_ipv4() { 13 } else { 25 };
    let port = u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?);
    (b.len() == at + 2).then_some((id, SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let keys = Control::Keys {
            keys: Keys {
                index: 9,
                key: [3; 32],
            },
            cipher: Cipher::ChaChaPoly,
        };
        let cands = Control::Candidates(vec![
            "198.51.100.7:4000".parse().unwrap(),
            "[2001:db8::1]:5".parse().unwrap(),
        ]);
        let moved = Control::Moved(vec!["203.0.113.4:9".parse().unwrap()]);
        let hard = Control::Nat(PeerNat::Random("198.51.100.9".parse().unwrap()));
        let seq = Control::Nat(PeerNat::Sequential {
            ip: "2001:db8::7".parse().unwrap(),
            after: 20_001,
            step: -2,
        });
        for m in [
            keys,
            cands,
            moved,
            hard,
            seq,
            Control::Nat(PeerNat::Predictable),
            Control::Nat(PeerNat::PerAddress {
                ip: "2001:db8::1".parse().unwrap(),
                after: 7,
            }),
            Control::Ping(u64::MAX),
            Control::Pong(3),
            Control::Interfaces(vec!["192.0.2.8:4000".parse().unwrap()]),
            Control::Hub {
                node: reach_proto::SecretKey::from_seed([7; 32]).node_id(),
                addr: "[2001:db8::5]:7000".parse().unwrap(),
            },
        ] {
            let mut b = Vec::new();
            m.encode(&mut b);
            assert_eq!(Control::decode(&b), Ok(m));
        }
        let mut out = [0u8; 27];
        for seen in ["203.0.113.1:9", "[2001:db8::2]:10"] {
            let seen: SocketAddr = seen.parse().unwrap();
            let n = ack(77, seen, &mut out);
            assert_eq!(read_ack(&out[..n]), Some((77, seen)));
        }
        assert_eq!(read_probe(&probe(5)), Some(5));
    }

    #[test]
    fn bad_messages_are_named() {
        assert_eq!(Control::decode(&[]), Err(ControlError::Short));
        assert_eq!(Control::decode(&[9]), Err(ControlError::Unknown(9)));
        assert_eq!(Control::decode(&[2, 17]), Err(ControlError::TooMany(17)));
        assert_eq!(Control::decode(&[2, 0, 1]), Err(ControlError::Trailing(1)));
        assert_eq!(Control::decode(&[2, 1, 5]), Err(ControlError::Unknown(5)));
        // A hub message whose NodeId is no curve point.
        let bad = (0..=255u8)
            .map(|i| [i; 32])
            .find(|b| NodeId::from_bytes(*b).is_err())
            .expect("some bytes are no ed25519 key");
        let mut hub = vec![8];
        hub.extend_from_slice(&bad);
        hub.extend_from_slice(&[4, 192, 0, 2, 1, 0x1b, 0x58]);
        assert_eq!(Control::decode(&hub), Err(ControlError::BadNode));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(m) = Control::decode(&b) {
                let mut again = Vec::new();
                m.encode(&mut again);
                prop_assert_eq!(&again, &b);
            }
            let _ = read_ack(&b);
            let _ = read_probe(&b);
        }
    }
}
