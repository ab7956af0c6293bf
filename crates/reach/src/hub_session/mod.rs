//! A node's session with its home hub: the tokio driver of
//! [`reach_proto::node_session::NodeSession`].
//!
//! Data flow: one driver task per endpoint runs the core's clock and dials
//! when the core asks (`dial`: resolve, learn or check the hub's identity,
//! authenticate). A connected link gets a writer task (the frame queue of
//! `crate::link`) and a reader task: stream frames (data, credit, fin, reset)
//! go straight to their [`RoutedStream`], control messages and opens into the
//! core. Every call into the core, from the driver, the reader or the
//! endpoint (lookups, exposures, opens, relays), runs under one lock and then
//! carries out what the core asks before the lock is let go: frames to the
//! link, answers to waiters, and requests from other nodes to the endpoint
//! ([`Request`], a bounded queue). When the link ends, every routed stream on
//! it ends with a clear error and the core schedules the redial.
//!
//! This module knows nothing of the endpoint: what other nodes ask of this
//! one leaves as [`Request`]s, so the hub link can be followed (and tested)
//! on its own.

mod dial;
mod target;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reach_proto::link::{encode_reset, ConnectBack, DirEntry, Frame, Rendezvous, ResetCode};
use reach_proto::node_session::{
    self, Event, ExposeRefusal, Exposure, LinkEnd, LinkId, LookupFailure, NodeSession, SpliceOffer,
};
use reach_proto::NodeId;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

pub(crate) use dial::{Dialer, ATTACH_TIMEOUT};
pub use target::{HubTarget, HubTargetError};

use crate::error::{ExposeError, SessionError};
use crate::link::{frame_channel, write_frames, FrameReader, FrameTx};
use crate::routed::{RoutedStream, StreamMap};
use crate::stream::ReachStream;

/// Requests from other nodes waiting for the endpoint; more are declined
/// (connect-backs and splice offers) or reset (streams) at once. The
/// endpoint only starts a task per request, but a burst of opens read in one
/// batch arrives faster than that: a thousand concurrent streams must fit.
const REQUEST_QUEUE: usize = 4096;
/// How often a busy link tells the core it is alive: stream frames do not
/// take the core's lock each, and keepalive needs only coarse time.
const TRAFFIC_STAMP: Duration = Duration::from_secs(1);

/// What the node's hub session looks like now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubStatus {
    /// The hub's NodeId.
    pub hub: NodeId,
    /// The node's address as the hub sees it (its NAT's mapping, if any).
    pub observed: SocketAddr,
    /// The local address of the link.
    pub local: SocketAddr,
    /// The hub's address.
    pub remote: SocketAddr,
    /// The hub's address echoes (for NAT behaviour detection).
    pub echo: Vec<SocketAddr>,
}

/// Where a service published with `Endpoint::expose_on_hub` stands now.
#[derive(Clone, Debug)]
pub enum HubExposure {
    /// Published at this address of the hub.
    Published(SocketAddr),
    /// Asked for (first time, or again after the hub link came back); no
    /// answer yet.
    Pending,
    /// The hub refused it on the current link.
    Refused(ExposeError),
}

/// A registered link.
#[derive(Clone)]
pub(crate) struct Link {
    id: LinkId,
    status: HubStatus,
}

impl Link {
    pub(crate) fn status(&self) -> &HubStatus {
        &self.status
    }
}

/// What another node asks of this one over the hub link, for the endpoint.
pub(crate) enum Request {
    /// A routed stream opened to this node: run the responder's handshake.
    Routed {
        stream: RoutedStream,
        src: NodeId,
        /// The link's (local, remote) addresses.
        addrs: (SocketAddr, SocketAddr),
    },
    /// Connect back to the asker; call [`Session::answer_done`] when done.
    ConnectBack(ConnectBack),
    /// Answer a splice offer; call [`Session::answer_done`] when done.
    SpliceOffer {
        offer: SpliceOffer,
        /// The hub's address echoes, to predict this node's mapping.
        echoes: Vec<SocketAddr>,
    },
    /// Answer a circuit offer; call [`Session::answer_done`] when done.
    CircuitOffer(reach_proto::node_session::CircuitOffer),
    /// An answer to something this node asked: the core's
    /// `SpliceAnswer`, `ConnectBackFailed` or `Undeliverable`.
    Answer(Event),
}

/// The I/O of one link.
struct Conn {
    id: LinkId,
    tx: FrameTx,
    streams: Arc<StreamMap>,
    local: SocketAddr,
    remote: SocketAddr,
    reader: JoinHandle<()>,
    writer: JoinHandle<std::io::Result<()>>,
}

impl Conn {
    fn abort(&self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// A lookup's answer, of either kind.
enum Answer {
    /// Where a node is.
    Node(Option<DirEntry>),
    /// Who holds a vpn address.
    Vip(Vec<NodeId>),
    /// What a dial-back met.
    DialedBack(reach_proto::link::DialBackOutcome),
}

/// Everything behind the session's one lock.
struct State {
    core: NodeSession,
    conn: Option<Conn>,
    /// A dial the core asked for, until the driver takes it.
    dial: Option<Instant>,
    /// The link being closed gracefully by [`Session::close`].
    closing: Option<Conn>,
    lookups: HashMap<u32, oneshot::Sender<Result<Answer, LookupFailure>>>,
    expose_waiters: HashMap<u16, oneshot::Sender<Result<u16, ExposeError>>>,
}

/// The endpoint's handle on its hub session.
pub(crate) struct Session {
    /// The hubs it may attach to: the first, then the others in turn when
    /// a dial fails or a link ends.
    targets: Vec<HubTarget>,
    /// Which of them it dials now.
    current: std::sync::atomic::AtomicUsize,
    dialer: Dialer,
    state: Mutex<State>,
    /// Wakes the driver: a dial to make or a new deadline.
    wake: Notify,
    /// The registered link, while there is one.
    link: watch::Sender<Option<Link>>,
    /// The hub's reason while it refuses this node.
    refused: watch::Sender<Option<String>>,
    requests: mpsc::Sender<Request>,
}

impl Session {
    /// A session with the first of `targets` (dialled by the driver,
    /// [`Session::run`]), moving to the next when a dial fails or a link
    /// ends; the receiver gets what other nodes ask of this one.
    pub(crate) fn new(
        targets: Vec<HubTarget>,
        dialer: Dialer,
        config: node_session::Config,
    ) -> (Arc<Self>, mpsc::Receiver<Request>) {
        let mut seed = [0u8; 8];
        // Only the reconnect jitter depends on it; a fixed seed would make
        // nodes that lost the same hub come back in lockstep, no worse.
        let _ = getrandom::fill(&mut seed);
        let core = NodeSession::new(config, u64::from_le_bytes(seed), Instant::now());
        let (requests, rx) = mpsc::channel(REQUEST_QUEUE);
        let session = Self {
            targets,
            current: std::sync::atomic::AtomicUsize::new(0),
            dialer,
            state: Mutex::new(State {
                core,
                conn: None,
                dial: None,
                closing: None,
                lookups: HashMap::new(),
                expose_waiters: HashMap::new(),
            }),
            wake: Notify::new(),
            link: watch::Sender::new(None),
            refused: watch::Sender::new(None),
            requests,
        };
        (Arc::new(session), rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hub the session dials now.
    pub(crate) fn target(&self) -> &HubTarget {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.targets[i % self.targets.len()]
    }

    /// After a failed dial or a lost link: the next hub, if there are
    /// several (any hub of the network finds this node once it registers
    /// there: the directory is shared).
    fn next_target(&self, why: &str) {
        if self.targets.len() > 1 {
            let was = self.target().clone();
            self.current
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(from = %was, to = %self.target(), "hub {why}: trying the next hub");
        }
    }

    /// Runs `f` on the core, then carries out what it asked for.
    fn with_core<R>(self: &Arc<Self>, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st);
        self.carry_out(&mut st);
        drop(st);
        self.wake.notify_one();
        r
    }

    /// Sends the core's frames and acts on its events (which may queue
    /// more frames: declines, say) until it has nothing left.
    fn carry_out(self: &Arc<Self>, st: &mut State) {
        loop {
            let mut busy = false;
            while let Some(frame) = st.core.poll_transmit() {
                busy = true;
                if let Some(c) = &st.conn {
                    let _ = c.tx.send(frame);
                }
            }
            while let Some(ev) = st.core.poll_event() {
                busy = true;
                self.on_event(st, ev);
            }
            if !busy {
                return;
            }
        }
    }

    fn on_event(self: &Arc<Self>, st: &mut State, ev: Event) {
        match ev {
            Event::Dial { deadline } => st.dial = Some(deadline),
            Event::Up(reg) => {
                let Some(c) = st.conn.as_ref().filter(|c| c.id == reg.link) else {
                    return;
                };
                let status = HubStatus {
                    hub: reg.hub,
                    observed: reg.observed,
                    local: c.local,
                    remote: c.remote,
                    echo: reg
                        .echo
                        .iter()
                        .take(2)
                        .map(|port| SocketAddr::new(c.remote.ip(), *port))
                        .collect(),
                };
                tracing::info!(hub = %reg.hub, observed = %reg.observed, "registered with hub");
                self.refused.send_replace(None);
                self.link.send_replace(Some(Link {
                    id: reg.link,
                    status,
                }));
            }
            Event::Down {
                link,
                why,
                retry_in,
            } => self.link_down(st, link, why, retry_in),
            Event::Retry { why, retry_in } => {
                tracing::warn!(hub = %self.target(), "cannot attach to hub: {why}; retrying in {retry_in:.1?}");
            }
            Event::Found { req, entry } => {
                if let Some(w) = st.lookups.remove(&req) {
                    let _ = w.send(Ok(Answer::Node(entry)));
                }
            }
            Event::VipFound { req, holders } => {
                if let Some(w) = st.lookups.remove(&req) {
                    let _ = w.send(Ok(Answer::Vip(holders)));
                }
            }
            Event::DialedBack { req, outcome } => {
                if let Some(w) = st.lookups.remove(&req) {
                    let _ = w.send(Ok(Answer::DialedBack(outcome)));
                }
            }
            Event::LookupFailed { req, why } => {
                if let Some(w) = st.lookups.remove(&req) {
                    let _ = w.send(Err(why));
                }
            }
            Event::Exposed { vport, result } => {
                let result = result.map_err(|r| {
                    let e = expose_error(r);
                    tracing::warn!(vport, "not published on the hub: {e}");
                    e
                });
                if let Some(w) = st.expose_waiters.remove(&vport) {
                    let _ = w.send(result);
                }
            }
            Event::Inbound { stream, src } => {
                let Some(c) = &st.conn else { return };
                let rs = RoutedStream::register(stream, c.streams.clone(), c.tx.clone());
                let addrs = (c.local, c.remote);
                let req = Request::Routed {
                    stream: rs,
                    src,
                    addrs,
                };
                if self.requests.try_send(req).is_err() {
                    // Dropping the stream resets it towards the opener.
                    tracing::warn!(%src, "routed stream refused: the node is busy");
                }
            }
            Event::ConnectBack(cb) => {
                let (from, token) = (cb.from, cb.token);
                if self.requests.try_send(Request::ConnectBack(cb)).is_err() {
                    st.core.answer_done();
                    let reason = "the node is busy with other connect-backs".into();
                    st.core.connect_back_failed(from, token, reason);
                }
            }
            Event::SpliceOffer(offer) => {
                let (from, token) = (offer.from, offer.token);
                let echoes = self.status().map(|s| s.echo).unwrap_or_default();
                let req = Request::SpliceOffer { offer, echoes };
                if self.requests.try_send(req).is_err() {
                    st.core.answer_done();
                    let reason = "the node is busy with other connection setups".into();
                    st.core
                        .relay(from, Rendezvous::SpliceDeclined { token, reason });
                }
            }
            Event::CircuitOffer(offer) => {
                // Unanswered when busy: the asker's half expires at the hub.
                if self
                    .requests
                    .try_send(Request::CircuitOffer(offer))
                    .is_err()
                {
                    st.core.answer_done();
                }
            }
            answer @ (Event::SpliceAnswer { .. }
            | Event::ConnectBackFailed { .. }
            | Event::Undeliverable { .. }) => self.request(Request::Answer(answer)),
        }
    }

    /// Queues an answer to something this node asked; when the endpoint is
    /// that far behind, the asker's own deadline ends the wait instead.
    fn request(&self, req: Request) {
        if self.requests.try_send(req).is_err() {
            tracing::debug!("dropped an answer from the hub: the node is busy");
        }
    }

    fn link_down(&self, st: &mut State, link: LinkId, why: LinkEnd, retry_in: Option<Duration>) {
        let Some(conn) = st.conn.take_if(|c| c.id == link) else {
            return;
        };
        self.link.send_replace(None);
        let streams: Vec<_> = crate::routed::lock_map(&conn.streams).drain().collect();
        for (_, s) in streams {
            s.on_reset(ResetCode::LinkLost, format!("hub link lost: {why}"));
        }
        for (_, w) in st.expose_waiters.drain() {
            let _ = w.send(Err(ExposeError::LinkLost));
        }
        if let LinkEnd::Refused(reason) = &why {
            self.refused.send_replace(Some(reason.clone()));
        }
        match (&why, retry_in) {
            (LinkEnd::Closed, _) | (_, None) => {
                tracing::debug!(hub = %self.target(), "hub session closed");
                st.closing = Some(conn);
            }
            (_, Some(d)) => {
                tracing::warn!(hub = %self.target(), "hub link ended: {why}; reconnecting in {d:.1?}");
                conn.abort();
                self.next_target("link ended");
            }
        }
    }

    /// Keeps the session up until it is closed: dials when the core asks,
    /// and runs its clock.
    pub(crate) async fn run(self: Arc<Self>) {
        loop {
            let (closed, dial, timeout) = {
                let mut st = self.lock();
                (st.core.is_closed(), st.dial.take(), st.core.poll_timeout())
            };
            if closed {
                return;
            }
            if let Some(deadline) = dial {
                self.attach(deadline).await;
                continue;
            }
            // Due already (the first dial, say): act now. A timer would
            // round up to the next millisecond tick, and a node that starts
            // and connects at once would wait for it.
            if timeout.is_some_and(|t| t <= Instant::now()) {
                self.with_core(|st| st.core.handle_timeout(Instant::now()));
                continue;
            }
            let sleep = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => self.with_core(|st| st.core.handle_timeout(Instant::now())),
                () = self.wake.notified() => {}
            }
        }
    }

    /// Dials and authenticates the hub by `deadline`, and starts the link's
    /// tasks; the core registers on it.
    async fn attach(self: &Arc<Self>, deadline: Instant) {
        let target = self.target().clone();
        let dialled = tokio::time::timeout_at(deadline.into(), self.dialer.dial(&target)).await;
        let stream = match dialled {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let why = e.to_string();
                self.next_target("out of reach");
                return self.with_core(|st| st.core.handle_dial_failed(why, Instant::now()));
            }
            Err(_) => {
                let why = format!("no answer within {ATTACH_TIMEOUT:?}");
                self.next_target("out of reach");
                return self.with_core(|st| st.core.handle_dial_failed(why, Instant::now()));
            }
        };
        let hub = stream.peer();
        let (local, remote) = (stream.info().local_addr, stream.info().remote_addr);
        let (r, w) = tokio::io::split(stream);
        self.with_core(|st| {
            // Closed meanwhile: dropping the halves closes the connection.
            let Some(id) = st.core.handle_connected(hub) else {
                return;
            };
            let (tx, rx) = frame_channel();
            let streams = Arc::<StreamMap>::default();
            let reader = tokio::spawn(self.clone().read(
                id,
                FrameReader::new(r),
                streams.clone(),
                tx.clone(),
            ));
            st.conn = Some(Conn {
                id,
                tx,
                streams,
                local,
                remote,
                reader,
                writer: tokio::spawn(write_frames(w, rx)),
            });
        });
    }

    /// Reads link `id` until it ends: stream frames to their streams, the
    /// rest into the core.
    async fn read(
        self: Arc<Self>,
        id: LinkId,
        mut reader: FrameReader<tokio::io::ReadHalf<ReachStream>>,
        streams: Arc<StreamMap>,
        tx: FrameTx,
    ) {
        let mut stamped = Instant::now();
        let stream_of = |id: u32| crate::routed::lock_map(&streams).get(&id).cloned();
        let why = loop {
            let frame = match reader.next().await {
                Ok(Some(f)) => f,
                Ok(None) => break "the hub closed the link".to_string(),
                Err(e) => break e.to_string(),
            };
            let now = Instant::now();
            match frame {
                Frame::Control(msg) => {
                    stamped = now;
                    self.with_core(|st| st.core.handle_control(id, msg, now));
                    continue;
                }
                Frame::Open { stream, dst, src } => {
                    stamped = now;
                    self.with_core(|st| st.core.handle_open(id, stream, dst, src, now));
                    continue;
                }
                Frame::Data { stream, data } => {
                    if let Some(s) = stream_of(stream) {
                        if let Err(e) = s.on_data(data) {
                            s.on_reset(ResetCode::FlowViolation, e.to_string());
                            crate::routed::lock_map(&streams).remove(&stream);
                            let mut f = Vec::new();
                            encode_reset(stream, ResetCode::FlowViolation, &e.to_string(), &mut f);
                            let _ = tx.send(f);
                        }
                    }
                }
                Frame::Credit { stream, bytes } => {
                    if let Some(s) = stream_of(stream) {
                        s.on_credit(bytes);
                    }
                }
                Frame::Fin { stream } => {
                    if let Some(s) = stream_of(stream) {
                        s.on_fin();
                    }
                }
                Frame::Reset {
                    stream,
                    code,
                    reason,
                } => {
                    if let Some(s) = crate::routed::lock_map(&streams).remove(&stream) {
                        s.on_reset(code, reason);
                    }
                }
            }
            if now.duration_since(stamped) >= TRAFFIC_STAMP {
                stamped = now;
                self.with_core(|st| st.core.handle_traffic(id, now));
            }
        };
        self.with_core(|st| st.core.handle_link_lost(id, why, Instant::now()));
    }

    /// Why there is no link now.
    fn down(&self) -> SessionError {
        SessionError::Down {
            hub: self.target().to_string(),
            last: self.lock().core.last_end().cloned(),
        }
    }

    /// The current link's status, if registered.
    pub(crate) fn status(&self) -> Option<HubStatus> {
        self.link.borrow().as_ref().map(|l| l.status.clone())
    }

    /// Waits until the session is registered or `deadline` passes; ends early
    /// when the hub refuses this node.
    pub(crate) async fn wait_link(&self, deadline: Instant) -> Result<Link, SessionError> {
        let mut rx = self.link.subscribe();
        let mut refused = self.refused.subscribe();
        let wait = async {
            tokio::select! {
                l = rx.wait_for(|l| l.is_some()) => l.ok().and_then(|l| l.clone()).ok_or_else(|| self.down()),
                r = refused.wait_for(|r| r.is_some()) => Err(match r.ok().and_then(|r| r.clone()) {
                    Some(reason) => SessionError::Refused { hub: self.target().to_string(), reason },
                    None => self.down(),
                }),
            }
        };
        tokio::time::timeout_at(deadline.into(), wait)
            .await
            .unwrap_or_else(|_| Err(self.down()))
    }

    /// Asks the hub where `node` is, by `deadline`.
    pub(crate) async fn lookup(
        self: &Arc<Self>,
        node: NodeId,
        deadline: Instant,
    ) -> Result<Option<DirEntry>, SessionError> {
        match self
            .ask(deadline, |core| core.lookup(node, deadline))
            .await?
        {
            Answer::Node(entry) => Ok(entry),
            _ => Err(self.down()),
        }
    }

    /// Asks the hub which nodes hold vpn address `ip` in `network`, by
    /// `deadline`.
    pub(crate) async fn lookup_vip(
        self: &Arc<Self>,
        network: reach_proto::vpn::NetworkTag,
        ip: IpAddr,
        deadline: Instant,
    ) -> Result<Vec<NodeId>, SessionError> {
        match self
            .ask(deadline, |core| core.lookup_vip(network, ip, deadline))
            .await?
        {
            Answer::Vip(holders) => Ok(holders),
            _ => Err(self.down()),
        }
    }

    /// Asks the hub to connect to this node's observed address at `port`
    /// from `from`, writing the greeting of `token`; by `deadline`.
    pub(crate) async fn dial_back(
        self: &Arc<Self>,
        port: u16,
        from: reach_proto::link::DialBackFrom,
        token: u64,
        deadline: Instant,
    ) -> Result<reach_proto::link::DialBackOutcome, SessionError> {
        match self
            .ask(deadline, |core| core.dial_back(port, from, token, deadline))
            .await?
        {
            Answer::DialedBack(outcome) => Ok(outcome),
            _ => Err(self.down()),
        }
    }

    /// Advertises `addrs` to the hub, now and after every reconnect.
    pub(crate) fn set_addrs(self: &Arc<Self>, addrs: Vec<SocketAddr>) {
        self.with_core(|st| st.core.set_addrs(addrs));
    }

    /// Holds vpn address `claim` (None: none) with the hub, now and after
    /// every reconnect.
    pub(crate) fn set_vpn(self: &Arc<Self>, claim: Option<reach_proto::vpn::VpnClaim>) {
        self.with_core(|st| st.core.set_vpn(claim));
    }

    /// Sends the lookup `start` makes and waits for its answer.
    async fn ask(
        self: &Arc<Self>,
        deadline: Instant,
        start: impl FnOnce(&mut NodeSession) -> Result<u32, LookupFailure>,
    ) -> Result<Answer, SessionError> {
        self.wait_link(deadline).await?;
        let (tx, rx) = oneshot::channel();
        let req = self.with_core(|st| {
            let req = start(&mut st.core)?;
            st.lookups.insert(req, tx);
            Ok(req)
        });
        let req = req.map_err(|e| self.lookup_error(e, deadline))?;
        // The core ends the lookup at its deadline; this bound only guards
        // against a driver that stopped.
        let answer = tokio::time::timeout_at((deadline + Duration::from_secs(1)).into(), rx).await;
        match answer {
            Ok(Ok(Ok(entry))) => Ok(entry),
            Ok(Ok(Err(e))) => Err(self.lookup_error(e, deadline)),
            Ok(Err(_)) | Err(_) => {
                self.with_core(|st| {
                    st.core.forget_lookup(req);
                    st.lookups.remove(&req);
                });
                Err(self.down())
            }
        }
    }

    fn lookup_error(&self, e: LookupFailure, deadline: Instant) -> SessionError {
        match e {
            LookupFailure::NotUp => self.down(),
            LookupFailure::Busy => SessionError::Busy,
            LookupFailure::LinkLost => SessionError::LinkLost {
                hub: self.target().to_string(),
            },
            LookupFailure::TimedOut => {
                SessionError::TimedOut(deadline.saturating_duration_since(Instant::now()))
            }
        }
    }

    /// Publishes `vport` on the hub's proxy ports (see `Endpoint::expose_on_hub`).
    pub(crate) async fn expose(
        self: &Arc<Self>,
        vport: u16,
        allow_from: Vec<(IpAddr, u8)>,
        deadline: Instant,
    ) -> Result<SocketAddr, ExposeError> {
        let started = Instant::now();
        let link = self.wait_link(deadline).await?;
        let (tx, rx) = oneshot::channel();
        self.with_core(|st| {
            st.core.expose(vport, allow_from)?;
            st.expose_waiters.insert(vport, tx);
            Ok(())
        })
        .map_err(ExposeError::TooLarge)?;
        let answer = tokio::time::timeout_at(deadline.into(), rx).await;
        self.lock().expose_waiters.remove(&vport);
        match answer {
            Ok(Ok(Ok(port))) => Ok(SocketAddr::new(link.status.remote.ip(), port)),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(ExposeError::LinkLost),
            Err(_) => Err(ExposeError::TimedOut(deadline - started)),
        }
    }

    /// Where the service published at `vport` stands, if it was published.
    /// Whether `peer` opens streams to `vport` for the hub's proxy-port
    /// clients (see `NodeSession::serves_proxy_clients`).
    pub(crate) fn serves_proxy_clients(&self, peer: &NodeId, vport: u16) -> bool {
        self.lock().core.serves_proxy_clients(peer, vport)
    }

    pub(crate) fn exposure(&self, vport: u16) -> Option<HubExposure> {
        let hub = self.status().map(|s| s.remote.ip());
        let st = self.lock();
        Some(match st.core.exposure(vport)? {
            Exposure::Pending => HubExposure::Pending,
            Exposure::Published(port) => match hub {
                Some(ip) => HubExposure::Published(SocketAddr::new(ip, *port)),
                None => HubExposure::Pending,
            },
            Exposure::Refused(r) => HubExposure::Refused(expose_error(r.clone())),
        })
    }

    /// Opens a routed stream to `dst` on `link`; returns it with the link's
    /// addresses. `None` when that link is gone.
    pub(crate) fn open(
        self: &Arc<Self>,
        link: &Link,
        dst: &NodeId,
    ) -> Option<(RoutedStream, (SocketAddr, SocketAddr))> {
        self.with_core(|st| {
            let c = st.conn.as_ref().filter(|c| c.id == link.id)?;
            let (tx, streams, addrs) = (c.tx.clone(), c.streams.clone(), (c.local, c.remote));
            let (on, id) = st.core.open_stream(dst)?;
            (on == link.id).then(|| (RoutedStream::register(id, streams, tx), addrs))
        })
    }

    /// Asks `cb.target`, through the hubs, to connect back.
    pub(crate) fn connect_back(self: &Arc<Self>, cb: ConnectBack) -> bool {
        self.with_core(|st| st.core.connect_back(cb))
    }

    /// Sends `msg` to node `to` through the hubs.
    pub(crate) fn relay(self: &Arc<Self>, to: NodeId, msg: Rendezvous) -> bool {
        self.with_core(|st| st.core.relay(to, msg))
    }

    /// Tells `requester` that its connect-back failed.
    pub(crate) fn connect_back_failed(
        self: &Arc<Self>,
        requester: NodeId,
        token: u16,
        reason: String,
    ) {
        self.with_core(|st| st.core.connect_back_failed(requester, token, reason));
    }

    /// The hub link's smoothed round trip, once measured.
    pub(crate) fn link_rtt(self: &Arc<Self>) -> Option<Duration> {
        self.lock().core.link_rtt()
    }

    /// A connect-back or splice answer from a [`Request`] has finished.
    pub(crate) fn answer_done(self: &Arc<Self>) {
        self.with_core(|st| st.core.answer_done());
    }

    /// Ends the session gracefully within `timeout`: what is queued on the
    /// hub link goes out, the link's write side closes, and the session ends
    /// once the hub has read everything and closed its side (no reconnect).
    pub(crate) async fn close(self: &Arc<Self>, timeout: Duration) {
        // The core's Down event moves the link to `closing` when it is
        // carried out, after the closure: take it only then.
        self.with_core(|st| st.core.close());
        let Some(mut conn) = self.lock().closing.take() else {
            return;
        };
        let wait = async {
            conn.tx.close().await;
            let _ = (&mut conn.reader).await;
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            tracing::debug!(hub = %self.target(), "hub link not closed within {timeout:?}");
        }
        conn.abort();
    }

    /// Stops the link's tasks at once (the endpoint is going away).
    pub(crate) fn shutdown(&self) {
        let mut st = self.lock();
        st.core.close();
        for c in [st.conn.take(), st.closing.take()].into_iter().flatten() {
            c.abort();
        }
    }
}

fn expose_error(r: ExposeRefusal) -> ExposeError {
    if r.offered {
        ExposeError::Refused(r.reason)
    } else {
        ExposeError::NoProxyPorts
    }
}
