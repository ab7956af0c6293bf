//! What one node's tasks share: its identity and settings, the hub
//! session, the module cache, and the waiters of its rendezvous.
//!
//! Data flow: the endpoint builds one [`Shared`] and hands an `Arc` of it to
//! its tasks: the accept loop and the setup driver read settings and the
//! cache from it; requests from other nodes (`crate::inbound`) and the setup
//! modules meet here, where a connect-back or splice this node waits for is
//! registered by (node, token) and resolved when its stream or answer comes.
//! Nothing here dials or listens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use reach_proto::handshake::{Admission, InitiatorOptions, Knock, Refusal, ResponderOptions};
use reach_proto::member::NetworkKey;
use reach_proto::setup_plan::SetupModule;
use reach_proto::{Cipher, NodeId, SecretKey};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::counters::{bump, Counters};
use crate::discovery::LocalAddrCache;
use crate::error::{AttemptError, ConnectBackError, SessionError};
use crate::hub_session::{Dialer, Link, Session};
use crate::module_cache::ModuleCache;
use crate::policy::AccessPolicy;
use crate::stream::{Direction, ReachStream};

/// What the endpoint's tasks (accept loop, hub session, setup driver) share.
/// The direct addresses a node advertises: its own, and the one its
/// gateway maps to it (while one is held).
#[derive(Debug)]
pub(crate) struct Advertised {
    base: Vec<SocketAddr>,
    mapped: StdMutex<Option<SocketAddr>>,
}

impl Advertised {
    pub(crate) fn new(base: Vec<SocketAddr>) -> Self {
        Self {
            base,
            mapped: StdMutex::new(None),
        }
    }

    /// The addresses now: its own first, then the mapped one.
    pub(crate) fn get(&self) -> Vec<SocketAddr> {
        let mut out = self.base.clone();
        if let Some(m) = *self.mapped.lock().unwrap_or_else(|p| p.into_inner()) {
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }

    /// The gateway's mapping came (Some) or went (None).
    pub(crate) fn set_mapped(&self, mapped: Option<SocketAddr>) {
        *self.mapped.lock().unwrap_or_else(|p| p.into_inner()) = mapped;
    }
}

pub(crate) struct Shared {
    pub(crate) secret: SecretKey,
    pub(crate) local_addrs: Arc<LocalAddrCache>,
    pub(crate) advertised: Advertised,
    /// The port mapping at the gateway, if asked for.
    pub(crate) mapper: Option<Arc<crate::port_map::Mapper>>,
    pub(crate) plaintext: bool,
    /// A virtual port where plaintext is granted anyway (a hub's circuits).
    pub(crate) plaintext_port: Option<u16>,
    /// Whether routed streams move onto relay circuits.
    pub(crate) circuits: bool,
    /// Resumption: the key this node's tickets are sealed with, and the
    /// tickets it holds for others (both `None` with resumption off).
    pub(crate) ticket_key: Option<reach_proto::resume::TicketKey>,
    pub(crate) tickets: Option<std::sync::Arc<crate::ticket_store::TicketStore>>,
    /// How long a routed stream lives before it tries to move.
    pub(crate) upgrade_after: std::time::Duration,
    /// Circuit joins at once, and the back-off after a hub offered none.
    pub(crate) circuit_gate: crate::circuit_gate::Gate,
    pub(crate) cipher: Cipher,
    pub(crate) accept_ports: Option<Vec<u16>>,
    pub(crate) connect_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) attempt_delay: Duration,
    pub(crate) modules: Vec<SetupModule>,
    pub(crate) direct_budget: Duration,
    pub(crate) reverse_budget: Duration,
    pub(crate) splice_budget: Duration,
    pub(crate) incoming: mpsc::Sender<ReachStream>,
    /// Connect-back requests waiting for the target, by (target, token).
    pub(crate) pending_reverse: StdMutex<HashMap<(NodeId, u16), ReverseWaiter>>,
    /// Splice offers in flight, both ways.
    pub(crate) offers: crate::offers::Offers,
    /// When a cached routed stream to a node was last offered an upgrade.
    pub(crate) upgrades_tried: StdMutex<HashMap<NodeId, Instant>>,
    /// Inbound routed streams the peer may move to a direct connection.
    pub(crate) upgrades: Arc<crate::stream::upgrade::Registry>,
    /// The streams handed out and still open, for `Endpoint::streams`.
    pub(crate) streams: crate::stream::track::StreamTable,
    /// The module that last worked, per target.
    pub(crate) cache: ModuleCache,
    /// Local ports splices used lately, not to be reused soon.
    pub(crate) splice_ports: crate::port_memory::PortMemory,
    /// The hub session, if the node has a hub.
    pub(crate) session: Option<Arc<Session>>,
    /// How this node dials hubs (and where it pins their identities).
    pub(crate) dialer: Dialer,
    /// Proves admission to hubs.
    pub(crate) network_secret: Option<Vec<u8>>,
    /// The network this node is a member of, for stream handshakes.
    pub(crate) network: Option<NetworkKey>,
    /// Who may open streams here.
    pub(crate) policy: AccessPolicy,
    /// Whether a hello for another node learns this node's NodeId.
    pub(crate) reveal_identity: bool,
    /// What was refused and dropped.
    pub(crate) counters: Counters,
    /// Room for inbound handshakes in progress.
    pub(crate) handshake_slots: Arc<crate::source_slots::Slots>,
}

/// A connect-back awaited with `Endpoint::expect_connect_back`.
pub struct ConnectBackWait {
    rx: oneshot::Receiver<Result<ReachStream, String>>,
    key: (NodeId, u16),
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ConnectBackWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnectBackWait({}, {})", self.key.0, self.key.1)
    }
}

impl ConnectBackWait {
    /// The token the node must connect back with.
    pub fn token(&self) -> u16 {
        self.key.1
    }

    /// The stream, once the node has connected back, within `timeout`.
    pub async fn wait(mut self, timeout: Duration) -> Result<ReachStream, ConnectBackError> {
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(Ok(Ok(stream))) => Ok(stream),
            Ok(Ok(Err(reason))) => Err(ConnectBackError::NotDelivered(reason)),
            Ok(Err(_)) => Err(ConnectBackError::Dropped),
            Err(_) => Err(ConnectBackError::TimedOut(timeout)),
        }
    }
}

impl Drop for ConnectBackWait {
    fn drop(&mut self) {
        self.shared
            .pending_reverse
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// How long [`Endpoint::probe_nat`] waits for a hub session coming up.
/// Where a connect-back stream (or the reason it will not come) goes.
pub(crate) type ReverseWaiter = oneshot::Sender<Result<ReachStream, String>>;

impl Shared {
    /// Whether a stream to virtual port `port` is accepted.
    pub(crate) fn admit_port(&self, port: u16) -> Admission {
        match &self.accept_ports {
            Some(ports) if !ports.contains(&port) => Admission::Refuse(Refusal::NoSuchPort),
            _ => Admission::Accept,
        }
    }

    /// The setup modules' time budgets.
    pub(crate) fn budgets(&self) -> reach_proto::setup_plan::Budgets {
        reach_proto::setup_plan::Budgets {
            direct: self.direct_budget,
            reverse: self.reverse_budget,
            splice: self.splice_budget,
        }
    }

    /// Where this node stands for the setup planner; `seen_at`: where its
    /// hub sees it.
    pub(crate) fn site(&self, seen_at: Option<SocketAddr>) -> reach_proto::setup_plan::Site {
        reach_proto::setup_plan::Site {
            local: self.local_addrs.get().to_vec(),
            advertised: self.advertised.get(),
            seen_at,
        }
    }

    pub(crate) fn responder_options(&self) -> ResponderOptions {
        ResponderOptions {
            allow_plaintext: self.plaintext,
            plaintext_port: self.plaintext_port,
            reveal_identity: self.reveal_identity,
            network: self.network,
        }
    }

    /// What the responder's side of a handshake needs of this node.
    pub(crate) fn responder(&self) -> crate::handshake::Responder<'_> {
        crate::handshake::Responder {
            secret: &self.secret,
            options: self.responder_options(),
            counters: &self.counters,
            tickets: self.ticket_key.as_ref(),
        }
    }

    /// What the initiator's side of a handshake needs of this node.
    pub(crate) fn me(&self) -> crate::handshake::Me<'_> {
        crate::handshake::Me {
            secret: &self.secret,
            tickets: self.tickets.as_deref(),
        }
    }

    /// Races `target`'s direct candidates as this node (its key, its
    /// resumption tickets, its local addresses).
    pub(crate) async fn direct_connect(
        &self,
        target: &reach_proto::VirtualAddr,
        settings: crate::direct::RaceSettings,
    ) -> Result<crate::stream::ReachStream, crate::error::ConnectError> {
        crate::direct::connect(
            &self.secret,
            self.tickets.as_ref(),
            &self.local_addrs.get(),
            target,
            settings,
        )
        .await
    }

    pub(crate) fn initiator_options(&self) -> InitiatorOptions {
        InitiatorOptions {
            plaintext: self.plaintext,
            cipher: self.cipher,
            reverse: false,
            upgrade: false,
            network: self.network,
        }
    }

    /// Whether `peer` (authenticated; `member` if it proved this node's
    /// network secret) may open a stream to `port` here: the access policy
    /// admits it, or it is the hub (or the hub's proxy node) serving the
    /// clients of a service this node published on the hub's proxy port. A
    /// refusal is logged and counted, naming the peer.
    pub(crate) fn admit_peer(&self, peer: &NodeId, member: bool, port: u16, how: &str) -> bool {
        if self.policy.admits(peer, member) || self.serves_proxy_clients(peer, port) {
            return true;
        }
        bump(&self.counters.refused_by_policy);
        tracing::warn!(%peer, "refused a {how} stream: the access policy does not admit this node");
        false
    }

    /// Whether `peer` opens streams to `port` for the hub's proxy-port
    /// clients.
    fn serves_proxy_clients(&self, peer: &NodeId, port: u16) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.serves_proxy_clients(peer, port))
    }

    /// Whether `peer` could be admitted to `port` once it proves what it
    /// can (before any work is done for it: a connect-back, a splice).
    pub(crate) fn may_admit(&self, peer: &NodeId, port: u16) -> bool {
        self.policy.may_admit(peer) || self.serves_proxy_clients(peer, port)
    }

    /// Admission of a new stream to a served port by an authenticated peer.
    pub(crate) fn admit_new(&self, k: &Knock<'_>, how: &str) -> Admission {
        match self.admit_port(k.hello.port) {
            Admission::Accept if !self.admit_peer(&k.peer, k.member, k.hello.port, how) => {
                Admission::Refuse(Refusal::NotAdmitted)
            }
            a => a,
        }
    }

    /// Admission of an inbound handshake on a TCP connection (not a
    /// connect-back): a new stream to a served port, or an upgrade of a routed
    /// stream this peer has here, whose slot goes to `moving`.
    pub(crate) fn admit_inbound(
        &self,
        k: &Knock<'_>,
        moving: &mut Option<crate::stream::upgrade::Slot>,
    ) -> Admission {
        if !k.hello.upgrade {
            return self.admit_new(k, "direct");
        }
        // The stream being moved was admitted when it was opened.
        match crate::stream::upgrade::lookup(&self.upgrades, k.peer, k.hello.port) {
            Some(slot) => {
                slot.begin();
                *moving = Some(slot);
                Admission::Accept
            }
            None => {
                tracing::warn!(
                    peer = %k.peer,
                    id = k.hello.port,
                    "refused to move a stream: none with that id here (it ended long ago, or never was)"
                );
                Admission::Refuse(Refusal::NotAdmitted)
            }
        }
    }

    /// Delivers an inbound TCP stream whose handshake ended as `est`: to
    /// `accept`, or, for an upgrade admitted into `moving`, to the routed
    /// stream it takes over.
    pub(crate) async fn finish_inbound(
        &self,
        tcp: TcpStream,
        est: Result<reach_proto::handshake::Established, AttemptError>,
        moving: Option<crate::stream::upgrade::Slot>,
        module: SetupModule,
        started: Instant,
    ) -> Result<(), AttemptError> {
        let est = match est {
            Ok(est) => est,
            Err(e) => {
                if let Some(slot) = moving {
                    slot.fail(e.to_string());
                }
                return Err(e);
            }
        };
        let stream = ReachStream::over_tcp(tcp, est, module, Direction::Inbound, started)?;
        if let Some(slot) = moving {
            tracing::debug!(peer = %stream.peer(), %module, "routed stream moving here");
            match stream.into_new_path() {
                Some(path) => slot.attach(path),
                None => slot.fail("the new connection is not encrypted".into()),
            }
            return Ok(());
        }
        tracing::debug!(peer = %stream.peer(), %module, "accepted stream");
        self.deliver(stream).await;
        Ok(())
    }

    /// The hub session, or the error saying there is none.
    pub(crate) fn session(&self) -> Result<&Arc<Session>, SessionError> {
        self.session.as_ref().ok_or_else(|| SessionError::Down {
            hub: "(none configured)".into(),
            last: None,
        })
    }

    /// The hub session and its current link, or why there is none.
    pub(crate) async fn hub_link(&self) -> Result<(&Arc<Session>, Link), SessionError> {
        let session = self.session()?;
        let link = session.wait_link(Instant::now()).await?;
        Ok((session, link))
    }

    /// Queues an inbound stream for `accept`.
    pub(crate) async fn deliver(&self, stream: ReachStream) {
        let _ = self.incoming.send(stream).await;
    }

    /// Registers for a connect-back from `node` with `token` (see
    /// `Endpoint::expect_connect_back`); `None` when it is awaited already.
    pub(crate) fn expect_connect_back(
        self: &Arc<Self>,
        node: NodeId,
        token: u16,
    ) -> Option<ConnectBackWait> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self
            .pending_reverse
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if pending.contains_key(&(node, token)) {
            return None;
        }
        pending.insert((node, token), tx);
        Some(ConnectBackWait {
            rx,
            key: (node, token),
            shared: self.clone(),
        })
    }

    /// Connect-back request `token` to `target` failed.
    pub(crate) fn fail_reverse(&self, target: NodeId, token: u16, reason: &str) {
        let waiter = self
            .pending_reverse
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(target, token));
        if let Some(w) = waiter {
            let _ = w.send(Err(reason.to_string()));
        }
    }
}
