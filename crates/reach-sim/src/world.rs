//! The simulated network: real [`HubCore`]s and simulated nodes joined by
//! links with latency and loss, driven by one event queue in virtual time.
//!
//! ```text
//!   event queue (time, seq) --pop--> World::step
//!        ^                              | Deliver: decode frame -> HubCore::handle_frame / node
//!        |                              | Tick: HubCore::handle_tick
//!        |                              | Dial/Up/Down: HubCore::handle_link_up / handle_link_down
//!        +---- schedule(frames) <-------+ drain HubCore outbox onto its links
//! ```
//! Links model TCP: frames in one direction arrive in order, each one link
//! latency after it was sent; a lost frame is retransmitted after an RTO, and
//! the frames behind it wait (head-of-line blocking). The Noise handshake and
//! the hub link's encryption are not run (they cost the same in every
//! topology and the hub core never sees them); a link comes up after the
//! round trips they take. A hub crash is a process crash: its peers see their
//! links close one latency later, as the kernel's FIN or RST tells them.
//!
//! Nodes run the real node core ([`NodeSession`]): it decides when to dial,
//! registers, keeps the link alive, times out lookups and backs off, exactly
//! as in a `reach` process; here a dial is a simulated TCP connect and
//! handshake, and the core's deadlines are events in the queue.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use reach_hub_core::{HubCore, LinkId, Policy, Verdict};
use reach_proto::link::{decode_frame, Frame};
use reach_proto::node_session::{self, Event as SessionEvent, NodeSession};
use reach_proto::{NodeId, SecretKey};

use reach_proto::rng::Rng;

/// Gossip interval of the simulated hubs (the hub's default).
pub const GOSSIP: Duration = reach_hub_core::DEFAULT_GOSSIP_INTERVAL;
/// Redial delays of configured peer hubs (the hub driver's).
const HUB_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(3));
/// How long a simulated lookup may take (the setup driver's budget).
const LOOKUP_BUDGET: Duration = Duration::from_secs(2);

/// Index of a hub in the world.
pub type HubIx = usize;
/// Index of a node in the world.
pub type NodeIx = usize;
type LinkIx = usize;

/// One end of a link.
#[derive(Clone, Copy, Debug)]
enum End {
    Hub(HubIx, LinkId),
    Node(NodeIx),
}

struct Link {
    ends: [End; 2],
    latency: Duration,
    up: bool,
    /// When the last frame sent in each direction arrives (TCP's ordering).
    arrives: [Duration; 2],
    /// The incarnation of the process at end 0 when it opened the link.
    incarnation: u32,
}

/// A simulated hub process.
pub struct Hub {
    /// Its identity.
    pub id: NodeId,
    /// Its key, which signs its gossip.
    key: SecretKey,
    /// Its core while the process runs.
    pub core: Option<HubCore>,
    links: HashMap<LinkId, LinkIx>,
    /// Hubs it dials (configured peers), with the one-way latency to each.
    peers: Vec<(HubIx, Duration)>,
    addr: SocketAddr,
    /// Process incarnation: timers of an earlier one are ignored.
    incarnation: u32,
    /// When the core's timer (`poll_timeout`) is armed for, if it is.
    timer: Option<Duration>,
}

/// A simulated node.
pub struct Node {
    /// Its identity.
    pub id: NodeId,
    /// Its home hub.
    pub hub: HubIx,
    latency: Duration,
    /// The link being dialled or in use.
    link: Option<LinkIx>,
    /// The node core.
    pub session: NodeSession,
    /// The core's id for the current link, once connected.
    session_link: Option<node_session::LinkId>,
    /// When the core's timer is armed for, if it is.
    timer: Option<Duration>,
    /// Lookup answers: request id to the home hub found (None: unknown or
    /// failed) and when the answer came.
    pub found: HashMap<u32, (Option<NodeId>, Duration)>,
    /// Lookup answers that carried the target's own signed claim to be
    /// registered with the hub found (request ids).
    pub proved: HashSet<u32>,
}

impl Hub {
    /// The hubs it dials (configured peers), with the one-way latency.
    pub fn peers(&self) -> &[(HubIx, Duration)] {
        &self.peers
    }
}

impl Node {
    /// Whether its hub took its registration on the current link.
    pub fn registered(&self) -> bool {
        self.session.registration().is_some()
    }
}

#[derive(Debug)]
enum Event {
    Deliver {
        link: LinkIx,
        to: usize,
        frame: Rc<[u8]>,
    },
    Tick {
        hub: HubIx,
        incarnation: u32,
    },
    /// The core's own deadline (`HubCore::poll_timeout`), as the hub
    /// driver's timer task wakes for it.
    Timeout {
        hub: HubIx,
        incarnation: u32,
    },
    Dial {
        from: HubIx,
        to: HubIx,
        latency: Duration,
        backoff: Duration,
        incarnation: u32,
    },
    Accept {
        link: LinkIx,
    },
    Establish {
        link: LinkIx,
    },
    Close {
        link: LinkIx,
        to: usize,
    },
    /// The node core's deadline (`NodeSession::poll_timeout`).
    NodeTimeout {
        node: NodeIx,
    },
    /// A node's dial ends: refused (its hub is down) or the link is up.
    NodeDialed {
        node: NodeIx,
        link: Option<LinkIx>,
    },
}

/// Events wait in a slab; the heap orders small (time, sequence, slot)
/// keys, so sifting moves 24 bytes instead of whole events (a thousand hubs
/// keep millions of frames in flight).
#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<(u64, u64, u32)>>,
    slab: Vec<Option<Event>>,
    free: Vec<u32>,
    seq: u64,
}

impl Queue {
    fn push(&mut self, at: Duration, event: Event) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(event);
                i
            }
            None => {
                self.slab.push(Some(event));
                u32::try_from(self.slab.len() - 1).expect("fewer than 4G events in flight")
            }
        };
        // Rounded up: a core's deadline in nanoseconds must not fire a
        // microsecond early, or the core finds nothing due and asks for the
        // same deadline again, forever.
        let at_us = at.as_nanos().div_ceil(1000) as u64;
        self.heap.push(Reverse((at_us, self.seq, slot)));
    }

    /// The time of the next event.
    fn peek(&self) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((at, _, _))| Duration::from_micros(*at))
    }

    fn pop(&mut self) -> Option<(Duration, Event)> {
        let Reverse((at, _, slot)) = self.heap.pop()?;
        let event = self.slab[slot as usize].take()?;
        self.free.push(slot);
        Some((Duration::from_micros(at), event))
    }
}

/// Frames and bytes carried, by kind of link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Frames between hubs.
    pub hub_messages: u64,
    /// Their bytes (frame headers included).
    pub hub_bytes: u64,
    /// Frames between hubs and nodes.
    pub node_messages: u64,
    /// Their bytes.
    pub node_bytes: u64,
}

impl Traffic {
    /// All frames.
    pub fn messages(&self) -> u64 {
        self.hub_messages + self.node_messages
    }
    /// All bytes.
    pub fn bytes(&self) -> u64 {
        self.hub_bytes + self.node_bytes
    }
}

/// The whole simulated network.
pub struct World {
    base: Instant,
    now: Duration,
    queue: Queue,
    links: Vec<Link>,
    /// The hubs.
    pub hubs: Vec<Hub>,
    /// The nodes.
    pub nodes: Vec<Node>,
    rng: Rng,
    /// Probability that a frame is lost once (and retransmitted after an RTO).
    loss: f64,
    /// Traffic so far.
    pub traffic: Traffic,
    /// While the network is cut: the side of each hub. Hub links across the
    /// cut are down and dials across it fail.
    cut: Option<Vec<bool>>,
}

impl World {
    /// An empty world; `loss` is the per-frame loss probability on every link.
    pub fn new(rng: Rng, loss: f64) -> Self {
        Self {
            base: Instant::now(),
            now: Duration::ZERO,
            queue: Queue::default(),
            links: Vec::new(),
            hubs: Vec::new(),
            nodes: Vec::new(),
            rng,
            loss,
            traffic: Traffic::default(),
            cut: None,
        }
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        self.now
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.queue.push(self.now + after, event);
    }

    /// Adds a hub (not yet running) with identity `key`.
    pub fn add_hub(&mut self, key: SecretKey) -> HubIx {
        let ix = self.hubs.len();
        let id = key.node_id();
        let addr = SocketAddr::new(IpAddr::V4(sim_ip(ix as u32, 0)), 7000);
        self.hubs.push(Hub {
            id,
            key,
            core: None,
            links: HashMap::new(),
            peers: Vec::new(),
            addr,
            incarnation: 0,
            timer: None,
        });
        ix
    }

    /// Makes `from` dial `to` as a configured peer, `latency` apart.
    pub fn add_peering(&mut self, from: HubIx, to: HubIx, latency: Duration) {
        self.hubs[from].peers.push((to, latency));
    }

    /// Adds a node with `key`, homed at `hub`, `latency` away from it, whose
    /// process starts after `after` (its core dials at once). Like a `reach`
    /// process, it signs a home claim for each registration, which the hub
    /// verifies.
    pub fn add_node(
        &mut self,
        key: SecretKey,
        hub: HubIx,
        latency: Duration,
        after: Duration,
    ) -> NodeIx {
        let ix = self.nodes.len();
        let id = key.node_id();
        let mut config = node_session::Config::new(id);
        config.addrs = vec![node_addr(ix)];
        config.key = Some(key);
        let seed = self.rng.next_u64();
        let session = NodeSession::new(config, seed, self.base + self.now + after);
        self.nodes.push(Node {
            id,
            hub,
            latency,
            link: None,
            session,
            session_link: None,
            timer: None,
            found: HashMap::new(),
            proved: HashSet::new(),
        });
        self.arm_node(ix);
        ix
    }

    /// Starts (or restarts) hub `hub` now, with empty state, as the hub
    /// process does; it dials its configured peers at once.
    pub fn start_hub(&mut self, hub: HubIx) {
        let h = &mut self.hubs[hub];
        // The hub driver's epoch is the wall clock in microseconds; here the
        // virtual clock, offset so that a first start is not at zero.
        let epoch = 1_000_000 + self.now.as_micros() as u64;
        // Open to nodes; hubs link by the federation's hub secret.
        let policy = Policy {
            open: true,
            hub_secret: Some(b"the simulated federation's hub secret".to_vec()),
            ..Policy::default()
        };
        let core = HubCore::new(&h.key, policy, vec![h.addr], GOSSIP * 5, epoch);
        h.core = Some(core);
        h.incarnation += 1;
        h.timer = None;
        let incarnation = h.incarnation;
        let peers = h.peers.clone();
        let phase = Duration::from_micros(self.rng.below(GOSSIP.as_micros() as u64));
        self.schedule(phase, Event::Tick { hub, incarnation });
        for (to, latency) in peers {
            self.redial(Duration::ZERO, hub, to, latency, incarnation);
        }
    }

    /// Crashes hub `hub`: its state is lost, and its peers see its links
    /// close one latency later.
    pub fn kill_hub(&mut self, hub: HubIx) {
        self.hubs[hub].core = None;
        let links: Vec<LinkIx> = self.hubs[hub].links.drain().map(|(_, l)| l).collect();
        for l in links {
            self.close_link(l);
        }
    }

    /// Cuts the network between the hubs with `side[h]` true and the rest:
    /// links across the cut close (both ends learn one latency later, as if
    /// the cut answered with a reset or ICMP unreachable) and dials across it
    /// fail until [`World::heal`]. Nodes stay with their hubs.
    pub fn partition(&mut self, side: Vec<bool>) {
        let crossing: Vec<LinkIx> = (0..self.links.len())
            .filter(|&l| self.links[l].up && self.crosses(&side, l))
            .collect();
        self.cut = Some(side);
        for l in crossing {
            self.close_link(l);
        }
    }

    /// Ends the cut: redials across it succeed again.
    pub fn heal(&mut self) {
        self.cut = None;
    }

    fn crosses(&self, side: &[bool], link: LinkIx) -> bool {
        match self.links[link].ends {
            [End::Hub(a, _), End::Hub(b, _)] => side[a] != side[b],
            _ => false,
        }
    }

    /// Whether hubs `a` and `b` are on different sides of a cut.
    fn cut_between(&self, a: HubIx, b: HubIx) -> bool {
        self.cut.as_ref().is_some_and(|side| side[a] != side[b])
    }

    /// Hangs hub `hub`: its state is gone and it neither reads nor sends,
    /// but its links stay open (a stopped process, a dead machine behind a
    /// firewall that drops instead of resetting). Only keepalives notice.
    pub fn freeze_hub(&mut self, hub: HubIx) {
        self.hubs[hub].core = None;
    }

    /// For each hub, the smallest index of the running hubs it is
    /// connected to through configured peerings among running hubs (None
    /// for a hub that is down): crashed hubs can cut the federation in
    /// parts, and routes can only exist within one.
    pub fn components(&self) -> Vec<Option<HubIx>> {
        let n = self.hubs.len();
        let mut parent: Vec<usize> = (0..n).collect();
        fn root(parent: &mut [usize], mut x: usize) -> usize {
            while parent[x] != x {
                parent[x] = parent[parent[x]];
                x = parent[x];
            }
            x
        }
        for (a, h) in self.hubs.iter().enumerate() {
            for (b, _) in &h.peers {
                if self.hub_alive(a) && self.hub_alive(*b) && !self.cut_between(a, *b) {
                    let (ra, rb) = (root(&mut parent, a), root(&mut parent, *b));
                    parent[ra.max(rb)] = ra.min(rb);
                }
            }
        }
        (0..n)
            .map(|h| self.hub_alive(h).then(|| root(&mut parent, h)))
            .collect()
    }

    /// Whether hub `hub` runs.
    pub fn hub_alive(&self, hub: HubIx) -> bool {
        self.hubs[hub].core.is_some()
    }

    /// Node `node` looks `target` up; returns the request id, whose answer
    /// lands in [`Node::found`].
    pub fn lookup(&mut self, node: NodeIx, target: NodeId) -> Option<u32> {
        let deadline = self.instant() + LOOKUP_BUDGET;
        let req = self.nodes[node].session.lookup(target, deadline).ok()?;
        self.flush_node(node);
        Some(req)
    }

    /// Runs events until virtual time `until` (or the queue empties).
    pub fn run_until(&mut self, until: Duration) {
        while let Some(at) = self.queue.peek() {
            if at > until {
                break;
            }
            let Some((at, event)) = self.queue.pop() else {
                break;
            };
            self.now = at;
            self.handle(event);
        }
        self.now = self.now.max(until);
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { link, to, frame } => self.deliver(link, to, &frame),
            Event::Tick { hub, incarnation } => {
                if self.hubs[hub].incarnation != incarnation {
                    return;
                }
                let now = self.instant();
                if let Some(core) = self.hubs[hub].core.as_mut() {
                    core.handle_tick(now);
                    self.flush(hub);
                    self.schedule(GOSSIP, Event::Tick { hub, incarnation });
                }
            }
            Event::Timeout { hub, incarnation } => {
                if self.hubs[hub].incarnation != incarnation {
                    return;
                }
                self.hubs[hub].timer = None;
                let now = self.instant();
                if let Some(core) = self.hubs[hub].core.as_mut() {
                    core.handle_timeout(now);
                    self.flush(hub);
                }
            }
            Event::Dial {
                from,
                to,
                latency,
                backoff,
                incarnation,
            } => self.dial(from, to, latency, backoff, incarnation),
            Event::Accept { link } => self.link_up(link, 1),
            Event::Establish { link } => self.link_up(link, 0),
            Event::Close { link, to } => self.end_closed(link, to),
            Event::NodeTimeout { node } => {
                self.nodes[node].timer = None;
                let now = self.instant();
                self.nodes[node].session.handle_timeout(now);
                self.flush_node(node);
            }
            Event::NodeDialed { node, link } => self.node_dialed(node, link),
        }
    }

    /// Hub `from` dials its peer `to` after `after`, starting its backoff
    /// afresh.
    fn redial(
        &mut self,
        after: Duration,
        from: HubIx,
        to: HubIx,
        latency: Duration,
        incarnation: u32,
    ) {
        let backoff = HUB_BACKOFF.0;
        let dial = Event::Dial {
            from,
            to,
            latency,
            backoff,
            incarnation,
        };
        self.schedule(after, dial);
    }

    /// A dial from hub `from` to `to`: TCP's round trip, then Noise IK's:
    /// the listener has the link after 3 one-way latencies, the dialler
    /// after 4. A dead listener refuses after one round trip, and the
    /// dialler tries again with the hub driver's backoff; so it does when
    /// the link closes (see [`World::end_closed`]).
    fn dial(
        &mut self,
        from: HubIx,
        to: HubIx,
        latency: Duration,
        backoff: Duration,
        incarnation: u32,
    ) {
        if self.hubs[from].incarnation != incarnation || !self.hub_alive(from) {
            return;
        }
        if !self.hub_alive(to) || self.cut_between(from, to) {
            let next = (backoff * 2).min(HUB_BACKOFF.1);
            self.schedule(
                latency * 2 + backoff,
                Event::Dial {
                    from,
                    to,
                    latency,
                    backoff: next,
                    incarnation,
                },
            );
            return;
        }
        let link = self.new_link([End::Hub(from, 0), End::Hub(to, 0)], latency);
        self.schedule(latency * 3, Event::Accept { link });
        self.schedule(latency * 4, Event::Establish { link });
    }

    fn new_link(&mut self, ends: [End; 2], latency: Duration) -> LinkIx {
        let incarnation = match ends[0] {
            End::Hub(h, _) => self.hubs[h].incarnation,
            End::Node(_) => 0,
        };
        self.links.push(Link {
            ends,
            latency,
            up: true,
            arrives: [Duration::ZERO; 2],
            incarnation,
        });
        self.links.len() - 1
    }

    /// End `side` of `link` comes up (its handshake finished).
    fn link_up(&mut self, link: LinkIx, side: usize) {
        if !self.links[link].up {
            return;
        }
        let other = self.links[link].ends[1 - side];
        match self.links[link].ends[side] {
            End::Hub(hub, _) => {
                let peer = match other {
                    End::Hub(h, _) => self.hubs[h].id,
                    End::Node(n) => self.nodes[n].id,
                };
                let observed = match other {
                    End::Hub(h, _) => self.hubs[h].addr,
                    End::Node(n) => node_addr(n),
                };
                let Some(core) = self.hubs[hub].core.as_mut() else {
                    self.close_link(link);
                    return;
                };
                let proof = if side == 0 {
                    core.hub_proof(&peer)
                } else {
                    None
                };
                let id = core.handle_link_up(peer, observed, side == 0, proof);
                self.links[link].ends[side] = End::Hub(hub, id);
                self.hubs[hub].links.insert(id, link);
                self.flush(hub);
            }
            End::Node(n) => self.schedule(
                Duration::ZERO,
                Event::NodeDialed {
                    node: n,
                    link: Some(link),
                },
            ),
        }
    }

    /// Sends `frame` from end `from` of `link`, in order behind earlier ones.
    fn send(&mut self, link: LinkIx, from: usize, frame: Rc<[u8]>) {
        let l = &self.links[link];
        if !l.up {
            return;
        }
        let mut delay = l.latency;
        if self.loss > 0.0 && self.rng.unit() < self.loss {
            // RFC 6298: RTO = max(1 s, SRTT + 4 RTTVAR); Linux uses 200 ms
            // as its floor, which is what hub links see.
            delay += (l.latency * 4).max(Duration::from_millis(200));
        }
        let at = (self.now + delay).max(l.arrives[1 - from]);
        let hub_link = matches!(l.ends, [End::Hub(..), End::Hub(..)]);
        if hub_link {
            self.traffic.hub_messages += 1;
            self.traffic.hub_bytes += frame.len() as u64;
        } else {
            self.traffic.node_messages += 1;
            self.traffic.node_bytes += frame.len() as u64;
        }
        self.links[link].arrives[1 - from] = at;
        let after = at - self.now;
        self.schedule(
            after,
            Event::Deliver {
                link,
                to: 1 - from,
                frame,
            },
        );
    }

    /// Sends what hub `hub`'s core queued (its driver events, proxy ports
    /// and status queries, have nothing to act on here) and arms its timer.
    fn flush(&mut self, hub: HubIx) {
        let Some(core) = self.hubs[hub].core.as_mut() else {
            return;
        };
        let out = core.poll_transmits();
        let _ = core.poll_events();
        let due = core.poll_timeout();
        self.arm(hub, due);
        // A flood queues the same frame for every link; in flight, the
        // copies share one buffer (a thousand hubs in one process would
        // otherwise hold every copy of every flood at once).
        let mut recent: Vec<Rc<[u8]>> = Vec::new();
        for (id, frame) in out {
            let Some(&link) = self.hubs[hub].links.get(&id) else {
                continue;
            };
            let side = self.side_of_hub(link, hub);
            let shared = match recent.iter().find(|r| ***r == *frame) {
                Some(r) => r.clone(),
                None => {
                    let r: Rc<[u8]> = frame.into();
                    recent.push(r.clone());
                    if recent.len() > 8 {
                        recent.remove(0);
                    }
                    r
                }
            };
            self.send(link, side, shared);
        }
    }

    /// Schedules the core's deadline `due` unless the timer is armed for it.
    fn arm(&mut self, hub: HubIx, due: Option<Instant>) {
        let (base, h) = (self.base, &mut self.hubs[hub]);
        if let Some(at) = rearm(&mut h.timer, due, base) {
            let incarnation = h.incarnation;
            self.schedule(
                at.saturating_sub(self.now),
                Event::Timeout { hub, incarnation },
            );
        }
    }

    fn side_of_hub(&self, link: LinkIx, hub: HubIx) -> usize {
        match self.links[link].ends[0] {
            End::Hub(h, _) if h == hub => 0,
            _ => 1,
        }
    }

    fn deliver(&mut self, link: LinkIx, to: usize, frame: &[u8]) {
        if !self.links[link].up {
            return;
        }
        match self.links[link].ends[to] {
            End::Hub(_, 0) => {
                // Not accepted yet (the link's handshake timing makes this
                // rare): TCP holds the bytes, so the core sees them later.
                // Behind every frame already on its way, to keep the order.
                let l = &mut self.links[link];
                let at = (self.now + l.latency).max(l.arrives[to]);
                l.arrives[to] = at;
                let frame = frame.into();
                self.schedule(at - self.now, Event::Deliver { link, to, frame });
            }
            End::Hub(hub, id) => {
                let now = self.instant();
                let Some(core) = self.hubs[hub].core.as_mut() else {
                    return;
                };
                let mut rest = frame;
                let mut close = None;
                while !rest.is_empty() {
                    match decode_frame(rest) {
                        Ok(Some((f, used))) => {
                            if let Verdict::Close(why) = core.handle_frame(id, f, now) {
                                close = Some(why);
                                break;
                            }
                            rest = &rest[used..];
                        }
                        _ => {
                            close = Some("undecodable frame".to_string());
                            break;
                        }
                    }
                }
                self.flush(hub);
                if close.is_some() {
                    self.close_link(link);
                }
            }
            End::Node(n) => self.node_frame(n, frame),
        }
    }

    /// A frame for node `n`: into its core, as its link reader does.
    fn node_frame(&mut self, n: NodeIx, frame: &[u8]) {
        let Some(id) = self.nodes[n].session_link else {
            return;
        };
        let now = self.instant();
        let session = &mut self.nodes[n].session;
        match decode_frame(frame) {
            Ok(Some((Frame::Control(msg), _))) => session.handle_control(id, msg, now),
            Ok(Some((Frame::Open { stream, dst, src }, _))) => {
                session.handle_open(id, stream, dst, src, now)
            }
            Ok(Some(_)) => session.handle_traffic(id, now),
            _ => session.handle_link_lost(id, "undecodable frame".into(), now),
        }
        self.flush_node(n);
    }

    /// Sends what node `n`'s core queued, acts on its events and arms its
    /// timer.
    fn flush_node(&mut self, n: NodeIx) {
        while let Some(frame) = self.nodes[n].session.poll_transmit() {
            if let (Some(link), Some(_)) = (self.nodes[n].link, self.nodes[n].session_link) {
                let side = side_of_node(&self.links[link]);
                self.send(link, side, frame.into());
            }
        }
        while let Some(event) = self.nodes[n].session.poll_event() {
            match event {
                SessionEvent::Dial { .. } => self.node_connect(n),
                SessionEvent::Down { .. } => {
                    // The core left the link (silence, a refusal): close it.
                    self.nodes[n].session_link = None;
                    if let Some(link) = self.nodes[n].link.take() {
                        self.close_link(link);
                    }
                }
                SessionEvent::Found { req, entry } => {
                    let proved = entry.as_ref().is_some_and(|e| {
                        e.claim
                            .as_ref()
                            .is_some_and(|c| c.is_valid(&e.node, &e.hub))
                    });
                    if proved {
                        self.nodes[n].proved.insert(req);
                    }
                    let found = (entry.map(|e| e.hub), self.now);
                    self.nodes[n].found.insert(req, found);
                }
                SessionEvent::LookupFailed { req, .. } => {
                    self.nodes[n].found.insert(req, (None, self.now));
                }
                // Nothing here asks nodes for connect-backs, splices or
                // streams; a node that got one would answer it in a process.
                _ => {}
            }
        }
        self.arm_node(n);
    }

    /// Schedules node `n`'s core deadline unless its timer is armed for it.
    fn arm_node(&mut self, n: NodeIx) {
        let (base, node) = (self.base, &mut self.nodes[n]);
        let due = node.session.poll_timeout();
        if let Some(at) = rearm(&mut node.timer, due, base) {
            self.schedule(at.saturating_sub(self.now), Event::NodeTimeout { node: n });
        }
    }

    /// Closes `link`: each live end learns one latency later.
    fn close_link(&mut self, link: LinkIx) {
        if !self.links[link].up {
            return;
        }
        self.links[link].up = false;
        let latency = self.links[link].latency;
        for to in 0..2 {
            self.schedule(latency, Event::Close { link, to });
        }
    }

    fn end_closed(&mut self, link: LinkIx, to: usize) {
        match self.links[link].ends[to] {
            End::Hub(hub, id) => {
                if id != 0 && self.hubs[hub].links.get(&id) == Some(&link) {
                    self.hubs[hub].links.remove(&id);
                    let now = self.instant();
                    if let Some(core) = self.hubs[hub].core.as_mut() {
                        core.handle_link_down(id, now);
                        self.flush(hub);
                    }
                }
                // The dialler of a configured peering redials after its
                // shortest backoff, as the hub driver's keep_peer does.
                if let (0, End::Hub(to, _)) = (to, self.links[link].ends[1]) {
                    let (latency, incarnation) =
                        (self.links[link].latency, self.links[link].incarnation);
                    self.redial(HUB_BACKOFF.0, hub, to, latency, incarnation);
                }
            }
            End::Node(n) => {
                if self.nodes[n].link != Some(link) {
                    return;
                }
                self.nodes[n].link = None;
                let now = self.instant();
                let node = &mut self.nodes[n];
                let session = &mut node.session;
                match node.session_link.take() {
                    Some(id) => session.handle_link_lost(id, "the hub closed the link".into(), now),
                    // Closed before the handshake finished.
                    None => session.handle_dial_failed("connection reset".into(), now),
                }
                self.flush_node(n);
            }
        }
    }

    /// A node dials its hub: refused after a round trip if the hub is down.
    fn node_connect(&mut self, n: NodeIx) {
        let (hub, latency) = (self.nodes[n].hub, self.nodes[n].latency);
        if !self.hub_alive(hub) {
            let dialed = Event::NodeDialed {
                node: n,
                link: None,
            };
            self.schedule(latency * 2, dialed);
            return;
        }
        let link = self.new_link([End::Node(n), End::Hub(hub, 0)], latency);
        self.nodes[n].link = Some(link);
        self.schedule(latency * 3, Event::Accept { link });
        self.schedule(latency * 4, Event::Establish { link });
    }

    /// Node `n`'s dial ended: with `link` up (its core registers on it), or
    /// refused.
    fn node_dialed(&mut self, n: NodeIx, link: Option<LinkIx>) {
        let now = self.instant();
        match link {
            Some(link) if self.nodes[n].link == Some(link) && self.links[link].up => {
                let hub = self.hubs[self.nodes[n].hub].id;
                self.nodes[n].session_link = self.nodes[n].session.handle_connected(hub);
            }
            Some(_) => return,
            None => {
                let why = "connection refused".into();
                self.nodes[n].session.handle_dial_failed(why, now);
            }
        }
        self.flush_node(n);
    }
}

/// A core asks to be woken at `due`: the virtual time to schedule its timer
/// event for, unless `timer` is already armed for then or earlier (that
/// event fires first, and the core is asked for its deadline again then).
fn rearm(timer: &mut Option<Duration>, due: Option<Instant>, base: Instant) -> Option<Duration> {
    let at = due?.saturating_duration_since(base);
    if timer.is_some_and(|t| t <= at) {
        return None;
    }
    *timer = Some(at);
    Some(at)
}

fn side_of_node(link: &Link) -> usize {
    match link.ends[0] {
        End::Node(_) => 0,
        End::Hub(..) => 1,
    }
}

/// A simulated public address: 198.51.100.0/24-style documentation space is
/// too small for 100k hosts, and these never leave the process, so the
/// addresses only need to be distinct.
fn sim_ip(ix: u32, kind: u8) -> Ipv4Addr {
    let b = ix.to_be_bytes();
    Ipv4Addr::new(10 + kind, b[1], b[2], b[3])
}

fn node_addr(n: NodeIx) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(sim_ip(n as u32, 1)), 4000)
}
