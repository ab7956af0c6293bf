//! The vpn member directory: which node holds which virtual address, for
//! every hub of the federation.
//!
//! Each hub lists the vpn members attached to it (their registrations'
//! [`VpnClaim`]s), signs the list with a state number and floods it; every
//! hub keeps the newest list of each origin and indexes all of them by
//! (network, address), so a node's `VipLookup` is answered by its own hub
//! without a round trip. A list replaces its origin's older one whole, so
//! a member that leaves or moves disappears with the next list; a hub
//! whose directory is forgotten (no route to it) loses its list too.
//!
//! The IPv6 ULA of a member is derived from its NodeId
//! ([`reach_proto::vpn::ula`]), so the index answers for it without the
//! list carrying it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use reach_proto::link::{Control, MAX_VIP_HOLDERS};
use reach_proto::vpn::{members_signed_bytes, ula, NetworkTag, VpnClaim, VpnMember, MEMBERS_PART};
use reach_proto::{NodeId, SecretKey, Signature};

/// A member list another hub signed.
struct RemoteList {
    state: u64,
    members: Vec<VpnMember>,
    /// The message as received, passed on to hubs that link later.
    msg: Vec<u8>,
}

/// Why a member list was not taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its origin did not sign it: the sender is lying or broken.
    Forged,
    /// More members than one list may hold.
    TooLarge(usize),
}

/// Every hub's vpn members, indexed by address.
pub(crate) struct VpnDirectory {
    /// This hub's members, in the order they joined.
    own: BTreeMap<NodeId, (u64, VpnClaim)>,
    next_join: u64,
    own_state: u64,
    /// The state of the last own list flooded.
    flooded_state: u64,
    /// The own list's message, made once per state.
    own_msg: Option<(u64, Vec<u8>)>,
    /// Other hubs' lists, in a fixed order: a hub that links passes them
    /// on in it (the simulator's runs must repeat exactly).
    remote: BTreeMap<NodeId, RemoteList>,
    /// (network, address) to (holder, origin), earliest listed first.
    index: HashMap<(NetworkTag, IpAddr), Vec<(NodeId, NodeId)>, ahash::RandomState>,
    /// Own members beyond [`MEMBERS_PART`], left out of the list (logged).
    pub unlisted: u64,
}

fn keys(m: &VpnMember) -> [(NetworkTag, IpAddr); 2] {
    let net = m.claim.network;
    [
        (net, IpAddr::V4(m.claim.ip)),
        (net, IpAddr::V6(ula(&net, &m.node))),
    ]
}

impl VpnDirectory {
    /// An empty directory whose own lists start at state `epoch` (the
    /// hub's start time, so a restarted hub's lists replace its old ones).
    pub(crate) fn new(epoch: u64) -> Self {
        Self {
            own: BTreeMap::new(),
            next_join: 0,
            own_state: epoch.max(1),
            flooded_state: 0,
            own_msg: None,
            remote: BTreeMap::new(),
            index: HashMap::default(),
            unlisted: 0,
        }
    }

    fn add(&mut self, origin: NodeId, m: &VpnMember) {
        for k in keys(m) {
            let holders = self.index.entry(k).or_default();
            if !holders.contains(&(m.node, origin)) {
                holders.push((m.node, origin));
            }
        }
    }

    fn remove(&mut self, origin: NodeId, m: &VpnMember) {
        for k in keys(m) {
            if let Some(holders) = self.index.get_mut(&k) {
                holders.retain(|h| *h != (m.node, origin));
                if holders.is_empty() {
                    self.index.remove(&k);
                }
            }
        }
    }

    /// `node`, attached here, holds `claim` (None: no vpn address), from
    /// its latest registration.
    pub(crate) fn set_own(&mut self, me: NodeId, node: NodeId, claim: Option<VpnClaim>) {
        let old = self.own.get(&node).map(|(_, c)| *c);
        if old == claim {
            return;
        }
        if let Some(c) = old {
            self.own.remove(&node);
            self.remove(me, &VpnMember { node, claim: c });
        }
        if let Some(c) = claim {
            self.next_join += 1;
            self.own.insert(node, (self.next_join, c));
            self.add(me, &VpnMember { node, claim: c });
        }
        self.own_state += 1;
    }

    /// This hub's list as a signed message (made once per state).
    fn own_message(&mut self, key: &SecretKey) -> Vec<u8> {
        if let Some((state, msg)) = &self.own_msg {
            if *state == self.own_state {
                return msg.clone();
            }
        }
        let mut joined: Vec<(u64, VpnMember)> = self
            .own
            .iter()
            .map(|(node, (at, claim))| {
                (
                    *at,
                    VpnMember {
                        node: *node,
                        claim: *claim,
                    },
                )
            })
            .collect();
        joined.sort_by_key(|(at, _)| *at);
        if joined.len() > MEMBERS_PART {
            let over = joined.len() - MEMBERS_PART;
            self.unlisted += over as u64;
            tracing::warn!(
                members = joined.len(),
                listed = MEMBERS_PART,
                "more vpn members attached than one member list holds: the latest {over} are not gossiped"
            );
            joined.truncate(MEMBERS_PART);
        }
        let members: Vec<VpnMember> = joined.into_iter().map(|(_, m)| m).collect();
        let sig = key.sign(&members_signed_bytes(
            &key.node_id(),
            self.own_state,
            &members,
        ));
        let msg = crate::control(&Control::VpnMembers {
            origin: key.node_id(),
            state: self.own_state,
            members,
            sig,
        });
        self.own_msg = Some((self.own_state, msg.clone()));
        msg
    }

    /// The own list, if it changed since it was last flooded.
    pub(crate) fn take_change(&mut self, key: &SecretKey) -> Option<Vec<u8>> {
        if self.flooded_state == self.own_state {
            return None;
        }
        self.flooded_state = self.own_state;
        Some(self.own_message(key))
    }

    /// Every list this hub knows, for a hub that just linked.
    pub(crate) fn sync(&mut self, key: &SecretKey) -> Vec<Vec<u8>> {
        let mut out = vec![self.own_message(key)];
        out.extend(self.remote.values().map(|r| r.msg.clone()));
        out
    }

    /// `origin`'s list at `state`: taken if newer than the one held, and
    /// then returned (encoded) for flooding on; `Ok(None)` if not newer.
    pub(crate) fn receive(
        &mut self,
        me: NodeId,
        origin: NodeId,
        state: u64,
        members: Vec<VpnMember>,
        sig: Signature,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        if origin == me || self.remote.get(&origin).is_some_and(|r| r.state >= state) {
            return Ok(None);
        }
        if members.len() > MEMBERS_PART {
            return Err(Refusal::TooLarge(members.len()));
        }
        if !origin.verify(&members_signed_bytes(&origin, state, &members), &sig) {
            return Err(Refusal::Forged);
        }
        self.forget(&origin);
        for m in &members {
            self.add(origin, m);
        }
        let msg = crate::control(&Control::VpnMembers {
            origin,
            state,
            members: members.clone(),
            sig,
        });
        self.remote.insert(
            origin,
            RemoteList {
                state,
                members,
                msg: msg.clone(),
            },
        );
        Ok(Some(msg))
    }

    /// Drops `origin`'s list (its directory was forgotten).
    pub(crate) fn forget(&mut self, origin: &NodeId) {
        if let Some(r) = self.remote.remove(origin) {
            for m in &r.members {
                self.remove(*origin, m);
            }
        }
    }

    /// The nodes holding `ip` in `network`, earliest listed first, each
    /// once, at most [`MAX_VIP_HOLDERS`].
    pub(crate) fn holders(&self, network: NetworkTag, ip: IpAddr) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = Vec::new();
        for (node, _) in self.index.get(&(network, ip)).into_iter().flatten() {
            if !out.contains(node) {
                out.push(*node);
            }
            if out.len() == MAX_VIP_HOLDERS {
                break;
            }
        }
        out
    }

    /// Members listed, own and remote (for the status report).
    pub(crate) fn len(&self) -> (usize, usize) {
        let remote = self.remote.values().map(|r| r.members.len()).sum();
        (self.own.len(), remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::vpn::NetworkTag;
    use std::net::Ipv4Addr;

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed([seed; 32])
    }

    fn claim(last: u8) -> VpnClaim {
        VpnClaim {
            network: NetworkTag::of("lab").unwrap(),
            ip: Ipv4Addr::new(10, 77, 0, last),
        }
    }

    fn decode(msg: &[u8]) -> (NodeId, u64, Vec<VpnMember>, Signature) {
        match reach_proto::link::decode_frame(msg).unwrap().unwrap().0 {
            reach_proto::link::Frame::Control(Control::VpnMembers {
                origin,
                state,
                members,
                sig,
            }) => (origin, state, members, sig),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_members_list_travels_and_answers_for_both_addresses() {
        let (a, b) = (key(1), key(2));
        let member = key(3).node_id();
        let mut da = VpnDirectory::new(5);
        let mut db = VpnDirectory::new(5);
        da.set_own(a.node_id(), member, Some(claim(9)));
        let msg = da.take_change(&a).unwrap();
        assert_eq!(da.take_change(&a), None, "flooded once per change");
        let (origin, state, members, sig) = decode(&msg);
        let flood = db.receive(b.node_id(), origin, state, members.clone(), sig);
        assert!(matches!(flood, Ok(Some(_))));
        let net = claim(9).network;
        assert_eq!(
            db.holders(net, Ipv4Addr::new(10, 77, 0, 9).into()),
            [member]
        );
        assert_eq!(db.holders(net, ula(&net, &member).into()), [member]);
        assert!(db
            .holders(net, Ipv4Addr::new(10, 77, 0, 8).into())
            .is_empty());
        let other = NetworkTag::of("other").unwrap();
        assert!(db
            .holders(other, Ipv4Addr::new(10, 77, 0, 9).into())
            .is_empty());
        // The same state again is not news.
        assert_eq!(
            db.receive(b.node_id(), origin, state, members, sig),
            Ok(None)
        );
        // The member leaves: the next list removes it.
        da.set_own(a.node_id(), member, None);
        let (origin, state, members, sig) = decode(&da.take_change(&a).unwrap());
        assert!(matches!(
            db.receive(b.node_id(), origin, state, members, sig),
            Ok(Some(_))
        ));
        assert!(db
            .holders(net, Ipv4Addr::new(10, 77, 0, 9).into())
            .is_empty());
    }

    #[test]
    fn a_list_its_origin_did_not_sign_is_refused() {
        let (a, b) = (key(1), key(2));
        let mut da = VpnDirectory::new(1);
        da.set_own(a.node_id(), key(3).node_id(), Some(claim(9)));
        let (origin, state, mut members, sig) = decode(&da.take_change(&a).unwrap());
        members[0].claim.ip = Ipv4Addr::new(10, 77, 0, 10);
        let mut db = VpnDirectory::new(1);
        assert_eq!(
            db.receive(b.node_id(), origin, state, members, sig),
            Err(Refusal::Forged)
        );
        assert_eq!(db.len(), (0, 0));
    }

    #[test]
    fn two_holders_of_one_address_are_both_named_first_come_first() {
        let a = key(1);
        let mut d = VpnDirectory::new(1);
        let (first, second) = (key(3).node_id(), key(4).node_id());
        d.set_own(a.node_id(), first, Some(claim(9)));
        d.set_own(a.node_id(), second, Some(claim(9)));
        let ip = Ipv4Addr::new(10, 77, 0, 9).into();
        assert_eq!(d.holders(claim(9).network, ip), [first, second]);
        // A remote hub lists the first one too (it moved): named once.
        let b = key(2);
        let mut db = VpnDirectory::new(1);
        db.set_own(b.node_id(), first, Some(claim(9)));
        let (origin, state, members, sig) = decode(&db.take_change(&b).unwrap());
        d.receive(a.node_id(), origin, state, members, sig).unwrap();
        assert_eq!(d.holders(claim(9).network, ip), [first, second]);
        d.forget(&b.node_id());
        d.set_own(a.node_id(), first, None);
        assert_eq!(d.holders(claim(9).network, ip), [second]);
    }

    #[test]
    fn an_oversized_list_is_refused_before_its_signature_is_checked() {
        let b = key(2);
        let m = VpnMember {
            node: key(3).node_id(),
            claim: claim(1),
        };
        let mut d = VpnDirectory::new(1);
        let sig = b.sign(b"anything");
        assert_eq!(
            d.receive(
                key(9).node_id(),
                b.node_id(),
                1,
                vec![m; MEMBERS_PART + 1],
                sig
            ),
            Err(Refusal::TooLarge(MEMBERS_PART + 1))
        );
    }
}
