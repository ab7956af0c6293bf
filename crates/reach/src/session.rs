//! A node's session with its home hub.
//!
//! One task per endpoint keeps one authenticated link to the hub: it dials
//! (learning and pinning the hub's NodeId on first contact when the address
//! does not name it, like ssh's known_hosts), registers the node's advertised
//! addresses, and then serves the link: routed streams in both directions,
//! directory lookups, connect-back requests, keepalives. When the link drops
//! (hub restart, network change) every routed stream on it ends with a clear
//! error, and the task reconnects with capped exponential backoff and jitter
//! and registers again.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach_proto::handshake::{Admission, HandshakeError, InitiatorOptions, Refusal};
use reach_proto::link::{
    admission_proof, encode_control, encode_open, encode_reset, ConnectBack, Control, DirEntry,
    Frame, Rendezvous, ResetCode, HUB_VPORT,
};
use reach_proto::setup_plan::SetupModule;
use reach_proto::{HubAddr, NodeId, SecretKey, VirtualAddr};
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, watch};

use crate::direct::{self, RaceSettings};
use crate::endpoint::Shared;
use crate::error::{AttemptError, ExposeError, HubError, SessionError};
use crate::handshake::{initiate, respond, tcp_connect};
use crate::link::{write_frames, FrameReader, FrameTx};
use crate::routed::{RoutedStream, StreamMap};
use crate::stream::{Direction, ReachStream};

/// First reconnect delay after a lost or failed hub session.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest reconnect delay: short enough that nodes are back well within 5 s
/// of a hub restart (2 s + 20% jitter + the attach itself). Against a hub
/// that is down, an attempt costs a refused TCP connect.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long dialling and registering may take.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive interval on an idle link.
const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A link silent this long is dead (three keepalives missed).
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a node waits for a connect-back it was asked for.
const CONNECT_BACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a hub listens, and optionally who it is: `NODEID@HOST:PORT` or
/// `HOST:PORT`. Without the NodeId the first contact learns it and pins it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubTarget {
    /// The hub's NodeId, if given.
    pub id: Option<NodeId>,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for HubTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(id) = &self.id {
            write!(f, "{id}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl From<&HubAddr> for HubTarget {
    /// A virtual address's `hub=` hint: the hub's identity is pinned on first
    /// contact.
    fn from(a: &HubAddr) -> Self {
        Self {
            id: None,
            host: a.host.clone(),
            port: a.port,
        }
    }
}

impl From<&HubTarget> for HubAddr {
    fn from(t: &HubTarget) -> Self {
        Self {
            host: t.host.clone(),
            port: t.port,
        }
    }
}

impl FromStr for HubTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, rest) = match s.split_once('@') {
            Some((id, rest)) => (
                Some(
                    id.parse::<NodeId>()
                        .map_err(|e| format!("bad hub id in {s:?}: {e}"))?,
                ),
                rest,
            ),
            None => (None, s),
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("hub address {s:?} has no port (expected [ID@]HOST:PORT)"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("hub address {s:?} has no host"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("bad port in hub address {s:?}"))?;
        Ok(Self {
            id,
            host: host.to_string(),
            port,
        })
    }
}

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

/// A registered link.
#[derive(Clone)]
pub(crate) struct Link {
    tx: FrameTx,
    streams: Arc<StreamMap>,
    next_id: Arc<AtomicU32>,
    status: HubStatus,
}

/// The endpoint's view of its hub session.
pub(crate) struct Session {
    pub(crate) target: HubTarget,
    known_hubs: Option<PathBuf>,
    network_secret: Option<Vec<u8>>,
    link: watch::Sender<Option<Link>>,
    /// The hub's reason when it refused the last registration.
    refused: watch::Sender<Option<String>>,
    lookups: Mutex<HashMap<u32, oneshot::Sender<Option<DirEntry>>>>,
    next_req: AtomicU32,
    last_error: Mutex<Option<String>>,
    /// Set by [`Session::close`]: no reconnecting.
    closing: watch::Sender<bool>,
    /// Set when the session task has ended after a close.
    closed: watch::Sender<bool>,
    /// Services published on the hub's proxy ports, by virtual port: asked
    /// for again after every reconnect, with the port they had.
    exposures: Mutex<HashMap<u16, Exposure>>,
    /// `expose` calls waiting for the hub's answer, by virtual port.
    expose_waiters: Mutex<HashMap<u16, oneshot::Sender<Result<u16, ExposeError>>>>,
}

/// One service published on the hub.
#[derive(Clone)]
struct Exposure {
    allow_from: Vec<(IpAddr, u8)>,
    port: Option<u16>,
    /// What the hub answered on the current link (`None`: no answer yet).
    state: Option<Result<SocketAddr, ExposeError>>,
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

impl Exposure {
    fn request(&self, vport: u16) -> Control {
        Control::Expose {
            vport,
            want_port: self.port,
            allow_from: self.allow_from.clone(),
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Link {
    pub(crate) fn status(&self) -> &HubStatus {
        &self.status
    }
}

impl Session {
    pub(crate) fn new(
        target: HubTarget,
        known_hubs: Option<PathBuf>,
        network_secret: Option<Vec<u8>>,
    ) -> Self {
        Self {
            target,
            known_hubs,
            network_secret,
            link: watch::Sender::new(None),
            refused: watch::Sender::new(None),
            lookups: Mutex::default(),
            next_req: AtomicU32::new(1),
            last_error: Mutex::default(),
            closing: watch::Sender::new(false),
            closed: watch::Sender::new(false),
            exposures: Mutex::default(),
            expose_waiters: Mutex::default(),
        }
    }

    /// Publishes `vport` on the hub's proxy ports (see `Endpoint::expose_on_hub`).
    pub(crate) async fn expose(
        &self,
        vport: u16,
        allow_from: Vec<(IpAddr, u8)>,
        deadline: Instant,
    ) -> Result<SocketAddr, ExposeError> {
        let link = self
            .wait_link(deadline)
            .await
            .map_err(|e| ExposeError::NoAnswer(e.to_string()))?;
        let exposure = Exposure {
            allow_from,
            port: None,
            state: None,
        };
        let (tx, rx) = oneshot::channel();
        locked(&self.expose_waiters).insert(vport, tx);
        // Recorded before the request goes out: the answer may come back
        // before this task runs again, and it must find the record (to keep
        // the port for later reconnects).
        locked(&self.exposures).insert(vport, exposure.clone());
        send_control(&link.tx, &exposure.request(vport));
        let answer = tokio::time::timeout_at(deadline.into(), rx).await;
        locked(&self.expose_waiters).remove(&vport);
        let port = match answer {
            Ok(Ok(Ok(port))) => port,
            Ok(Ok(Err(e))) => {
                locked(&self.exposures).remove(&vport);
                return Err(e);
            }
            Ok(Err(_)) => {
                return Err(ExposeError::NoAnswer(
                    "the hub session ended before the hub answered".into(),
                ))
            }
            Err(_) => {
                return Err(ExposeError::NoAnswer(
                    "the hub did not answer in time".into(),
                ))
            }
        };
        Ok(SocketAddr::new(link.status.remote.ip(), port))
    }

    /// Where the service published at `vport` stands, if it was published.
    pub(crate) fn exposure(&self, vport: u16) -> Option<HubExposure> {
        locked(&self.exposures).get(&vport).map(|e| match &e.state {
            None => HubExposure::Pending,
            Some(Ok(a)) => HubExposure::Published(*a),
            Some(Err(r)) => HubExposure::Refused(r.clone()),
        })
    }

    /// The hub's answer to an `Expose`, on the link to `hub`.
    fn exposed(&self, vport: u16, hub: IpAddr, result: Result<u16, ExposeError>) {
        if let Some(e) = locked(&self.exposures).get_mut(&vport) {
            if let Ok(port) = result {
                e.port = Some(port);
            }
            e.state = Some(result.clone().map(|port| SocketAddr::new(hub, port)));
        }
        if let Some(w) = locked(&self.expose_waiters).remove(&vport) {
            let _ = w.send(result);
        }
    }

    /// Ends the session gracefully within `timeout`: what is queued on the
    /// hub link goes out, the link's write side closes, and the session ends
    /// once the hub has read everything and closed its side (no reconnect).
    pub(crate) async fn close(&self, timeout: Duration) {
        self.closing.send_replace(true);
        let link = self.link.borrow().clone();
        let mut closed = self.closed.subscribe();
        let wait = async {
            if let Some(link) = link {
                link.tx.close().await;
            }
            let _ = closed.wait_for(|c| *c).await;
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            tracing::debug!(hub = %self.target, "hub link not closed within {timeout:?}");
        }
    }

    fn down(&self) -> SessionError {
        SessionError::Down {
            hub: self.target.to_string(),
            last: locked(&self.last_error).clone(),
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
                    Some(reason) => SessionError::Refused { hub: self.target.to_string(), reason },
                    None => self.down(),
                }),
            }
        };
        tokio::time::timeout_at(deadline.into(), wait)
            .await
            .unwrap_or_else(|_| Err(self.down()))
    }

    /// Asks the hub where `node` is.
    pub(crate) async fn lookup(
        &self,
        node: NodeId,
        deadline: Instant,
    ) -> Result<Option<DirEntry>, SessionError> {
        let link = self.wait_link(deadline).await?;
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        locked(&self.lookups).insert(req, tx);
        send_control(&link.tx, &Control::Lookup { req, node });
        let result = tokio::time::timeout_at(deadline.into(), rx).await;
        locked(&self.lookups).remove(&req);
        match result {
            Ok(Ok(entry)) => Ok(entry),
            Ok(Err(_)) => Err(self.down()),
            Err(_) => Err(SessionError::TimedOut(
                deadline.saturating_duration_since(Instant::now()),
            )),
        }
    }

    /// Opens a routed stream to `dst`; returns it with the link's addresses.
    pub(crate) fn open(
        &self,
        link: &Link,
        me: &NodeId,
        dst: &NodeId,
    ) -> (RoutedStream, (SocketAddr, SocketAddr)) {
        let id = link.next_id.fetch_add(2, Ordering::Relaxed);
        let stream = RoutedStream::register(id, link.streams.clone(), link.tx.clone());
        let mut f = Vec::with_capacity(80);
        encode_open(id, dst, me, &mut f);
        let _ = link.tx.send(f);
        (stream, (link.status.local, link.status.remote))
    }

    /// Sends a connect-back request.
    pub(crate) fn connect_back(&self, link: &Link, cb: ConnectBack) {
        send_control(&link.tx, &Control::ConnectBack(cb));
    }

    /// Sends a control message to the hub.
    pub(crate) fn send(&self, link: &Link, msg: &Control) {
        send_control(&link.tx, msg);
    }
}

pub(crate) fn send_control(tx: &FrameTx, msg: &Control) {
    let mut f = Vec::new();
    match encode_control(msg, &mut f) {
        Ok(()) => {
            let _ = tx.send(f);
        }
        Err(e) => tracing::warn!("cannot encode control message: {e}"),
    }
}

/// Keeps the session up for as long as the endpoint lives.
pub(crate) async fn run(shared: Arc<Shared>) {
    let Some(session) = shared.session.as_ref() else {
        return;
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        if *session.closing.borrow() {
            session.closed.send_replace(true);
            return;
        }
        match tokio::time::timeout(ATTACH_TIMEOUT, attach(&shared, session)).await {
            Ok(Ok(attached)) => {
                backoff = MIN_BACKOFF;
                *locked(&session.last_error) = None;
                let why = serve(&shared, session, attached).await;
                if *session.closing.borrow() {
                    tracing::debug!(hub = %session.target, "hub session closed: {why}");
                    session.closed.send_replace(true);
                    return;
                }
                tracing::warn!(hub = %session.target, "hub session lost: {why}; reconnecting");
                *locked(&session.last_error) = Some(format!("session lost: {why}"));
            }
            Ok(Err(e)) => {
                tracing::warn!(hub = %session.target, "cannot attach to hub: {e}");
                *locked(&session.last_error) = Some(e.to_string());
                if session.refused.borrow().is_some() {
                    // Policies change by hand: no point asking often.
                    backoff = REFUSED_BACKOFF;
                }
            }
            Err(_) => {
                let e = format!("no answer within {ATTACH_TIMEOUT:?}");
                tracing::warn!(hub = %session.target, "cannot attach to hub: {e}");
                *locked(&session.last_error) = Some(e.to_string());
            }
        }
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF.max(backoff));
    }
}

/// How long a refused node waits before asking the hub again.
const REFUSED_BACKOFF: Duration = Duration::from_secs(30);

/// `d` scaled by a random factor in [0.8, 1.2), so nodes that lost the same hub
/// do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = getrandom::fill(&mut b).map_or(0.5, |_| f64::from(u16::from_le_bytes(b)) / 65536.0);
    d.mul_f64(0.8 + 0.4 * r)
}

struct Attached {
    reader: FrameReader<tokio::io::ReadHalf<ReachStream>>,
    link: Link,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Resolves the hub's addresses.
async fn resolve(target: &HubTarget) -> Result<Vec<SocketAddr>, HubError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|source| HubError::Resolve {
            host: target.host.clone(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(HubError::NoAddress {
            host: target.host.clone(),
        });
    }
    Ok(addrs)
}

/// The pinned NodeId of the hub at `key`, from a known_hubs file.
fn pinned(path: &std::path::Path, key: &str) -> Option<NodeId> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, id)| id.trim().parse().ok())
}

/// Learns the NodeId of the hub at `addrs` by greeting it under our own name:
/// it answers that it is another node and says which.
async fn learn_hub_id(secret: &SecretKey, addrs: &[SocketAddr]) -> Result<NodeId, HubError> {
    let mut last = String::from("no address");
    for addr in addrs {
        let mut tcp = match tcp_connect(*addr).await {
            Ok(t) => t,
            Err(e) => {
                last = format!("{addr}: {e}");
                continue;
            }
        };
        let opts = InitiatorOptions {
            plaintext: false,
            cipher: crate::endpoint::preferred_cipher(),
            reverse: false,
            upgrade: false,
        };
        match initiate(&mut tcp, secret, secret.node_id(), HUB_VPORT, opts).await {
            Err(AttemptError::Handshake(HandshakeError::WrongNode { found, .. })) => {
                return Ok(found)
            }
            Err(e) => last = format!("{addr}: {e}"),
            Ok(_) => last = format!("{addr}: answered as this node itself"),
        }
    }
    Err(HubError::UnknownIdentity { last })
}

/// The hub's NodeId: given, pinned, or learned and pinned now.
async fn hub_id(
    target: &HubTarget,
    known_hubs: Option<&std::path::Path>,
    secret: &SecretKey,
    addrs: &[SocketAddr],
) -> Result<NodeId, HubError> {
    if let Some(id) = target.id {
        return Ok(id);
    }
    let key = format!("{}:{}", target.host, target.port);
    if let Some(id) = known_hubs.and_then(|p| pinned(p, &key)) {
        return Ok(id);
    }
    let id = learn_hub_id(secret, addrs).await?;
    tracing::info!(hub = %key, %id, "learned the hub's identity on first contact; pinned");
    if let Some(path) = known_hubs {
        use std::io::Write;
        let line = format!("{key} {id}\n");
        let pinned = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = pinned {
            tracing::warn!("cannot pin the hub's identity in {}: {e}", path.display());
        }
    }
    Ok(id)
}

/// Dials a hub and authenticates it: the link of a node's session, or of a
/// hub to a peer hub.
pub(crate) async fn dial(
    shared: &Shared,
    hub: &HubTarget,
    known_hubs: Option<&std::path::Path>,
) -> Result<ReachStream, HubError> {
    let addrs = resolve(hub).await?;
    let id = hub_id(hub, known_hubs, &shared.secret, &addrs).await?;
    let target = VirtualAddr::new(id, HUB_VPORT).with_direct(addrs);
    let settings = RaceSettings {
        // A plaintext link still authenticates both ends; routed streams on it
        // stay end-to-end encrypted unless their own peers both opt out.
        options: shared.initiator_options(),
        attempt_delay: shared.attempt_delay,
        timeout: ATTACH_TIMEOUT,
        module: SetupModule::Direct,
        first: None,
    };
    direct::connect(&shared.secret, &shared.local_addrs.get(), &target, settings)
        .await
        .map_err(|source| HubError::Connect {
            key_changed: source.is_identity_mismatch(),
            known_hubs: known_hubs.map(std::path::Path::to_path_buf),
            source,
        })
}

/// Asks `hub` for its status report (JSON) on a short-lived link: the hub
/// answers one `StatusQuery` from an admitted node and closes.
pub(crate) async fn query_status(
    shared: &Shared,
    hub: &HubTarget,
    network_secret: Option<&[u8]>,
) -> Result<String, HubError> {
    let stream = tokio::time::timeout(
        ATTACH_TIMEOUT,
        dial(shared, hub, shared.known_hubs.as_deref()),
    )
    .await
    .map_err(|_| HubError::TimedOut {
        hub: hub.to_string(),
        what: "did not answer",
        after: ATTACH_TIMEOUT,
    })??;
    let hub_id = stream.peer();
    let (r, mut w) = tokio::io::split(stream);
    let proof = network_secret.map(|s| admission_proof(s, &shared.secret.node_id(), &hub_id));
    let mut frame = Vec::new();
    // A StatusQuery is a few dozen bytes: it always fits a frame.
    let _ = encode_control(&Control::StatusQuery { proof }, &mut frame);
    const DURING: &str = "during the status query";
    async {
        w.write_all(&frame).await?;
        w.flush().await
    }
    .await
    .map_err(|e| HubError::Link {
        hub: hub_id,
        during: DURING,
        source: e.into(),
    })?;
    let mut reader = FrameReader::new(r);
    match first_answer(&mut reader, hub_id, "the status query", DURING).await? {
        Control::StatusReport { json } => Ok(json),
        other => Err(HubError::Unexpected {
            hub: hub_id,
            during: DURING,
            got: format!("{other:?}"),
        }),
    }
}

/// The hub's first answer on a fresh link (to a registration or a status
/// query): a control message within [`ATTACH_TIMEOUT`]. A refusal becomes
/// [`HubError::Refused`] of `what`; anything else that is not a control
/// message, a closed or broken link, or silence is an error `during` it.
async fn first_answer<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    hub: NodeId,
    what: &'static str,
    during: &'static str,
) -> Result<Control, HubError> {
    let answer = tokio::time::timeout(ATTACH_TIMEOUT, reader.next())
        .await
        .map_err(|_| HubError::TimedOut {
            hub: hub.to_string(),
            what: "did not answer",
            after: ATTACH_TIMEOUT,
        })?;
    match answer {
        Ok(Some(Frame::Control(Control::Refused { reason }))) => {
            Err(HubError::Refused { hub, what, reason })
        }
        Ok(Some(Frame::Control(msg))) => Ok(msg),
        Ok(Some(other)) => Err(HubError::Unexpected {
            hub,
            during,
            got: format!("{other:?}"),
        }),
        Ok(None) => Err(HubError::Closed { hub, during }),
        Err(source) => Err(HubError::Link {
            hub,
            during,
            source,
        }),
    }
}

/// Dials the hub, authenticates it and registers.
async fn attach(shared: &Arc<Shared>, session: &Session) -> Result<Attached, HubError> {
    let stream = dial(shared, &session.target, session.known_hubs.as_deref()).await?;
    let hub = stream.peer();
    let (local, remote) = (stream.info().local_addr, stream.info().remote_addr);
    let (r, w) = tokio::io::split(stream);
    let (tx, rx) = crate::link::frame_channel();
    let writer = tokio::spawn(write_frames(w, rx));
    let proof = session
        .network_secret
        .as_deref()
        .map(|s| admission_proof(s, &shared.secret.node_id(), &hub));
    send_control(
        &tx,
        &Control::Register {
            addrs: shared.advertised.clone(),
            proof,
            accepts: shared.accepts_streams(),
        },
    );
    const DURING: &str = "during registration";
    let mut reader = FrameReader::new(r);
    let (observed, echo) = match first_answer(&mut reader, hub, "this node", DURING).await {
        Ok(Control::Registered { observed, echo }) => (observed, echo),
        Ok(other) => {
            let got = format!("{other:?}");
            return Err(HubError::Unexpected {
                hub,
                during: DURING,
                got,
            });
        }
        Err(e) => {
            if let HubError::Refused { reason, .. } = &e {
                session.refused.send_replace(Some(reason.clone()));
            }
            return Err(e);
        }
    };
    tracing::info!(%hub, %observed, "registered with hub");
    session.refused.send_replace(None);
    let link = Link {
        tx,
        streams: Arc::default(),
        next_id: Arc::new(AtomicU32::new(1)),
        status: HubStatus {
            hub,
            observed,
            local,
            remote,
            echo: echo
                .into_iter()
                .take(2)
                .map(|port| SocketAddr::new(remote.ip(), port))
                .collect(),
        },
    };
    Ok(Attached {
        reader,
        link,
        writer,
    })
}

/// Serves a registered link until it fails; returns why it ended.
async fn serve(shared: &Arc<Shared>, session: &Session, attached: Attached) -> String {
    let Attached {
        mut reader,
        link,
        writer,
    } = attached;
    session.link.send_replace(Some(link.clone()));
    // A reconnect (a hub restart, say): publish again, asking for the ports
    // the services had.
    let exposures: Vec<(u16, Exposure)> = locked(&session.exposures)
        .iter_mut()
        .map(|(v, e)| {
            e.state = None;
            (*v, e.clone())
        })
        .collect();
    for (vport, e) in exposures {
        send_control(&link.tx, &e.request(vport));
    }
    let pinger = {
        let tx = link.tx.clone();
        tokio::spawn(async move {
            let mut nonce = 0u64;
            loop {
                tokio::time::sleep(PING_INTERVAL).await;
                nonce += 1;
                send_control(&tx, &Control::Ping { nonce });
            }
        })
    };
    let why = loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, reader.next()).await {
            Err(_) => break format!("no traffic from the hub for {IDLE_TIMEOUT:?}"),
            Ok(Err(e)) => break e.to_string(),
            Ok(Ok(None)) => break "the hub closed the link".to_string(),
            Ok(Ok(Some(f))) => f,
        };
        if let Some(why) = handle_frame(shared, session, &link, frame) {
            break why;
        }
    };
    pinger.abort();
    session.link.send_replace(None);
    locked(&session.lookups).clear();
    let streams: Vec<_> = locked(&link.streams).drain().collect();
    for (_, s) in streams {
        s.on_reset(ResetCode::LinkLost, format!("hub link lost: {why}"));
    }
    drop(link);
    writer.abort();
    why
}

/// Handles one frame; `Some(reason)` ends the session.
fn handle_frame(
    shared: &Arc<Shared>,
    session: &Session,
    link: &Link,
    frame: Frame<'_>,
) -> Option<String> {
    let stream_of = |id: u32| locked(&link.streams).get(&id).cloned();
    match frame {
        Frame::Data { stream, data } => {
            if let Some(s) = stream_of(stream) {
                if let Err(e) = s.on_data(data) {
                    s.on_reset(ResetCode::FlowViolation, e.to_string());
                    locked(&link.streams).remove(&stream);
                    let mut f = Vec::new();
                    encode_reset(stream, ResetCode::FlowViolation, &e.to_string(), &mut f);
                    let _ = link.tx.send(f);
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
            if let Some(s) = locked(&link.streams).remove(&stream) {
                s.on_reset(code, reason);
            }
        }
        Frame::Open { stream, dst, src } => {
            if dst != shared.secret.node_id() {
                let mut f = Vec::new();
                encode_reset(stream, ResetCode::NoRoute, "not this node", &mut f);
                let _ = link.tx.send(f);
            } else {
                let rs = RoutedStream::register(stream, link.streams.clone(), link.tx.clone());
                let addrs = (link.status.local, link.status.remote);
                tokio::spawn(accept_routed(shared.clone(), rs, src, addrs));
            }
        }
        Frame::Control(msg) => match msg {
            Control::Found { req, entry, .. } => {
                if let Some(tx) = locked(&session.lookups).remove(&req) {
                    let _ = tx.send(entry);
                }
            }
            Control::ConnectBack(cb) => match shared.connect_backs.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (shared, tx) = (shared.clone(), link.tx.clone());
                    tokio::spawn(async move {
                        connect_back(shared, tx, cb).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    // Requests come from other nodes: a flood must not make
                    // this node dial without bound.
                    let failed = Control::ConnectBackFailed {
                        requester: cb.from,
                        target: shared.secret.node_id(),
                        token: cb.token,
                        reason: "the node is busy with other connect-backs".into(),
                    };
                    send_control(&link.tx, &failed);
                }
            },
            Control::ConnectBackFailed {
                target,
                token,
                reason,
                ..
            } => {
                shared.fail_reverse(target, token, &reason);
            }
            Control::Relay { from, msg, .. } => relayed(shared, link, from, msg),
            Control::Undeliverable {
                to, msg, reason, ..
            } => {
                shared.pending_splice.resolve(to, msg.token(), Err(reason));
            }
            Control::Exposed { vport, port } => {
                session.exposed(vport, link.status.remote.ip(), Ok(port))
            }
            Control::ExposeRefused {
                vport,
                offered,
                reason,
            } => {
                let e = if offered {
                    ExposeError::Refused(reason)
                } else {
                    ExposeError::NoProxyPorts
                };
                tracing::warn!(vport, "not published on the hub: {e}");
                session.exposed(vport, link.status.remote.ip(), Err(e));
            }
            Control::Ping { nonce } => send_control(&link.tx, &Control::Pong { nonce }),
            Control::Pong { .. } => {}
            Control::Refused { reason } => return Some(format!("hub refused: {reason}")),
            other => tracing::debug!("ignoring unexpected control message {other:?}"),
        },
    }
    None
}

/// Handles a message another node sent through the hubs.
fn relayed(shared: &Arc<Shared>, link: &Link, from: NodeId, msg: Rendezvous) {
    match msg {
        Rendezvous::SpliceOffer {
            token,
            vport,
            mut candidates,
            upgrade,
        } => {
            candidates.truncate(reach_proto::nat::MAX_CANDIDATES);
            match shared.connect_backs.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (shared, tx) = (shared.clone(), link.tx.clone());
                    let echoes = link.status.echo.clone();
                    tokio::spawn(async move {
                        let offer = crate::splice::Offer {
                            from,
                            token,
                            vport,
                            upgrade,
                            candidates,
                        };
                        crate::splice::answer(shared, tx, echoes, offer).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    // Offers come from other nodes: a flood must not make this
                    // node punch without bound.
                    let msg = Rendezvous::SpliceDeclined {
                        token,
                        reason: "the node is busy with other connection setups".into(),
                    };
                    let me = shared.secret.node_id();
                    send_control(
                        &link.tx,
                        &Control::Relay {
                            from: me,
                            to: from,
                            msg,
                        },
                    );
                }
            }
        }
        Rendezvous::SpliceAnswer { token, candidates } => {
            shared.pending_splice.resolve(from, token, Ok(candidates));
        }
        Rendezvous::SpliceDeclined { token, reason } => {
            shared
                .pending_splice
                .resolve(from, token, Err(format!("the node declined: {reason}")));
        }
        other => tracing::debug!(%from, "ignoring relayed message {other:?}"),
    }
}

/// Runs the responder's handshake on an inbound routed stream and queues it.
async fn accept_routed(
    shared: Arc<Shared>,
    mut rs: RoutedStream,
    src: NodeId,
    link: (SocketAddr, SocketAddr),
) {
    let started = Instant::now();
    let admit = |_: &NodeId, h: &reach_proto::handshake::HelloHeader| {
        if h.reverse {
            // Connect-backs are TCP connections by definition.
            return Admission::Refuse(Refusal::NotAdmitted);
        }
        shared.admit_port(h.port)
    };
    let hs = respond(&mut rs, &shared.secret, shared.responder_options(), admit);
    match tokio::time::timeout(shared.handshake_timeout, hs).await {
        Ok(Ok(est)) => {
            // The peer may move this stream to a direct connection later.
            let stream = ReachStream::over_routed(rs, est, link, Direction::Inbound, started);
            let slot = crate::stream::upgrade::Slot::default();
            let registration = stream.upgrade_id().and_then(|id| {
                crate::stream::upgrade::register(
                    &shared.upgrades,
                    (stream.peer(), id),
                    slot.clone(),
                )
            });
            let stream = match registration {
                Some(r) => stream.into_upgradable(slot, Some(r)),
                None => stream,
            };
            tracing::debug!(peer = %stream.peer(), "accepted routed stream");
            shared.deliver(stream).await;
        }
        Ok(Err(e)) => tracing::warn!(%src, "rejected routed stream: {e}"),
        Err(_) => tracing::warn!(%src, "rejected routed stream: handshake timed out"),
    }
}

/// Answers a connect-back request: dials the asker and hands the stream to
/// this endpoint's `accept`.
async fn connect_back(shared: Arc<Shared>, tx: FrameTx, cb: ConnectBack) {
    let me = shared.secret.node_id();
    let fail = |reason: String| {
        let failed = Control::ConnectBackFailed {
            requester: cb.from,
            target: me,
            token: cb.token,
            reason,
        };
        send_control(&tx, &failed);
    };
    if shared.admit_port(cb.vport) != Admission::Accept {
        tracing::debug!(from = %cb.from, vport = cb.vport, "not connecting back: port not served");
        fail(format!("no service on virtual port {}", cb.vport));
        return;
    }
    let mut addrs = cb.addrs;
    addrs.truncate(reach_proto::link::MAX_NODE_ADDRS);
    let target = VirtualAddr::new(cb.from, cb.token).with_direct(addrs);
    let settings = RaceSettings {
        options: InitiatorOptions {
            plaintext: shared.plaintext,
            cipher: shared.cipher,
            reverse: true,
            upgrade: false,
        },
        attempt_delay: shared.attempt_delay,
        timeout: CONNECT_BACK_TIMEOUT,
        module: SetupModule::Reverse,
        first: shared.cache.addr(&cb.from),
    };
    match direct::connect(&shared.secret, &shared.local_addrs.get(), &target, settings).await {
        Ok(mut stream) => {
            shared.cache.set_addr(cb.from, stream.info().remote_addr);
            stream.info_mut().virtual_port = cb.vport;
            tracing::debug!(peer = %cb.from, "connected back");
            shared.deliver(stream).await;
        }
        Err(e) => {
            tracing::debug!(peer = %cb.from, "cannot connect back: {e}");
            fail(format!("the node could not connect back: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_targets_parse_and_print() {
        let id = SecretKey::from_seed([1; 32]).node_id();
        for text in [
            "hub.example:7700".to_string(),
            format!("{id}@203.0.113.1:7700"),
            "[2001:db8::1]:7700".to_string(),
        ] {
            let t: HubTarget = text.parse().expect("parses");
            assert_eq!(t.to_string(), text);
        }
        assert!("hub.example".parse::<HubTarget>().is_err());
        assert!(":7700".parse::<HubTarget>().is_err());
        assert!("notanid@h:1".parse::<HubTarget>().is_err());
        assert!("h:99999".parse::<HubTarget>().is_err());
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(1));
            assert!(j >= Duration::from_millis(800) && j < Duration::from_millis(1200));
        }
    }
}
