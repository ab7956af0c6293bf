//! The hubs' routing table (SmartSockets section 3.3): hubs gossip versioned
//! state and compute shortest-path routes to every other hub.
//!
//! Each hub has a *state number* that it increments whenever its own
//! information changes, and at least every gossip interval so that routes
//! through vanished paths age out. Hubs send each neighbour a list of
//! [`Advert`]s: (origin, state, hops). A receiver keeps, per origin, the route
//! with the newest state and, among equal states, the fewest hops: the
//! destination-sequenced distance vector rule (DSDV), which keeps routes free of
//! loops without a global view. Two more rules bound the damage of stale
//! information: split horizon (a route is not advertised back to the neighbour
//! it came from) and a hop limit. Routes whose origin has not been heard from
//! within the expiry time are dropped.
//!
//! State numbers and hop counts are proved by each origin's hash chain
//! ([`crate::route_chain`]): a linked hub cannot advertise a state its
//! origin has not, nor fewer hops than it heard (but for one, see there).
//! Anchors (each chain's signed top) travel ahead of the adverts that need
//! them.
//!
//! Driver loop: feed link changes with [`RouteTable::handle_link_up`] and
//! [`RouteTable::handle_link_down`], received anchors with
//! [`RouteTable::handle_anchor`] and adverts with
//! [`RouteTable::handle_adverts`]; every gossip interval call
//! [`RouteTable::bump`] and [`RouteTable::handle_timeout`], then send each
//! neighbour [`RouteTable::take_own_anchor`] (if any) and
//! [`RouteTable::adverts_for`] it; a new neighbour gets
//! [`RouteTable::anchors`] first; ask for [`RouteTable::take_wanted`]
//! anchors. Time is an input.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::identity::{NodeId, SecretKey};
use crate::route_chain::{Anchor, Chain, Check, Proof, Verifier};

/// Routes longer than this are not kept (they would only be stale ones
/// counting to infinity).
pub const MAX_HOPS: u8 = 16;
/// Destinations a table holds at most: anchors (and so adverts) for further
/// new origins are ignored (and counted), so a neighbour inventing hubs
/// cannot grow it without end. Far above any federation (the simulator runs
/// 1000 hubs).
pub const MAX_ROUTES: usize = 1 << 16;

/// Missing anchors asked for per tick at most: a neighbour advertising
/// made-up hubs makes this hub ask, not remember without bound.
const MAX_WANTED: usize = 1024;

/// Notes that `origin`'s anchor is missing and `from` has it, within the
/// bound.
fn want(wanted: &mut BTreeMap<NodeId, NodeId>, origin: NodeId, from: NodeId) {
    if wanted.len() < MAX_WANTED {
        wanted.insert(origin, from);
    }
}

/// One hub's reachability as a neighbour reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Advert {
    /// The hub the advert is about (decoded without the point check: see
    /// [`crate::identity::relayed_id`]).
    #[serde(with = "crate::identity::relayed_id")]
    pub origin: NodeId,
    /// The origin's state number when it sent the information.
    pub state: u64,
    /// Hops from the sender to the origin (0: the sender is the origin).
    pub hops: u8,
    /// The origin's chain element for (state, hops): see
    /// [`crate::route_chain`].
    pub proof: Proof,
}

/// A route to a hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The neighbour to send through.
    pub next_hop: NodeId,
    /// Hops to the destination.
    pub hops: u8,
    /// The destination's state number this route was learned with.
    pub state: u64,
    /// The chain element proving (state, hops), passed on in adverts.
    pub proof: Proof,
    /// When it was last confirmed.
    pub refreshed: Instant,
}

/// What became of an anchor a neighbour sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnchorNews {
    /// A new incarnation of its origin: pass it on to the other neighbours.
    New,
    /// Known already (or older, or this hub's own).
    Known,
    /// Not signed by its origin: the sender forged or broke it.
    Forged,
    /// The table is full of routed origins.
    Full,
}

/// A hub's view of every other hub.
#[derive(Debug)]
pub struct RouteTable {
    me: NodeId,
    key: SecretKey,
    chain: Chain,
    /// This hub's anchor changed and its neighbours have not had it.
    anchor_news: bool,
    state: u64,
    expiry: Duration,
    neighbours: BTreeSet<NodeId>,
    routes: BTreeMap<NodeId, Route>,
    /// Other hubs' anchors: what their adverts are checked against.
    verifiers: BTreeMap<NodeId, Verifier>,
    /// Origins whose adverts could not be checked for want of their
    /// anchor, and the neighbour to ask for it.
    wanted: BTreeMap<NodeId, NodeId>,
    max_routes: usize,
    /// Destinations whose path changed since the last triggered update.
    changed: BTreeSet<NodeId>,
    /// Adverts and anchors for new origins ignored because the table was full.
    pub refused_full: u64,
    /// Adverts and anchors that failed their check: forgeries.
    pub forged: u64,
}

impl RouteTable {
    /// An empty table for hub `key`; routes not refreshed within `expiry`
    /// go. State numbers start at `state`: a restarted hub must start above
    /// every state its earlier run advertised, or other hubs keep
    /// preferring the dead run's routes (newer state wins) until they
    /// expire, so drivers pass the wall-clock time in microseconds.
    pub fn new(key: &SecretKey, expiry: Duration, state: u64) -> Self {
        let state = state.max(1);
        Self {
            me: key.node_id(),
            key: key.clone(),
            chain: Chain::new(key, state),
            anchor_news: true,
            state,
            expiry,
            neighbours: BTreeSet::new(),
            routes: BTreeMap::new(),
            verifiers: BTreeMap::new(),
            wanted: BTreeMap::new(),
            max_routes: MAX_ROUTES,
            changed: BTreeSet::new(),
            refused_full: 0,
            forged: 0,
        }
    }

    /// This hub's current state number.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// Marks this hub's own information as changed (and refreshes it). Past
    /// the end of its chain, the hub signs a new one.
    pub fn bump(&mut self) {
        self.state += 1;
        if self.chain.proof(self.state).is_none() {
            self.chain = Chain::new(&self.key, self.state);
            self.anchor_news = true;
        }
    }

    /// This hub's anchor, once after each new chain (and at the start):
    /// send it to every neighbour before the adverts that need it.
    pub fn take_own_anchor(&mut self) -> Option<Anchor> {
        std::mem::take(&mut self.anchor_news).then(|| self.chain.anchor().clone())
    }

    /// Every anchor this hub checks against, its own first: what a newly
    /// linked neighbour needs before adverts.
    pub fn anchors(&self) -> impl Iterator<Item = &Anchor> {
        std::iter::once(self.chain.anchor()).chain(self.verifiers.values().map(|v| v.anchor()))
    }

    /// The anchor of `origin`, if this hub has it (to answer a request).
    pub fn anchor_of(&self, origin: &NodeId) -> Option<&Anchor> {
        if *origin == self.me {
            return Some(self.chain.anchor());
        }
        self.verifiers.get(origin).map(|v| v.anchor())
    }

    /// Takes in an anchor a neighbour sent.
    pub fn handle_anchor(&mut self, anchor: Anchor) -> AnchorNews {
        if anchor.origin == self.me
            || self
                .verifiers
                .get(&anchor.origin)
                .is_some_and(|v| v.anchor().base >= anchor.base)
        {
            return AnchorNews::Known;
        }
        if !self.verifiers.contains_key(&anchor.origin)
            && self.verifiers.len() >= self.max_routes
            && !self.evict_unrouted()
        {
            self.refused_full += 1;
            return AnchorNews::Full;
        }
        let origin = anchor.origin;
        match Verifier::new(anchor) {
            Some(v) => {
                self.verifiers.insert(origin, v);
                self.wanted.remove(&origin);
                AnchorNews::New
            }
            None => {
                self.forged += 1;
                AnchorNews::Forged
            }
        }
    }

    /// Makes room for an anchor by forgetting one of a hub no route leads
    /// to (should it come back, its anchor is asked for again).
    fn evict_unrouted(&mut self) -> bool {
        let victim = self
            .verifiers
            .keys()
            .find(|o| !self.routes.contains_key(*o))
            .copied();
        victim.is_some_and(|o| self.verifiers.remove(&o).is_some())
    }

    /// Origins whose anchors are missing, each with the neighbour whose
    /// adverts needed it: ask them (they checked those adverts, so they
    /// have it).
    pub fn take_wanted(&mut self) -> Vec<(NodeId, NodeId)> {
        std::mem::take(&mut self.wanted).into_iter().collect()
    }

    /// A direct link to `peer` is up; routes follow once it advertises.
    pub fn handle_link_up(&mut self, peer: NodeId) {
        if peer != self.me {
            self.neighbours.insert(peer);
        }
    }

    /// The link to `peer` is gone: so is every route through it.
    pub fn handle_link_down(&mut self, peer: NodeId) {
        self.neighbours.remove(&peer);
        self.routes.retain(|_, r| r.next_hop != peer);
        self.bump();
    }

    /// Takes in what neighbour `from` advertised. Returns whether any path
    /// changed (a new destination, another next hop or hop count): news to
    /// pass on at once. A newer state on the same path only refreshes the
    /// route. Adverts from a hub that is not a neighbour are ignored; an
    /// advert that would change or refresh a route is checked against its
    /// origin's chain first ([`RouteTable::forged`] counts failures; the
    /// driver cuts a link that sends one).
    pub fn handle_adverts(&mut self, now: Instant, from: NodeId, adverts: &[Advert]) -> bool {
        if !self.neighbours.contains(&from) {
            return false;
        }
        let mut changed = false;
        for a in adverts.iter().filter(|a| a.origin != self.me) {
            let Some(hops) = a.hops.checked_add(1).filter(|h| *h <= MAX_HOPS) else {
                continue;
            };
            let current = self.routes.get(&a.origin);
            let better = match current {
                None => true,
                Some(r) => {
                    a.state > r.state
                        || (a.state == r.state && hops < r.hops)
                        // The current next hop's word is news even when the path
                        // grew: it is the path we use.
                        || (r.next_hop == from && a.state == r.state && hops != r.hops)
                }
            };
            // The same path and state again: the proof this route holds.
            let refresh = current
                .filter(|r| r.next_hop == from && r.state == a.state && r.hops == hops)
                .map(|r| r.proof);
            if !better && refresh.is_none() {
                // Changes nothing: not worth a hash.
                continue;
            }
            let Some(v) = self.verifiers.get_mut(&a.origin) else {
                want(&mut self.wanted, a.origin, from);
                continue;
            };
            if let Some(held) = refresh {
                // One hash: the route's proof is this advert's, one hop on.
                if v.next_hop(a.state, a.hops, &a.proof) == held {
                    if let Some(r) = self.routes.get_mut(&a.origin) {
                        r.refreshed = now;
                    }
                } else {
                    self.forged += 1;
                }
                continue;
            }
            match v.check(a.state, a.hops, &a.proof) {
                Check::Valid => {}
                Check::Stale => continue,
                Check::Unknown => {
                    want(&mut self.wanted, a.origin, from);
                    continue;
                }
                Check::Forged => {
                    self.forged += 1;
                    continue;
                }
            }
            let proof = v.next_hop(a.state, a.hops, &a.proof);
            let old = self.routes.insert(
                a.origin,
                Route {
                    next_hop: from,
                    hops,
                    state: a.state,
                    proof,
                    refreshed: now,
                },
            );
            // A newer state on the same path is a refresh: the periodic
            // gossip carries it. Only a new path is news worth a triggered
            // update (DSDV's rule; otherwise every hub's periodic bump would
            // set off a federation-wide cascade).
            if old.is_none_or(|r| r.next_hop != from || r.hops != hops) {
                self.changed.insert(a.origin);
                changed = true;
            }
        }
        changed
    }

    /// Drops routes not refreshed within the expiry time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expiry = self.expiry;
        self.routes
            .retain(|_, r| now.saturating_duration_since(r.refreshed) < expiry);
    }

    /// What to tell `neighbour`: this hub itself, and every route not learned
    /// from that neighbour (split horizon).
    pub fn adverts_for(&self, neighbour: NodeId) -> Vec<Advert> {
        let mut out = vec![Advert {
            origin: self.me,
            state: self.state,
            hops: 0,
            proof: self.chain.proof(self.state).unwrap_or_default(),
        }];
        out.extend(
            self.routes
                .iter()
                .filter(|(dest, r)| r.next_hop != neighbour && **dest != neighbour)
                .map(|(dest, r)| Advert {
                    origin: *dest,
                    state: r.state,
                    hops: r.hops,
                    proof: r.proof,
                }),
        );
        out
    }

    /// A triggered update for `neighbour`: only the routes whose path
    /// changed since [`RouteTable::clear_changes`] (DSDV's incremental
    /// dump), with split horizon. Sending the whole table on every change
    /// would cost a full table per neighbour per change: at a thousand hubs
    /// that is most of the gossip. The periodic [`RouteTable::adverts_for`]
    /// still sends everything.
    pub fn changed_adverts_for(&self, neighbour: NodeId) -> Vec<Advert> {
        self.changed
            .iter()
            .filter_map(|dest| self.routes.get(dest).map(|r| (dest, r)))
            .filter(|(dest, r)| r.next_hop != neighbour && **dest != neighbour)
            .map(|(dest, r)| Advert {
                origin: *dest,
                state: r.state,
                hops: r.hops,
                proof: r.proof,
            })
            .collect()
    }

    /// Marks the changes as sent to every neighbour.
    pub fn clear_changes(&mut self) {
        self.changed.clear();
    }

    /// The neighbour to forward through to reach hub `dest`.
    pub fn next_hop(&self, dest: &NodeId) -> Option<NodeId> {
        self.routes.get(dest).map(|r| r.next_hop)
    }

    /// The route to `dest`.
    pub fn route(&self, dest: &NodeId) -> Option<&Route> {
        self.routes.get(dest)
    }

    /// How many hubs this table routes to.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether it routes to no hub.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Every known route.
    pub fn routes(&self) -> impl Iterator<Item = (&NodeId, &Route)> {
        self.routes.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use crate::route_chain::{Chain, Check, Verifier};
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn key(i: usize) -> SecretKey {
        SecretKey::from_seed([i as u8 + 1; 32])
    }

    fn id(i: usize) -> NodeId {
        key(i).node_id()
    }

    fn table(i: usize) -> RouteTable {
        RouteTable::new(&key(i), Duration::from_secs(5), 1)
    }

    /// Hubs on a graph, gossiping in rounds of virtual time.
    struct Sim {
        tables: Vec<RouteTable>,
        links: BTreeSet<(usize, usize)>,
        now: Instant,
    }

    impl Sim {
        fn new(n: usize, edges: &[(usize, usize)]) -> Self {
            let mut sim = Sim {
                tables: (0..n).map(table).collect(),
                links: BTreeSet::new(),
                now: Instant::now(),
            };
            // Anchors flood ahead of adverts (the hub core's job).
            let anchors: Vec<Anchor> = sim
                .tables
                .iter_mut()
                .filter_map(|t| t.take_own_anchor())
                .collect();
            for t in &mut sim.tables {
                for a in &anchors {
                    t.handle_anchor(a.clone());
                }
            }
            for &(a, b) in edges {
                sim.connect(a, b);
            }
            sim
        }

        fn connect(&mut self, a: usize, b: usize) {
            self.links.insert((a.min(b), a.max(b)));
            self.tables[a].handle_link_up(id(b));
            self.tables[b].handle_link_up(id(a));
        }

        fn cut(&mut self, a: usize, b: usize) {
            self.links.remove(&(a.min(b), a.max(b)));
            self.tables[a].handle_link_down(id(b));
            self.tables[b].handle_link_down(id(a));
        }

        /// One gossip interval: every hub refreshes, ages routes, and sends
        /// every neighbour its adverts.
        fn round(&mut self) {
            self.now += Duration::from_secs(1);
            let mut mail = Vec::new();
            for (i, t) in self.tables.iter_mut().enumerate() {
                t.bump();
                t.handle_timeout(self.now);
                for &(a, b) in &self.links {
                    let peer = if a == i {
                        b
                    } else if b == i {
                        a
                    } else {
                        continue;
                    };
                    mail.push((peer, id(i), t.adverts_for(id(peer))));
                }
            }
            for (to, from, adverts) in mail {
                self.tables[to].handle_adverts(self.now, from, &adverts);
            }
        }

        /// Hop distances from `src` by breadth-first search.
        fn bfs(&self, src: usize) -> Vec<Option<u8>> {
            let n = self.tables.len();
            let mut dist = vec![None; n];
            dist[src] = Some(0u8);
            let mut queue = VecDeque::from([src]);
            while let Some(u) = queue.pop_front() {
                for &(a, b) in &self.links {
                    let v = if a == u {
                        b
                    } else if b == u {
                        a
                    } else {
                        continue;
                    };
                    if dist[v].is_none() {
                        dist[v] = dist[u].map(|d| d + 1);
                        queue.push_back(v);
                    }
                }
            }
            dist
        }

        /// Every hub routes to every reachable hub along a shortest path that
        /// actually arrives, and knows no route to unreachable ones.
        fn check_shortest_paths(&self) -> Result<(), String> {
            for (s, t) in self.tables.iter().enumerate() {
                let dist = self.bfs(s);
                for (d, want) in dist.iter().enumerate().filter(|(d, _)| *d != s) {
                    let route = t.route(&id(d));
                    match (want, route) {
                        (None, None) => {}
                        (Some(w), Some(r)) if r.hops == *w => {
                            // Follow next hops: must arrive within `w` steps.
                            let mut at = s;
                            for _ in 0..*w {
                                let next =
                                    self.tables[at].next_hop(&id(d)).ok_or("broken chain")?;
                                at = (0..self.tables.len())
                                    .find(|i| id(*i) == next)
                                    .ok_or("unknown hop")?;
                            }
                            if at != d {
                                return Err(format!("{s} -> {d}: chain ends at {at}"));
                            }
                        }
                        (w, r) => return Err(format!("{s} -> {d}: want {w:?} hops, have {r:?}")),
                    }
                }
            }
            Ok(())
        }
    }

    #[test]
    fn a_line_of_hubs_learns_every_distance() {
        let mut sim = Sim::new(5, &[(0, 1), (1, 2), (2, 3), (3, 4)]);
        for _ in 0..5 {
            sim.round();
        }
        sim.check_shortest_paths().expect("converged");
        assert_eq!(sim.tables[0].route(&id(4)).map(|r| r.hops), Some(4));
        assert_eq!(sim.tables[0].next_hop(&id(4)), Some(id(1)));
    }

    #[test]
    fn a_cut_ring_reroutes_the_other_way() {
        let ring: Vec<(usize, usize)> = (0..6).map(|i| (i, (i + 1) % 6)).collect();
        let mut sim = Sim::new(6, &ring);
        for _ in 0..6 {
            sim.round();
        }
        sim.check_shortest_paths().expect("ring converged");
        assert_eq!(sim.tables[0].next_hop(&id(1)), Some(id(1)));
        sim.cut(0, 1);
        for _ in 0..8 {
            sim.round();
        }
        sim.check_shortest_paths().expect("re-routed");
        assert_eq!(
            sim.tables[0].route(&id(1)).map(|r| (r.next_hop, r.hops)),
            Some((id(5), 5))
        );
    }

    #[test]
    fn a_vanished_hub_ages_out_of_every_table() {
        let mut sim = Sim::new(4, &[(0, 1), (1, 2), (2, 3)]);
        for _ in 0..4 {
            sim.round();
        }
        assert!(sim.tables[0].route(&id(3)).is_some());
        sim.cut(2, 3);
        for _ in 0..10 {
            sim.round();
        }
        assert!(sim.tables.iter().take(3).all(|t| t.route(&id(3)).is_none()));
        sim.check_shortest_paths()
            .expect("consistent after the partition");
    }

    /// A table of hub 0 linked to hub 1, holding the anchors of hubs 2..n.
    fn linked_table(n: usize) -> (RouteTable, Vec<Chain>) {
        let mut t = table(0);
        t.handle_link_up(id(1));
        let chains: Vec<Chain> = (0..n).map(|i| Chain::new(&key(i), 1)).collect();
        for c in chains.iter().skip(2) {
            assert_eq!(t.handle_anchor(c.anchor().clone()), AnchorNews::New);
        }
        (t, chains)
    }

    /// What hub 1 would advertise for hub `origin` one hop away.
    fn one_hop(chains: &[Chain], origin: usize, state: u64) -> Advert {
        let v = Verifier::new(chains[origin].anchor().clone()).expect("signed");
        let head = chains[origin].proof(state).expect("in the chain");
        Advert {
            origin: id(origin),
            state,
            hops: 1,
            proof: v.next_hop(state, 0, &head),
        }
    }

    #[test]
    fn a_neighbour_inventing_hubs_cannot_grow_the_table_past_its_bound() {
        let (mut t, chains) = linked_table(6);
        t.max_routes = 4;
        let now = Instant::now();
        let adverts: Vec<Advert> = (2..6).map(|o| one_hop(&chains, o, 1)).collect();
        assert!(t.handle_adverts(now, id(1), &adverts));
        assert_eq!(t.len(), 4);
        // A fifth hub's anchor finds the table full of routed hubs.
        let fifth = Chain::new(&key(6), 1);
        assert_eq!(t.handle_anchor(fifth.anchor().clone()), AnchorNews::Full);
        assert_eq!(t.refused_full, 1);
        // Adverts for it cannot be checked: not taken, the anchor is asked
        // for instead.
        let v = Verifier::new(fifth.anchor().clone()).expect("signed");
        let advert = Advert {
            origin: id(6),
            state: 1,
            hops: 1,
            proof: v.next_hop(1, 0, &fifth.proof(1).expect("head")),
        };
        assert!(!t.handle_adverts(now, id(1), &[advert]));
        assert_eq!(t.take_wanted(), vec![(id(6), id(1))]);
        // Once the routes through hub 1 are gone, room is made.
        t.handle_link_down(id(1));
        assert_eq!(t.handle_anchor(fifth.anchor().clone()), AnchorNews::New);
    }

    #[test]
    fn adverts_from_strangers_and_about_ourselves_are_ignored() {
        let (mut t, chains) = linked_table(4);
        let now = Instant::now();
        let advert = one_hop(&chains, 2, 1);
        assert!(!t.handle_adverts(now, id(3), &[advert]), "not a neighbour");
        let me = Advert {
            origin: id(0),
            state: 99,
            hops: 3,
            proof: [0; 16],
        };
        let far = Advert {
            hops: MAX_HOPS,
            ..one_hop(&chains, 3, 1)
        };
        assert!(!t.handle_adverts(now, id(1), &[me, far]));
        assert!(t.handle_adverts(now, id(1), &[advert]));
        assert!(
            t.adverts_for(id(1)).iter().all(|a| a.origin != id(2)),
            "split horizon"
        );
        assert_eq!(t.forged, 0);
    }

    #[test]
    fn forged_states_and_hop_counts_take_no_route() {
        let (mut t, chains) = linked_table(4);
        let now = Instant::now();
        let honest = one_hop(&chains, 2, 5);
        // A state the origin never reached, an element replayed for a newer
        // state, fewer hops than heard: none is taken.
        let frozen = Advert {
            state: u64::MAX,
            ..honest
        };
        let newer = Advert { state: 6, ..honest };
        let shorter = Advert { hops: 0, ..honest };
        assert!(!t.handle_adverts(now, id(1), &[newer, shorter]));
        assert_eq!(t.forged, 2);
        assert!(!t.handle_adverts(now, id(1), &[frozen]));
        assert_eq!(
            t.take_wanted(),
            vec![(id(2), id(1))],
            "a later chain, asked for"
        );
        assert!(t.route(&id(2)).is_none());
        // The honest advert still works, and is passed on one hop further.
        assert!(t.handle_adverts(now, id(1), &[honest]));
        let r = t.route(&id(2)).expect("route");
        assert_eq!((r.state, r.hops), (5, 2));
        // An anchor from someone other than its origin is refused.
        let mut fake = chains[3].anchor().clone();
        fake.base = 1000;
        assert_eq!(t.handle_anchor(fake), AnchorNews::Forged);
        assert_eq!(t.forged, 3);
    }

    #[test]
    fn a_hub_signs_a_new_chain_when_its_states_run_past_the_old_one() {
        let mut t = table(0);
        let first = t.take_own_anchor().expect("the first anchor");
        assert_eq!(t.take_own_anchor(), None);
        for _ in 0..crate::route_chain::SEQS {
            t.bump();
        }
        let second = t.take_own_anchor().expect("a new chain");
        assert!(second.base > first.base);
        let mut v = Verifier::new(second).expect("signed");
        let own = t.adverts_for(id(1))[0];
        assert_eq!(v.check(own.state, 0, &own.proof), Check::Valid);
    }

    proptest! {
        #[test]
        fn gossip_converges_to_shortest_paths_on_any_graph(
            n in 2usize..9,
            edges in proptest::collection::vec((0usize..9, 0usize..9), 0..20),
        ) {
            let edges: Vec<(usize, usize)> = edges.into_iter()
                .map(|(a, b)| (a % n, b % n))
                .filter(|(a, b)| a != b)
                .collect();
            let mut sim = Sim::new(n, &edges);
            for _ in 0..n + 2 {
                sim.round();
            }
            prop_assert_eq!(sim.check_shortest_paths(), Ok(()));
        }
    }
}
