//! What the vpn reads from an IP packet: its version and its source and
//! destination addresses, nothing more. Packets come from the local TUN
//! device (where the kernel built them) and from peers (where anyone may
//! have), so every length is checked and a short or unknown packet is an
//! error, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of an IPv4 header without options.
const IPV4_MIN: usize = 20;
/// Length of an IPv6 fixed header.
const IPV6_LEN: usize = 40;

/// A packet the vpn cannot route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Empty, or shorter than its version's header.
    #[error("packet of {0} bytes is shorter than its IP header")]
    Short(usize),
    /// Neither IPv4 nor IPv6.
    #[error("not an IP packet (version {0})")]
    Version(u8),
}

/// A packet's source and destination addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addrs {
    /// Where it comes from.
    pub src: IpAddr,
    /// Where it goes.
    pub dst: IpAddr,
}

/// The addresses of the IP packet `pkt`.
pub fn addrs(pkt: &[u8]) -> Result<Addrs, PacketError> {
    let version = pkt.first().ok_or(PacketError::Short(0))? >> 4;
    match version {
        4 => {
            let h: &[u8; IPV4_MIN] = pkt
                .get(..IPV4_MIN)
                .and_then(|h| h.try_into().ok())
                .ok_or(PacketError::Short(pkt.len()))?;
            let at = |i: usize| Ipv4Addr::new(h[i], h[i + 1], h[i + 2], h[i + 3]);
            Ok(Addrs {
                src: at(12).into(),
                dst: at(16).into(),
            })
        }
        6 => {
            let h: &[u8; IPV6_LEN] = pkt
                .get(..IPV6_LEN)
                .and_then(|h| h.try_into().ok())
                .ok_or(PacketError::Short(pkt.len()))?;
            let at = |i: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&h[i..i + 16]);
                Ipv6Addr::from(b)
            };
            Ok(Addrs {
                src: at(8).into(),
                dst: at(24).into(),
            })
        }
        v => Err(PacketError::Version(v)),
    }
}

/// A member's two addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Its IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Its ULA.
    pub ula: Ipv6Addr,
}

impl Owner {
    /// Whether `ip` is one of them.
    pub fn owns(&self, ip: IpAddr) -> bool {
        ip == IpAddr::V4(self.ipv4) || ip == IpAddr::V6(self.ula)
    }
}

/// What to do with a packet a peer sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Write it to the device.
    Deliver,
    /// Not an IP packet: drop and count.
    Bad,
    /// From an address that is not the peer's: drop and count (no member
    /// speaks for another).
    Spoofed,
    /// Not for this member: drop and count (the vpn does not route on).
    NotMine,
}

/// Judges packet `pkt` that `peer` sent to member `me`.
pub fn inbound(pkt: &[u8], peer: &Owner, me: &Owner) -> Inbound {
    match addrs(pkt) {
        Err(_) => Inbound::Bad,
        Ok(a) if !peer.owns(a.src) => Inbound::Spoofed,
        Ok(a) if !me.owns(a.dst) => Inbound::NotMine,
        Ok(_) => Inbound::Deliver,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0; 8]);
        p
    }

    #[test]
    fn ipv4_and_ipv6_addresses_are_read() {
        let p = v4([10, 77, 0, 1], [10, 77, 0, 2]);
        assert_eq!(
            addrs(&p),
            Ok(Addrs {
                src: Ipv4Addr::new(10, 77, 0, 1).into(),
                dst: Ipv4Addr::new(10, 77, 0, 2).into()
            })
        );
        let mut p6 = vec![0x60, 0, 0, 0, 0, 0, 58, 64];
        let (s, d): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        p6.extend_from_slice(&s.octets());
        p6.extend_from_slice(&d.octets());
        assert_eq!(
            addrs(&p6),
            Ok(Addrs {
                src: s.into(),
                dst: d.into()
            })
        );
    }

    #[test]
    fn short_and_foreign_packets_are_errors() {
        assert_eq!(addrs(&[]), Err(PacketError::Short(0)));
        assert_eq!(
            addrs(&v4([1; 4], [2; 4])[..19]),
            Err(PacketError::Short(19))
        );
        assert_eq!(addrs(&[0x60; 39]), Err(PacketError::Short(39)));
        assert_eq!(addrs(&[0x50; 60]), Err(PacketError::Version(5)));
    }

    #[test]
    fn a_peer_delivers_only_its_own_packets_to_this_member() {
        let peer = Owner {
            ipv4: Ipv4Addr::new(10, 77, 0, 2),
            ula: "fd00::2".parse().unwrap(),
        };
        let me = Owner {
            ipv4: Ipv4Addr::new(10, 77, 0, 1),
            ula: "fd00::1".parse().unwrap(),
        };
        assert_eq!(
            inbound(&v4([10, 77, 0, 2], [10, 77, 0, 1]), &peer, &me),
            Inbound::Deliver
        );
        assert_eq!(
            inbound(&v4([10, 77, 0, 3], [10, 77, 0, 1]), &peer, &me),
            Inbound::Spoofed
        );
        assert_eq!(
            inbound(&v4([10, 77, 0, 2], [10, 77, 0, 9]), &peer, &me),
            Inbound::NotMine
        );
        assert_eq!(inbound(&[0x45, 0], &peer, &me), Inbound::Bad);
    }

    proptest! {
        #[test]
        fn arbitrary_packets_from_a_peer_are_judged_never_panic(p in proptest::collection::vec(any::<u8>(), 0..80)) {
            let o = Owner { ipv4: Ipv4Addr::new(10, 77, 0, 2), ula: Ipv6Addr::LOCALHOST };
            let _ = inbound(&p, &o, &o);
        }

        #[test]
        fn any_bytes_give_addresses_or_an_error(p in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = addrs(&p);
        }
    }
}
