//! The overlay map: every hub's links and attached node count, for the
//! dashboard and `reach status` (see [`reach_proto::overlay`]).
//!
//! Each hub measures the round trip of its hub links (a `Ping` per link
//! every gossip tick, smoothed like TCP's SRTT), and at the tick floods a
//! signed card of its links when they changed: a link came or went, the
//! node count changed, or a round trip moved by a quarter
//! ([`rtt_moved`]). Every hub keeps the newest card of each origin and
//! passes its cards to hubs that link later. A card goes when its origin
//! has had no route for the directory grace time, as directories do.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use reach_proto::link::Control;
use reach_proto::overlay::{card_signed_bytes, rtt_moved, LinkCard, MAX_CARD_LINKS};
use reach_proto::routes::MAX_ROUTES;
use reach_proto::{NodeId, SecretKey, Signature};

/// A hub's card of the overlay map, as a snapshot reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubCard {
    /// The hub.
    pub hub: NodeId,
    /// Nodes attached to it.
    pub nodes: u32,
    /// Its links, by neighbour id.
    pub links: Vec<LinkCard>,
    /// Links it has beyond those listed.
    pub unlisted: u32,
    /// Whether this hub routes to it now (a card outlives its route for
    /// the directory grace time).
    pub reachable: bool,
}

/// A card another hub signed.
struct RemoteCard {
    state: u64,
    nodes: u32,
    unlisted: u32,
    links: Vec<LinkCard>,
    /// The message as received, passed on to hubs that link later.
    msg: Vec<u8>,
    unroutable_since: Option<Instant>,
}

/// Round trip of one hub link.
#[derive(Default)]
struct Rtt {
    /// Smoothed, in microseconds (0: none yet).
    srtt_us: u32,
    /// The ping in flight: its nonce and when it went.
    pending: Option<(u64, Instant)>,
}

/// Why a card was not taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its origin did not sign it.
    Forged,
    /// More links than a card may list.
    TooLarge(usize),
    /// Cards of [`MAX_ROUTES`] hubs are held already.
    Full,
}

/// Every hub's card, and this hub's link round trips.
pub(crate) struct OverlayMap {
    own_state: u64,
    /// What the last own card flooded said: (nodes, links).
    flooded: Option<(u32, Vec<LinkCard>)>,
    own_msg: Option<Vec<u8>>,
    rtt: HashMap<NodeId, Rtt>,
    next_nonce: u64,
    remote: BTreeMap<NodeId, RemoteCard>,
}

impl OverlayMap {
    /// An empty map whose own cards start at state `epoch` (so a restarted
    /// hub's cards replace its old ones).
    pub(crate) fn new(epoch: u64) -> Self {
        Self {
            own_state: epoch.max(1),
            flooded: None,
            own_msg: None,
            rtt: HashMap::new(),
            next_nonce: 1,
            remote: BTreeMap::new(),
        }
    }

    /// A ping to `hub` goes now: its nonce. A ping still unanswered is
    /// given up (the next one measures the link).
    pub(crate) fn ping(&mut self, hub: NodeId, now: Instant) -> u64 {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.rtt.entry(hub).or_default().pending = Some((nonce, now));
        nonce
    }

    /// `hub` answered ping `nonce`: its round trip is updated (7/8 old,
    /// 1/8 new, as RFC 6298 smooths). False for a nonce not in flight.
    pub(crate) fn pong(&mut self, hub: NodeId, nonce: u64, now: Instant) -> bool {
        let Some(r) = self.rtt.get_mut(&hub) else {
            return false;
        };
        let Some((sent_nonce, sent)) = r.pending else {
            return false;
        };
        if sent_nonce != nonce {
            return false;
        }
        r.pending = None;
        let sample = u32::try_from(now.saturating_duration_since(sent).as_micros())
            .unwrap_or(u32::MAX)
            .max(1);
        r.srtt_us = if r.srtt_us == 0 {
            sample
        } else {
            ((u64::from(r.srtt_us) * 7 + u64::from(sample)) / 8) as u32
        };
        true
    }

    /// The link to `hub` is gone.
    pub(crate) fn link_gone(&mut self, hub: &NodeId) {
        self.rtt.remove(hub);
    }

    /// The smoothed round trip of the link to `hub`, if measured.
    pub(crate) fn rtt(&self, hub: &NodeId) -> Option<Duration> {
        let us = self.rtt.get(hub)?.srtt_us;
        (us > 0).then(|| Duration::from_micros(u64::from(us)))
    }

    /// This hub's card now, from its links as (neighbour, dialled).
    pub(crate) fn own_card(&self, links: &[(NodeId, bool)]) -> (Vec<LinkCard>, u32) {
        let mut cards: Vec<LinkCard> = links
            .iter()
            .map(|(hub, dialled)| LinkCard {
                hub: *hub,
                dialled: *dialled,
                rtt_us: self.rtt.get(hub).map_or(0, |r| r.srtt_us),
            })
            .collect();
        cards.sort();
        let unlisted = cards.len().saturating_sub(MAX_CARD_LINKS);
        cards.truncate(MAX_CARD_LINKS);
        (cards, u32::try_from(unlisted).unwrap_or(u32::MAX))
    }

    /// The own card as a signed message if it changed enough since the
    /// last one flooded (see the module docs); None otherwise.
    pub(crate) fn take_change(
        &mut self,
        key: &SecretKey,
        links: &[(NodeId, bool)],
        nodes: usize,
    ) -> Option<Vec<u8>> {
        let nodes = u32::try_from(nodes).unwrap_or(u32::MAX);
        let (cards, unlisted) = self.own_card(links);
        let changed = match &self.flooded {
            None => true,
            Some((n, old)) => {
                *n != nodes
                    || old.len() != cards.len()
                    || old.iter().zip(&cards).any(|(a, b)| {
                        a.hub != b.hub || a.dialled != b.dialled || rtt_moved(a.rtt_us, b.rtt_us)
                    })
            }
        };
        if !changed {
            return None;
        }
        self.own_state += 1;
        let me = key.node_id();
        let sig = key.sign(&card_signed_bytes(
            &me,
            self.own_state,
            nodes,
            unlisted,
            &cards,
        ));
        let msg = crate::control(&Control::HubLinks {
            origin: me,
            state: self.own_state,
            nodes,
            unlisted,
            links: cards.clone(),
            sig,
        });
        self.flooded = Some((nodes, cards));
        self.own_msg = Some(msg.clone());
        Some(msg)
    }

    /// Every card this hub knows, for a hub that just linked.
    pub(crate) fn sync(&self) -> Vec<Vec<u8>> {
        let own = self.own_msg.iter().cloned();
        own.chain(self.remote.values().map(|r| r.msg.clone()))
            .collect()
    }

    /// `origin`'s card at `state`: taken if newer than the one held, and
    /// then returned (encoded) for flooding on; `Ok(None)` if not newer.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn receive(
        &mut self,
        me: NodeId,
        origin: NodeId,
        state: u64,
        nodes: u32,
        unlisted: u32,
        links: Vec<LinkCard>,
        sig: Signature,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let held = self.remote.get(&origin);
        if origin == me || held.is_some_and(|r| r.state >= state) {
            return Ok(None);
        }
        if links.len() > MAX_CARD_LINKS {
            return Err(Refusal::TooLarge(links.len()));
        }
        if held.is_none() && self.remote.len() >= MAX_ROUTES {
            return Err(Refusal::Full);
        }
        if !origin.verify(
            &card_signed_bytes(&origin, state, nodes, unlisted, &links),
            &sig,
        ) {
            return Err(Refusal::Forged);
        }
        let msg = crate::control(&Control::HubLinks {
            origin,
            state,
            nodes,
            unlisted,
            links: links.clone(),
            sig,
        });
        self.remote.insert(
            origin,
            RemoteCard {
                state,
                nodes,
                unlisted,
                links,
                msg: msg.clone(),
                unroutable_since: None,
            },
        );
        Ok(Some(msg))
    }

    /// Drops the cards of hubs that have had no route for `grace`.
    pub(crate) fn forget_unroutable(
        &mut self,
        now: Instant,
        grace: Duration,
        routed: impl Fn(&NodeId) -> bool,
    ) {
        self.remote.retain(|origin, r| {
            if routed(origin) {
                r.unroutable_since = None;
                return true;
            }
            let since = *r.unroutable_since.get_or_insert(now);
            now.saturating_duration_since(since) < grace
        });
    }

    /// Other hubs' cards; `routed` tells which are reachable now.
    pub(crate) fn cards(&self, routed: impl Fn(&NodeId) -> bool) -> Vec<HubCard> {
        self.remote
            .iter()
            .map(|(hub, r)| HubCard {
                hub: *hub,
                nodes: r.nodes,
                links: r.links.clone(),
                unlisted: r.unlisted,
                reachable: routed(hub),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed([seed; 32])
    }

    fn decode(msg: &[u8]) -> (NodeId, u64, u32, u32, Vec<LinkCard>, Signature) {
        match reach_proto::link::decode_frame(msg).unwrap().unwrap().0 {
            reach_proto::link::Frame::Control(Control::HubLinks {
                origin,
                state,
                nodes,
                unlisted,
                links,
                sig,
            }) => (origin, state, nodes, unlisted, links, sig),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_card_floods_when_links_change_not_on_jitter_and_travels_whole() {
        let (a, b, c) = (key(1), key(2), key(3));
        let t0 = Instant::now();
        let mut ma = OverlayMap::new(10);
        let links = [(b.node_id(), true), (c.node_id(), false)];
        let first = ma.take_change(&a, &links, 2).expect("first card");
        assert_eq!(ma.take_change(&a, &links, 2), None, "nothing changed");
        // The first round trips are news; jitter afterwards is not.
        let n = ma.ping(b.node_id(), t0);
        assert!(!ma.pong(b.node_id(), n + 1, t0), "a nonce not in flight");
        assert!(ma.pong(b.node_id(), n, t0 + Duration::from_millis(4)));
        assert!(!ma.pong(b.node_id(), n, t0), "answered once");
        assert_eq!(ma.rtt(&b.node_id()), Some(Duration::from_millis(4)));
        let measured = ma.take_change(&a, &links, 2).expect("rtt measured");
        let n = ma.ping(b.node_id(), t0);
        assert!(ma.pong(b.node_id(), n, t0 + Duration::from_micros(4_400)));
        assert_eq!(ma.take_change(&a, &links, 2), None, "50 us of jitter");
        // A node attaches; a link goes.
        assert!(ma.take_change(&a, &links, 3).is_some());
        ma.link_gone(&c.node_id());
        let last = ma.take_change(&a, &links[..1], 3).expect("link gone");

        let mut mb = OverlayMap::new(10);
        for msg in [&first, &measured, &last] {
            let (o, s, n, u, l, sig) = decode(msg);
            assert!(mb
                .receive(b.node_id(), o, s, n, u, l, sig)
                .unwrap()
                .is_some());
        }
        // An older card after a newer one is not news.
        let (o, s, n, u, l, sig) = decode(&first);
        assert_eq!(mb.receive(b.node_id(), o, s, n, u, l, sig), Ok(None));
        let cards = mb.cards(|_| true);
        assert_eq!(cards.len(), 1);
        assert_eq!(cards[0].hub, a.node_id());
        assert_eq!(cards[0].nodes, 3);
        assert_eq!(cards[0].links.len(), 1);
        assert_eq!(cards[0].links[0].hub, b.node_id());
        assert!(cards[0].links[0].dialled);
        assert_eq!(cards[0].links[0].rtt_us, 4_050);
        assert_eq!(mb.sync().len(), 1, "passed on to hubs that link later");
    }

    #[test]
    fn a_forged_or_oversized_card_is_refused() {
        let (a, b) = (key(1), key(2));
        let mut ma = OverlayMap::new(1);
        let msg = ma.take_change(&a, &[(key(3).node_id(), true)], 1).unwrap();
        let (o, s, n, u, mut l, sig) = decode(&msg);
        let mut mb = OverlayMap::new(1);
        assert_eq!(
            mb.receive(b.node_id(), o, s, n + 1, u, l.clone(), sig),
            Err(Refusal::Forged)
        );
        l[0].dialled = false;
        assert_eq!(
            mb.receive(b.node_id(), o, s, n, u, l.clone(), sig),
            Err(Refusal::Forged)
        );
        assert_eq!(
            mb.receive(b.node_id(), o, s, n, u, vec![l[0]; MAX_CARD_LINKS + 1], sig),
            Err(Refusal::TooLarge(MAX_CARD_LINKS + 1))
        );
        assert!(mb.cards(|_| true).is_empty());
    }

    #[test]
    fn a_card_goes_once_its_hub_is_unroutable_for_the_grace_time() {
        let (a, b) = (key(1), key(2));
        let mut ma = OverlayMap::new(1);
        let (o, s, n, u, l, sig) = decode(&ma.take_change(&a, &[], 0).unwrap());
        let mut mb = OverlayMap::new(1);
        mb.receive(b.node_id(), o, s, n, u, l, sig).unwrap();
        let t0 = Instant::now();
        let grace = Duration::from_secs(30);
        mb.forget_unroutable(t0, grace, |_| false);
        assert!(!mb.cards(|_| false)[0].reachable, "kept, shown unreachable");
        mb.forget_unroutable(t0 + Duration::from_secs(29), grace, |_| false);
        assert_eq!(mb.cards(|_| false).len(), 1);
        mb.forget_unroutable(t0 + grace, grace, |_| false);
        assert!(mb.cards(|_| false).is_empty());
    }

    #[test]
    fn a_card_lists_at_most_its_bound_of_links_and_counts_the_rest() {
        let a = key(1);
        let links: Vec<(NodeId, bool)> = (0..MAX_CARD_LINKS + 3)
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
                seed[31] = 9;
                (SecretKey::from_seed(seed).node_id(), true)
            })
            .collect();
        let mut ma = OverlayMap::new(1);
        let (_, _, _, unlisted, l, _) = decode(&ma.take_change(&a, &links, 0).unwrap());
        assert_eq!((l.len(), unlisted), (MAX_CARD_LINKS, 3));
    }
}
