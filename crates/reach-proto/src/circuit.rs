//! Relay circuits: two nodes each open a TCP connection to the same hub, the
//! hub pairs them and from then on moves bytes between them in the kernel
//! (`splice(2)`), without reading them. A routed stream moves onto a circuit
//! with the ordinary handover (`FLAG_UPGRADE`), so the circuit carries the
//! stream's end-to-end encrypted records and the hub never sees plaintext;
//! a byte changed on the way fails the records' authentication at the ends.
//!
//! ```text
//!   A (moves its routed stream)        hub H                    B
//!   Rendezvous::CircuitOffer{ticket} ----------------------->   (through the hubs)
//!   TCP + handshake to H, plaintext,   <- pairs by ticket ->    TCP + handshake to H
//!   vport CIRCUIT_VPORT; CircuitHello{ticket, peer: B}          CircuitHello{ticket, peer: A}
//!   <------------------- CircuitAnswer::Paired ------------------------>
//!   upgrade hello (Noise IK, A to B) ======== spliced by H ==========> B
//! ```
//!
//! When B cannot reach A's hub, it joins at its own hub with
//! [`CircuitHello::toward`] naming A's hub, and every hub on the route there
//! carries the circuit on: it dials the next hub's circuit port, sends the
//! next leg's hello ([`CircuitHello::next_leg`], one hop fewer) and splices
//! the two connections once that hub has paired the leg or carried it on in
//! turn. A's hub pairs the last leg with A's half.
//!
//! ```text
//!   A --hello--> H1 <--leg-- H2 <--leg-- H3 <--hello{toward: H1}-- B
//! ```
//!
//! The handshake with the hub authenticates both nodes to it (a plaintext
//! stream: the hub must be able to hand the bare socket to the kernel), so
//! the hub pairs only the two nodes that named each other under one ticket.
//! The hello and the answer are not authenticated themselves: someone on
//! the path between a node and its hub could change them, and so only stop
//! the circuit (which they can anyway) or pair it wrongly, which the
//! end-to-end upgrade handshake then refuses. Tickets are random, chosen by
//! the node that offers, and sent to the other node inside the offer.
//!
//! [`Circuits`] is the hub's pairing table: bounded in count, per node and
//! in time, with counters.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::identity::{NodeId, NODE_ID_LEN};

/// The hub's virtual port for circuit connections.
pub const CIRCUIT_VPORT: u16 = 2;

/// Length of a circuit ticket.
pub const TICKET_LEN: usize = 16;

/// A circuit's ticket: random, from the node that offered it.
pub type Ticket = [u8; TICKET_LEN];

/// The offer token a ticket starts with (little-endian): a node that cannot
/// join declines under it (`Rendezvous::SpliceDeclined`).
pub fn ticket_token(ticket: &Ticket) -> u32 {
    u32::from_le_bytes([ticket[0], ticket[1], ticket[2], ticket[3]])
}

const HELLO_MAGIC: [u8; 3] = *b"rcc";
const HELLO_VERSION: u8 = 2;

/// Length of a circuit hello's header (magic and version): read first, so
/// that a hello of another version gets a clear refusal, not a wait for
/// bytes that never come.
pub const HELLO_HEADER_LEN: usize = 4;

/// Length of an encoded [`CircuitHello`].
pub const HELLO_LEN: usize = HELLO_HEADER_LEN + 2 + TICKET_LEN + 3 * NODE_ID_LEN;

/// Hubs a circuit may cross at most: a node's hello carries it, each leg a
/// hub extends carries one fewer, and a hello with none left is refused (a
/// loop in changing routes ends there).
pub const MAX_HOPS: u8 = 8;

const FLAG_EXTEND: u8 = 1;
const FLAG_PULLED: u8 = 2;

/// Longest refusal reason in a [`CircuitAnswer`].
pub const MAX_REASON_LEN: usize = 255;

/// The first bytes on a circuit connection, after the handshake: a node's
/// (`from` is the node itself) or, on a leg one hub extends to the next, the
/// extending hub's (`from` is the node whose end the leg carries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitHello {
    /// The circuit's ticket.
    pub ticket: Ticket,
    /// The node at this end of the circuit.
    pub from: NodeId,
    /// The node at the circuit's other end.
    pub peer: NodeId,
    /// The hub where `peer` joins, when it is another: this hub carries the
    /// circuit on towards it (the answering node, which could not reach the
    /// offering node's hub, joins at its own) instead of pairing it here.
    pub toward: Option<NodeId>,
    /// Hubs the circuit may still cross, this one included.
    pub hops: u8,
    /// A leg the receiving hub asked for ([`Control::CircuitPull`]): the
    /// hub that sends it dialled back because the receiver could not dial
    /// it, and from here on serves the leg as if it had arrived from the
    /// receiver. The receiver takes it only from the hub it asked, under a
    /// ticket it is waiting for ([`Pulls`]).
    ///
    /// [`Control::CircuitPull`]: crate::link::Control::CircuitPull
    pub pulled: bool,
}

/// Why bytes are not a circuit hello.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CircuitHelloError {
    /// Not the circuit magic.
    #[error("not a circuit hello (bad magic bytes)")]
    BadMagic,
    /// A version this build does not speak.
    #[error("circuit hello version {0}, this build speaks {HELLO_VERSION}")]
    Version(u8),
    /// A node id is not an ed25519 public key.
    #[error("the circuit hello names an invalid node id")]
    BadPeer,
    /// Flags this build does not know, or a hub without its flag.
    #[error("the circuit hello has unknown flags {0:#04x}, or a hub without its flag")]
    Flags(u8),
    /// No hops left: a loop, or a path longer than [`MAX_HOPS`].
    #[error("the circuit crossed too many hubs")]
    NoHopsLeft,
}

impl CircuitHello {
    /// The hello's bytes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..3].copy_from_slice(&HELLO_MAGIC);
        b[3] = HELLO_VERSION;
        b[4] = if self.toward.is_some() {
            FLAG_EXTEND
        } else {
            0
        } | if self.pulled { FLAG_PULLED } else { 0 };
        b[5] = self.hops;
        let (ticket, ids) = b[6..].split_at_mut(TICKET_LEN);
        ticket.copy_from_slice(&self.ticket);
        let (from, rest) = ids.split_at_mut(NODE_ID_LEN);
        let (peer, toward) = rest.split_at_mut(NODE_ID_LEN);
        from.copy_from_slice(self.from.as_bytes());
        peer.copy_from_slice(self.peer.as_bytes());
        if let Some(hub) = &self.toward {
            toward.copy_from_slice(hub.as_bytes());
        }
        b
    }

    /// Checks a hello's header before the rest is read.
    pub fn check_header(b: &[u8; HELLO_HEADER_LEN]) -> Result<(), CircuitHelloError> {
        if b[..3] != HELLO_MAGIC {
            return Err(CircuitHelloError::BadMagic);
        }
        if b[3] != HELLO_VERSION {
            return Err(CircuitHelloError::Version(b[3]));
        }
        Ok(())
    }

    /// Reads a hello.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, CircuitHelloError> {
        if let Some(header) = b.first_chunk() {
            Self::check_header(header)?;
        }
        if b[4] & !(FLAG_EXTEND | FLAG_PULLED) != 0 {
            return Err(CircuitHelloError::Flags(b[4]));
        }
        let hops = b[5];
        if hops == 0 {
            return Err(CircuitHelloError::NoHopsLeft);
        }
        let (t, ids) = b[6..].split_at(TICKET_LEN);
        let mut ticket = [0u8; TICKET_LEN];
        ticket.copy_from_slice(t);
        let id = |bytes: &[u8]| {
            let mut a = [0u8; NODE_ID_LEN];
            a.copy_from_slice(bytes);
            NodeId::from_bytes(a).map_err(|_| CircuitHelloError::BadPeer)
        };
        let toward = &ids[2 * NODE_ID_LEN..];
        let toward = if b[4] & FLAG_EXTEND != 0 {
            Some(id(toward)?)
        } else if toward.iter().any(|&x| x != 0) {
            return Err(CircuitHelloError::Flags(b[4]));
        } else {
            None
        };
        Ok(Self {
            ticket,
            from: id(&ids[..NODE_ID_LEN])?,
            peer: id(&ids[NODE_ID_LEN..2 * NODE_ID_LEN])?,
            toward,
            hops,
            pulled: b[4] & FLAG_PULLED != 0,
        })
    }

    /// The hello of the leg a hub extends this circuit on, if a hop is
    /// left for it.
    pub fn next_leg(&self) -> Option<Self> {
        let hops = self.hops.checked_sub(1).filter(|h| *h > 0)?;
        Some(Self {
            hops,
            pulled: false,
            ..*self
        })
    }
}

/// The hub's answer to a circuit hello: one status byte, and for a refusal a
/// length byte and the reason. After `Paired`, every further byte is the
/// other node's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CircuitAnswer {
    /// The other node is here: the connection is now a pipe to it.
    Paired,
    /// No circuit; why.
    Refused(String),
    /// The hub offers no circuits now (none at all, or a limit is
    /// reached): the node should not ask again for a while.
    Unavailable(String),
}

const PAIRED: u8 = 0;
const REFUSED: u8 = 1;
const UNAVAILABLE: u8 = 2;

/// The hub's refusal when it offers no circuits.
pub const NO_CIRCUITS: &str = "this hub offers no circuits";
const HUB_LIMIT: &str = "the hub's circuit limit is reached";
const NODE_LIMIT: &str = "the node's circuit limit is reached";
const WAITING_LIMIT: &str = "the hub's limit of waiting circuits is reached";

/// Whether a refusal of [`Circuits::offer`] is a limit (answered as
/// [`CircuitAnswer::Unavailable`], so the node backs off).
pub fn is_limit(reason: &str) -> bool {
    [HUB_LIMIT, NODE_LIMIT, WAITING_LIMIT].contains(&reason)
}

impl CircuitAnswer {
    /// The answer's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            CircuitAnswer::Paired => vec![PAIRED],
            CircuitAnswer::Refused(reason) | CircuitAnswer::Unavailable(reason) => {
                let mut end = reason.len().min(MAX_REASON_LEN);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                let mut b = Vec::with_capacity(2 + end);
                b.push(if matches!(self, CircuitAnswer::Refused(_)) {
                    REFUSED
                } else {
                    UNAVAILABLE
                });
                b.push(end as u8);
                b.extend_from_slice(&reason.as_bytes()[..end]);
                b
            }
        }
    }

    /// What the status byte says: `Ok(None)` for paired, `Ok(Some(len))`
    /// for a refusal whose reason takes `len` more bytes.
    pub fn reason_len(status: u8, len: u8) -> Result<Option<usize>, u8> {
        match status {
            PAIRED => Ok(None),
            REFUSED | UNAVAILABLE => Ok(Some(len as usize)),
            other => Err(other),
        }
    }

    /// Whether `status` is followed by a length byte.
    pub fn has_reason(status: u8) -> bool {
        status == REFUSED || status == UNAVAILABLE
    }

    /// Whether `status` says the hub offers no circuits now.
    pub fn is_unavailable(status: u8) -> bool {
        status == UNAVAILABLE
    }
}

/// Bounds of a hub's pairing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitLimits {
    /// Halves waiting for their other half, in total.
    pub pending: usize,
    /// Circuits (waiting or paired) one node may hold.
    pub per_node: usize,
    /// Paired circuits in total.
    pub active: usize,
    /// How long a half waits for its other half.
    pub wait: Duration,
}

impl Default for CircuitLimits {
    fn default() -> Self {
        Self {
            pending: 1024,
            per_node: 256,
            active: 4096,
            wait: Duration::from_secs(10),
        }
    }
}

/// What the table did with a half.
#[derive(Debug)]
pub enum Offered<C> {
    /// It waits for its other half.
    Waiting,
    /// Both halves are here: `waiting` arrived first, then the new one.
    Paired {
        /// The half that waited.
        waiting: C,
        /// The half just offered.
        arrived: C,
    },
    /// Refused, with the connection back and why.
    Refused(C, &'static str),
}

/// Counters of a pairing table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CircuitCounters {
    /// Circuits paired.
    pub paired: u64,
    /// Halves refused (limits, a ticket in use, a circuit this hub does
    /// not serve).
    pub refused: u64,
    /// Halves whose other half did not come in time.
    pub expired: u64,
    /// Circuits this hub carried on to the next hub (see
    /// [`CircuitHello::extend`]).
    pub extended: u64,
}

struct Half<C> {
    from: NodeId,
    to: NodeId,
    conn: C,
    deadline: Instant,
}

/// A hub's circuit pairing table (sans-IO: connections are opaque `C`).
pub struct Circuits<C> {
    limits: CircuitLimits,
    waiting: HashMap<Ticket, Half<C>>,
    /// Circuits, waiting or paired, each node holds.
    held: HashMap<NodeId, usize>,
    active: usize,
    /// What happened so far.
    pub counters: CircuitCounters,
}

impl<C> Circuits<C> {
    /// An empty table.
    pub fn new(limits: CircuitLimits) -> Self {
        Self {
            limits,
            waiting: HashMap::new(),
            held: HashMap::new(),
            active: 0,
            counters: CircuitCounters::default(),
        }
    }

    /// Halves waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Paired circuits now.
    pub fn active(&self) -> usize {
        self.active
    }

    /// Offers the half of `from` (authenticated by its handshake) for a
    /// circuit to `to` under `ticket`. `serves` says whether this hub
    /// serves the circuit at all (the hub's rule: one of the two nodes is
    /// registered here), so strangers cannot use it between themselves.
    pub fn offer(
        &mut self,
        now: Instant,
        ticket: Ticket,
        from: NodeId,
        to: NodeId,
        conn: C,
        serves: bool,
    ) -> Offered<C> {
        if !serves {
            return self.refuse(conn, "neither node is registered at this hub");
        }
        if from == to {
            return self.refuse(conn, "a circuit needs two different nodes");
        }
        if let Some(half) = self.waiting.get(&ticket) {
            if half.from != to || half.to != from {
                return self.refuse(conn, "the ticket is in use by other nodes");
            }
            if self.active >= self.limits.active {
                return self.refuse(conn, HUB_LIMIT);
            }
            if self.count(&from) >= self.limits.per_node {
                return self.refuse(conn, NODE_LIMIT);
            }
            let Some(half) = self.waiting.remove(&ticket) else {
                return self.refuse(conn, "the ticket is in use by other nodes");
            };
            *self.held.entry(from).or_default() += 1;
            self.active += 1;
            self.counters.paired += 1;
            return Offered::Paired {
                waiting: half.conn,
                arrived: conn,
            };
        }
        if self.waiting.len() >= self.limits.pending {
            return self.refuse(conn, WAITING_LIMIT);
        }
        if self.count(&from) >= self.limits.per_node {
            return self.refuse(conn, NODE_LIMIT);
        }
        *self.held.entry(from).or_default() += 1;
        let deadline = now + self.limits.wait;
        self.waiting.insert(
            ticket,
            Half {
                from,
                to,
                conn,
                deadline,
            },
        );
        Offered::Waiting
    }

    /// Takes a place for a circuit between `from` and `to` that this hub
    /// carries on to the next hub rather than pairs here: it counts like a
    /// paired circuit (the same limits, released by [`closed`]).
    ///
    /// [`closed`]: Self::closed
    pub fn extend(&mut self, from: NodeId, to: NodeId) -> Result<(), &'static str> {
        if from == to {
            self.counters.refused += 1;
            return Err("a circuit needs two different nodes");
        }
        let limit = if self.active >= self.limits.active {
            Some(HUB_LIMIT)
        } else if self.count(&from) >= self.limits.per_node
            || self.count(&to) >= self.limits.per_node
        {
            Some(NODE_LIMIT)
        } else {
            None
        };
        if let Some(why) = limit {
            self.counters.refused += 1;
            return Err(why);
        }
        *self.held.entry(from).or_default() += 1;
        *self.held.entry(to).or_default() += 1;
        self.active += 1;
        self.counters.extended += 1;
        Ok(())
    }

    fn count(&self, node: &NodeId) -> usize {
        self.held.get(node).copied().unwrap_or(0)
    }

    fn refuse(&mut self, conn: C, why: &'static str) -> Offered<C> {
        self.counters.refused += 1;
        Offered::Refused(conn, why)
    }

    fn release(&mut self, node: &NodeId) {
        if let Some(n) = self.held.get_mut(node) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(node);
            }
        }
    }

    /// A paired circuit between `a` and `b` ended.
    pub fn closed(&mut self, a: &NodeId, b: &NodeId) {
        self.release(a);
        self.release(b);
        self.active = self.active.saturating_sub(1);
    }

    /// Removes the halves whose wait ended by `now`; their connections (the
    /// driver answers them). Until then an expired half still counts, and
    /// can still pair.
    pub fn expire(&mut self, now: Instant) -> Vec<C> {
        let late: Vec<Ticket> = self
            .waiting
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        let mut out = Vec::new();
        for t in late {
            if let Some(half) = self.waiting.remove(&t) {
                self.release(&half.from);
                self.counters.expired += 1;
                out.push(half.conn);
            }
        }
        out
    }
}

/// Most circuit legs a hub waits for at once from hubs it asked to dial it
/// ([`Pulls`]).
pub const MAX_PULLS: usize = 256;

/// Counters of a hub's pull table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PullCounters {
    /// Legs this hub asked another hub to dial back.
    pub asked: u64,
    /// Asked legs that arrived.
    pub pulled: u64,
    /// Asks refused (the table full, a ticket already waiting) and pulled
    /// legs nobody waited for.
    pub refused: u64,
    /// Asked legs that did not come in time.
    pub expired: u64,
}

struct Pull<W> {
    hub: NodeId,
    leg: CircuitHello,
    waiter: W,
    deadline: Instant,
}

/// The legs a hub waits for after asking the next hub to dial it
/// (`Control::CircuitPull`): a hub that cannot dial the next hub on a
/// circuit's route (it sits behind a NAT or firewall and dialled this hub
/// itself) is asked to dial back and present the leg, marked
/// [`CircuitHello::pulled`]. Sans-IO: the waiter `W` is whatever hands the
/// connection to the waiting task. Bounded ([`MAX_PULLS`]) and in time.
pub struct Pulls<W> {
    waiting: HashMap<Ticket, Pull<W>>,
    /// What happened so far.
    pub counters: PullCounters,
}

impl<W> Default for Pulls<W> {
    fn default() -> Self {
        Self {
            waiting: HashMap::new(),
            counters: PullCounters::default(),
        }
    }
}

impl<W> Pulls<W> {
    /// Legs waited for now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Waits, until `deadline`, for hub `hub` to dial back with `leg`.
    /// Expired entries are dropped first (their tasks may be gone).
    pub fn ask(
        &mut self,
        now: Instant,
        hub: NodeId,
        leg: CircuitHello,
        waiter: W,
        deadline: Instant,
    ) -> Result<(), (W, &'static str)> {
        let before = self.waiting.len();
        self.waiting.retain(|_, p| p.deadline > now);
        self.counters.expired += (before - self.waiting.len()) as u64;
        if self.waiting.contains_key(&leg.ticket) {
            self.counters.refused += 1;
            return Err((waiter, "the ticket is in use by other nodes"));
        }
        if self.waiting.len() >= MAX_PULLS {
            self.counters.refused += 1;
            return Err((waiter, "the hub's limit of pulled circuit legs is reached"));
        }
        self.counters.asked += 1;
        self.waiting.insert(
            leg.ticket,
            Pull {
                hub,
                leg,
                waiter,
                deadline,
            },
        );
        Ok(())
    }

    /// A pulled leg `hello` arrived from hub `from` (authenticated by its
    /// handshake): the waiter it answers, if this hub asked `from` for
    /// exactly that leg.
    pub fn arrived(&mut self, from: &NodeId, hello: &CircuitHello) -> Result<W, &'static str> {
        // Tickets are not secret from the hubs on the route (the offer
        // crosses them), so the leg must come from the hub asked, with the
        // hello asked for; anything else leaves the wait as it is.
        let asked = self.waiting.get(&hello.ticket).is_some_and(|p| {
            p.hub == *from
                && CircuitHello {
                    pulled: true,
                    ..p.leg
                } == *hello
        });
        if let Some(p) = asked.then(|| self.waiting.remove(&hello.ticket)).flatten() {
            self.counters.pulled += 1;
            return Ok(p.waiter);
        }
        self.counters.refused += 1;
        Err("no hub asked for this circuit leg")
    }

    /// The wait for `ticket`'s leg ended without it: forgets it.
    pub fn cancel(&mut self, ticket: &Ticket) {
        if self.waiting.remove(ticket).is_some() {
            self.counters.expired += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;
    use proptest::prelude::*;

    fn id(n: u8) -> NodeId {
        SecretKey::from_seed([n; 32]).node_id()
    }

    #[test]
    fn hellos_round_trip_and_bad_ones_say_why() {
        let hello = CircuitHello {
            ticket: [7; TICKET_LEN],
            from: id(2),
            peer: id(1),
            toward: Some(id(3)),
            hops: MAX_HOPS,
            pulled: false,
        };
        let here = CircuitHello {
            toward: None,
            ..hello
        };
        assert_eq!(CircuitHello::decode(&here.encode()), Ok(here));
        for pulled in [here, hello].map(|h| CircuitHello { pulled: true, ..h }) {
            assert_eq!(CircuitHello::decode(&pulled.encode()), Ok(pulled));
            assert_eq!(pulled.next_leg().map(|l| l.pulled), Some(false));
        }
        assert_eq!(CircuitHello::decode(&hello.encode()), Ok(hello));
        let mut b = hello.encode();
        b[0] = b'x';
        assert_eq!(CircuitHello::decode(&b), Err(CircuitHelloError::BadMagic));
        let mut b = hello.encode();
        b[3] = 1;
        assert_eq!(CircuitHello::decode(&b), Err(CircuitHelloError::Version(1)));
        let header: [u8; HELLO_HEADER_LEN] = b[..HELLO_HEADER_LEN].try_into().expect("4");
        assert_eq!(
            CircuitHello::check_header(&header),
            Err(CircuitHelloError::Version(1)),
            "an older node's hello is refused from its header"
        );
        let mut b = hello.encode();
        b[4] = 0x82;
        assert_eq!(
            CircuitHello::decode(&b),
            Err(CircuitHelloError::Flags(0x82))
        );
        // Each leg has one hop fewer; the last hub extends no further.
        let mut leg = hello;
        for _ in 1..MAX_HOPS {
            leg = leg.next_leg().expect("a hop left");
            assert_eq!(
                (leg.from, leg.peer, leg.toward),
                (hello.from, hello.peer, hello.toward)
            );
        }
        assert_eq!(leg.hops, 1);
        assert_eq!(leg.next_leg(), None);
        let mut b = leg.encode();
        b[5] = 0;
        assert_eq!(CircuitHello::decode(&b), Err(CircuitHelloError::NoHopsLeft));
        let mut b = hello.encode();
        b[4] = 0;
        assert_eq!(
            CircuitHello::decode(&b),
            Err(CircuitHelloError::Flags(0)),
            "a hub without its flag"
        );
    }

    #[test]
    fn a_pulled_leg_is_taken_only_from_the_hub_asked_with_the_leg_asked_for() {
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        let leg = CircuitHello {
            ticket: [9; TICKET_LEN],
            from: id(1),
            peer: id(2),
            toward: Some(id(3)),
            hops: MAX_HOPS - 1,
            pulled: false,
        };
        let back = CircuitHello {
            pulled: true,
            ..leg
        };
        let mut p: Pulls<u8> = Pulls::default();
        assert_eq!(p.ask(now, id(3), leg, 1, later).map_err(|e| e.1), Ok(()));
        assert_eq!(
            p.ask(now, id(3), leg, 2, later).map_err(|e| e.1),
            Err("the ticket is in use by other nodes")
        );
        // Another hub on the route knows the ticket: it cannot take the wait.
        assert!(p.arrived(&id(4), &back).is_err());
        // Not marked pulled, or another leg of the circuit: no.
        assert!(p.arrived(&id(3), &leg).is_err());
        let shorter = CircuitHello { hops: 1, ..back };
        assert!(p.arrived(&id(3), &shorter).is_err());
        assert_eq!(p.waiting(), 1, "the wait survives what is not its leg");
        assert_eq!(p.arrived(&id(3), &back), Ok(1));
        assert!(p.arrived(&id(3), &back).is_err(), "taken once");
        assert_eq!(
            p.counters,
            PullCounters {
                asked: 1,
                pulled: 1,
                refused: 5,
                expired: 0
            }
        );
    }

    #[test]
    fn pulls_are_bounded_and_expire() {
        let now = Instant::now();
        let soon = now + Duration::from_secs(1);
        let mut p: Pulls<()> = Pulls::default();
        let leg = |n: usize| CircuitHello {
            ticket: {
                let mut t = [0; TICKET_LEN];
                t[..8].copy_from_slice(&(n as u64).to_le_bytes());
                t
            },
            from: id(1),
            peer: id(2),
            toward: None,
            hops: 2,
            pulled: false,
        };
        for n in 0..MAX_PULLS {
            assert!(p.ask(now, id(3), leg(n), (), soon).is_ok());
        }
        assert_eq!(
            p.ask(now, id(3), leg(MAX_PULLS), (), soon).map_err(|e| e.1),
            Err("the hub's limit of pulled circuit legs is reached")
        );
        p.cancel(&leg(0).ticket);
        assert!(p.ask(now, id(3), leg(MAX_PULLS), (), soon).is_ok());
        // Past their deadline the waits go at the next ask.
        assert!(p
            .ask(
                soon,
                id(3),
                leg(MAX_PULLS + 1),
                (),
                soon + soon.duration_since(now)
            )
            .is_ok());
        assert_eq!(p.waiting(), 1);
        assert_eq!(p.counters.expired, MAX_PULLS as u64 + 1);
    }

    #[test]
    fn an_extended_circuit_counts_like_a_paired_one() {
        let limits = CircuitLimits {
            pending: 4,
            per_node: 2,
            active: 3,
            wait: Duration::from_secs(10),
        };
        let mut c: Circuits<()> = Circuits::new(limits);
        assert_eq!(c.extend(id(1), id(2)), Ok(()));
        assert_eq!(c.extend(id(1), id(3)), Ok(()));
        assert_eq!(
            c.extend(id(1), id(4)),
            Err(NODE_LIMIT),
            "per node, at either end"
        );
        assert_eq!(c.extend(id(4), id(1)), Err(NODE_LIMIT));
        assert_eq!(
            c.extend(id(5), id(5)),
            Err("a circuit needs two different nodes")
        );
        assert_eq!(c.extend(id(4), id(5)), Ok(()));
        assert_eq!(c.extend(id(6), id(7)), Err(HUB_LIMIT));
        assert_eq!(
            (c.active(), c.counters.extended, c.counters.refused),
            (3, 3, 4)
        );
        c.closed(&id(1), &id(2));
        c.closed(&id(1), &id(3));
        c.closed(&id(4), &id(5));
        assert_eq!(c.active(), 0);
        assert!(c.held.is_empty());
    }

    #[test]
    fn answers_carry_a_bounded_reason() {
        assert_eq!(CircuitAnswer::Paired.encode(), vec![0]);
        let long = "é".repeat(200);
        let b = CircuitAnswer::Refused(long).encode();
        assert_eq!(b[0], 1);
        assert_eq!(b[1] as usize, b.len() - 2);
        assert!(
            std::str::from_utf8(&b[2..]).is_ok(),
            "cut at a char boundary"
        );
        assert_eq!(CircuitAnswer::reason_len(b[0], b[1]), Ok(Some(b.len() - 2)));
        assert_eq!(CircuitAnswer::reason_len(0, 0), Ok(None));
        assert_eq!(CircuitAnswer::reason_len(7, 0), Err(7));
        let b = CircuitAnswer::Unavailable(NO_CIRCUITS.into()).encode();
        assert!(CircuitAnswer::is_unavailable(b[0]) && CircuitAnswer::has_reason(b[0]));
        assert!(is_limit(HUB_LIMIT) && is_limit(NODE_LIMIT) && !is_limit(NO_CIRCUITS));
    }

    #[test]
    fn two_halves_naming_each_other_pair_and_others_are_refused() {
        let now = Instant::now();
        let mut c = Circuits::new(CircuitLimits::default());
        let t = [1; TICKET_LEN];
        assert!(matches!(
            c.offer(now, t, id(1), id(2), "a", true),
            Offered::Waiting
        ));
        // A third node with the ticket (it saw the offer on the way).
        assert!(matches!(
            c.offer(now, t, id(3), id(1), "x", true),
            Offered::Refused("x", _)
        ));
        match c.offer(now, t, id(2), id(1), "b", true) {
            Offered::Paired { waiting, arrived } => assert_eq!((waiting, arrived), ("a", "b")),
            other => panic!("not paired: {other:?}"),
        }
        assert_eq!((c.waiting(), c.active()), (0, 1));
        c.closed(&id(1), &id(2));
        assert_eq!(c.active(), 0);
        assert!(c.held.is_empty(), "nothing held after the circuit ends");
        assert_eq!(c.counters.paired, 1);
        assert_eq!(c.counters.refused, 1);
        assert!(matches!(
            c.offer(now, [2; TICKET_LEN], id(4), id(5), "s", false),
            Offered::Refused("s", _)
        ));
    }

    #[test]
    fn halves_wait_only_so_long_and_only_so_many() {
        let now = Instant::now();
        let limits = CircuitLimits {
            pending: 3,
            per_node: 2,
            active: 1,
            wait: Duration::from_secs(10),
        };
        let mut c = Circuits::new(limits);
        for i in 0..2u8 {
            assert!(matches!(
                c.offer(now, [i; TICKET_LEN], id(1), id(2), i, true),
                Offered::Waiting
            ));
        }
        assert!(
            matches!(
                c.offer(now, [9; TICKET_LEN], id(1), id(2), 9, true),
                Offered::Refused(9, "the node's circuit limit is reached")
            ),
            "per node"
        );
        assert!(matches!(
            c.offer(now, [3; TICKET_LEN], id(3), id(2), 3, true),
            Offered::Waiting
        ));
        assert!(
            matches!(
                c.offer(now, [4; TICKET_LEN], id(4), id(2), 4, true),
                Offered::Refused(4, "the hub's limit of waiting circuits is reached")
            ),
            "in total"
        );
        assert!(c
            .expire(now + limits.wait - Duration::from_millis(1))
            .is_empty());
        let mut gone = c.expire(now + limits.wait);
        gone.sort();
        assert_eq!(gone, vec![0, 1, 3]);
        assert_eq!(c.counters.expired, 3);
        assert!(c.held.is_empty());
        // Active circuits are bounded too.
        c.offer(now, [5; TICKET_LEN], id(1), id(2), 5, true);
        assert!(matches!(
            c.offer(now, [5; TICKET_LEN], id(2), id(1), 6, true),
            Offered::Paired { .. }
        ));
        c.offer(now, [6; TICKET_LEN], id(1), id(2), 7, true);
        assert!(matches!(
            c.offer(now, [6; TICKET_LEN], id(2), id(1), 8, true),
            Offered::Refused(8, "the hub's circuit limit is reached")
        ));
        assert_eq!(c.waiting(), 1, "the refused half's ticket still waits");
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_hellos_never_panics(b in proptest::collection::vec(any::<u8>(), HELLO_LEN)) {
            let mut h = [0u8; HELLO_LEN];
            h.copy_from_slice(&b);
            let _ = CircuitHello::decode(&h);
            h[..4].copy_from_slice(&[b'r', b'c', b'c', HELLO_VERSION]);
            if let Ok(hello) = CircuitHello::decode(&h) {
                prop_assert_eq!(hello.encode(), h);
            }
        }

        #[test]
        fn held_counts_return_to_zero_whatever_the_order(
            ops in proptest::collection::vec((0u8..4, 0u8..4, 0u8..6, 0u64..30), 0..200),
        ) {
            let start = Instant::now();
            let mut c = Circuits::new(CircuitLimits { pending: 8, per_node: 4, active: 4, wait: Duration::from_secs(10) });
            let mut paired = Vec::new();
            for (from, to, t, at) in ops {
                let now = start + Duration::from_secs(at);
                if let Offered::Paired { .. } = c.offer(now, [t; TICKET_LEN], id(from), id(to), (), true) {
                    paired.push((id(from), id(to)));
                }
                prop_assert!(c.waiting() <= 8 && c.active() <= 4);
            }
            for (a, b) in paired {
                c.closed(&a, &b);
            }
            c.expire(start + Duration::from_secs(100));
            prop_assert!(c.held.is_empty());
            prop_assert_eq!(c.active(), 0);
        }
    }
}
