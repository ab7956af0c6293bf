//! Classifying addresses and ordering a target's direct candidates.
//!
//! SmartSockets (section 3.2) sorts a target's addresses against the addresses the
//! local machine has: private addresses go first only when both sides have a
//! private address in the same range, because a private address otherwise most
//! likely names some other machine (or nothing) from here. We refine the heuristic
//! with the local prefix length: a target address inside one of our own subnets is
//! tried before one that merely shares an RFC 1918 block. Within a class the
//! advertised order is kept, and address families alternate, IPv6 first, as RFC
//! 8305 section 4 recommends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What kind of network an address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddrClass {
    /// 127.0.0.0/8, ::1: this host only.
    Loopback,
    /// 169.254.0.0/16, fe80::/10: this link only, needs a scope.
    LinkLocal,
    /// RFC 1918 ranges, IPv6 unique local fc00::/7.
    Private,
    /// RFC 6598 shared address space 100.64.0.0/10 (carrier-grade NAT).
    Shared,
    /// Everything else that is unicast. The lab's documentation ranges count as
    /// global, since they stand in for public addresses there.
    Global,
    /// Unspecified, multicast or broadcast: never a connection target.
    Unusable,
}

/// An address of a local interface with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddr {
    /// The interface address.
    pub ip: IpAddr,
    /// The length of the interface's network prefix.
    pub prefix_len: u8,
}

/// Classifies an IP address.
pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let o = ip.octets();
    if ip.is_loopback() {
        AddrClass::Loopback
    } else if ip.is_link_local() {
        AddrClass::LinkLocal
    } else if ip.is_private() {
        AddrClass::Private
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        AddrClass::Shared
    } else if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || o[0] == 0 {
        AddrClass::Unusable
    } else {
        AddrClass::Global
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let seg0 = ip.segments()[0];
    if ip.is_loopback() {
        AddrClass::Loopback
    } else if ip.is_unspecified() || ip.is_multicast() {
        AddrClass::Unusable
    } else if (seg0 & 0xffc0) == 0xfe80 {
        AddrClass::LinkLocal
    } else if (seg0 & 0xfe00) == 0xfc00 {
        AddrClass::Private
    } else {
        AddrClass::Global
    }
}

/// The well-known private block (RFC 1918, RFC 6598, fc00::/7) an address is in.
fn private_block(ip: IpAddr) -> Option<(IpAddr, u8)> {
    let blocks: [(IpAddr, u8); 5] = [
        (Ipv4Addr::new(10, 0, 0, 0).into(), 8),
        (Ipv4Addr::new(172, 16, 0, 0).into(), 12),
        (Ipv4Addr::new(192, 168, 0, 0).into(), 16),
        (Ipv4Addr::new(100, 64, 0, 0).into(), 10),
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0).into(), 7),
    ];
    blocks
        .into_iter()
        .find(|(net, len)| in_prefix(ip, *net, *len))
}

/// Whether `ip` lies in `net/len`. Addresses of different families never match.
pub fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let len = u32::from(len.min(32));
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let len = u32::from(len.min(128));
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Rank of a target address from this host: lower is tried earlier.
fn rank(target: IpAddr, local: &[LocalAddr]) -> u8 {
    let class = classify(target);
    match class {
        AddrClass::Private | AddrClass::Shared => {
            if local
                .iter()
                .any(|l| in_prefix(target, l.ip, l.prefix_len) && l.ip != target)
            {
                0 // on one of our own subnets
            } else if private_block(target)
                .is_some_and(|(net, len)| local.iter().any(|l| in_prefix(l.ip, net, len)))
            {
                1 // same private range as one of ours: SmartSockets' private-first case
            } else {
                3 // some other private network: most likely not this one
            }
        }
        AddrClass::Global => 2,
        AddrClass::Loopback => 4,
        AddrClass::LinkLocal => 5,
        AddrClass::Unusable => u8::MAX,
    }
}

/// Whether `target` is plausibly reachable from a host with these addresses:
/// on one of its subnets, in one of its private ranges, or public. A private
/// address of some other network (a NATed host's LAN address seen from
/// elsewhere) most likely is not.
pub fn plausibly_reachable(target: IpAddr, local: &[LocalAddr]) -> bool {
    rank(target, local) <= 2
}

/// Orders a target's advertised addresses for connection attempts from a host
/// with the given local addresses. Unusable addresses and duplicates are dropped.
pub fn order_candidates(targets: &[SocketAddr], local: &[LocalAddr]) -> Vec<SocketAddr> {
    let mut ranked: Vec<(u8, SocketAddr)> = Vec::with_capacity(targets.len());
    for t in targets {
        let r = rank(t.ip(), local);
        if r != u8::MAX && !ranked.iter().any(|(_, seen)| seen == t) {
            ranked.push((r, *t));
        }
    }
    // Stable sort keeps the advertised order within a rank.
    ranked.sort_by_key(|(r, _)| *r);
    let mut out = Vec::with_capacity(ranked.len());
    let mut start = 0;
    while start < ranked.len() {
        let end = start
            + ranked[start..]
                .iter()
                .take_while(|(r, _)| *r == ranked[start].0)
                .count();
        interleave_families(ranked[start..end].iter().map(|(_, a)| *a), &mut out);
        start = end;
    }
    out
}

/// RFC 8305 section 4: alternate IPv6 and IPv4, starting with IPv6.
fn interleave_families(addrs: impl Iterator<Item = SocketAddr> + Clone, out: &mut Vec<SocketAddr>) {
    let mut v6 = addrs.clone().filter(SocketAddr::is_ipv6);
    let mut v4 = addrs.filter(SocketAddr::is_ipv4);
    loop {
        let (a, b) = (v6.next(), v4.next());
        if a.is_none() && b.is_none() {
            break;
        }
        out.extend(a);
        out.extend(b);
    }
}

/// Chooses which local addresses a listener advertises: everything that is
/// neither loopback, link-local nor unusable; loopback only when there is nothing
/// else, so a host without interfaces can still talk to itself.
pub fn advertisable(local: &[LocalAddr]) -> Vec<IpAddr> {
    let useful: Vec<IpAddr> = local
        .iter()
        .map(|l| l.ip)
        .filter(|ip| {
            matches!(
                classify(*ip),
                AddrClass::Private | AddrClass::Shared | AddrClass::Global
            )
        })
        .collect();
    if !useful.is_empty() {
        return useful;
    }
    local
        .iter()
        .map(|l| l.ip)
        .filter(|ip| classify(*ip) == AddrClass::Loopback)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket addr")
    }

    fn local(s: &str, len: u8) -> LocalAddr {
        LocalAddr {
            ip: s.parse().expect("ip"),
            prefix_len: len,
        }
    }

    #[test]
    fn classifies_every_range() {
        let cases = [
            ("127.0.0.1", AddrClass::Loopback),
            ("::1", AddrClass::Loopback),
            ("169.254.1.1", AddrClass::LinkLocal),
            ("fe80::1", AddrClass::LinkLocal),
            ("10.1.2.3", AddrClass::Private),
            ("172.20.0.1", AddrClass::Private),
            ("192.168.1.1", AddrClass::Private),
            ("fd00::1", AddrClass::Private),
            ("100.64.0.1", AddrClass::Shared),
            ("100.127.255.1", AddrClass::Shared),
            ("100.128.0.1", AddrClass::Global),
            ("192.0.2.1", AddrClass::Global),
            ("2001:db8::1", AddrClass::Global),
            ("::ffff:10.0.0.1", AddrClass::Private),
            ("0.0.0.0", AddrClass::Unusable),
            ("224.0.0.1", AddrClass::Unusable),
            ("ff02::1", AddrClass::Unusable),
        ];
        for (ip, class) in cases {
            assert_eq!(classify(ip.parse().expect("ip")), class, "{ip}");
        }
    }

    #[test]
    fn public_first_when_private_ranges_differ() {
        // The paper's example: 10.0.0.10 here, 192.168.1.20 there.
        let targets = [sa("192.168.1.20:1"), sa("198.51.100.5:1")];
        let here = [local("10.0.0.10", 24), local("203.0.113.9", 24)];
        assert_eq!(
            order_candidates(&targets, &here),
            vec![sa("198.51.100.5:1"), sa("192.168.1.20:1")]
        );
    }

    #[test]
    fn private_first_when_both_share_a_range() {
        let targets = [sa("198.51.100.5:1"), sa("10.9.0.4:1"), sa("10.0.0.4:1")];
        let here = [local("10.0.0.10", 24), local("203.0.113.9", 24)];
        // Same subnet first, then same RFC 1918 block, then public.
        assert_eq!(
            order_candidates(&targets, &here),
            vec![sa("10.0.0.4:1"), sa("10.9.0.4:1"), sa("198.51.100.5:1")]
        );
    }

    #[test]
    fn public_only_host_tries_public_first() {
        let targets = [sa("10.0.0.4:1"), sa("198.51.100.5:1")];
        let here = [local("203.0.113.9", 24)];
        assert_eq!(order_candidates(&targets, &here)[0], sa("198.51.100.5:1"));
    }

    #[test]
    fn another_networks_private_address_is_not_plausibly_reachable() {
        let here = [
            LocalAddr {
                ip: "10.3.0.3".parse().expect("ip"),
                prefix_len: 24,
            },
            LocalAddr {
                ip: "203.0.113.106".parse().expect("ip"),
                prefix_len: 24,
            },
        ];
        let reachable = |s: &str| plausibly_reachable(s.parse().expect("ip"), &here);
        assert!(reachable("10.3.0.9"), "own subnet");
        assert!(reachable("10.0.0.3"), "same private block");
        assert!(reachable("198.51.100.4"), "public");
        assert!(!reachable("192.168.1.2"), "someone else's LAN");
    }

    #[test]
    fn families_alternate_and_duplicates_and_unusable_drop() {
        let targets = [
            sa("192.0.2.1:1"),
            sa("192.0.2.2:1"),
            sa("[2001:db8::1]:1"),
            sa("192.0.2.1:1"),
            sa("0.0.0.0:1"),
        ];
        assert_eq!(
            order_candidates(&targets, &[]),
            vec![sa("[2001:db8::1]:1"), sa("192.0.2.1:1"), sa("192.0.2.2:1")]
        );
    }

    #[test]
    fn advertises_loopback_only_without_anything_else() {
        let lo = local("127.0.0.1", 8);
        assert_eq!(advertisable(&[lo]), vec![lo.ip]);
        let eth = local("10.0.0.2", 24);
        let ll = local("fe80::1", 64);
        assert_eq!(advertisable(&[lo, ll, eth]), vec![eth.ip]);
    }

    proptest! {
        #[test]
        fn ordering_is_a_permutation_of_usable_unique_targets(
            targets in proptest::collection::vec((any::<[u8; 4]>(), 1u16..4), 0..12),
            here in proptest::collection::vec((any::<[u8; 4]>(), 0u8..=32), 0..4),
        ) {
            let targets: Vec<SocketAddr> = targets.into_iter()
                .map(|(ip, p)| SocketAddr::new(Ipv4Addr::from(ip).into(), p)).collect();
            let here: Vec<LocalAddr> = here.into_iter()
                .map(|(ip, l)| LocalAddr { ip: Ipv4Addr::from(ip).into(), prefix_len: l }).collect();
            let out = order_candidates(&targets, &here);
            let mut want: Vec<SocketAddr> = targets.iter().copied()
                .filter(|t| classify(t.ip()) != AddrClass::Unusable).collect();
            want.sort();
            want.dedup();
            let mut got = out.clone();
            got.sort();
            prop_assert_eq!(got, want);
        }
    }
}
