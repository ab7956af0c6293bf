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
//! Driver loop: feed link changes with [`RouteTable::handle_link_up`] and
//! [`RouteTable::handle_link_down`], received adverts with
//! [`RouteTable::handle_adverts`]; every gossip interval call
//! [`RouteTable::bump`] and [`RouteTable::handle_timeout`], then send each
//! neighbour [`RouteTable::adverts_for`] it. Time is an input.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::identity::NodeId;

/// Routes longer than this are not kept (they would only be stale ones
/// counting to infinity).
pub const MAX_HOPS: u8 = 16;
/// Destinations a table holds at most: adverts for further new origins are
/// ignored (and counted), so a neighbour inventing hubs cannot grow it
/// without end. Far above any federation (the simulator runs 1000 hubs).
pub const MAX_ROUTES: usize = 1 << 16;

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
    /// When it was last confirmed.
    pub refreshed: Instant,
}

/// A hub's view of every other hub.
#[derive(Debug)]
pub struct RouteTable {
    me: NodeId,
    state: u64,
    expiry: Duration,
    neighbours: BTreeSet<NodeId>,
    routes: BTreeMap<NodeId, Route>,
    /// Destinations whose path changed since the last triggered update.
    changed: BTreeSet<NodeId>,
    /// Adverts for new origins ignored because the table was full.
    pub refused_full: u64,
}

impl RouteTable {
    /// An empty table for hub `me`; routes not refreshed within `expiry` go.
    pub fn new(me: NodeId, expiry: Duration) -> Self {
        Self {
            me,
            state: 1,
            expiry,
            neighbours: BTreeSet::new(),
            routes: BTreeMap::new(),
            changed: BTreeSet::new(),
            refused_full: 0,
        }
    }

    /// The table with its state numbers starting at `state`. A restarted
    /// hub must start above every state its earlier run advertised, or
    /// other hubs keep preferring the dead run's routes (newer state wins)
    /// until they expire: drivers pass the wall-clock time in microseconds.
    pub fn starting_at(mut self, state: u64) -> Self {
        self.state = self.state.max(state);
        self
    }

    /// This hub's current state number.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// Marks this hub's own information as changed (and refreshes it).
    pub fn bump(&mut self) {
        self.state += 1;
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
    /// route. Adverts from a hub that is not a neighbour are ignored.
    pub fn handle_adverts(&mut self, now: Instant, from: NodeId, adverts: &[Advert]) -> bool {
        if !self.neighbours.contains(&from) {
            return false;
        }
        let mut changed = false;
        for a in adverts.iter().filter(|a| a.origin != self.me) {
            let Some(hops) = a.hops.checked_add(1).filter(|h| *h <= MAX_HOPS) else {
                continue;
            };
            let better = match self.routes.get(&a.origin) {
                None if self.routes.len() >= MAX_ROUTES => {
                    self.refused_full += 1;
                    false
                }
                None => true,
                Some(r) => {
                    a.state > r.state
                        || (a.state == r.state && hops < r.hops)
                        // The current next hop's word is news even when the path
                        // grew: it is the path we use.
                        || (r.next_hop == from && a.state == r.state && hops != r.hops)
                }
            };
            let refresh = self
                .routes
                .get(&a.origin)
                .is_some_and(|r| r.next_hop == from && r.state == a.state && r.hops == hops);
            if better {
                let old = self.routes.insert(
                    a.origin,
                    Route {
                        next_hop: from,
                        hops,
                        state: a.state,
                        refreshed: now,
                    },
                );
                // A newer state on the same path is a refresh: the periodic
                // gossip carries it. Only a new path is news worth a
                // triggered update (DSDV's rule; otherwise every hub's
                // periodic bump would set off a federation-wide cascade).
                if old.is_none_or(|r| r.next_hop != from || r.hops != hops) {
                    self.changed.insert(a.origin);
                    changed = true;
                }
            } else if refresh {
                if let Some(r) = self.routes.get_mut(&a.origin) {
                    r.refreshed = now;
                }
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
        }];
        out.extend(
            self.routes
                .iter()
                .filter(|(dest, r)| r.next_hop != neighbour && **dest != neighbour)
                .map(|(dest, r)| Advert {
                    origin: *dest,
                    state: r.state,
                    hops: r.hops,
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
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn id(i: usize) -> NodeId {
        SecretKey::from_seed([i as u8 + 1; 32]).node_id()
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
                tables: (0..n)
                    .map(|i| RouteTable::new(id(i), Duration::from_secs(5)))
                    .collect(),
                links: BTreeSet::new(),
                now: Instant::now(),
            };
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

    #[test]
    fn a_neighbour_inventing_hubs_cannot_grow_the_table_past_its_bound() {
        let mut t = RouteTable::new(id(0), Duration::from_secs(5));
        let now = Instant::now();
        t.handle_link_up(id(1));
        // Distinct made-up origins, decoded as relayed ids are (without the
        // point check), as a neighbour's adverts would be.
        let advert = |i: u32, state: u64| {
            let mut b = [7u8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            let wire = postcard::to_allocvec(&(b, state, 0u8)).expect("encode");
            postcard::from_bytes::<Advert>(&wire).expect("decode")
        };
        let origin = |i: u32| advert(i, 1).origin;
        let adverts: Vec<Advert> = (0..MAX_ROUTES as u32 + 100).map(|i| advert(i, 1)).collect();
        t.handle_adverts(now, id(1), &adverts);
        assert_eq!(t.routes.len(), MAX_ROUTES);
        assert_eq!(t.refused_full, 100);
        // Known origins still update.
        t.handle_adverts(now, id(1), &[advert(0, 2)]);
        assert_eq!(t.routes[&origin(0)].state, 2);
    }

    #[test]
    fn adverts_from_strangers_and_about_ourselves_are_ignored() {
        let mut t = RouteTable::new(id(0), Duration::from_secs(5));
        let now = Instant::now();
        let advert = Advert {
            origin: id(2),
            state: 9,
            hops: 0,
        };
        assert!(!t.handle_adverts(now, id(1), &[advert]), "not a neighbour");
        t.handle_link_up(id(1));
        let me = Advert {
            origin: id(0),
            state: 99,
            hops: 3,
        };
        let far = Advert {
            origin: id(3),
            state: 1,
            hops: MAX_HOPS,
        };
        assert!(!t.handle_adverts(now, id(1), &[me, far]));
        assert!(t.handle_adverts(now, id(1), &[advert]));
        assert!(
            t.adverts_for(id(1)).iter().all(|a| a.origin != id(2)),
            "split horizon"
        );
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
