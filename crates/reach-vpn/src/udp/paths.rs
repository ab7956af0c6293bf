//! Which UDP path a peer's packets take, sans-IO: hole punching by
//! probing every candidate address of the peer at once (both peers start
//! together, told over their stream), validation by an authenticated
//! probe and its answer, keepalives on the chosen path, and going back to
//! probing when the path falls silent or there is none. Time comes in as
//! an argument; what to send comes out of [`Paths::poll_transmit`].
//!
//! ```text
//!  Searching: a round probes every candidate each PROBE_INTERVAL, for
//!             FIRST_ROUND (then ROUND every RETRY), until an answer comes
//!  Up(addr):  data flows; a probe every KEEPALIVE when idle; a better
//!             path found by a later round takes over; silence for
//!             DEAD_AFTER ends it (back to Searching)
//! ```
//!
//! A probe or answer that arrives authenticated (the driver opened it
//! with the session key) proves the peer sent it; an answer to a probe
//! this side sent to address A proves both directions of A. An
//! authenticated probe from an address not yet known makes it a candidate
//! (the peer's NAT mapping as this side sees it), and every answer tells
//! this side how the peer saw it ([`Event::SeenAs`]): the two reflexive
//! addresses hole punching needs, learned from the peer itself.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Between two probes of one candidate while searching.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// How long the first round probes (the punching window: after it, the
/// peer's packets go over the stream).
pub const FIRST_ROUND: Duration = Duration::from_secs(3);
/// How long later rounds probe.
pub const ROUND: Duration = Duration::from_secs(1);
/// Between the end of a round and the next while no path is up: a path
/// that opens (a firewall rule lifted) is found within this and a round.
pub const RETRY: Duration = Duration::from_secs(3);
/// A probe on an idle path this often (NAT mappings that forget idle ones
/// after 30 s keep it; RFC 4787 asks at least 2 min).
pub const KEEPALIVE: Duration = Duration::from_secs(10);
/// A path that brought nothing authenticated for this long is down.
pub const DEAD_AFTER: Duration = Duration::from_secs(25);
/// While up, a round looks for a better path this often.
pub const UPGRADE_EVERY: Duration = Duration::from_secs(30);
/// Candidates kept at most.
pub const MAX_CANDIDATES: usize = 64;
/// Probes to random ports of a peer behind a random-port NAT per probe
/// tick of a first round ([`Paths::spray`]).
pub const SPRAY_PER_TICK: usize = 256;
/// Ports after a sequential NAT's last mapping a first round probes:
/// every destination the peer's socket met since its echoes took one.
pub const SEQUENTIAL_SPRAY: usize = 128;
/// How long into a first round the spray begins: the peer's own socket
/// is tried first, and its spare sockets open meanwhile.
pub const SPRAY_AFTER: Duration = Duration::from_millis(400);
/// Most random ports one first round probes: with the peer holding
/// [`BIRTHDAY_SOCKETS`] mappings among 64512 ports, 2048 probes miss all
/// of them about once in 3000 rounds.
pub const SPRAY_PER_ROUND: usize = 2048;
/// Sockets a member behind a random-port NAT opens towards a peer with a
/// predictable mapping (each gets a mapping of its own the peer's spray
/// may hit).
pub const BIRTHDAY_SOCKETS: usize = 256;
/// The ports a spray picks from (below them, NATs rarely map).
const SPRAY_PORTS: std::ops::RangeInclusive<u32> = 1024..=65535;
/// A probe not answered within this is forgotten.
const PROBE_LIFE: Duration = Duration::from_secs(5);
/// A new path must be this much faster to take over.
const BETTER: f64 = 0.7;

/// What the driver sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// A probe with this id.
    Probe(u64),
    /// The answer to probe `id`, which came from `seen`.
    Ack {
        /// The probe's id.
        id: u64,
        /// Where the probe came from, as this side saw it.
        seen: SocketAddr,
    },
}

/// One datagram to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub to: SocketAddr,
    /// What.
    pub message: Message,
}

/// What changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Packets go to `addr` now (a first path, or a better one).
    Up {
        /// The path's address at the peer.
        addr: SocketAddr,
        /// Its round trip.
        rtt: Duration,
    },
    /// The path to `addr` is down; packets go over the stream until
    /// another is found.
    Down {
        /// The path's address.
        addr: SocketAddr,
    },
    /// The peer saw this side's datagrams come from `addr` (a NAT's
    /// mapping): worth telling the peer as a candidate.
    SeenAs(SocketAddr),
}

/// How a UDP path crosses the network between two members.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crossing {
    /// Both ends are the members' own interface addresses: no NAT
    /// translates either side (a LAN, public hosts, or firewalls the
    /// probes opened).
    Direct,
    /// A NAT maps one side or both: the path is the NATs' mappings, which
    /// hole punching opened.
    Punched,
}

impl std::fmt::Display for Crossing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Crossing::Direct => "udp-direct",
            Crossing::Punched => "udp-punched",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Probing every candidate until `until`.
    Searching { until: Instant },
    /// No path; the next round at `at`.
    Waiting { at: Instant },
}

#[derive(Clone, Copy, Debug)]
struct Active {
    addr: SocketAddr,
    /// Where the peer saw this side's probes on the path come from.
    seen: SocketAddr,
    rtt: Duration,
    heard: Instant,
    sent: Instant,
}

/// One peer's UDP paths.
#[derive(Debug)]
pub struct Paths {
    candidates: Vec<SocketAddr>,
    /// Probes sent and not answered: id to (address, when).
    probes: HashMap<u64, (SocketAddr, Instant)>,
    next_id: u64,
    phase: Phase,
    /// When the current round next probes every candidate.
    next_probe: Instant,
    active: Option<Active>,
    /// Since when the path is up (for upgrade rounds).
    last_round: Instant,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    seen_as: Option<SocketAddr>,
    /// When the latest [`Paths::punch`] or [`Paths::moved`] began.
    punched: Option<Instant>,
    /// How long after it the first path came up.
    setup: Option<Duration>,
    /// How the peer's NAT maps, when a first round sprays its ports.
    spray_to: Option<PeerNat>,
    /// The current first round's spray.
    spray: Option<Spray>,
    /// For spray ports.
    rng: u64,
}

/// How a peer's NAT maps its socket to a new destination, as the hub's
/// echoes showed it (the peer tells, `crate::control::Control::Nat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerNat {
    /// The same port for every destination (or one its candidates
    /// predict well): nothing to spray.
    Predictable,
    /// A random port of this address per destination.
    Random(IpAddr),
    /// The next free ports of `ip` in turn, `step` apart: the mapping
    /// towards this side is one of the next after `after`.
    Sequential {
        /// The NAT's address.
        ip: IpAddr,
        /// The last mapping the echoes saw.
        after: u16,
        /// Between consecutive mappings.
        step: i16,
    },
    /// One port towards each address, perhaps a new one for each new
    /// address: the echoes shared one address, so an address-dependent
    /// mapping looked endpoint-independent. The mapping towards this
    /// side is `after` or one of the next ports (one per address the
    /// socket met since).
    PerAddress {
        /// The NAT's address.
        ip: IpAddr,
        /// The mapping the echoes saw.
        after: u16,
    },
}

impl PeerNat {
    /// Whether a socket behind this NAT keeps one mapping towards each
    /// address, so that probes to many ports of one address leave by
    /// one mapping (it may spray, and be the easy side of many-port
    /// punching).
    pub fn one_mapping_per_address(self) -> bool {
        matches!(self, PeerNat::Predictable | PeerNat::PerAddress { .. })
    }
}

/// Ports of one address probed in a first round, each at most once: a
/// walk through the whole range with a step coprime to its size (a
/// random-port NAT), or the next ports of a sequential one.
#[derive(Clone, Copy, Debug)]
struct Spray {
    ip: IpAddr,
    at: i64,
    step: i64,
    /// Wrap around the port range (the random walk) or stop at its end.
    wrap: bool,
    left: usize,
}

impl Spray {
    /// The [`SEQUENTIAL_SPRAY`] ports of `ip` after `port`, `step` apart.
    fn after(ip: IpAddr, port: u16, step: i64) -> Self {
        Spray {
            ip: ip.to_canonical(),
            at: i64::from(port),
            step,
            wrap: false,
            left: SEQUENTIAL_SPRAY,
        }
    }

    fn next_port(&mut self) -> Option<u16> {
        let (low, high) = (
            i64::from(*SPRAY_PORTS.start()),
            i64::from(*SPRAY_PORTS.end()),
        );
        self.left -= 1;
        self.at += self.step;
        if self.wrap {
            self.at = low + (self.at - low).rem_euclid(high - low + 1);
        }
        (low..=high).contains(&self.at).then_some(self.at as u16)
    }
}

/// splitmix64: spray positions need spreading, not secrecy.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Paths {
    /// A peer with no candidates yet; the first round starts with
    /// [`Paths::punch`]. `first_id` seeds probe ids (random, so that ids
    /// of different sessions do not collide in logs).
    pub fn new(now: Instant, first_id: u64) -> Self {
        Self {
            candidates: Vec::new(),
            probes: HashMap::new(),
            next_id: first_id,
            phase: Phase::Waiting {
                at: now + Duration::from_secs(3600),
            },
            next_probe: now,
            active: None,
            last_round: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            seen_as: None,
            punched: None,
            setup: None,
            spray_to: None,
            spray: None,
            rng: first_id,
        }
    }

    /// Sprays the peer's ports in each first round, as its NAT calls
    /// for (None or [`PeerNat::Predictable`]: no spray). A random-port
    /// NAT: [`SPRAY_PER_ROUND`] random ports of its address, from
    /// [`SPRAY_AFTER`] into the round, where the peer's
    /// [`BIRTHDAY_SOCKETS`] mappings towards this side wait to be hit. A
    /// sequential one: the [`SEQUENTIAL_SPRAY`] ports after the last one
    /// its echoes saw, at once (the peer's probes to this side take one
    /// of them, and this side's probes open its own filter to all). One
    /// that may map per address: the same number of ports after its
    /// mapping, one tick into the round unless its candidates answered.
    pub fn spray(&mut self, nat: Option<PeerNat>) {
        self.spray_to = nat.filter(|n| *n != PeerNat::Predictable);
    }

    /// How the peer's NAT is sprayed, if it is.
    pub fn spraying(&self) -> Option<PeerNat> {
        self.spray_to
    }

    /// Registers a probe to `to` that the driver sends itself (from
    /// another socket); returns its id. Its answer counts as any probe's.
    pub fn probe_id(&mut self, to: SocketAddr, now: Instant) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.probes.insert(id, (canonical(to), now));
        id
    }

    /// Adds candidate addresses of the peer (its interfaces, its
    /// reflexive addresses, predictions); duplicates and those beyond
    /// [`MAX_CANDIDATES`] are ignored. Returns how many were new.
    pub fn add_candidates(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> usize {
        let mut added = 0;
        for a in addrs {
            let a = canonical(a);
            if self.candidates.len() < MAX_CANDIDATES && !self.candidates.contains(&a) {
                self.candidates.push(a);
                added += 1;
            }
        }
        added
    }

    /// Starts a round now (the first: [`FIRST_ROUND`] long), as both
    /// peers do when they agree to punch.
    pub fn punch(&mut self, now: Instant) {
        // Setup counts from the first punch of the session (or move).
        if self.setup.is_none() && self.punched.is_none() {
            self.punched = Some(now);
        }
        self.spray = match self.spray_to {
            Some(PeerNat::Random(ip)) => {
                let size = SPRAY_PORTS.end() - SPRAY_PORTS.start() + 1;
                let r = next_random(&mut self.rng);
                // Odd and not a multiple of 3 or 7: coprime to 64512.
                let mut step = ((r >> 32) as u32 % size) | 1;
                while step % 3 == 0 || step % 7 == 0 {
                    step += 2;
                }
                Some(Spray {
                    ip: ip.to_canonical(),
                    at: i64::from(*SPRAY_PORTS.start()) + i64::from(r as u32 % size),
                    step: i64::from(step),
                    wrap: true,
                    left: SPRAY_PER_ROUND,
                })
            }
            Some(PeerNat::Sequential { ip, after, step }) if step != 0 => {
                Some(Spray::after(ip, after, step.into()))
            }
            Some(PeerNat::PerAddress { ip, after }) => Some(Spray::after(ip, after, 1)),
            _ => None,
        };
        self.start_round(now, FIRST_ROUND);
    }

    /// One side's UDP socket moved (a rebind, a new network): the path
    /// and the probes in flight are gone. `candidates`, when given (the
    /// peer moved), replace the peer's; then a first round starts, as
    /// when the peers first punched.
    pub fn moved(&mut self, now: Instant, candidates: Option<Vec<SocketAddr>>) {
        if let Some(a) = self.active.take() {
            self.events.push_back(Event::Down { addr: a.addr });
        }
        self.probes.clear();
        self.seen_as = None;
        self.punched = Some(now);
        self.setup = None;
        if let Some(c) = candidates {
            self.candidates.clear();
            self.add_candidates(c);
        }
        self.punch(now);
    }

    /// How long the latest punch took to bring the first path up (None:
    /// none came up since it began).
    pub fn setup(&self) -> Option<Duration> {
        self.setup
    }

    fn start_round(&mut self, now: Instant, length: Duration) {
        self.phase = Phase::Searching {
            until: now + length,
        };
        self.next_probe = now;
        self.last_round = now;
        self.probe_all(now);
    }

    fn probe(&mut self, to: SocketAddr, now: Instant) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.probes.insert(id, (to, now));
        self.transmits.push_back(Transmit {
            to,
            message: Message::Probe(id),
        });
    }

    fn probe_all(&mut self, now: Instant) {
        self.probes
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < PROBE_LIFE);
        for i in 0..self.candidates.len() {
            let to = self.candidates[i];
            self.probe(to, now);
        }
        // A random-port peer's spares open meanwhile; a sequential one
        // needs none. A peer that may map per address most often maps
        // alike (a port-preserving NAT): its candidates answer in the
        // first tick, and no spray follows.
        let after = match self.spray_to {
            Some(PeerNat::Random(_)) => SPRAY_AFTER,
            Some(PeerNat::PerAddress { .. }) => PROBE_INTERVAL,
            _ => Duration::ZERO,
        };
        let spraying = now.saturating_duration_since(self.last_round) >= after;
        if let Some(mut spray) = self.spray.take_if(|_| spraying) {
            for _ in 0..SPRAY_PER_TICK.min(spray.left) {
                if let Some(port) = spray.next_port() {
                    self.probe(SocketAddr::new(spray.ip, port), now);
                }
            }
            if spray.left > 0 {
                self.spray = Some(spray);
            }
        }
        self.next_probe = now + PROBE_INTERVAL;
    }

    /// Where packets go now, if a path is up.
    pub fn active(&self) -> Option<SocketAddr> {
        self.active.map(|a| a.addr)
    }

    /// The active path's round trip.
    pub fn rtt(&self) -> Option<Duration> {
        self.active.map(|a| a.rtt)
    }

    /// How the active path crosses the network: `mine` says whether an
    /// address is this side's socket on one of its own interfaces, and
    /// `peer_interfaces` are the peer's ([`crate::control::Control::Interfaces`]).
    pub fn crossing(
        &self,
        mine: impl Fn(SocketAddr) -> bool,
        peer_interfaces: &[SocketAddr],
    ) -> Option<Crossing> {
        let a = self.active?;
        let direct = mine(a.seen) && peer_interfaces.contains(&a.addr);
        Some(if direct {
            Crossing::Direct
        } else {
            Crossing::Punched
        })
    }

    /// The candidates known.
    pub fn candidates(&self) -> &[SocketAddr] {
        &self.candidates
    }

    /// An authenticated probe `id` came from `from`: answer it, and take
    /// `from` as a candidate (the peer's mapping as seen from here).
    pub fn handle_probe(&mut self, from: SocketAddr, id: u64, now: Instant) {
        self.transmits.push_back(Transmit {
            to: from,
            message: Message::Ack { id, seen: from },
        });
        self.heard(from, now);
        self.add_candidates([from]);
        if self.active.is_none() {
            // A hole the peer just punched towards us (its probe came
            // in, so ours can go out): probe back at once rather than at
            // the next round's tick. One probe per probe received, and
            // none once a path is up.
            self.probe(from, now);
        }
    }

    /// An authenticated answer to probe `id` came from `from`, saying the
    /// probe came from `seen`.
    pub fn handle_ack(&mut self, from: SocketAddr, id: u64, seen: SocketAddr, now: Instant) {
        if self.seen_as != Some(seen) {
            self.seen_as = Some(seen);
            self.events.push_back(Event::SeenAs(seen));
        }
        let Some((to, sent)) = self.probes.remove(&id) else {
            return;
        };
        if to != from {
            // Answered from another address than probed (a NAT that maps
            // the peer's replies elsewhere): that address is a candidate.
            self.add_candidates([from]);
            return;
        }
        let rtt = now.saturating_duration_since(sent);
        match &mut self.active {
            Some(a) if a.addr == from => {
                a.rtt = rtt;
                a.heard = now;
                a.seen = seen;
            }
            Some(a) if rtt.as_secs_f64() >= a.rtt.as_secs_f64() * BETTER => {}
            _ => {
                self.active = Some(Active {
                    addr: from,
                    seen,
                    rtt,
                    heard: now,
                    sent: now,
                });
                self.phase = Phase::Waiting {
                    at: now + UPGRADE_EVERY,
                };
                self.spray = None;
                if self.setup.is_none() {
                    self.setup = self.punched.map(|at| now.saturating_duration_since(at));
                }
                self.events.push_back(Event::Up { addr: from, rtt });
            }
        }
    }

    /// An authenticated datagram (data) came from `from`.
    pub fn heard(&mut self, from: SocketAddr, now: Instant) {
        if let Some(a) = &mut self.active {
            if a.addr == from {
                a.heard = now;
            }
        }
    }

    /// The driver sent a data datagram on the active path.
    pub fn sent(&mut self, now: Instant) {
        if let Some(a) = &mut self.active {
            a.sent = now;
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next change to act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Paths::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Instant {
        let phase = match self.phase {
            Phase::Searching { until } => self.next_probe.min(until),
            Phase::Waiting { at } => at,
        };
        match self.active {
            Some(a) => phase
                .min(a.sent.max(a.heard) + KEEPALIVE)
                .min(a.heard + DEAD_AFTER),
            None => phase,
        }
    }

    /// Does what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(a) = self.active {
            if now >= a.heard + DEAD_AFTER {
                self.active = None;
                self.events.push_back(Event::Down { addr: a.addr });
                self.start_round(now, ROUND);
            } else if now >= a.sent.max(a.heard) + KEEPALIVE {
                self.probe(a.addr, now);
                if let Some(a) = &mut self.active {
                    a.sent = now;
                }
            }
        }
        match self.phase {
            Phase::Searching { until } if now >= until => {
                self.spray = None;
                let at = now
                    + if self.active.is_some() {
                        UPGRADE_EVERY
                    } else {
                        RETRY
                    };
                self.phase = Phase::Waiting { at };
            }
            Phase::Searching { .. } if now >= self.next_probe => self.probe_all(now),
            Phase::Waiting { at } if now >= at && !self.candidates.is_empty() => {
                self.start_round(now, ROUND);
            }
            _ => {}
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Runs `p` to `until` in virtual time, feeding each transmit to
    /// `net`, which may answer (with an event for `p`) or drop it.
    fn run(
        p: &mut Paths,
        mut now: Instant,
        until: Instant,
        mut net: impl FnMut(Transmit, Instant) -> Option<(SocketAddr, u64, SocketAddr, Duration)>,
    ) -> Instant {
        loop {
            while let Some(t) = p.poll_transmit() {
                if let Some((from, id, seen, rtt)) = net(t, now) {
                    p.handle_ack(from, id, seen, now + rtt);
                }
            }
            let next = p.poll_timeout();
            if next > until {
                return until;
            }
            now = next.max(now);
            p.handle_timeout(now);
        }
    }

    /// A network where `open` addresses answer probes after `rtt`.
    fn answering(
        open: &'static [&'static str],
        rtt: Duration,
        me: &'static str,
    ) -> impl FnMut(Transmit, Instant) -> Option<(SocketAddr, u64, SocketAddr, Duration)> {
        move |t, _| match t.message {
            Message::Probe(id) if open.contains(&t.to.to_string().as_str()) => {
                Some((t.to, id, addr(me), rtt))
            }
            _ => None,
        }
    }

    #[test]
    fn a_peer_that_moved_is_punched_afresh_and_the_setup_time_is_measured() {
        let t0 = Instant::now();
        let mut p = Paths::new(t0, 1);
        p.add_candidates([addr("198.51.100.7:40000")]);
        p.punch(t0);
        let rtt = Duration::from_millis(20);
        let t1 = run(
            &mut p,
            t0,
            t0 + Duration::from_secs(1),
            answering(&["198.51.100.7:40000"], rtt, "203.0.113.9:1"),
        );
        assert_eq!(p.setup(), Some(rtt));
        while p.poll_event().is_some() {}
        // The peer's socket moved: its old address answers no more.
        p.moved(t1, Some(vec![addr("198.51.100.7:41000")]));
        assert_eq!(p.active(), None);
        assert_eq!(p.setup(), None);
        assert_eq!(p.candidates(), [addr("198.51.100.7:41000")]);
        assert_eq!(
            p.poll_event(),
            Some(Event::Down {
                addr: addr("198.51.100.7:40000")
            })
        );
        let slow = Duration::from_millis(50);
        run(
            &mut p,
            t1,
            t1 + Duration::from_secs(1),
            answering(&["198.51.100.7:41000"], slow, "203.0.113.9:2"),
        );
        assert_eq!(p.active(), Some(addr("198.51.100.7:41000")));
        assert_eq!(p.setup(), Some(slow));
        // This side moved: the peer's candidates stay, the path goes.
        p.moved(t1 + Duration::from_secs(1), None);
        assert_eq!(p.active(), None);
        assert_eq!(p.candidates(), [addr("198.51.100.7:41000")]);
    }

    #[test]
    fn a_spray_probes_distinct_random_ports_in_the_first_round_only_and_finds_a_mapping() {
        let t0 = Instant::now();
        let mut p = Paths::new(t0, 7);
        p.add_candidates([addr("203.0.113.5:4000")]);
        p.spray(Some(PeerNat::Random("203.0.113.5".parse().unwrap())));
        p.punch(t0);
        // The peer's NAT holds BIRTHDAY_SOCKETS mappings; none answers
        // here: count what a whole first round sends.
        let mut ports = std::collections::HashSet::new();
        let mut sprayed = 0;
        run(&mut p, t0, t0 + FIRST_ROUND + RETRY + ROUND, |t, _| {
            if t.to.port() != 4000 {
                sprayed += 1;
                assert!(t.to.port() >= 1024);
                ports.insert(t.to.port());
            }
            None
        });
        assert_eq!(sprayed, SPRAY_PER_ROUND, "later rounds do not spray");
        assert_eq!(ports.len(), SPRAY_PER_ROUND, "no port twice");
        // With mappings at 256 random ports the spray hits one: the path
        // is the mapping that answered.
        let mut q = Paths::new(t0, 9);
        q.add_candidates([addr("203.0.113.5:4000")]);
        q.spray(Some(PeerNat::Random("203.0.113.5".parse().unwrap())));
        q.punch(t0);
        let mut rng = 12345u64;
        let mapped: std::collections::HashSet<u16> = (0..BIRTHDAY_SOCKETS)
            .map(|_| 1024 + (next_random(&mut rng) % 64512) as u16)
            .collect();
        run(&mut q, t0, t0 + FIRST_ROUND, |t, _| match t.message {
            Message::Probe(id) if t.to.port() != 4000 && mapped.contains(&t.to.port()) => {
                Some((t.to, id, addr("198.51.100.1:1"), Duration::from_millis(5)))
            }
            _ => None,
        });
        let up = q.active().expect("a mapping was hit");
        assert!(mapped.contains(&up.port()));
        assert!(q.setup().is_some_and(|d| d < FIRST_ROUND));
    }

    #[test]
    fn a_sequential_nat_is_sprayed_at_once_on_the_ports_after_its_last_mapping() {
        let t0 = Instant::now();
        let mut p = Paths::new(t0, 1);
        p.add_candidates([addr("203.0.113.5:20002")]);
        p.spray(Some(PeerNat::Sequential {
            ip: "203.0.113.5".parse().unwrap(),
            after: 65_500,
            step: 1,
        }));
        p.punch(t0);
        let first: Vec<u16> = std::iter::from_fn(|| p.poll_transmit())
            .map(|t| t.to.port())
            .collect();
        // The candidate, then the ports up to the range's end (no wrap).
        let want: Vec<u16> = std::iter::once(20_002).chain(65_501..=65_535).collect();
        assert_eq!(first, want);
        // A predictable peer is not sprayed.
        p.spray(Some(PeerNat::Predictable));
        assert_eq!(p.spraying(), None);
    }

    #[test]
    fn a_nat_that_may_map_per_address_is_sprayed_on_the_ports_after_its_mapping() {
        let t0 = Instant::now();
        let mut p = Paths::new(t0, 1);
        p.add_candidates([addr("203.0.113.5:40000")]);
        p.spray(Some(PeerNat::PerAddress {
            ip: "203.0.113.5".parse().unwrap(),
            after: 40_000,
        }));
        p.punch(t0);
        let ports = |p: &mut Paths| -> Vec<u16> {
            std::iter::from_fn(|| p.poll_transmit())
                .map(|t| t.to.port())
                .collect()
        };
        // The candidate alone first: it answers where the NAT maps alike.
        assert_eq!(ports(&mut p), vec![40_000]);
        p.handle_timeout(t0 + PROBE_INTERVAL);
        let want: Vec<u16> = std::iter::once(40_000)
            .chain((40_001..).take(SEQUENTIAL_SPRAY))
            .collect();
        assert_eq!(ports(&mut p), want);
    }

    #[test]
    fn a_path_is_direct_only_when_neither_end_is_translated() {
        let t0 = Instant::now();
        let peer_if = [addr("198.51.100.7:40000")];
        let mine = |a: SocketAddr| a == addr("203.0.113.9:1234");
        // (the peer's address on the path, how the peer saw this side)
        static CASES: [(&str, &str, Crossing); 3] = [
            ("198.51.100.7:40000", "203.0.113.9:1234", Crossing::Direct),
            // This side's NAT mapped it.
            ("198.51.100.7:40000", "203.0.113.9:61000", Crossing::Punched),
            // The peer's NAT mapping, not its interface.
            ("192.0.2.50:40000", "203.0.113.9:1234", Crossing::Punched),
        ];
        for (to, seen, want) in &CASES {
            let mut p = Paths::new(t0, 1);
            assert_eq!(p.crossing(mine, &peer_if), None, "no path yet");
            p.add_candidates([addr(to)]);
            p.punch(t0);
            run(
                &mut p,
                t0,
                t0 + Duration::from_secs(1),
                answering(std::slice::from_ref(to), Duration::from_millis(1), seen),
            );
            assert_eq!(
                p.crossing(mine, &peer_if),
                Some(*want),
                "{to} seeing {seen}"
            );
        }
        assert_eq!(Crossing::Direct.to_string(), "udp-direct");
        assert_eq!(Crossing::Punched.to_string(), "udp-punched");
    }

    #[test]
    fn a_round_finds_the_candidate_that_answers_and_reports_how_it_was_seen() {
        let t0 = Instant::now();
        let mut p = Paths::new(t0, 1);
        p.add_candidates([addr("10.0.0.2:5000"), addr("198.51.100.7:40000")]);
        p.punch(t0);
        run(
            &mut p,
            t0,
            t0 + Duration::from_secs(1),
            answering(
                &["198.51.100.7:40000"],
                Duration::from_millis(20),
                "203.0.113.9:1234",
            ),
        );
        assert_eq!(p.active(), Some(addr("198.51.100.7:40000")));
        assert_eq!(p.rtt(), Some(Duration::from_millis(20)));
        let events: Vec<Event> = std::iter::from_fn(|| p.poll_event()).collect();
        assert_eq!(
            events,
            [
                Event::SeenAs(addr("203.0.113.9:1234")),
                Event::Up {
                    addr: addr("198.51.100.7:40000"),
                    rtt: Duration::from_millis(20)
                }
            ]
        );
    }

    #[test]
    fn with_nothing_answering_rounds_repeat_and_a_path_that_opens_is_found_within_five_seconds() {
        let t0 = Instant::now();
        let mut p = Paths::new(t0, 1);
        p.add_candidates([addr("198.51.100.7:40000")]);
        p.punch(t0);
        let mut sent = 0;
        let t1 = run(&mut p, t0, t0 + Duration::from_secs(60), |_, _| {
            sent += 1;
            None
        });
        assert_eq!(p.active(), None);
        // A first round of 3 s (16 probes), then 1 s (6) every 4 s: about
        // 1.5 probes a second per candidate, bounded.
        assert!((60..=100).contains(&sent), "{sent} probes in a minute");
        // The firewall opens at t1: found within RETRY + a round trip.
        let opened = t1;
        let mut found = None;
        run(&mut p, t1, t1 + Duration::from_secs(10), |t, now| {
            if let Message::Probe(id) = t.message {
                found.get_or_insert(now);
                return Some((t.to, id, addr("203.0.113.9:1"), Duration::from_millis(5)));
            }
            None
        });
        assert_eq!(p.active(), Some(addr("198.51.100.7:40000")));
        let took = found.expect("probed") - opened;
        assert!(took <= Duration::from_secs(5), "found after {took:?}");
    }

    #[test]
    fn an_idle_path_gets_keepalives_and_a_silent_one_goes_down() {
        let t0 = Instant::now();
        let mut p = Paths::new(t0, 1);
        let peer = addr("198.51.100.7:40000");
        p.add_candidates([peer]);
        p.punch(t0);
        let mut probes = Vec::new();
        let end = run(&mut p, t0, t0 + Duration::from_secs(40), |t, now| {
            let Message::Probe(id) = t.message else {
                return None;
            };
            probes.push(now);
            Some((t.to, id, addr("203.0.113.9:1"), Duration::from_millis(5)))
        });
        assert_eq!(p.active(), Some(peer));
        // After the first answer, one probe per KEEPALIVE of idleness
        // until the upgrade round at UPGRADE_EVERY.
        let keepalives = probes
            .iter()
            .filter(|at| **at > t0 + Duration::from_secs(1) && **at < t0 + UPGRADE_EVERY)
            .count();
        assert_eq!(keepalives, 2, "keepalives: {probes:?}");
        // The path falls silent: nothing answers any more.
        run(
            &mut p,
            end,
            end + DEAD_AFTER + Duration::from_secs(1),
            |_, _| None,
        );
        assert_eq!(p.active(), None);
        let events: Vec<Event> = std::iter::from_fn(|| p.poll_event()).collect();
        assert!(events.contains(&Event::Down { addr: peer }), "{events:?}");
    }

    #[test]
    fn a_probe_from_an_unknown_address_is_answered_and_probed_back() {
        let t0 = Instant::now();
        let mut p = Paths::new(t0, 100);
        let mapping = addr("203.0.113.5:61000");
        p.handle_probe(mapping, 42, t0);
        let sent: Vec<Transmit> = std::iter::from_fn(|| p.poll_transmit()).collect();
        assert_eq!(
            sent,
            [
                Transmit {
                    to: mapping,
                    message: Message::Ack {
                        id: 42,
                        seen: mapping
                    }
                },
                Transmit {
                    to: mapping,
                    message: Message::Probe(100)
                },
            ]
        );
        p.handle_ack(
            mapping,
            100,
            addr("198.51.100.1:5000"),
            t0 + Duration::from_millis(3),
        );
        assert_eq!(p.active(), Some(mapping));
    }

    #[test]
    fn a_clearly_faster_path_takes_over_and_a_slightly_faster_one_does_not() {
        let t0 = Instant::now();
        let mut p = Paths::new(t0, 1);
        let (slow, close, fast) = (
            addr("198.51.100.7:1"),
            addr("198.51.100.8:1"),
            addr("10.0.0.7:1"),
        );
        p.add_candidates([slow, close, fast]);
        p.punch(t0);
        let sent: Vec<Transmit> = std::iter::from_fn(|| p.poll_transmit()).collect();
        let id = |to| {
            sent.iter()
                .find_map(|t| match t.message {
                    Message::Probe(id) if t.to == to => Some(id),
                    _ => None,
                })
                .unwrap()
        };
        let seen = addr("203.0.113.9:1");
        p.handle_ack(slow, id(slow), seen, t0 + Duration::from_millis(30));
        assert_eq!(p.active(), Some(slow));
        p.handle_ack(close, id(close), seen, t0 + Duration::from_millis(25));
        assert_eq!(
            p.active(),
            Some(slow),
            "25 ms is not clearly better than 30"
        );
        p.handle_ack(fast, id(fast), seen, t0 + Duration::from_millis(2));
        assert_eq!(p.active(), Some(fast));
    }

    #[test]
    fn candidates_are_bounded_and_canonical() {
        let mut p = Paths::new(Instant::now(), 1);
        let v4mapped: SocketAddr = "[::ffff:198.51.100.7]:5".parse().unwrap();
        assert_eq!(p.add_candidates([v4mapped, addr("198.51.100.7:5")]), 1);
        let many = (0..200u16).map(|i| SocketAddr::from(([198, 51, 100, 9], 1000 + i)));
        p.add_candidates(many);
        assert_eq!(p.candidates().len(), MAX_CANDIDATES);
    }

    #[test]
    fn an_answer_to_an_unknown_probe_changes_nothing() {
        let t0 = Instant::now();
        let mut p = Paths::new(t0, 1);
        p.handle_ack(addr("198.51.100.7:1"), 999, addr("203.0.113.9:1"), t0);
        assert_eq!(p.active(), None);
    }
}
