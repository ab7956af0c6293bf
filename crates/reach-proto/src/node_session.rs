//! The node's side of its hub link, sans-IO.
//!
//! Data flow: the core asks its driver to dial ([`Event::Dial`]); the driver
//! dials and authenticates the hub and reports back
//! ([`NodeSession::handle_connected`] or [`NodeSession::handle_dial_failed`]).
//! From then on the driver feeds in what the hub sends (control messages,
//! stream opens, the fact that any frame arrived, the link's end), writes out
//! what [`NodeSession::poll_transmit`] yields, acts on what
//! [`NodeSession::poll_event`] yields, and calls
//! [`NodeSession::handle_timeout`] at [`NodeSession::poll_timeout`].
//!
//! The core decides: when to dial (capped exponential backoff with jitter, a
//! long wait after a refusal), what to register, when a link is dead (no
//! registration in time, keepalive silence), which lookups are pending and
//! when they expire, which services are published on the hub (asked for again
//! after every reconnect, with the port they had), how many connect-backs and
//! splice answers run at once for other nodes, and the ids of the routed
//! streams this node opens. Stream bytes and credit stay with the driver's
//! stream objects, which count with [`crate::link::Window`] and
//! [`crate::link::Credit`].
//!
//! Every link gets a [`LinkId`]; input about an older link (a reader that
//! had not noticed its end yet) is ignored, so a late frame can never act on
//! the new link's state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::link::{
    admission_proof, encode_control, encode_reset, ConnectBack, Control, DirEntry, HomeClaim,
    Rendezvous, ResetCode,
};
use crate::rng::Rng;
use crate::{NodeId, SecretKey};

/// The session's clocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    /// First reconnect delay after a lost or failed link.
    pub min_backoff: Duration,
    /// Longest reconnect delay: short enough that nodes are back well within
    /// 5 s of a hub restart (2 s + 20% jitter + the attach itself).
    pub max_backoff: Duration,
    /// Wait after the hub refused this node: policies change by hand, so
    /// there is no point asking often.
    pub refused_backoff: Duration,
    /// How long dialling and registering may take together.
    pub attach_timeout: Duration,
    /// Keepalive interval.
    pub ping_interval: Duration,
    /// A link silent this long is dead (three keepalives missed).
    pub idle_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
            refused_backoff: Duration::from_secs(30),
            attach_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
        }
    }
}

/// What the session registers and how much it takes on.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node.
    pub me: NodeId,
    /// Direct addresses to advertise.
    pub addrs: Vec<SocketAddr>,
    /// Whether this session accepts streams (see [`Control::Register`]).
    pub accepts: bool,
    /// Proves admission to hubs that use a network secret.
    pub network_secret: Option<Vec<u8>>,
    /// Connect-backs and splice answers run at once for other nodes; more
    /// are declined at once. Requests come from other nodes: a flood must
    /// not make this node dial or punch without bound.
    pub max_answers: usize,
    /// Lookups pending at once.
    pub max_lookups: usize,
    /// The clocks.
    pub timing: Timing,
    /// The node's key, to sign a [`HomeClaim`] for each hub it registers
    /// with (`None`: registers without one, and loses any dispute over
    /// where it is to a hub that shows one).
    pub key: Option<SecretKey>,
    /// The wall clock in microseconds when the session was made. A claim's
    /// stamp is this plus the link number: later registrations of this
    /// process, and of a later process, carry larger stamps.
    pub clock_micros: u64,
    /// The vpn address this node holds, registered with every hub (see
    /// [`Control::Register`]).
    pub vpn: Option<crate::vpn::VpnClaim>,
}

impl Config {
    /// The defaults for `me`.
    pub fn new(me: NodeId) -> Self {
        Self {
            me,
            addrs: Vec::new(),
            accepts: true,
            network_secret: None,
            max_answers: 32,
            max_lookups: 1024,
            timing: Timing::default(),
            key: None,
            clock_micros: 0,
            vpn: None,
        }
    }
}

/// One link to the hub, as the core numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

/// What the hub said when it took the registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The link.
    pub link: LinkId,
    /// The hub.
    pub hub: NodeId,
    /// This node's address as the hub sees it (its NAT's mapping, if any).
    pub observed: SocketAddr,
    /// Ports of the hub's address echoes, on the hub's address.
    pub echo: Vec<u16>,
}

/// Why a link ended (or never came up).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkEnd {
    /// Dialling or authenticating the hub failed (the driver's reason).
    #[error("{0}")]
    Dial(String),
    /// Dialled, but no registration within the attach timeout.
    #[error("no registration within {0:?}")]
    NoRegistration(Duration),
    /// The hub refused this node.
    #[error("hub refused: {0}")]
    Refused(String),
    /// The hub's first answer was not `Registered`.
    #[error("unexpected answer to the registration: {0}")]
    Unexpected(String),
    /// Nothing heard from the hub for this long.
    #[error("no traffic from the hub for {0:?}")]
    Silent(Duration),
    /// The transport failed or the hub closed it (the driver's reason).
    #[error("{0}")]
    Transport(String),
    /// This node closed the session.
    #[error("closed by this node")]
    Closed,
}

/// Why a lookup got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupFailure {
    /// The session is not registered.
    #[error("not registered with the hub")]
    NotUp,
    /// Too many lookups pending.
    #[error("too many lookups pending")]
    Busy,
    /// The link ended before the answer came.
    #[error("the hub link ended before the answer came")]
    LinkLost,
    /// The deadline passed.
    #[error("no answer in time")]
    TimedOut,
}

/// The hub's refusal to publish a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExposeRefusal {
    /// False when the hub offers no proxy ports at all.
    pub offered: bool,
    /// Why, for the operator.
    pub reason: String,
}

/// Where a published service stands on the current link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// Asked for; no answer yet on this link.
    Pending,
    /// Published on this proxy port of the hub.
    Published(u16),
    /// Refused on this link.
    Refused(ExposeRefusal),
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Dial and authenticate the hub; report with `handle_connected` or
    /// `handle_dial_failed`, giving up at `deadline`.
    Dial {
        /// When to give up.
        deadline: Instant,
    },
    /// Registered: the link carries streams and lookups now.
    Up(Registration),
    /// The link ended: close it and end its routed streams. A new `Dial`
    /// follows after `retry_in` (none after a close).
    Down {
        /// The link.
        link: LinkId,
        /// Why.
        why: LinkEnd,
        /// When the next dial comes.
        retry_in: Option<Duration>,
    },
    /// A dial failed; the next comes after `retry_in`.
    Retry {
        /// Why it failed.
        why: LinkEnd,
        /// When the next dial comes.
        retry_in: Duration,
    },
    /// A lookup's answer.
    Found {
        /// The request.
        req: u32,
        /// Where the node is, if any hub knows.
        entry: Option<DirEntry>,
    },
    /// A vpn address lookup's answer: the nodes holding it.
    VipFound {
        /// The request.
        req: u32,
        /// The holders, earliest listed first (empty: none).
        holders: Vec<NodeId>,
    },
    /// A dial-back's answer ([`NodeSession::dial_back`]).
    DialedBack {
        /// The request.
        req: u32,
        /// What the hub's connection met.
        outcome: crate::link::DialBackOutcome,
    },
    /// A lookup (of either kind) that got no answer.
    LookupFailed {
        /// The request.
        req: u32,
        /// Why.
        why: LookupFailure,
    },
    /// The hub's answer to publishing `vport`.
    Exposed {
        /// The virtual port.
        vport: u16,
        /// The proxy port, or the refusal.
        result: Result<u16, ExposeRefusal>,
    },
    /// Another node opens routed stream `stream` to this node.
    Inbound {
        /// The stream id on the link.
        stream: u32,
        /// Who opens it (as the hubs authenticated it).
        src: NodeId,
    },
    /// Another node asks this one to connect back. Admitted under
    /// `max_answers`: call [`NodeSession::answer_done`] when finished.
    ConnectBack(ConnectBack),
    /// Another node offers a splice. Admitted under `max_answers`: call
    /// [`NodeSession::answer_done`] when finished.
    SpliceOffer(SpliceOffer),
    /// Another node offers to move a routed stream onto a relay circuit.
    /// Admitted under `max_answers`: call [`NodeSession::answer_done`] when
    /// finished.
    CircuitOffer(CircuitOffer),
    /// Another node's answer (or refusal) to this node's splice offer.
    SpliceAnswer {
        /// The target.
        from: NodeId,
        /// The offer's token.
        token: u32,
        /// Its candidates, or its reason for declining.
        result: Result<Vec<SocketAddr>, String>,
    },
    /// A connect-back this node asked for failed.
    ConnectBackFailed {
        /// Who was to connect back.
        target: NodeId,
        /// The request's token.
        token: u16,
        /// Why.
        reason: String,
    },
    /// A message this node relayed could not be delivered.
    Undeliverable {
        /// Where it was going.
        to: NodeId,
        /// The message.
        msg: Rendezvous,
        /// Why.
        reason: String,
    },
}

/// A relay circuit offer from another node (`crate::circuit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CircuitOffer {
    /// The asker.
    pub from: NodeId,
    /// The circuit's ticket.
    pub ticket: crate::circuit::Ticket,
    /// The routed stream's upgrade id.
    pub upgrade: u16,
    /// The hub that pairs the circuit.
    pub hub: NodeId,
    /// Where the asker reached it (at most `nat::MAX_CANDIDATES`).
    pub addrs: Vec<SocketAddr>,
}

/// A splice offer from another node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpliceOffer {
    /// The asker.
    pub from: NodeId,
    /// The offer's token.
    pub token: u32,
    /// The virtual port wanted.
    pub vport: u16,
    /// The asker's predicted endpoints (at most `nat::MAX_CANDIDATES`).
    pub candidates: Vec<SocketAddr>,
    /// Whether the spliced connection replaces a routed stream.
    pub upgrade: bool,
}

/// Where the session is.
#[derive(Clone, Debug)]
enum Phase {
    /// Waiting to dial.
    Waiting { until: Instant },
    /// The driver is dialling.
    Dialing { deadline: Instant },
    /// Register sent; waiting for the answer.
    Registering {
        link: LinkId,
        hub: NodeId,
        deadline: Instant,
    },
    /// Registered.
    Up {
        reg: Registration,
        heard: Instant,
        next_ping: Instant,
    },
    /// Closed for good.
    Closed,
}

/// A service published on the hub.
#[derive(Clone, Debug)]
struct Published {
    allow_from: Vec<(IpAddr, u8)>,
    /// The proxy port it had, asked for again after a reconnect.
    port: Option<u16>,
    state: Exposure,
    /// Whether the hub ever took it: a service refused on first asking is
    /// forgotten, one refused after a reconnect is kept (and shown refused).
    taken: bool,
    /// The hub's own node that serves proxy-port clients over the session.
    proxy: Option<NodeId>,
}

/// The node's side of its hub link.
#[derive(Debug)]
pub struct NodeSession {
    config: Config,
    rng: Rng,
    phase: Phase,
    backoff: Duration,
    next_link: u64,
    /// The hub's reason, while it refuses this node.
    refused: Option<String>,
    /// Why the last link ended or the last dial failed, until the next
    /// registration.
    last_end: Option<LinkEnd>,
    lookups: HashMap<u32, Instant>,
    next_req: u32,
    published: BTreeMap<u16, Published>,
    answers: usize,
    next_stream: u32,
    ping_nonce: u64,
    /// The ping in flight (its nonce, when it was sent), for the round trip.
    ping_sent: Option<(u64, Instant)>,
    /// The hub link's smoothed round trip (RFC 6298's SRTT), once measured.
    rtt: Option<std::time::Duration>,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
}

impl NodeSession {
    /// A session that dials at once; `seed` drives the backoff jitter.
    pub fn new(config: Config, seed: u64, now: Instant) -> Self {
        let backoff = config.timing.min_backoff;
        Self {
            config,
            rng: Rng::new(seed),
            phase: Phase::Waiting { until: now },
            backoff,
            next_link: 1,
            refused: None,
            last_end: None,
            lookups: HashMap::new(),
            next_req: 1,
            published: BTreeMap::new(),
            answers: 0,
            next_stream: 1,
            ping_nonce: 0,
            ping_sent: None,
            rtt: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.config.me
    }

    /// The registration, while the link is up.
    pub fn registration(&self) -> Option<&Registration> {
        match &self.phase {
            Phase::Up { reg, .. } => Some(reg),
            _ => None,
        }
    }

    /// The hub's reason, while it refuses this node.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Why the last link ended or the last dial failed (cleared by the next
    /// registration).
    pub fn last_end(&self) -> Option<&LinkEnd> {
        self.last_end.as_ref()
    }

    /// Whether [`NodeSession::close`] was called.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The next frame to write on the current link.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The next thing the driver must do.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`NodeSession::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match &self.phase {
            Phase::Waiting { until } => Some(*until),
            Phase::Dialing { .. } | Phase::Closed => None,
            Phase::Registering { deadline, .. } => Some(*deadline),
            Phase::Up {
                heard, next_ping, ..
            } => Some((*next_ping).min(*heard + self.config.timing.idle_timeout)),
        };
        let lookups = self.lookups.values().min().copied();
        match (phase, lookups) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time passes.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<u32> = self
            .lookups
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(r, _)| *r)
            .collect();
        for req in expired {
            self.lookups.remove(&req);
            self.events.push_back(Event::LookupFailed {
                req,
                why: LookupFailure::TimedOut,
            });
        }
        match &mut self.phase {
            Phase::Waiting { until } if *until <= now => {
                let deadline = now + self.config.timing.attach_timeout;
                self.phase = Phase::Dialing { deadline };
                self.events.push_back(Event::Dial { deadline });
            }
            Phase::Registering { link, deadline, .. } if *deadline <= now => {
                let link = *link;
                let why = LinkEnd::NoRegistration(self.config.timing.attach_timeout);
                self.end_link(link, why, now);
            }
            Phase::Up {
                reg,
                heard,
                next_ping,
            } => {
                let idle = self.config.timing.idle_timeout;
                if *heard + idle <= now {
                    let link = reg.link;
                    self.end_link(link, LinkEnd::Silent(idle), now);
                } else if *next_ping <= now {
                    *next_ping = now + self.config.timing.ping_interval;
                    self.ping(now);
                }
            }
            _ => {}
        }
    }

    /// Sends a ping and remembers when.
    fn ping(&mut self, now: Instant) {
        self.ping_nonce += 1;
        let nonce = self.ping_nonce;
        self.ping_sent = Some((nonce, now));
        self.send(&Control::Ping { nonce });
    }

    /// The current hub link's smoothed round trip, once a ping came back.
    pub fn link_rtt(&self) -> Option<std::time::Duration> {
        matches!(self.phase, Phase::Up { .. })
            .then_some(self.rtt)
            .flatten()
    }

    /// The driver's dial failed (or ran past its deadline).
    pub fn handle_dial_failed(&mut self, why: String, now: Instant) {
        if matches!(self.phase, Phase::Dialing { .. }) {
            let why = LinkEnd::Dial(why);
            let retry_in = self.schedule_retry(&why, now);
            self.last_end = Some(why.clone());
            self.events.push_back(Event::Retry { why, retry_in });
        }
    }

    /// The driver dialled and authenticated `hub`: the core registers on the
    /// new link. `None` when no dial was asked for (closed meanwhile): the
    /// driver drops the connection.
    pub fn handle_connected(&mut self, hub: NodeId) -> Option<LinkId> {
        let Phase::Dialing { deadline } = self.phase else {
            return None;
        };
        let link = LinkId(self.next_link);
        self.next_link += 1;
        self.transmit.clear();
        self.next_stream = 1;
        let proof = self
            .config
            .network_secret
            .as_deref()
            .map(|s| admission_proof(s, &self.config.me, &hub));
        let stamp = self.config.clock_micros.saturating_add(link.0);
        let home = self
            .config
            .key
            .as_ref()
            .map(|k| Box::new(HomeClaim::new(k, &hub, stamp)));
        self.send(&Control::Register {
            addrs: self.config.addrs.clone(),
            proof,
            accepts: self.config.accepts,
            home,
            vpn: self.config.vpn,
        });
        self.phase = Phase::Registering {
            link,
            hub,
            deadline,
        };
        Some(link)
    }

    /// Some frame arrived on `link` (keeps it alive). Control frames count
    /// by themselves; the driver calls this for stream frames, as often as
    /// it likes.
    pub fn handle_traffic(&mut self, link: LinkId, now: Instant) {
        if let Phase::Up { reg, heard, .. } = &mut self.phase {
            if reg.link == link {
                *heard = now;
            }
        }
    }

    /// `link` ended under the driver (read error, the hub closed it).
    pub fn handle_link_lost(&mut self, link: LinkId, why: String, now: Instant) {
        self.end_link(link, LinkEnd::Transport(why), now);
    }

    /// Another node opens routed stream `stream` to `dst` on `link`.
    pub fn handle_open(
        &mut self,
        link: LinkId,
        stream: u32,
        dst: NodeId,
        src: NodeId,
        now: Instant,
    ) {
        if !self.is_up_on(link) {
            return;
        }
        self.handle_traffic(link, now);
        if dst == self.config.me {
            self.events.push_back(Event::Inbound { stream, src });
        } else {
            let mut f = Vec::new();
            encode_reset(stream, ResetCode::NoRoute, "not this node", &mut f);
            self.transmit.push_back(f);
        }
    }

    /// A control message from the hub on `link`.
    pub fn handle_control(&mut self, link: LinkId, msg: Control, now: Instant) {
        match &self.phase {
            Phase::Registering { link: l, hub, .. } if *l == link => {
                let hub = *hub;
                self.registering(link, hub, msg, now);
            }
            Phase::Up { reg, .. } if reg.link == link => {
                self.handle_traffic(link, now);
                self.serve(link, msg, now);
            }
            _ => {}
        }
    }

    /// The first answer on a new link.
    fn registering(&mut self, link: LinkId, hub: NodeId, msg: Control, now: Instant) {
        match msg {
            Control::Registered { observed, echo } => {
                let reg = Registration {
                    link,
                    hub,
                    observed,
                    echo,
                };
                self.phase = Phase::Up {
                    reg: reg.clone(),
                    heard: now,
                    next_ping: now + self.config.timing.ping_interval,
                };
                self.backoff = self.config.timing.min_backoff;
                self.refused = None;
                self.last_end = None;
                self.events.push_back(Event::Up(reg));
                // At once, not after the ping interval: the setup driver
                // sizes its hedge delay from the link's round trip.
                self.rtt = None;
                self.ping(now);
                // A reconnect (a hub restart, say): publish again, asking for
                // the ports the services had.
                let again: Vec<Control> = self
                    .published
                    .iter_mut()
                    .map(|(vport, p)| {
                        p.state = Exposure::Pending;
                        expose_request(*vport, p)
                    })
                    .collect();
                for msg in &again {
                    self.send(msg);
                }
            }
            Control::Refused { reason } => {
                self.refused = Some(reason.clone());
                self.end_link(link, LinkEnd::Refused(reason), now);
            }
            other => {
                let got = format!("{other:?}");
                self.end_link(link, LinkEnd::Unexpected(got), now);
            }
        }
    }

    /// A control message on a registered link.
    fn serve(&mut self, link: LinkId, msg: Control, now: Instant) {
        match msg {
            // A late answer (the asker gave up) finds no entry and is dropped.
            Control::Found { req, entry, .. } if self.lookups.remove(&req).is_some() => {
                self.events.push_back(Event::Found { req, entry });
            }
            Control::VipFound { req, holders } if self.lookups.remove(&req).is_some() => {
                self.events.push_back(Event::VipFound { req, holders });
            }
            Control::DialedBack { req, outcome } if self.lookups.remove(&req).is_some() => {
                self.events.push_back(Event::DialedBack { req, outcome });
            }
            Control::ConnectBack(cb) => {
                if self.answers < self.config.max_answers {
                    self.answers += 1;
                    self.events.push_back(Event::ConnectBack(cb));
                } else {
                    self.send(&Control::ConnectBackFailed {
                        requester: cb.from,
                        target: self.config.me,
                        token: cb.token,
                        reason: "the node is busy with other connect-backs".into(),
                    });
                }
            }
            Control::ConnectBackFailed {
                target,
                token,
                reason,
                ..
            } => self.events.push_back(Event::ConnectBackFailed {
                target,
                token,
                reason,
            }),
            Control::Relay { from, msg, .. } => self.relayed(from, msg),
            Control::Undeliverable {
                to, msg, reason, ..
            } => self
                .events
                .push_back(Event::Undeliverable { to, msg, reason }),
            Control::Exposed { vport, port, proxy } => {
                if let Some(p) = self.published.get_mut(&vport) {
                    p.proxy = Some(proxy);
                }
                self.exposed(vport, Ok(port))
            }
            Control::ExposeRefused {
                vport,
                offered,
                reason,
            } => self.exposed(vport, Err(ExposeRefusal { offered, reason })),
            Control::Ping { nonce } => self.send(&Control::Pong { nonce }),
            Control::Pong { nonce } => {
                if let Some((sent, at)) = self.ping_sent {
                    if sent == nonce {
                        self.ping_sent = None;
                        let sample = now.saturating_duration_since(at);
                        // SRTT = 7/8 SRTT + 1/8 sample (RFC 6298 2.3).
                        self.rtt = Some(match self.rtt {
                            Some(srtt) => (srtt * 7 + sample) / 8,
                            None => sample,
                        });
                    }
                }
            }
            Control::Refused { reason } => {
                self.refused = Some(reason.clone());
                self.end_link(link, LinkEnd::Refused(reason), now);
            }
            // Anything else is not for a node; ignoring it keeps old nodes
            // working with newer hubs.
            _ => {}
        }
    }

    /// Takes one of the `max_answers` turns for an offer from `from`; when
    /// the node is busy, declines the offer's `token` instead.
    fn take_answer(&mut self, from: NodeId, token: u32) -> bool {
        if self.answers < self.config.max_answers {
            self.answers += 1;
            return true;
        }
        let reason = "the node is busy with other connection setups".into();
        self.relay(from, Rendezvous::SpliceDeclined { token, reason });
        false
    }

    /// A message another node sent through the hubs.
    fn relayed(&mut self, from: NodeId, msg: Rendezvous) {
        let token = msg.token();
        match msg {
            Rendezvous::SpliceOffer {
                token,
                vport,
                mut candidates,
                upgrade,
            } => {
                if self.take_answer(from, token) {
                    candidates.truncate(crate::nat::MAX_CANDIDATES);
                    self.events.push_back(Event::SpliceOffer(SpliceOffer {
                        from,
                        token,
                        vport,
                        candidates,
                        upgrade,
                    }));
                }
            }
            Rendezvous::CircuitOffer {
                ticket,
                upgrade,
                hub,
                mut addrs,
            } => {
                if self.take_answer(from, token) {
                    addrs.truncate(crate::nat::MAX_CANDIDATES);
                    self.events.push_back(Event::CircuitOffer(CircuitOffer {
                        from,
                        ticket,
                        upgrade,
                        hub,
                        addrs,
                    }));
                }
            }
            Rendezvous::SpliceAnswer { token, candidates } => {
                self.events.push_back(Event::SpliceAnswer {
                    from,
                    token,
                    result: Ok(candidates),
                })
            }
            Rendezvous::SpliceDeclined { token, reason } => {
                self.events.push_back(Event::SpliceAnswer {
                    from,
                    token,
                    result: Err(reason),
                })
            }
        }
    }

    fn exposed(&mut self, vport: u16, result: Result<u16, ExposeRefusal>) {
        if let Some(p) = self.published.get_mut(&vport) {
            match &result {
                Ok(port) => {
                    p.port = Some(*port);
                    p.taken = true;
                    p.state = Exposure::Published(*port);
                }
                Err(r) if p.taken => p.state = Exposure::Refused(r.clone()),
                Err(_) => {
                    self.published.remove(&vport);
                }
            }
        }
        self.events.push_back(Event::Exposed { vport, result });
    }

    /// Ends `link` (if it is the current one) and schedules the next dial.
    fn end_link(&mut self, link: LinkId, why: LinkEnd, now: Instant) {
        let current = match &self.phase {
            Phase::Registering { link: l, .. } => *l == link,
            Phase::Up { reg, .. } => reg.link == link,
            _ => false,
        };
        if !current {
            return;
        }
        let was_up = matches!(self.phase, Phase::Up { .. });
        self.transmit.clear();
        for req in std::mem::take(&mut self.lookups).into_keys() {
            self.events.push_back(Event::LookupFailed {
                req,
                why: LookupFailure::LinkLost,
            });
        }
        if was_up {
            self.backoff = self.config.timing.min_backoff;
        }
        let retry_in = self.schedule_retry(&why, now);
        self.last_end = Some(why.clone());
        self.events.push_back(Event::Down {
            link,
            why,
            retry_in: Some(retry_in),
        });
    }

    /// Waits before the next dial: the backoff with ±20% jitter, so nodes
    /// that lost the same hub do not come back in lockstep; then doubles it.
    fn schedule_retry(&mut self, why: &LinkEnd, now: Instant) -> Duration {
        let t = &self.config.timing;
        if matches!(why, LinkEnd::Refused(_)) {
            self.backoff = t.refused_backoff;
        }
        let wait = self.backoff.mul_f64(0.8 + 0.4 * self.rng.unit());
        self.backoff = (self.backoff * 2).min(t.max_backoff.max(self.backoff));
        self.phase = Phase::Waiting { until: now + wait };
        wait
    }

    fn is_up_on(&self, link: LinkId) -> bool {
        matches!(&self.phase, Phase::Up { reg, .. } if reg.link == link)
    }

    fn send(&mut self, msg: &Control) {
        let mut f = Vec::new();
        // Only oversized messages fail to encode; the node's own are small
        // (address lists are capped where they are built, an Expose is
        // checked when it is asked for).
        if encode_control(msg, &mut f).is_ok() {
            self.transmit.push_back(f);
        }
    }

    /// Asks the hub where `node` is; the answer comes as [`Event::Found`] or
    /// [`Event::LookupFailed`] by `deadline`.
    pub fn lookup(&mut self, node: NodeId, deadline: Instant) -> Result<u32, LookupFailure> {
        let req = self.lookup_slot(deadline)?;
        self.send(&Control::Lookup { req, node });
        Ok(req)
    }

    /// Advertises `addrs` from now on: told to the hub now if registered,
    /// and in every registration after.
    pub fn set_addrs(&mut self, addrs: Vec<SocketAddr>) {
        if addrs == self.config.addrs {
            return;
        }
        self.config.addrs = addrs;
        if matches!(self.phase, Phase::Up { .. }) {
            self.send(&Control::NodeAddrs {
                addrs: self.config.addrs.clone(),
            });
        }
    }

    /// Holds vpn address `claim` from now on (None: none): told to the hub
    /// now if registered, and in every registration after.
    pub fn set_vpn(&mut self, claim: Option<crate::vpn::VpnClaim>) {
        self.config.vpn = claim;
        if matches!(self.phase, Phase::Up { .. }) {
            self.send(&Control::VpnClaim { claim });
        }
    }

    /// Asks the hub which nodes hold vpn address `ip` in `network`; the
    /// answer comes as [`Event::VipFound`] or [`Event::LookupFailed`] by
    /// `deadline`.
    pub fn lookup_vip(
        &mut self,
        network: crate::vpn::NetworkTag,
        ip: IpAddr,
        deadline: Instant,
    ) -> Result<u32, LookupFailure> {
        let req = self.lookup_slot(deadline)?;
        self.send(&Control::VipLookup { req, network, ip });
        Ok(req)
    }

    /// Asks the hub to connect to this node's observed address at `port`
    /// from `from`, writing `token`; the answer comes as
    /// [`Event::DialedBack`] or [`Event::LookupFailed`] by `deadline`.
    pub fn dial_back(
        &mut self,
        port: u16,
        from: crate::link::DialBackFrom,
        token: u64,
        deadline: Instant,
    ) -> Result<u32, LookupFailure> {
        let req = self.lookup_slot(deadline)?;
        self.send(&Control::DialBack {
            req,
            port,
            from,
            token,
        });
        Ok(req)
    }

    /// A request id for a lookup answered by `deadline`, within the bound.
    fn lookup_slot(&mut self, deadline: Instant) -> Result<u32, LookupFailure> {
        if !matches!(self.phase, Phase::Up { .. }) {
            return Err(LookupFailure::NotUp);
        }
        if self.lookups.len() >= self.config.max_lookups {
            return Err(LookupFailure::Busy);
        }
        let req = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        self.lookups.insert(req, deadline);
        Ok(req)
    }

    /// Stops waiting for lookup `req` (its asker gave up).
    pub fn forget_lookup(&mut self, req: u32) {
        self.lookups.remove(&req);
    }

    /// Publishes `vport` on the hub's proxy ports (now, if registered, and
    /// again after every reconnect). The answer comes as [`Event::Exposed`].
    /// Fails, recording nothing, when the request cannot be sent at all
    /// (an `allow_from` list too long for one frame).
    pub fn expose(
        &mut self,
        vport: u16,
        allow_from: Vec<(IpAddr, u8)>,
    ) -> Result<(), crate::link::LinkError> {
        let p = Published {
            allow_from,
            port: None,
            state: Exposure::Pending,
            taken: false,
            proxy: None,
        };
        let mut frame = Vec::new();
        encode_control(&expose_request(vport, &p), &mut frame)?;
        self.published.insert(vport, p);
        if matches!(self.phase, Phase::Up { .. }) {
            self.transmit.push_back(frame);
        }
        Ok(())
    }

    /// Whether `peer` opens a stream to `vport` on behalf of the hub's proxy
    /// port clients: `vport` is published on the hub of the current link,
    /// and `peer` is that hub (connect-backs) or its proxy node (routed).
    pub fn serves_proxy_clients(&self, peer: &NodeId, vport: u16) -> bool {
        let Phase::Up { reg, .. } = &self.phase else {
            return false;
        };
        self.published.get(&vport).is_some_and(|p| {
            matches!(p.state, Exposure::Published(_))
                && (*peer == reg.hub || p.proxy.as_ref() == Some(peer))
        })
    }

    /// Where the service published at `vport` stands, if it is.
    pub fn exposure(&self, vport: u16) -> Option<&Exposure> {
        self.published.get(&vport).map(|p| &p.state)
    }

    /// Opens a routed stream to `dst` on the current link: returns the link
    /// and the stream id, and queues the Open.
    pub fn open_stream(&mut self, dst: &NodeId) -> Option<(LinkId, u32)> {
        let Phase::Up { reg, .. } = &self.phase else {
            return None;
        };
        let link = reg.link;
        // The node opens odd ids; the hub's opens towards it are even.
        let id = self.next_stream;
        self.next_stream = self.next_stream.wrapping_add(2);
        let mut f = Vec::with_capacity(80);
        crate::link::encode_open(id, dst, &self.config.me, &mut f);
        self.transmit.push_back(f);
        Some((link, id))
    }

    /// Asks `cb.target` to connect back, through the hubs.
    pub fn connect_back(&mut self, cb: ConnectBack) -> bool {
        self.send_if_up(&Control::ConnectBack(cb))
    }

    /// Sends `msg` to node `to` through the hubs.
    pub fn relay(&mut self, to: NodeId, msg: Rendezvous) -> bool {
        let from = self.config.me;
        self.send_if_up(&Control::Relay { from, to, msg })
    }

    /// Tells the asker of a connect-back that it failed.
    pub fn connect_back_failed(&mut self, requester: NodeId, token: u16, reason: String) -> bool {
        let target = self.config.me;
        self.send_if_up(&Control::ConnectBackFailed {
            requester,
            target,
            token,
            reason,
        })
    }

    fn send_if_up(&mut self, msg: &Control) -> bool {
        let up = matches!(self.phase, Phase::Up { .. });
        if up {
            self.send(msg);
        }
        up
    }

    /// A connect-back or splice answer admitted by an event has finished.
    pub fn answer_done(&mut self) {
        self.answers = self.answers.saturating_sub(1);
    }

    /// Connect-backs and splice answers running now.
    pub fn answers_running(&self) -> usize {
        self.answers
    }

    /// Ends the session for good: no more dials. A current link ends with
    /// [`LinkEnd::Closed`] (the driver flushes and closes it).
    pub fn close(&mut self) {
        let link = match &self.phase {
            Phase::Registering { link, .. } => Some(*link),
            Phase::Up { reg, .. } => Some(reg.link),
            _ => None,
        };
        for req in std::mem::take(&mut self.lookups).into_keys() {
            self.events.push_back(Event::LookupFailed {
                req,
                why: LookupFailure::LinkLost,
            });
        }
        self.phase = Phase::Closed;
        if let Some(link) = link {
            self.events.push_back(Event::Down {
                link,
                why: LinkEnd::Closed,
                retry_in: None,
            });
        }
    }
}

fn expose_request(vport: u16, p: &Published) -> Control {
    Control::Expose {
        vport,
        want_port: p.port,
        allow_from: p.allow_from.clone(),
    }
}

#[cfg(test)]
#[path = "node_session_tests.rs"]
mod tests;
