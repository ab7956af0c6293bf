//! The virtual IP network's names, as hubs and nodes share them: which
//! network a virtual address belongs to ([`NetworkTag`]), a member's claim
//! of an IPv4 address in it ([`VpnClaim`]), the IPv6 ULA every member has
//! without asking ([`ula`]), the IPv4 addresses a member may take without
//! configuration ([`derived_ipv4`]), and the member lists hubs sign and
//! flood so that any hub of a federation can answer "who is 10.77.3.4 in
//! network `lab`" ([`members_signed_bytes`]).
//!
//! Derivations hash the NodeId without its sign bit, like every other
//! NodeId comparison: a key and its negation are one node, and get one
//! address.

use std::net::{Ipv4Addr, Ipv6Addr};

use aws_lc_rs::digest::{digest, Context, SHA256};
use serde::{Deserialize, Serialize};

use crate::identity::NodeId;

/// Most members one hub lists in its signed member list (one message); a
/// hub with more vpn members attached gossips this many and logs the rest.
pub const MEMBERS_PART: usize = 1024;

/// Longest network name.
pub const MAX_NETWORK_NAME: usize = 64;

/// A virtual network's name, reduced to 8 bytes for the wire: networks
/// with different names never see each other's members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetworkTag(pub [u8; 8]);

/// A network name that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetworkNameError {
    /// Empty.
    #[error("the network name is empty")]
    Empty,
    /// Longer than [`MAX_NETWORK_NAME`].
    #[error("the network name has {0} bytes; at most {MAX_NETWORK_NAME}")]
    TooLong(usize),
    /// A character outside `a-z 0-9 - _ .`.
    #[error("the network name has {0:?}; use a-z, 0-9, '-', '_' and '.'")]
    BadChar(char),
}

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl NetworkTag {
    /// The tag of network `name` (lowercase letters, digits, `-_.`).
    pub fn of(name: &str) -> Result<Self, NetworkNameError> {
        if name.is_empty() {
            return Err(NetworkNameError::Empty);
        }
        if name.len() > MAX_NETWORK_NAME {
            return Err(NetworkNameError::TooLong(name.len()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(*c)))
        {
            return Err(NetworkNameError::BadChar(c));
        }
        let h = digest(
            &SHA256,
            &[b"reach vpn network v1|", name.as_bytes()].concat(),
        );
        let mut tag = [0; 8];
        tag.copy_from_slice(&h.as_ref()[..8]);
        Ok(Self(tag))
    }
}

/// A member's claim of an IPv4 address in a network, carried in its
/// registration and in its hub's member list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VpnClaim {
    /// The network.
    pub network: NetworkTag,
    /// The member's virtual IPv4 address.
    pub ip: Ipv4Addr,
}

/// One vpn member in a hub's member list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpnMember {
    /// The member (decoded without the point check: see
    /// [`crate::identity::relayed_id`]).
    #[serde(with = "crate::identity::relayed_id")]
    pub node: NodeId,
    /// Its claim.
    pub claim: VpnClaim,
}

/// The NodeId's bytes without the sign bit (see the module doc).
fn principal(node: &NodeId) -> [u8; 32] {
    let mut b = *node.as_bytes();
    b[31] &= 0x7f;
    b
}

/// `node`'s IPv6 unique local address in `network` (RFC 4193): the /48
/// comes from the network (every member shares it), the interface id from
/// the node, so no two members of a network are likely to share one (a
/// 64-bit hash) and none needs configuring.
pub fn ula(network: &NetworkTag, node: &NodeId) -> Ipv6Addr {
    let iid = hash(&[b"reach vpn ula iid v1|", &network.0, &principal(node)]);
    let mut b = ula_prefix(network).octets();
    // The interface id's universal/local bit means nothing for an address
    // that is not built from a MAC.
    b[8..16].copy_from_slice(&iid[..8]);
    Ipv6Addr::from(b)
}

/// The prefix of `network`'s ULAs, a /64 (subnet 0 of a /48 hashed from
/// the network): every member's address is in it.
pub fn ula_prefix(network: &NetworkTag) -> Ipv6Addr {
    let net = hash(&[b"reach vpn ula prefix v1|", &network.0]);
    let mut b = [0u8; 16];
    b[0] = 0xfd;
    b[1..6].copy_from_slice(&net[..5]);
    Ipv6Addr::from(b)
}

/// An IPv4 prefix that cannot hold derived addresses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// Too few host addresses for hashing into (a /31 or /32), or a
    /// prefix length over 32.
    #[error("a /{0} is too small to derive member addresses in; use /8 to /30, or give --ip")]
    TooSmall(u8),
    /// Bits set past the prefix length.
    #[error("{0}/{1} has host bits set; the network is {2}/{1}")]
    HostBits(Ipv4Addr, u8, Ipv4Addr),
}

/// The mask of a /`len`.
fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

/// The network `ip/len` is in (its address with the host bits cleared).
pub fn network_of(ip: Ipv4Addr, len: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) & mask(len))
}

/// Checks that `net/len` names a network (no host bits) in which member
/// addresses can be derived.
pub fn check_prefix(net: Ipv4Addr, len: u8) -> Result<(), PrefixError> {
    if len > 30 {
        return Err(PrefixError::TooSmall(len));
    }
    if network_of(net, len) != net {
        return Err(PrefixError::HostBits(net, len, network_of(net, len)));
    }
    Ok(())
}

/// Whether `ip` is a usable host address of `net/len` (not the network's
/// own address, nor its broadcast address).
pub fn is_host_of(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let m = mask(len);
    let (i, n) = (u32::from(ip), u32::from(net));
    if i & m != n & m {
        return false;
    }
    len >= 31 || (i & !m != 0 && i & !m != !m)
}

/// The `attempt`th address `node` may take in `net/len` (which must pass
/// [`check_prefix`]): attempt 0 is its usual address; a member whose
/// usual address is taken tries the next attempts. Never the network or
/// broadcast address.
pub fn derived_ipv4(
    network: &NetworkTag,
    node: &NodeId,
    net: Ipv4Addr,
    len: u8,
    attempt: u32,
) -> Ipv4Addr {
    let hosts = !mask(len);
    let usable = hosts.saturating_sub(1).max(1);
    let h = hash(&[
        b"reach vpn ipv4 v1|",
        &network.0,
        &principal(node),
        &attempt.to_be_bytes(),
    ]);
    let r = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    // 1..=hosts-1: skips the network (0) and broadcast (all ones) addresses.
    let host = 1 + r % usable;
    Ipv4Addr::from((u32::from(net) & mask(len)) | (host & hosts))
}

const MEMBERS_LABEL: &[u8] = b"reach vpn members v1|";

/// What a hub signs for its member list at `state`.
pub fn members_signed_bytes(origin: &NodeId, state: u64, members: &[VpnMember]) -> Vec<u8> {
    let mut m = Vec::with_capacity(MEMBERS_LABEL.len() + 48 + 44 * members.len());
    m.extend_from_slice(MEMBERS_LABEL);
    m.extend_from_slice(origin.as_bytes());
    m.extend_from_slice(&state.to_be_bytes());
    m.extend_from_slice(&(members.len() as u32).to_be_bytes());
    for VpnMember { node, claim } in members {
        m.extend_from_slice(node.as_bytes());
        m.extend_from_slice(&claim.network.0);
        m.extend_from_slice(&claim.ip.octets());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;
    use proptest::prelude::*;

    fn node(seed: u8) -> NodeId {
        SecretKey::from_seed([seed; 32]).node_id()
    }

    #[test]
    fn network_names_are_checked() {
        assert!(NetworkTag::of("lab-1.x_y").is_ok());
        assert_eq!(NetworkTag::of(""), Err(NetworkNameError::Empty));
        assert_eq!(NetworkTag::of("Lab"), Err(NetworkNameError::BadChar('L')));
        assert_eq!(
            NetworkTag::of(&"a".repeat(65)),
            Err(NetworkNameError::TooLong(65))
        );
        assert_ne!(NetworkTag::of("a"), NetworkTag::of("b"));
    }

    #[test]
    fn a_key_and_its_negation_get_one_address() {
        let net = NetworkTag::of("lab").unwrap();
        let id = node(3);
        let mut neg = *id.as_bytes();
        neg[31] ^= 0x80;
        let neg = NodeId::from_bytes(neg).unwrap();
        assert_eq!(ula(&net, &id), ula(&net, &neg));
        let p = Ipv4Addr::new(10, 77, 0, 0);
        assert_eq!(
            derived_ipv4(&net, &id, p, 16, 0),
            derived_ipv4(&net, &neg, p, 16, 0)
        );
    }

    #[test]
    fn ulas_share_the_network_prefix() {
        let net = NetworkTag::of("lab").unwrap();
        let prefix = ula_prefix(&net);
        for s in 1..20 {
            let a = ula(&net, &node(s)).octets();
            assert_eq!(a[..8], prefix.octets()[..8]);
            assert_eq!(a[0], 0xfd);
        }
        assert_ne!(ula_prefix(&NetworkTag::of("other").unwrap()), prefix);
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix(Ipv4Addr::new(10, 77, 0, 0), 16).is_ok());
        assert_eq!(
            check_prefix(Ipv4Addr::new(10, 77, 0, 1), 16),
            Err(PrefixError::HostBits(
                Ipv4Addr::new(10, 77, 0, 1),
                16,
                Ipv4Addr::new(10, 77, 0, 0)
            ))
        );
        assert_eq!(
            check_prefix(Ipv4Addr::new(10, 0, 0, 0), 31),
            Err(PrefixError::TooSmall(31))
        );
    }

    proptest! {
        #[test]
        fn derived_addresses_are_host_addresses_of_the_prefix(
            seed in any::<u8>(), len in 8u8..=30, attempt in 0u32..8, raw in any::<u32>()
        ) {
            let net = Ipv4Addr::from(raw & mask(len));
            let tag = NetworkTag::of("p").unwrap();
            let ip = derived_ipv4(&tag, &node(seed), net, len, attempt);
            prop_assert!(is_host_of(ip, net, len), "{ip} in {net}/{len}");
        }
    }

    #[test]
    fn attempts_give_other_addresses() {
        let tag = NetworkTag::of("lab").unwrap();
        let p = Ipv4Addr::new(10, 77, 0, 0);
        let a: std::collections::HashSet<_> = (0..8)
            .map(|k| derived_ipv4(&tag, &node(1), p, 16, k))
            .collect();
        assert!(a.len() >= 7, "{a:?}");
    }

    #[test]
    fn member_lists_are_signed_over_every_claim() {
        let tag = NetworkTag::of("lab").unwrap();
        let claim = VpnClaim {
            network: tag,
            ip: Ipv4Addr::new(10, 77, 0, 5),
        };
        let m = |n, claim| {
            [VpnMember {
                node: node(n),
                claim,
            }]
        };
        let one = members_signed_bytes(&node(1), 7, &m(2, claim));
        let moved = VpnClaim {
            ip: Ipv4Addr::new(10, 77, 0, 6),
            ..claim
        };
        assert_ne!(one, members_signed_bytes(&node(1), 7, &m(2, moved)));
        assert_ne!(one, members_signed_bytes(&node(1), 8, &m(2, claim)));
        assert_ne!(one, members_signed_bytes(&node(1), 7, &m(3, claim)));
    }
}
