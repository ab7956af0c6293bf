//! The Splice module: a direct kernel TCP connection between two hosts that
//! are both behind NATs or firewalls, by TCP simultaneous open
//! (SmartSockets section 3.4).
//!
//! ```text
//!  asker                        hubs                         target
//!  bind port A, echo x2 -> mapping, predict
//!  SpliceOffer{cands A} --------------------------------------->
//!                                        bind port B, echo x2 -> predict
//!  <--------------------------------------- SpliceAnswer{cands B}
//!                                           SYNs from B to every cand A
//!  SYNs from A to every cand B   ==== simultaneous open ====
//!  Noise IK initiator on the first connection   responder on each
//! ```
//! Each side sends its SYNs from the one port it learned its mapping on
//! (SO_REUSEADDR and SO_REUSEPORT let one socket per candidate share it). A
//! SYN that reaches the other side before that side's own SYN has opened its
//! NAT is dropped (and the later SYN then meets a socket in SYN_SENT) or
//! answered with a reset by a rejecting firewall, after which that candidate
//! is retried after a pause that doubles from 2 to 100 ms, until the
//! deadline (`reach_proto::punch` schedules the attempts). Meanwhile a
//! listener on the same port accepts a SYN that finds no connecting socket.
//! The answering side sends first, so the asker's SYNs, sent one hub path
//! later, find its NAT open. Both send to candidates in the offered order
//! (each connect system call is made before the next attempt starts): two
//! sequential NATs then allocate their i-th mappings for each other's i-th
//! candidates.
//!
//! The stream is authenticated end to end like every other; the target
//! checks that the handshake comes from the node that made the offer.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_proto::candidates::{classify as addr_class, AddrClass};
use reach_proto::handshake::{Admission, HandshakeError, InitiatorOptions, Refusal};
use reach_proto::link::{Control, Rendezvous};
use reach_proto::nat::{self, NatProfile, Observation, MAX_CANDIDATES, MAX_ECHO_LEN};
use reach_proto::punch::{Punch, PunchStep};
use reach_proto::{NodeId, VirtualAddr};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::endpoint::Shared;
use crate::error::{AttemptError, ConnectError};
use crate::handshake::{initiate, respond};
use crate::link::FrameTx;
use crate::stream::{Direction, ReachStream, SetupModule};

/// How long one address echo may take to answer.
const ECHO_BUDGET: Duration = Duration::from_millis(800);
/// Offers one node may have answered at once here; more are declined.
const ANSWERS_PER_ASKER: usize = 4;
/// How long the target keeps punching after it answered.
const TARGET_WINDOW: Duration = Duration::from_secs(3);
/// How long the asker waits for the answer, at most.
const ANSWER_BUDGET: Duration = Duration::from_secs(2);
/// Fresh ports bound at most when looking for one not used lately.
const PORT_TRIES: usize = 16;
/// How long the asker punches after the answer, at most.
const PUNCH_BUDGET: Duration = Duration::from_secs(2);

/// The target's candidates, or why it will not splice.
type Answer = Result<Vec<SocketAddr>, String>;
/// Where a splice answer goes, by (target, token).
type SpliceWaiter = oneshot::Sender<Answer>;

/// Pending offers of this endpoint.
#[derive(Default)]
pub(crate) struct Pending(std::sync::Mutex<HashMap<(NodeId, u32), SpliceWaiter>>);

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(NodeId, u32), SpliceWaiter>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new offer to `target`; returns its token.
    fn register(&self, target: NodeId) -> Result<(u32, oneshot::Receiver<Answer>), String> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.lock();
        let mut b = [0u8; 4];
        loop {
            getrandom::fill(&mut b).map_err(|e| e.to_string())?;
            let token = u32::from_le_bytes(b);
            if let std::collections::hash_map::Entry::Vacant(v) = pending.entry((target, token)) {
                v.insert(tx);
                return Ok((token, rx));
            }
        }
    }

    fn remove(&self, target: NodeId, token: u32) {
        self.lock().remove(&(target, token));
    }

    /// Hands an answer (or a refusal) to the offer it belongs to.
    pub(crate) fn resolve(&self, from: NodeId, token: u32, result: Answer) {
        match self.lock().remove(&(from, token)) {
            Some(w) => {
                let _ = w.send(result);
            }
            None => tracing::debug!(%from, token, "splice answer for no pending offer"),
        }
    }
}

/// What probing the hub's echoes found about this host's NAT.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NatReport {
    /// The classification.
    pub profile: NatProfile,
    /// The local port probed from.
    pub local_port: u16,
    /// The endpoints a peer would be told to aim at for that port (empty:
    /// not predictable, so splicing is skipped).
    pub candidates: Vec<SocketAddr>,
}

/// Probes the NAT in front of this host, as a splice would.
pub(crate) async fn probe(shared: &Shared, echoes: &[SocketAddr]) -> Result<NatReport, String> {
    let p = prepare(shared, echoes).await?;
    Ok(NatReport {
        profile: p.profile,
        local_port: p.local.port(),
        candidates: p.candidates,
    })
}

/// A local port with its learned NAT mapping and predicted endpoints.
struct Prepared {
    /// Holds the port while the splice runs.
    _anchor: TcpSocket,
    local: SocketAddr,
    profile: NatProfile,
    candidates: Vec<SocketAddr>,
}

impl Prepared {
    /// Fails when there is nothing to tell the peer.
    fn predictable(self) -> Result<Self, String> {
        if self.candidates.is_empty() {
            return Err(format!(
                "this node's NAT cannot be predicted ({})",
                self.profile
            ));
        }
        Ok(self)
    }
}

fn reusable_socket(local: SocketAddr) -> std::io::Result<TcpSocket> {
    let s = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(local)?;
    Ok(s)
}

/// Asks one echo, from `local`, what it sees.
async fn observe(local: SocketAddr, server: SocketAddr) -> Result<Observation, String> {
    let ask = async {
        let mut tcp = reusable_socket(local)
            .map_err(|e| format!("cannot bind port {}: {e}", local.port()))?
            .connect(server)
            .await
            .map_err(|e| e.to_string())?;
        let from = tcp.local_addr().map_err(|e| e.to_string())?;
        let mut buf = [0u8; MAX_ECHO_LEN];
        let mut n = 0;
        while n < buf.len() && !buf[..n].contains(&b'\n') {
            match tcp.read(&mut buf[n..]).await.map_err(|e| e.to_string())? {
                0 => break,
                k => n += k,
            }
        }
        let mapped = nat::decode_echo(&buf[..n]).map_err(|e| e.to_string())?;
        // Close with a reset: no TIME_WAIT at either end. Thousands of probes
        // otherwise leave the echo with TIME_WAIT entries that a later probe's
        // (random) port can hit, costing it a SYN retransmission.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        Ok(Observation {
            local: from,
            server,
            mapped,
        })
    };
    tokio::time::timeout(ECHO_BUDGET, ask)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {ECHO_BUDGET:?}")))
        .map_err(|e: String| format!("address echo {server}: {e}"))
}

/// Binds a port not used for splicing lately: such a port may still have
/// stale NAT mappings (see `port_memory`). The sockets tried are held until
/// one is found, so the kernel does not hand the same port out again.
fn fresh_port(shared: &Shared, ip: IpAddr) -> Result<(TcpSocket, SocketAddr), String> {
    let mut tried = Vec::new();
    let (anchor, local) = loop {
        let anchor = reusable_socket(SocketAddr::new(ip, 0))
            .map_err(|e| format!("cannot bind a splice port: {e}"))?;
        let local = anchor.local_addr().map_err(|e| e.to_string())?;
        if !shared.splice_ports.recently_used(local.port()) || tried.len() >= PORT_TRIES {
            break (anchor, local);
        }
        tried.push(anchor);
    };
    shared.splice_ports.remember(local.port());
    Ok((anchor, local))
}

/// Binds a fresh port, learns its mapping from the echoes and predicts.
async fn prepare(shared: &Shared, echoes: &[SocketAddr]) -> Result<Prepared, String> {
    let first = *echoes.first().ok_or("the hub runs no address echo")?;
    let unspecified: IpAddr = if first.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let (anchor, local) = fresh_port(shared, unspecified)?;
    let mut observations = Vec::new();
    for (i, echo) in echoes.iter().take(2).enumerate() {
        match observe(local, *echo).await {
            Ok(o) => observations.push(o),
            Err(e) if i == 0 => return Err(e),
            Err(e) => tracing::debug!("second echo failed, classifying from one: {e}"),
        }
    }
    let mut profile = nat::classify(&observations);
    if let (nat::Allocation::Sequential { .. }, Some(first)) =
        (profile.allocation, observations.first())
    {
        // Confirm with a third mapping from another fresh port; it also is
        // the newest allocation, which predictions start from.
        let other = fresh_port(shared, unspecified)?;
        let third = observe(other.1, first.server).await?;
        profile = nat::confirm_sequential(&profile, &third);
    }
    let public: Vec<IpAddr> = shared
        .local_addrs
        .get()
        .iter()
        .map(|l| l.ip)
        .filter(|ip| addr_class(*ip) == AddrClass::Global)
        .collect();
    let candidates = nat::predict(&profile, &public, local.port());
    tracing::debug!(%profile, ?candidates, port = local.port(), "splice port prepared");
    Ok(Prepared {
        _anchor: anchor,
        local,
        profile,
        candidates,
    })
}

/// Connects from `local` to every candidate until each either connects or
/// the deadline passes; established connections come out of the receiver.
fn punch(
    local: SocketAddr,
    candidates: &[SocketAddr],
    deadline: Instant,
) -> (JoinSet<()>, mpsc::Receiver<TcpStream>) {
    let (tx, rx) = mpsc::channel(MAX_CANDIDATES);
    let mut tasks = JoinSet::new();
    // A listener on the same port takes a peer SYN that arrives while no
    // connecting socket waits for it (one was just reset by a rejecting
    // firewall): without it the kernel would answer with a reset, and two
    // sides that reset each other's SYNs could retry in lockstep forever.
    match reusable_socket(local).and_then(|s| s.listen(MAX_CANDIDATES as u32)) {
        Ok(listener) => {
            let tx = tx.clone();
            tasks.spawn(async move {
                let accept = async {
                    while let Ok((tcp, from)) = listener.accept().await {
                        tracing::trace!(%from, "splice SYN accepted");
                        let _ = tcp.set_nodelay(true);
                        if tx.send(tcp).await.is_err() {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout_at(deadline.into(), accept).await;
            });
        }
        Err(e) => tracing::debug!(%local, "no splice listener: {e}"),
    }
    let candidates: Vec<SocketAddr> = candidates.iter().take(MAX_CANDIDATES).copied().collect();
    tasks.spawn(drive_attempts(local, candidates, deadline, tx));
    (tasks, rx)
}

/// Runs the attempts `reach_proto::punch::Punch` schedules, sending each
/// connection that opens to `opened`, until the deadline.
async fn drive_attempts(
    local: SocketAddr,
    candidates: Vec<SocketAddr>,
    deadline: Instant,
    opened: mpsc::Sender<TcpStream>,
) {
    let mut schedule = Punch::new(&candidates, Instant::now(), deadline);
    let mut attempts = JoinSet::new();
    loop {
        let wake = loop {
            match schedule.poll(Instant::now()) {
                PunchStep::Connect(i, to) => match start_connect(local, to).await {
                    Ok(attempt) => {
                        attempts.spawn(async move { (i, attempt.await) });
                    }
                    Err(e) => {
                        tracing::trace!(%to, "splice SYN failed: {e}");
                        schedule.handle_failed(i, Instant::now());
                    }
                },
                PunchStep::Wait(t) => break t,
                PunchStep::Finished => return,
            }
        };
        tokio::select! {
            Some(done) = attempts.join_next() => match done {
                Ok((i, Ok(tcp))) => {
                    schedule.handle_connected(i);
                    let _ = tcp.set_nodelay(true);
                    if opened.send(tcp).await.is_err() {
                        return;
                    }
                }
                Ok((i, Err(e))) => {
                    tracing::trace!(candidate = i, "splice SYN failed: {e}");
                    schedule.handle_failed(i, Instant::now());
                }
                Err(_) => {}
            },
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// Sends the SYN of one attempt from `local` to `to` now, before returning,
/// so attempts leave in the order they are started; the future it returns
/// resolves when the attempt connects or fails.
async fn start_connect(
    local: SocketAddr,
    to: SocketAddr,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<TcpStream>> + Send> {
    let mut connecting = Box::pin(reusable_socket(local)?.connect(to));
    // The first poll makes the connect system call (and sends the SYN).
    let first = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(connecting.as_mut(), cx))
    })
    .await;
    Ok(async move {
        match first {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => connecting.await,
        }
    })
}

/// The asker's side: offers, waits for the answer, punches, and runs the
/// handshake on the first connection that opens.
/// With `options.upgrade` the connection is to carry the routed stream whose
/// upgrade id is `target.port`.
pub(crate) async fn connect(
    shared: &Arc<Shared>,
    target: &VirtualAddr,
    options: InitiatorOptions,
    budget: Duration,
    started: Instant,
) -> Result<ReachStream, Result<String, ConnectError>> {
    let deadline = Instant::now() + budget;
    let (session, link) = shared.hub_link().await.map_err(Ok)?;
    let prepared = prepare(shared, &link.status().echo)
        .await
        .and_then(Prepared::predictable)
        .map_err(Ok)?;
    let node = target.node;
    let (token, answer) = shared.pending_splice.register(node).map_err(Ok)?;
    session.send(
        &link,
        &Control::Relay {
            from: shared.secret.node_id(),
            to: node,
            msg: Rendezvous::SpliceOffer {
                token,
                vport: target.port,
                candidates: prepared.candidates.clone(),
                upgrade: options.upgrade,
            },
        },
    );
    let wait = deadline.min(Instant::now() + ANSWER_BUDGET);
    let answer = tokio::time::timeout_at(wait.into(), answer).await;
    shared.pending_splice.remove(node, token);
    let theirs = match answer {
        Ok(Ok(Ok(c))) => c,
        Ok(Ok(Err(reason))) => return Err(Ok(reason)),
        Ok(Err(_)) => return Err(Ok("the splice offer was dropped".into())),
        Err(_) => return Err(Ok("no splice answer in time".into())),
    };
    let punch_deadline = deadline.min(Instant::now() + PUNCH_BUDGET);
    let (tasks, mut opened) = punch(prepared.local, &theirs, punch_deadline);
    let mut last = format!(
        "no connection opened towards {theirs:?} (this side: {})",
        prepared.profile
    );
    while let Ok(Some(mut tcp)) =
        tokio::time::timeout_at(punch_deadline.into(), opened.recv()).await
    {
        let hs = initiate(&mut tcp, &shared.secret, node, target.port, options);
        match tokio::time::timeout_at(deadline.into(), hs).await {
            Ok(Ok(est)) => {
                drop(tasks);
                return ReachStream::over_tcp(
                    tcp,
                    est,
                    SetupModule::Splice,
                    Direction::Outbound,
                    started,
                )
                .map_err(|e| Ok(e.to_string()));
            }
            Ok(Err(AttemptError::Handshake(HandshakeError::Refused(refusal)))) => {
                return Err(Err(ConnectError::Refused { node, refusal }));
            }
            Ok(Err(e)) => last = format!("handshake on the spliced connection: {e}"),
            Err(_) => last = "handshake on the spliced connection timed out".into(),
        }
    }
    Err(Ok(last))
}

/// One of the [`ANSWERS_PER_ASKER`] answers a node may have running here.
struct AskerTurn<'a> {
    shared: &'a Shared,
    from: NodeId,
}

impl<'a> AskerTurn<'a> {
    fn take(shared: &'a Shared, from: NodeId) -> Option<Self> {
        let mut busy = shared
            .splice_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = busy.entry(from).or_insert(0);
        if *n >= ANSWERS_PER_ASKER {
            return None;
        }
        *n += 1;
        Some(Self { shared, from })
    }
}

impl Drop for AskerTurn<'_> {
    fn drop(&mut self) {
        let mut busy = self
            .shared
            .splice_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = busy.get_mut(&self.from) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.from);
            }
        }
    }
}

/// A splice offer another node sent.
pub(crate) struct Offer {
    pub(crate) from: NodeId,
    pub(crate) token: u32,
    pub(crate) vport: u16,
    pub(crate) upgrade: bool,
    pub(crate) candidates: Vec<SocketAddr>,
}

/// The target's side: answers an offer relayed by the hubs and punches.
pub(crate) async fn answer(
    shared: Arc<Shared>,
    tx: FrameTx,
    echoes: Vec<SocketAddr>,
    offer: Offer,
) {
    let Offer {
        from,
        token,
        vport,
        upgrade,
        candidates: theirs,
    } = offer;
    let started = Instant::now();
    let reply = |msg: Rendezvous| {
        crate::session::send_control(
            &tx,
            &Control::Relay {
                from: shared.secret.node_id(),
                to: from,
                msg,
            },
        )
    };
    let decline = |reason: String| {
        tracing::debug!(%from, "declining splice: {reason}");
        reply(Rendezvous::SpliceDeclined { token, reason });
    };
    let Some(_turn) = AskerTurn::take(&shared, from) else {
        return decline(format!(
            "already answering {ANSWERS_PER_ASKER} offers from this node"
        ));
    };
    if upgrade {
        if crate::upgrade::lookup(&shared.upgrades, from, vport).is_none() {
            return decline("no routed stream here to move".into());
        }
    } else if shared.admit_port(vport) != Admission::Accept {
        return decline(format!("no service on virtual port {vport}"));
    }
    let prepared = match prepare(&shared, &echoes)
        .await
        .and_then(Prepared::predictable)
    {
        Ok(p) => p,
        Err(e) => return decline(e),
    };
    reply(Rendezvous::SpliceAnswer {
        token,
        candidates: prepared.candidates.clone(),
    });
    let deadline = Instant::now() + TARGET_WINDOW;
    let (tasks, mut opened) = punch(prepared.local, &theirs, deadline);
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            Some(tcp) = opened.recv() => {
                let shared = shared.clone();
                handshakes.spawn(async move {
                    let mut tcp = tcp;
                    let mut moving = None;
                    let admit = |peer: &NodeId, h: &reach_proto::handshake::HelloHeader| {
                        if *peer != from || h.reverse {
                            Admission::Refuse(Refusal::NotAdmitted)
                        } else {
                            shared.admit_inbound(peer, h, &mut moving)
                        }
                    };
                    let est = respond(&mut tcp, &shared.secret, shared.responder_options(), admit).await;
                    shared
                        .finish_inbound(tcp, est, moving, SetupModule::Splice, started)
                        .await
                });
            }
            Some(done) = handshakes.join_next() => {
                match done {
                    Ok(Ok(())) => {
                        drop(tasks);
                        tracing::debug!(peer = %from, "spliced");
                        return;
                    }
                    Ok(Err(e)) => tracing::debug!(%from, "spliced connection failed its handshake: {e}"),
                    Err(_) => {}
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                tracing::debug!(%from, profile = %prepared.profile, "splice window closed");
                return;
            }
        }
    }
}
