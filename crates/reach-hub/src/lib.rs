//! The reach hub: nodes attach to it, hubs federate through it.
//!
//! ```text
//!              +------------------------ Hub -------------------------+
//! node link -->| reader task --frames--> HubCore (sans-IO, one lock)   |
//! hub link  -->| reader task --frames-->   directory, routes, relay    |
//!              |                            | outbox                   |
//!              | writer task per link <-----+                          |
//!              | peer tasks: dial configured hubs, redial with backoff |
//!              | gossip tick; metrics over HTTP                        |
//!              +-------------------------------------------------------+
//! ```
//! All decisions live in [`core::HubCore`]; this module only moves bytes
//! between sockets and the core. Every link is an ordinary reach stream to the
//! hub's NodeId on virtual port 0, so nodes and hubs are authenticated by the
//! same handshake as every stream, and the link is encrypted.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

/// The hub's logic, sans-IO (the `reach-hub-core` crate).
pub use reach_hub_core as core;
mod circuits;
mod dial_back;
mod echo;
pub mod kernel_copy;
pub mod lan;
mod metrics;
pub mod peer;
mod port_holds;
mod proxy_ports;
pub mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach::link::{write_frames, FrameReader, FrameTx};
use reach::{Endpoint, EndpointBuilder, EndpointError, HubTarget, NodeId, ReachStream};
use reach_proto::circuit::{Circuits, Pulls, CIRCUIT_VPORT};
use reach_proto::link::HUB_VPORT;

pub use crate::core::{HubCore, Limits, LinkId, Policy, Verdict};
pub use crate::status::Status;
pub use metrics::serve_metrics;
pub use peer::{Peer, SshServer};
pub use reach_proto::circuit::CircuitLimits;

pub use reach_hub_core::DEFAULT_GOSSIP_INTERVAL;
/// A link silent this long is dead: nodes ping every 15 s, hubs gossip every
/// few seconds.
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// Redial delays for peer hubs.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(3);

/// How a hub runs.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Hubs to link to (this hub dials them; a firewalled hub lists reachable ones).
    pub peers: Vec<Peer>,
    /// Extra `ssh` arguments for peers reached over ssh (identity file, options).
    pub ssh_args: Vec<String>,
    /// Who may attach.
    pub policy: Policy,
    /// Addresses other hubs can reach this one at (default: the endpoint's
    /// advertised addresses).
    pub advertise: Option<Vec<SocketAddr>>,
    /// Routing gossip interval.
    pub gossip_interval: Duration,
    /// Dial hubs learned from gossip directly (default); when they cannot be
    /// reached, traffic keeps going through the hubs that route to them.
    pub link_learned: bool,
    /// Announce this hub on, and discover hubs from, this multicast group
    /// (opt-in; see [`lan`]).
    pub lan_discovery: Option<std::net::SocketAddrV4>,
    /// Proxy ports nodes may publish services on for unmodified TCP clients
    /// (`reach expose`), an inclusive range; `None` offers none.
    pub proxy_ports: Option<(u16, u16)>,
    /// Nodes that may publish services (empty: every admitted node).
    pub expose_allowed: Vec<NodeId>,
    /// Services one node may publish at once.
    pub max_exposures: usize,
    /// A proxy-port connection that moves nothing this long is cut.
    pub proxy_idle: Duration,
    /// A proxy-port connection that moves no byte this long after it is
    /// set up is cut.
    pub proxy_first_byte: Duration,
    /// Proxy-port client connections at once, in all and from one source
    /// (an IPv4 address or IPv6 /64).
    pub proxy_clients: (usize, usize),
    /// How long a proxy port stays held for its node after the node leaves
    /// (and after a restart of the hub).
    pub proxy_port_hold: Duration,
    /// Where the hub keeps what must survive a restart (the proxy port
    /// holds); nothing is kept without one.
    pub state_dir: Option<std::path::PathBuf>,
    /// Ports of the address echoes nodes use to learn their NAT's behaviour
    /// (0: any free port; nodes learn the ports when they register). Two
    /// let a node tell a port-dependent mapping apart; empty runs none, and
    /// nodes then do not splice.
    pub echo_ports: Vec<u16>,
    /// A second address of this host's that dial-backs may come from, so a
    /// node can tell endpoint-independent filtering from filtering by
    /// address (`reach doctor`); without one, dial-backs come only from
    /// the hub's own address.
    pub dial_back_from: Option<std::net::IpAddr>,
    /// Bounds on streams and unregistered links.
    pub limits: Limits,
    /// Relay circuits nodes may move routed streams onto, and their bounds
    /// (`reach_proto::circuit`); `None` offers none.
    pub circuits: Option<CircuitLimits>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            ssh_args: Vec::new(),
            policy: Policy {
                open: true,
                ..Policy::default()
            },
            advertise: None,
            gossip_interval: DEFAULT_GOSSIP_INTERVAL,
            link_learned: true,
            lan_discovery: None,
            echo_ports: vec![0, 0],
            dial_back_from: None,
            proxy_ports: None,
            expose_allowed: Vec::new(),
            max_exposures: DEFAULT_MAX_EXPOSURES,
            proxy_idle: DEFAULT_PROXY_IDLE,
            proxy_first_byte: DEFAULT_PROXY_FIRST_BYTE,
            proxy_clients: DEFAULT_PROXY_CLIENTS,
            proxy_port_hold: port_holds::DEFAULT_PORT_HOLD,
            state_dir: None,
            limits: Limits::default(),
            circuits: Some(CircuitLimits::default()),
        }
    }
}

/// Default services one node may publish at once.
pub const DEFAULT_MAX_EXPOSURES: usize = 8;
/// Default idle time of a proxy-port connection: RFC 5382's (REQ-5) least
/// established-TCP timeout for NATs, 2 hours 4 minutes, so a proxied
/// connection lasts at least as long as it would through a NAT.
pub const DEFAULT_PROXY_IDLE: Duration = Duration::from_secs(2 * 3600 + 4 * 60);
/// Default time a proxy-port connection may take to move its first byte
/// (either way) once connected to the node.
pub const DEFAULT_PROXY_FIRST_BYTE: Duration = Duration::from_secs(10);
/// Default caps on proxy-port client connections: in all, per source.
pub const DEFAULT_PROXY_CLIENTS: (usize, usize) = (4096, 64);
pub use port_holds::DEFAULT_PORT_HOLD;

struct State {
    core: HubCore,
    txs: HashMap<LinkId, FrameTx>,
    /// Published services, by proxy port.
    exposures: HashMap<u16, proxy_ports::Exposure>,
    /// Proxy ports held for their nodes.
    holds: port_holds::PortHolds,
    /// Wakes the timer task when the core's deadline
    /// ([`HubCore::poll_timeout`]) changes.
    timer: Arc<tokio::sync::Notify>,
    /// The deadline the timer task last heard of.
    armed: Option<Instant>,
    /// Relay circuits: halves waiting for their other half, and counts.
    circuits: Circuits<tokio::net::TcpStream>,
    /// Circuit legs this hub asked the next hub to dial back with.
    pulls: Pulls<tokio::sync::oneshot::Sender<tokio::net::TcpStream>>,
    /// Legs this hub dials back for other hubs now, and those it refused.
    dial_backs: usize,
    dial_backs_refused: u64,
}

impl State {
    /// The hub's status report: the core's, with the proxy ports held here.
    fn status(&self) -> Status {
        Status::new(
            self.core.status(),
            proxy_ports::exposure_status(self),
            status::CircuitStatus {
                waiting: self.circuits.waiting(),
                active: self.circuits.active(),
                counters: self.circuits.counters,
                pulls: self.pulls.counters,
                dial_backs: self.dial_backs,
                dial_backs_refused: self.dial_backs_refused,
            },
        )
    }

    /// Sends what the core queued, and arms the timer if the core asks.
    fn flush(&mut self) {
        for (link, frame) in self.core.poll_transmits() {
            if let Some(tx) = self.txs.get(&link) {
                let _ = tx.send(frame);
            }
        }
        // Only a new deadline wakes the task (not every frame while one is
        // pending); a stored permit covers a task that is busy right now.
        let due = self.core.poll_timeout();
        if due != self.armed {
            self.armed = due;
            self.timer.notify_one();
        }
    }
}

struct Inner {
    endpoint: Endpoint,
    /// A connect-only node of this hub's own, attached to it like any node:
    /// proxy-port clients of a node that cannot connect back are carried to
    /// it over its session, as routed streams from this node (only with
    /// proxy ports).
    session_client: Option<SessionClient>,
    state: Mutex<State>,
    config: HubConfig,
    /// Set when the hub is dropped: every link task ends.
    stop: tokio::sync::watch::Sender<bool>,
    /// Room for links that have not registered yet.
    unregistered: Arc<reach::source_slots::Slots>,
    /// Room for proxy-port client connections.
    proxy_clients: Arc<reach::source_slots::Slots>,
}

impl Inner {
    /// Where this hub listens, as it tells others.
    fn listen(&self) -> Vec<SocketAddr> {
        self.config
            .advertise
            .clone()
            .unwrap_or_else(|| self.endpoint.advertised().to_vec())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The core is consistent between calls; a panic inside one call is a
        // bug that should not take every other link down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running hub. Dropping it stops every task and closes every link.
pub struct Hub {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.inner.stop.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Hub {
    /// Binds the hub's endpoint from `builder` (its identity, listen address)
    /// and starts serving.
    pub async fn start(builder: EndpointBuilder, config: HubConfig) -> Result<Hub, EndpointError> {
        let endpoint = builder
            .accept_ports(if config.circuits.is_some() {
                vec![HUB_VPORT, CIRCUIT_VPORT]
            } else {
                vec![HUB_VPORT]
            })
            // Circuit connections are handed to the kernel bare; links and
            // everything else stay encrypted.
            .plaintext_port(CIRCUIT_VPORT)
            .reveal_identity(true)
            .bind()
            .await?;
        let listen = config
            .advertise
            .clone()
            .unwrap_or_else(|| endpoint.advertised().to_vec());
        let route_expiry = config.gossip_interval * 5;
        let ip = endpoint.local_addr().ip();
        let mut echoes = Vec::new();
        for port in &config.echo_ports {
            echoes.push(echo::bind(ip, *port).await?);
        }
        let echo_ports: Vec<u16> = echoes
            .iter()
            .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
            .collect();
        // The echoes answer on the dial-back address too (on the same
        // ports), so a node comparing its mappings towards the hub's two
        // addresses tells an address-dependent mapping from an
        // endpoint-independent one. A hub on every address has them there.
        if let Some(second) = config.dial_back_from.filter(|_| !ip.is_unspecified()) {
            for port in &echo_ports {
                echoes.push(echo::bind(second, *port).await?);
            }
        }
        let mut policy = config.policy.clone();
        let session_client = match config.proxy_ports {
            Some(_) => Some(SessionClient::new(&mut policy)?),
            None => None,
        };
        // State numbers start at the wall clock (see HubCore::new): a clock
        // before 1970 only loses the head start, not correctness of a first run.
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        let mut core = HubCore::new(endpoint.secret_key(), policy, listen, route_expiry, epoch);
        if !echoes.is_empty() {
            tracing::info!(ports = ?echo_ports, "address echoes up");
        }
        core.set_echo_ports(echo_ports);
        core.set_limits(config.limits);
        let proxy_clients =
            reach::source_slots::Slots::new(config.proxy_clients.0, config.proxy_clients.1);
        let unregistered = reach::source_slots::Slots::new(
            config.limits.unregistered_links,
            config.limits.unregistered_per_source,
        );
        let inner = Arc::new(Inner {
            endpoint,
            session_client,
            state: Mutex::new(State {
                core,
                txs: HashMap::new(),
                exposures: HashMap::new(),
                holds: port_holds::PortHolds::load(
                    config.state_dir.as_ref().map(|d| d.join("proxy-ports")),
                    config.proxy_port_hold,
                ),
                timer: Arc::new(tokio::sync::Notify::new()),
                armed: None,
                circuits: Circuits::new(config.circuits.unwrap_or_default()),
                pulls: Pulls::default(),
                dial_backs: 0,
                dial_backs_refused: 0,
            }),
            config,
            stop: tokio::sync::watch::Sender::new(false),
            unregistered,
            proxy_clients,
        });
        let mut tasks = vec![
            tokio::spawn(accept_links(inner.clone())),
            tokio::spawn(gossip(inner.clone())),
        ];
        for l in echoes {
            // The same port answers UDP, for the vpn's UDP paths; a port
            // taken for UDP leaves the TCP echo alone.
            if let Ok(at) = l.local_addr() {
                match echo::bind_udp(at).await {
                    Ok(u) => tasks.push(tokio::spawn(echo::serve_udp(u))),
                    Err(e) => tracing::warn!(%at, "no UDP address echo: {e}"),
                }
            }
            tasks.push(tokio::spawn(echo::serve(l)));
        }
        for peer in inner.config.peers.clone() {
            tasks.push(tokio::spawn(keep_peer(inner.clone(), peer)));
        }
        if let Some(group) = inner.config.lan_discovery {
            let sock = lan::socket(group).map_err(|source| EndpointError::Bind {
                what: format!("the LAN discovery socket ({group})"),
                source,
            })?;
            tasks.push(tokio::spawn(discover(inner.clone(), sock, group)));
        }
        tracing::info!(hub = %inner.endpoint.node_id(), addr = %inner.endpoint.local_addr(), "hub up");
        Ok(Hub { inner, tasks })
    }

    /// The hub's NodeId.
    pub fn id(&self) -> NodeId {
        self.inner.endpoint.node_id()
    }

    /// Where the hub listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.endpoint.local_addr()
    }

    /// The hub's address as nodes give it: `NODEID@HOST:PORT` for `addr`.
    pub fn target(&self, addr: SocketAddr) -> HubTarget {
        HubTarget {
            id: Some(self.id()),
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }

    /// A snapshot of the hub's state.
    pub fn status(&self) -> Status {
        self.inner.state().status()
    }

    /// Serves Prometheus metrics (`/metrics`) and the JSON status (`/status`)
    /// on `listener` until the hub is dropped.
    pub fn serve_metrics(&mut self, listener: tokio::net::TcpListener) {
        let inner = self.inner.clone();
        self.tasks
            .push(tokio::spawn(serve_metrics(listener, move || {
                inner.state().status()
            })));
    }
}

/// The hub's own connect-only node, for proxy-port clients of nodes that
/// cannot connect back: its key is made, and admitted by the policy, at
/// start; it attaches to the hub over the hub's own address on first use
/// (most hubs never need it).
pub(crate) struct SessionClient {
    key: reach::SecretKey,
    endpoint: tokio::sync::OnceCell<Endpoint>,
}

impl SessionClient {
    /// A fresh identity, admitted by `policy`.
    fn new(policy: &mut Policy) -> Result<SessionClient, EndpointError> {
        let key = reach::keystore::generate()?;
        policy.allowed.push(key.node_id());
        Ok(SessionClient {
            key,
            endpoint: tokio::sync::OnceCell::new(),
        })
    }

    /// Its identity.
    pub(crate) fn node_id(&self) -> NodeId {
        self.key.node_id()
    }

    /// The node, attached to `hub` (connect-only, routed streams only).
    pub(crate) async fn endpoint(
        &self,
        hub: &Endpoint,
        secret: Option<&[u8]>,
    ) -> Result<&Endpoint, EndpointError> {
        self.endpoint
            .get_or_try_init(|| async {
                let at = hub.local_addr();
                // A hub on every address (dual-stack [::] included) takes
                // IPv4 loopback, which every namespace has (IPv6 may be off).
                let ip = if at.ip().is_unspecified() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    at.ip()
                };
                let target = HubTarget {
                    id: Some(hub.node_id()),
                    host: ip.to_string(),
                    port: at.port(),
                };
                let mut b = Endpoint::builder()
                    .secret_key(self.key.clone())
                    .bind_ip(ip)
                    .accept_ports(Vec::new())
                    .modules(vec![reach::SetupModule::Routed])
                    .hub(target);
                if let Some(secret) = secret {
                    b = b.network_secret(secret.to_vec());
                }
                b.bind().await
            })
            .await
    }
}

async fn accept_links(inner: Arc<Inner>) {
    loop {
        match inner.endpoint.accept().await {
            Ok(stream) if stream.info().virtual_port == CIRCUIT_VPORT => {
                tokio::spawn(circuits::serve(inner.clone(), stream));
            }
            Ok(stream) => {
                let from = stream.info().remote_addr;
                match inner.unregistered.try_take(from.ip()) {
                    Ok(slot) => {
                        tokio::spawn(serve_link(inner.clone(), stream, Some(slot)));
                    }
                    Err(full) => {
                        let n = {
                            let mut s = inner.state();
                            s.core.count_unregistered_cut();
                            s.core.counters.links_unregistered_cut
                        };
                        if n.is_power_of_two() {
                            tracing::warn!(
                                %from,
                                "unregistered link limit: refused a link, {full} waiting to register ({n} so far)"
                            );
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!("hub endpoint stopped accepting: {e}");
                return;
            }
        }
    }
}

async fn gossip(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.config.gossip_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When each learned hub was last dialled, so unreachable ones are retried
    // only every LEARNED_RETRY.
    let mut tried: HashMap<NodeId, Instant> = HashMap::new();
    let timer = inner.state().timer.clone();
    loop {
        let deadline = inner.state().core.poll_timeout();
        tokio::select! {
            _ = tick.tick() => {}
            _ = timer.notified() => continue,
            _ = sleep_until_some(deadline) => {
                let mut s = inner.state();
                s.core.handle_timeout(Instant::now());
                s.flush();
                continue;
            }
        }
        let learned = {
            let mut s = inner.state();
            s.core.handle_tick(Instant::now());
            s.flush();
            s.core.unlinked_hubs()
        };
        let now = Instant::now();
        for (hub, addrs) in learned.into_iter().filter(|_| inner.config.link_learned) {
            if tried
                .get(&hub)
                .is_some_and(|at| now.duration_since(*at) < LEARNED_RETRY)
            {
                continue;
            }
            tried.insert(hub, now);
            tokio::spawn(link_learned(inner.clone(), hub, addrs));
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// How often a hub announces itself on the LAN.
const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(5);

/// Announces this hub on the LAN and links to hubs heard there.
async fn discover(inner: Arc<Inner>, sock: tokio::net::UdpSocket, group: std::net::SocketAddrV4) {
    let me = lan::Announce {
        hub: inner.endpoint.node_id(),
        port: inner.endpoint.local_addr().port(),
    };
    let mut tick = tokio::time::interval(ANNOUNCE_INTERVAL);
    let mut tried: HashMap<NodeId, Instant> = HashMap::new();
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            _ = tick.tick() => lan::announce(&sock, group, &me).await,
            got = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                let heard = match lan::Announce::decode(&buf[..n]) {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(%from, "ignoring datagram on the discovery group: {e}");
                        continue;
                    }
                };
                // One link per pair: the smaller NodeId dials.
                if heard.hub.as_bytes() <= me.hub.as_bytes()
                    || inner.state().core.has_hub_link(&heard.hub)
                    || tried.get(&heard.hub).is_some_and(|at| at.elapsed() < LEARNED_RETRY)
                {
                    continue;
                }
                tried.insert(heard.hub, Instant::now());
                tracing::info!(hub = %heard.hub, %from, "hub heard on the LAN");
                tokio::spawn(link_learned(inner.clone(), heard.hub, vec![heard.dial_addr(from)]));
            }
        }
    }
}

/// How often a hub learned from gossip, but not reachable, is dialled again.
const LEARNED_RETRY: Duration = Duration::from_secs(60);
/// How long dialling a learned hub may take.
const LEARNED_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Tries a direct link to a hub learned from gossip; serves it if it works.
async fn link_learned(inner: Arc<Inner>, hub: NodeId, addrs: Vec<SocketAddr>) {
    let target = reach::VirtualAddr::new(hub, HUB_VPORT).with_direct(addrs);
    match inner
        .endpoint
        .connect_timeout(&target, LEARNED_DIAL_TIMEOUT)
        .await
    {
        Ok(stream) => {
            tracing::info!(%hub, "linked to a hub learned from gossip");
            let why = serve_link(inner, stream, None).await;
            tracing::info!(%hub, "link to learned hub ended: {why}");
        }
        Err(e) => tracing::debug!(%hub, "learned hub not reachable directly: {e}"),
    }
}

/// Keeps a link to a configured peer hub, redialling with backoff. While the
/// peer keeps a link it dialled to this hub, that link serves both and this
/// one waits, so two hubs configured with each other keep one link.
async fn keep_peer(inner: Arc<Inner>, peer: Peer) {
    let mut backoff = MIN_BACKOFF;
    let mut id = peer.target.id;
    loop {
        if let Some(id) = id {
            wait_while_linked(&inner, &id).await;
        }
        let result = match &peer.ssh {
            None => inner
                .endpoint
                .dial_hub(&peer.target)
                .await
                .map(|s| (s, None))
                .map_err(|e| e.to_string()),
            Some(server) => through_ssh(&inner, &peer, server)
                .await
                .map_err(|e| e.to_string()),
        };
        match result {
            Ok((stream, tunnel)) => {
                backoff = MIN_BACKOFF;
                id = Some(stream.peer());
                // A configured peer is admitted by being configured; its
                // NodeId is known for sure only now (it may have been
                // learned on first contact).
                inner.state().core.allow_hub(stream.peer());
                let why = serve_link(inner.clone(), stream, None).await;
                drop(tunnel);
                tracing::warn!(%peer, "hub link lost: {why}; redialling");
            }
            Err(e) => tracing::warn!(%peer, "cannot link to hub: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Returns once this hub has no link to `id` (checked every second).
async fn wait_while_linked(inner: &Inner, id: &NodeId) {
    while inner.state().core.has_hub_link(id) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Opens an ssh tunnel to `server` and dials the peer through it.
async fn through_ssh(
    inner: &Inner,
    peer: &Peer,
    server: &SshServer,
) -> Result<(ReachStream, Option<peer::Tunnel>), peer::TunnelError> {
    let mut tunnel = peer::Tunnel::open(server, &peer.target, &inner.config.ssh_args).await?;
    let target = tunnel.target(&peer.target);
    tracing::debug!(%peer, local = %tunnel.local, "ssh tunnel started");
    let stream = tunnel
        .wait_ready(|| async { inner.endpoint.dial_hub(&target).await })
        .await?;
    Ok((stream, Some(tunnel)))
}

/// Serves one link until it ends; returns why.
/// Serves one link until it ends. An accepted link holds an `unregistered`
/// slot until it registers, and must do so within the limit's deadline;
/// links this hub dialled hold none.
async fn serve_link(
    inner: Arc<Inner>,
    stream: ReachStream,
    mut unregistered: Option<reach::source_slots::Slot>,
) -> String {
    let dialled = unregistered.is_none();
    let register_by = Instant::now() + inner.config.limits.register_within;
    let peer = stream.peer();
    // Stream addresses are canonical (IPv4 peers of a dual-stack listener
    // as plain IPv4), so nodes can compare what they are told with their own.
    let observed = stream.info().remote_addr;
    // This hub's address as the peer reached it (nodes connect back there).
    let via = stream.info().local_addr;
    let (r, w) = tokio::io::split(stream);
    let (tx, rx) = reach::link::frame_channel();
    let mut writer = tokio::spawn(write_frames(w, rx));
    let mut writer_ended = false;
    let mut abnormal = false;
    let link = {
        let mut s = inner.state();
        let proof = if dialled {
            s.core.hub_proof(&peer)
        } else {
            None
        };
        let link = s.core.handle_link_up(peer, observed, dialled, proof);
        s.txs.insert(link, tx);
        s.flush();
        link
    };
    let mut reader = FrameReader::new(r);
    let mut stop = inner.stop.subscribe();
    let why = loop {
        let wait = match unregistered {
            Some(_) => register_by.saturating_duration_since(Instant::now()),
            None => IDLE_TIMEOUT,
        };
        let next = tokio::select! {
            next = tokio::time::timeout(wait, reader.next()) => next,
            _ = stop.wait_for(|s| *s) => break "hub shutting down".to_string(),
            // The writer ends only when the link must: its queue overflowed
            // (a peer that does not read), a write stalled, or the transport
            // failed.
            w = &mut writer => {
                writer_ended = true;
                break match w {
                    Ok(Err(e)) => format!("cannot send: {e}"),
                    _ => "the writer ended".to_string(),
                };
            }
        };
        let frame = match next {
            Err(_) if unregistered.is_some() => {
                inner.state().core.count_unregistered_cut();
                break format!(
                    "not registered within {:?}",
                    inner.config.limits.register_within
                );
            }
            Err(_) => {
                abnormal = true;
                break format!("silent for {IDLE_TIMEOUT:?}");
            }
            Ok(Err(e)) => {
                // A reset, the kernel's user timeout (a peer that stopped
                // taking data), a broken frame.
                abnormal = true;
                break e.to_string();
            }
            Ok(Ok(None)) => break "closed by peer".to_string(),
            Ok(Ok(Some(f))) => f,
        };
        let mut s = inner.state();
        let verdict = s.core.handle_frame(link, frame, Instant::now());
        s.flush();
        proxy_ports::handle(&inner, &mut s, via);
        if unregistered.is_some() && s.core.is_registered(link) {
            unregistered = None;
        }
        if let Verdict::Close(why) = verdict {
            break why;
        }
    };
    {
        let mut s = inner.state();
        s.core.handle_link_down(link, Instant::now());
        s.txs.remove(&link);
        s.flush();
        proxy_ports::handle(&inner, &mut s, via);
    }
    if writer_ended || abnormal {
        // Abnormal ends: a peer that does not read, vanished, or whose
        // connection failed.
        tracing::warn!(%peer, %observed, "link closed: {why}");
    } else {
        tracing::debug!(%peer, %observed, "link closed: {why}");
        // The writer ends once it has sent what is queued (a refusal, say).
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    }
    why
}
