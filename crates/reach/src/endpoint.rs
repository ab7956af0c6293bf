//! The `Endpoint`: a node's identity bound to a listening socket.
//!
//! ```text
//!             +--------------------- Endpoint ----------------------+
//! connect() --|--> direct race --> TCP + handshake --> ReachStream  |
//!             |                                                     |
//! TCP accept -|--> task per connection: handshake (deadline) --+    |
//!             |                     bounded channel <----------+    |
//! accept() <--|---------------------------+                         |
//!             +-----------------------------------------------------+
//! ```
//! Incoming handshakes run in their own tasks with a deadline, so a slow or
//! garbage-sending client never delays others; failures are logged and the
//! listener keeps serving. The accept task ends when the `Endpoint` is dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use reach_proto::candidates::advertisable;
use reach_proto::handshake::{Admission, InitiatorOptions, Knock, Refusal};
use reach_proto::member::NetworkKey;
use reach_proto::node_session;
use reach_proto::race::DEFAULT_ATTEMPT_DELAY;
use reach_proto::setup_plan::SetupModule;
use reach_proto::{Cipher, NodeId, SecretKey, VirtualAddr};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};

use crate::discovery::{local_addrs, LocalAddrCache};
use crate::error::{AttemptError, ConnectError, EndpointError, HubError, SessionError};
use crate::hub_session::{Dialer, HubStatus, HubTarget, Session};
use crate::keystore;
use crate::module_cache::ModuleCache;
use crate::node::{ConnectBackWait, Shared};
use crate::policy::AccessPolicy;
use crate::setup;
use crate::stream::track::LiveStream;
use crate::stream::{Direction, ReachStream, StreamInfo};

/// Default time `connect` may take before giving up.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an incoming handshake may take before the listener drops it.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time the Direct module may take when another module follows.
pub const DEFAULT_DIRECT_BUDGET: Duration = Duration::from_secs(2);
/// Default time the Reverse module waits when another module follows.
pub const DEFAULT_REVERSE_BUDGET: Duration = Duration::from_secs(2);
/// Default time the Splice module may take when another module follows:
/// two echo round trips, the rendezvous through the hubs and the punching.
pub const DEFAULT_SPLICE_BUDGET: Duration = Duration::from_secs(3);
/// Finished inbound streams waiting for `accept()`.
const ACCEPT_QUEUE: usize = 64;

/// Which TCP port(s) the endpoint may listen on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenPorts {
    /// Any free port the OS picks.
    Any,
    /// Exactly this port.
    Fixed(u16),
    /// The first free port in this inclusive range (for sites that open a range).
    Range(u16, u16),
}

/// Builds an [`Endpoint`].
#[derive(Debug)]
pub struct EndpointBuilder {
    secret: Option<SecretKey>,
    state_dir: Option<PathBuf>,
    bind_ip: Option<IpAddr>,
    ports: ListenPorts,
    advertise: Option<Vec<SocketAddr>>,
    plaintext: bool,
    plaintext_port: Option<u16>,
    circuits: bool,
    upgrade_after: Duration,
    resumption: bool,
    cipher: Option<Cipher>,
    accept_ports: Option<Vec<u16>>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    attempt_delay: Duration,
    hub: Option<HubTarget>,
    fallback_hubs: Vec<HubTarget>,
    port_mapping: bool,
    gateway_query: bool,
    network_secret: Option<Vec<u8>>,
    modules: Vec<SetupModule>,
    direct_budget: Duration,
    reverse_budget: Duration,
    splice_budget: Duration,
    policy: AccessPolicy,
    reveal_identity: bool,
    max_handshakes: (usize, usize),
}

impl Default for EndpointBuilder {
    fn default() -> Self {
        Self {
            secret: None,
            state_dir: None,
            bind_ip: None,
            ports: ListenPorts::Any,
            advertise: None,
            plaintext: false,
            plaintext_port: None,
            circuits: true,
            upgrade_after: Duration::ZERO,
            resumption: true,
            cipher: None,
            accept_ports: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            attempt_delay: DEFAULT_ATTEMPT_DELAY,
            hub: None,
            fallback_hubs: Vec::new(),
            port_mapping: false,
            gateway_query: true,
            network_secret: None,
            modules: SetupModule::ALL.to_vec(),
            direct_budget: DEFAULT_DIRECT_BUDGET,
            reverse_budget: DEFAULT_REVERSE_BUDGET,
            splice_budget: DEFAULT_SPLICE_BUDGET,
            policy: AccessPolicy::open(),
            reveal_identity: false,
            max_handshakes: (
                crate::DEFAULT_MAX_HANDSHAKES,
                crate::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            ),
        }
    }
}

impl EndpointBuilder {
    /// Uses this secret key instead of the one in the state directory.
    pub fn secret_key(mut self, key: SecretKey) -> Self {
        self.secret = Some(key);
        self
    }

    /// Loads (or creates) the identity in this state directory. Without this and
    /// without [`secret_key`](Self::secret_key), the default state directory is used.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Listens on this IP only (default: every address, IPv6 and IPv4).
    pub fn bind_ip(mut self, ip: IpAddr) -> Self {
        self.bind_ip = Some(ip);
        self
    }

    /// Which TCP port(s) to listen on (default: any).
    pub fn listen_ports(mut self, ports: ListenPorts) -> Self {
        self.ports = ports;
        self
    }

    /// Advertises exactly these socket addresses instead of the discovered ones
    /// (for a port forwarded by a NAT, say).
    pub fn advertise(mut self, addrs: Vec<SocketAddr>) -> Self {
        self.advertise = Some(addrs);
        self
    }

    /// Opts in to plaintext streams: peers stay authenticated, and so does
    /// a stream's end (a cut connection is an error, not an end of file),
    /// but payload is neither encrypted nor integrity-protected. Used only
    /// when both ends opt in; for trusted fabrics.
    pub fn plaintext(mut self, yes: bool) -> Self {
        self.plaintext = yes;
        self
    }

    /// Grants plaintext streams on this one virtual port to initiators that
    /// ask for them, whatever [`plaintext`](Self::plaintext) says: a hub's
    /// circuit port, whose sockets it hands to the kernel.
    pub fn plaintext_port(mut self, port: u16) -> Self {
        self.plaintext_port = Some(port);
        self
    }

    /// Whether routed streams move onto relay circuits at the hub (default
    /// on): both nodes dial the hub, which pairs the two connections and
    /// moves the stream's encrypted bytes between them in the kernel. See
    /// `reach_proto::circuit`.
    pub fn circuits(mut self, yes: bool) -> Self {
        self.circuits = yes;
        self
    }

    /// How long a routed stream carries data before it tries to move to a
    /// better path (default: at once). A site where most streams are short
    /// requests can spare the hole punching and connect-backs their moves
    /// cost; a move onto a relay circuit waits 50 ms whatever this is.
    pub fn upgrade_after(mut self, t: Duration) -> Self {
        self.upgrade_after = t;
        self
    }

    /// Whether handshakes between nodes that met before resume (default
    /// on): one Diffie-Hellman per side instead of four, with the same
    /// identity guarantees (`reach_proto::resume`). Off, every handshake
    /// proves both static keys, and this node issues no tickets.
    pub fn resumption(mut self, yes: bool) -> Self {
        self.resumption = yes;
        self
    }

    /// The AEAD for streams this endpoint opens (default: AES-256-GCM where the
    /// CPU accelerates it, else ChaCha20-Poly1305).
    pub fn cipher(mut self, cipher: Cipher) -> Self {
        self.cipher = Some(cipher);
        self
    }

    /// Accepts streams only on these virtual ports; others are refused during the
    /// handshake with "no service on that virtual port". Default: every port.
    /// An empty list makes a connect-only endpoint: it does not enter its
    /// hub's directory, so it never displaces a process of the same identity
    /// that does accept (streams it asked to be connected back still arrive).
    pub fn accept_ports(mut self, ports: Vec<u16>) -> Self {
        self.accept_ports = Some(ports);
        self
    }

    /// How long `connect` may take (default 10 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// How long an incoming handshake may take (default 10 s).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Delay between staggered connection attempts (default 250 ms, RFC 8305).
    pub fn attempt_delay(mut self, t: Duration) -> Self {
        self.attempt_delay = t;
        self
    }

    /// Attaches to this hub: the endpoint keeps a session with it (reconnecting
    /// as needed), is reachable through it by NodeId alone, and can use the
    /// Reverse and Routed modules.
    pub fn hub(mut self, hub: HubTarget) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Asks the gateway in front of this host to forward the listening port
    /// (PCP, then NAT-PMP, then UPnP IGD), renews the mapping at half its
    /// lease, advertises the mapped address beside the node's own (so peers
    /// connect Direct), and deletes it on [`Endpoint::close`] (default off;
    /// `reach`'s serving commands turn it on). Every stream through it is
    /// authenticated and admitted like any other.
    pub fn port_mapping(mut self, yes: bool) -> Self {
        self.port_mapping = yes;
        self
    }

    /// Asks the gateway in front of this host, before connecting Direct to
    /// a peer whose address is this host's own NAT's public address (the
    /// peer is behind the same gateway), which internal endpoint that
    /// address forwards to, and connects there on the LAN (DPF's
    /// same-network query, served by `reach gateway`; default on). A
    /// gateway that does not answer within 300 ms is not asked again for
    /// ten minutes.
    pub fn gateway_query(mut self, yes: bool) -> Self {
        self.gateway_query = yes;
        self
    }

    /// Another hub of the same network: when a dial to the current hub
    /// fails or its link ends, the session tries the next hub in turn
    /// (the first set with [`hub`](Self::hub), then these in order).
    pub fn fallback_hub(mut self, hub: HubTarget) -> Self {
        self.fallback_hubs.push(hub);
        self
    }

    /// The network secret a hub may require before it admits this node.
    pub fn network_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.network_secret = Some(secret.into());
        self
    }

    /// The setup modules `connect` tries, in order (default: direct, reverse,
    /// routed). A module that cannot work for a target is skipped.
    pub fn modules(mut self, modules: Vec<SetupModule>) -> Self {
        self.modules = modules;
        self
    }

    /// How long the Direct module may try before the next module starts, when
    /// one follows (default 2 s); the last module gets what remains.
    pub fn direct_budget(mut self, t: Duration) -> Self {
        self.direct_budget = t;
        self
    }

    /// How long the Reverse module waits for the target to connect back, when
    /// another module follows (default 2 s).
    pub fn reverse_budget(mut self, t: Duration) -> Self {
        self.reverse_budget = t;
        self
    }

    /// How long the Splice module may take when another module follows
    /// (default [`DEFAULT_SPLICE_BUDGET`]).
    pub fn splice_budget(mut self, t: Duration) -> Self {
        self.splice_budget = t;
        self
    }

    /// Who may open streams to this endpoint (default:
    /// [`AccessPolicy::open`], every authenticated node, as a TCP listener
    /// admits everyone; the peer's NodeId is in every accepted stream).
    pub fn policy(mut self, policy: AccessPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Answers a hello meant for another node with this node's NodeId, so
    /// that a connector can learn it (default: no, such a hello gets a
    /// generic refusal). Hubs reveal themselves: nodes pin a hub's identity
    /// on first contact.
    pub fn reveal_identity(mut self, yes: bool) -> Self {
        self.reveal_identity = yes;
        self
    }

    /// Inbound handshakes in progress at once: `total`, and `per_source`
    /// from one IPv4 address or IPv6 /64 (defaults
    /// [`crate::DEFAULT_MAX_HANDSHAKES`],
    /// [`crate::DEFAULT_MAX_HANDSHAKES_PER_SOURCE`]). A connection over its
    /// source's share is closed at once; one over the total displaces the
    /// oldest unfinished handshake, so idle connections cannot lock real
    /// peers out.
    pub fn max_handshakes(mut self, total: usize, per_source: usize) -> Self {
        self.max_handshakes = (total, per_source);
        self
    }

    /// Loads the identity, binds the listening socket and starts accepting.
    pub async fn bind(self) -> Result<Endpoint, EndpointError> {
        let (secret, state_dir) = match self.secret.clone() {
            Some(k) => (k, self.state_dir.clone()),
            None => {
                let dir = match &self.state_dir {
                    Some(d) => d.clone(),
                    None => keystore::default_state_dir()?,
                };
                (keystore::load_or_create(&dir)?, Some(dir))
            }
        };
        let std_listener = bind_listener(self.bind_ip, self.ports)?;
        let listener =
            TcpListener::from_std(std_listener).map_err(|source| EndpointError::Bind {
                what: "the listening socket".into(),
                source,
            })?;
        let local = listener
            .local_addr()
            .map_err(|source| EndpointError::Bind {
                what: "the listening socket".into(),
                source,
            })?;
        let advertised = match &self.advertise {
            Some(a) => a.clone(),
            None => discover_advertised(local),
        };
        let known_hubs = state_dir.as_ref().map(|d| d.join("known_hubs"));
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let local_addrs = Arc::new(LocalAddrCache::default());
        let network = self.network_secret.as_deref().map(NetworkKey::from_secret);
        let options = InitiatorOptions {
            plaintext: self.plaintext,
            cipher: self.cipher.unwrap_or_else(preferred_cipher),
            reverse: false,
            upgrade: false,
            network,
        };
        // How this node dials hubs: its own session's, a hub's peer links,
        // status queries.
        let dialer = Dialer {
            secret: secret.clone(),
            local_addrs: local_addrs.clone(),
            options,
            attempt_delay: self.attempt_delay,
            known_hubs,
        };
        let session = self.hub.map(|hub| {
            let mut config = node_session::Config::new(secret.node_id());
            config.addrs = advertised.clone();
            // An empty port list makes the node connect-only (connect-back
            // streams it asked for still arrive): it must not take its
            // listener's place in the directory.
            config.accepts = self.accept_ports.as_ref().is_none_or(|p| !p.is_empty());
            config.network_secret = self.network_secret.clone();
            // The node signs where it registers, so that no hub can claim
            // it; the wall clock orders its claims across restarts.
            config.key = Some(secret.clone());
            config.clock_micros = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
            let targets = std::iter::once(hub).chain(self.fallback_hubs).collect();
            Session::new(targets, dialer.clone(), config)
        });
        let (session, requests) = session.unzip();
        let shared = Arc::new(Shared {
            secret,
            local_addrs,
            advertised: crate::node::Advertised::new(advertised.clone()),
            mapper: (self.port_mapping || self.gateway_query)
                .then(|| Arc::new(crate::port_map::Mapper::default())),
            plaintext: self.plaintext,
            plaintext_port: self.plaintext_port,
            circuits: self.circuits,
            upgrade_after: self.upgrade_after,
            ticket_key: self
                .resumption
                .then(crate::handshake::seed)
                .transpose()
                .map_err(EndpointError::Random)?
                .map(|s| reach_proto::resume::TicketKey::new(s, std::time::Instant::now())),
            tickets: self.resumption.then(|| {
                std::sync::Arc::new(crate::ticket_store::TicketStore::new(
                    state_dir.as_ref().map(|d| d.join("tickets")),
                ))
            }),
            circuit_gate: crate::circuit_gate::Gate::default(),
            cipher: options.cipher,
            accept_ports: self.accept_ports,
            connect_timeout: self.connect_timeout,
            handshake_timeout: self.handshake_timeout,
            attempt_delay: self.attempt_delay,
            modules: self.modules,
            direct_budget: self.direct_budget,
            reverse_budget: self.reverse_budget,
            splice_budget: self.splice_budget,
            incoming: tx,
            pending_reverse: StdMutex::default(),
            offers: crate::offers::Offers::default(),
            upgrades_tried: StdMutex::default(),
            upgrades: Arc::default(),
            streams: Default::default(),
            cache: ModuleCache::new(state_dir.as_ref().map(|d| d.join("modules"))),
            splice_ports: crate::port_memory::PortMemory::new(
                state_dir.as_ref().map(|d| d.join("splice-ports")),
            ),
            session,
            dialer,
            network_secret: self.network_secret,
            network,
            policy: self.policy,
            reveal_identity: self.reveal_identity,
            counters: crate::counters::Counters::default(),
            handshake_slots: crate::source_slots::Slots::new(
                self.max_handshakes.0,
                self.max_handshakes.1,
            ),
        });
        let mut tasks = vec![tokio::spawn(accept_loop(listener, shared.clone()))];
        if let Some(mapper) = shared.mapper.clone().filter(|_| self.port_mapping) {
            let s = shared.clone();
            tasks.push(tokio::spawn(mapper.run(local.port(), move |mapped| {
                s.advertised.set_mapped(mapped);
                if let Some(session) = &s.session {
                    session.set_addrs(s.advertised.get());
                }
            })));
        }
        if let (Some(session), Some(requests)) = (&shared.session, requests) {
            tasks.push(tokio::spawn(session.clone().run()));
            let serve = crate::inbound::serve(shared.clone(), session.clone(), requests);
            tasks.push(tokio::spawn(serve));
        }
        Ok(Endpoint {
            shared,
            local,
            incoming: Mutex::new(rx),
            tasks,
        })
    }
}

/// How long [`Endpoint::expose_on_hub`] waits for the hub's answer.
const EXPOSE_WAIT: Duration = Duration::from_secs(10);

/// How long [`Endpoint::probe_nat`] waits for a hub session coming up.
const PROBE_SESSION_WAIT: Duration = Duration::from_secs(3);

/// A node's endpoint: connect to virtual addresses and accept streams.
///
/// ```
/// use reach::{keystore, Endpoint};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // A real node keeps its identity: `.state_dir("/var/lib/myapp/reach")`.
/// let loopback = "127.0.0.1".parse()?;
/// let server = Endpoint::builder()
///     .secret_key(keystore::generate()?)
///     .bind_ip(loopback)
///     .bind()
///     .await?;
/// let addr = server.virtual_addr(80); // NODEID:80/a=127.0.0.1:PORT; give it to peers
///
/// let client = Endpoint::builder()
///     .secret_key(keystore::generate()?)
///     .bind_ip(loopback)
///     .bind()
///     .await?;
/// let serve = tokio::spawn(async move {
///     let mut s = server.accept().await?;
///     s.write_all(format!("hello, {}", s.peer()).as_bytes()).await?;
///     s.shutdown().await?;
///     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
/// });
///
/// let mut s = client.connect(&addr).await?;
/// let mut got = String::new();
/// s.read_to_string(&mut got).await?;
/// assert_eq!(got, format!("hello, {}", client.node_id()));
/// let info = s.info();
/// println!("{} via {} ({:?}) in {:?}", info.peer, info.module, info.mode, info.setup_time);
/// serve.await?.map_err(|e| e.to_string())?;
/// # Ok(()) }
/// ```
pub struct Endpoint {
    shared: Arc<Shared>,
    local: SocketAddr,
    incoming: Mutex<mpsc::Receiver<ReachStream>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("node", &self.node_id())
            .field("local", &self.local)
            .finish()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(s) = &self.shared.session {
            s.shutdown();
        }
    }
}

impl Endpoint {
    /// A builder with default settings.
    pub fn builder() -> EndpointBuilder {
        EndpointBuilder::default()
    }

    /// Registers for a connect-back from `node` carrying `token`: a hub
    /// asks a node to dial it (for a proxy port) and waits here. Register
    /// before sending the request. `None` when that (node, token) is already
    /// awaited.
    pub fn expect_connect_back(&self, node: NodeId, token: u16) -> Option<ConnectBackWait> {
        Shared::expect_connect_back(&self.shared, node, token)
    }

    /// Publishes this node's virtual port `vport` on a proxy port of its hub,
    /// for unmodified TCP clients whose source address is in `allow_from`
    /// (address and prefix length; empty admits all). Returns the hub's
    /// address and port. The request is made again after every reconnect
    /// (asking for the same port), for as long as the endpoint lives.
    pub async fn expose_on_hub(
        &self,
        vport: u16,
        allow_from: Vec<(IpAddr, u8)>,
    ) -> Result<SocketAddr, crate::ExposeError> {
        let session = self
            .shared
            .session
            .as_ref()
            .ok_or(crate::ExposeError::NoHub)?;
        session
            .expose(vport, allow_from, Instant::now() + EXPOSE_WAIT)
            .await
    }

    /// Where the service published at `vport` with
    /// [`expose_on_hub`](Self::expose_on_hub) stands now (after a hub
    /// restart it is pending until the hub answers again); `None` if it was
    /// never published.
    pub fn hub_exposure(&self, vport: u16) -> Option<crate::HubExposure> {
        self.shared.session.as_ref()?.exposure(vport)
    }

    /// Probes the NAT in front of this host with the hub's address echoes,
    /// as a splice does: how it maps a local port, how it allocates external
    /// ports, and what a peer would be told to aim at.
    pub async fn probe_nat(&self) -> Result<crate::NatReport, crate::NatProbeError> {
        use crate::NatProbeError;
        let session = self.shared.session.as_ref().ok_or(NatProbeError::NoHub)?;
        let link = session
            .wait_link(Instant::now() + PROBE_SESSION_WAIT)
            .await?;
        let echoes = &link.status().echo;
        if echoes.is_empty() {
            return Err(NatProbeError::NoEcho);
        }
        crate::splice::probe(&self.shared, echoes)
            .await
            .map_err(NatProbeError::Echo)
    }

    /// Closes the hub session gracefully, within `timeout`: everything
    /// written to routed streams so far reaches the hub before the link
    /// ends. Call it before exiting after a routed transfer; dropping the
    /// endpoint instead may make the kernel reset the link and discard data
    /// it had not sent yet. Without a hub there is nothing to do.
    pub async fn close(&self, timeout: Duration) {
        if let Some(mapper) = &self.shared.mapper {
            mapper.delete(timeout).await;
        }
        if let Some(session) = &self.shared.session {
            session.close(timeout).await;
        }
    }

    /// What this endpoint refused and dropped so far (policy refusals,
    /// unconfirmed (replayed) hellos, handshake limits).
    pub fn counters(&self) -> crate::EndpointCounters {
        self.shared.counters.snapshot()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.secret.node_id()
    }

    /// This node's secret key: a hub in the same process signs its gossip
    /// with it.
    pub fn secret_key(&self) -> &SecretKey {
        &self.shared.secret
    }

    /// The socket address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The direct addresses this endpoint advertises.
    pub fn advertised(&self) -> Vec<SocketAddr> {
        self.shared.advertised.get()
    }

    /// The port mapping the gateway holds for this node, if one was asked
    /// for ([`EndpointBuilder::port_mapping`]) and given.
    pub fn port_mapping(&self) -> Option<crate::PortMapping> {
        self.shared.mapper.as_ref().and_then(|m| m.status())
    }

    /// This node's virtual address for `port`, with its direct addresses as hints.
    ///
    /// With a hub, the address names it (`/hub=HOST:PORT`), so a connector
    /// without hub configuration of its own can attach there to find this node.
    pub fn virtual_addr(&self, port: u16) -> VirtualAddr {
        let mut a = VirtualAddr::new(self.node_id(), port).with_direct(self.advertised());
        if let Some(s) = &self.shared.session {
            a.hub = Some(s.target().into());
        }
        a
    }

    /// Connects to a virtual address within the configured connect timeout.
    pub async fn connect(&self, target: &VirtualAddr) -> Result<ReachStream, ConnectError> {
        self.connect_timeout(target, self.shared.connect_timeout)
            .await
    }

    /// Connects to a virtual address within `timeout`.
    ///
    /// Without a hub this races the address's direct hints. With a hub, the
    /// setup driver tries the configured modules in order (skipping those that
    /// cannot work), starting with the module that last worked for this node.
    pub async fn connect_timeout(
        &self,
        target: &VirtualAddr,
        timeout: Duration,
    ) -> Result<ReachStream, ConnectError> {
        let mut stream = setup::connect(&self.shared, target, timeout).await?;
        let via = hubs_crossed(stream.info(), target.hub.as_ref());
        stream.track_in(&self.shared.streams, via);
        Ok(stream)
    }

    /// The streams this endpoint handed out (from `connect` and `accept`)
    /// that are still open, oldest first: how each was made, where it
    /// moved, the hubs it crosses, its bytes and round trip.
    pub fn streams(&self) -> Vec<LiveStream> {
        self.shared.streams.snapshot()
    }

    /// The hub session's state: `None` while not registered (or without a hub).
    pub fn hub_status(&self) -> Option<HubStatus> {
        self.shared.session.as_ref().and_then(|s| s.status())
    }

    /// The hub link's smoothed round trip, once a ping has measured it.
    pub fn hub_rtt(&self) -> Option<Duration> {
        self.shared.session.as_ref()?.link_rtt()
    }

    /// Asks the gateway in front of this host (PCP, NAT-PMP, then UPnP
    /// IGD) to forward this endpoint's listening port, then deletes the
    /// mapping: what a serving node would get. Takes up to 8 s when no
    /// gateway answers; the error names what each protocol said.
    pub async fn probe_port_mapping(&self) -> Result<crate::PortMapping, String> {
        let port = std::num::NonZeroU16::new(self.local_addr().port())
            .ok_or("this endpoint has no listening port")?;
        crate::port_map::Mapper::probe(port, Duration::from_secs(2)).await
    }

    /// Asks the hub to connect to this host's address as the hub sees it
    /// (the session's observed address; the hub dials no other) at `port`,
    /// from `from`, and to write [`reach_proto::link::dial_back_greeting`]
    /// of `token`; returns what the hub's connection met, within `timeout`.
    /// A listener on the port (with the NAT mapping that leads there) shows
    /// whether inbound connections from there get in: `reach doctor`'s
    /// filtering check.
    pub async fn hub_dial_back(
        &self,
        port: u16,
        from: reach_proto::link::DialBackFrom,
        token: u64,
        timeout: Duration,
    ) -> Result<reach_proto::link::DialBackOutcome, SessionError> {
        let session = self.shared.session()?;
        session
            .dial_back(port, from, token, Instant::now() + timeout)
            .await
    }

    /// Waits until the hub session is registered, at most `timeout`.
    pub async fn wait_hub(&self, timeout: Duration) -> Result<HubStatus, SessionError> {
        let session = self.shared.session()?;
        let link = session.wait_link(Instant::now() + timeout).await?;
        Ok(link.status().clone())
    }

    /// Holds vpn address `claim` in the hubs' member directory (None:
    /// none), now and after every reconnect; other members find this node
    /// by it with [`Endpoint::lookup_vip`]. Without a hub it does nothing.
    pub fn set_vpn_claim(&self, claim: Option<reach_proto::vpn::VpnClaim>) {
        if let Some(s) = &self.shared.session {
            s.set_vpn(claim);
        }
    }

    /// The nodes the hubs list as holding vpn address `ip` (an IPv4 claim
    /// or a member's ULA) in `network`, earliest listed first: none if no
    /// member holds it, more than one if members conflict.
    pub async fn lookup_vip(
        &self,
        network: reach_proto::vpn::NetworkTag,
        ip: IpAddr,
        timeout: Duration,
    ) -> Result<Vec<NodeId>, SessionError> {
        let session = self.shared.session()?;
        session
            .lookup_vip(network, ip, Instant::now() + timeout)
            .await
    }

    /// Dials a hub and authenticates it (pinning its identity on first
    /// contact when `hub` does not name it): the start of a hub-to-hub link.
    /// The caller speaks the link protocol (`reach::link`) on the stream.
    pub async fn dial_hub(&self, hub: &HubTarget) -> Result<ReachStream, HubError> {
        self.shared.dialer.dial(hub).await
    }

    /// Carries a relay circuit on to the next hub (a hub's side; see
    /// `reach_proto::circuit`): dials `hub` at `addrs` on its circuit port,
    /// sends `hello` (the next leg's) and waits until that hub pairs the
    /// leg or carries it on in turn. The bare connection, from then on a
    /// pipe towards the circuit's far end.
    pub async fn circuit_leg(
        &self,
        hub: NodeId,
        addrs: Vec<SocketAddr>,
        hello: reach_proto::circuit::CircuitHello,
    ) -> Result<TcpStream, crate::CircuitJoinError> {
        crate::circuit::leg(&self.shared, hub, addrs, hello).await
    }

    /// For hubs: dials hub `hub` at `addrs` and presents the circuit leg
    /// `hello` it asked this hub to carry (marked pulled); the connection,
    /// on which this hub answers the leg as if it had come from `hub`.
    pub async fn circuit_pulled_leg(
        &self,
        hub: NodeId,
        addrs: Vec<SocketAddr>,
        hello: reach_proto::circuit::CircuitHello,
    ) -> Result<TcpStream, crate::CircuitJoinError> {
        crate::circuit::pulled_leg(&self.shared, hub, addrs, hello).await
    }

    /// For hubs: waits on a circuit leg this hub asked another to carry
    /// until that hub pairs it or carries it on (or refuses); the connection,
    /// from then on a pipe towards the circuit's other end.
    pub async fn circuit_answer(tcp: TcpStream) -> Result<TcpStream, crate::CircuitJoinError> {
        crate::circuit::await_pairing(tcp).await
    }

    /// Asks a hub for its status report (JSON: links, routes, attached
    /// nodes, counters). `hub` defaults to the endpoint's own hub; the query
    /// carries the network secret's proof when one is configured.
    pub async fn query_hub(&self, hub: Option<&HubTarget>) -> Result<String, HubError> {
        let target = match (hub, &self.shared.session) {
            (Some(h), _) => h,
            (None, Some(s)) => s.target(),
            (None, None) => return Err(HubError::NoHub),
        };
        self.shared
            .dialer
            .query_status(target, self.shared.network_secret.as_deref())
            .await
    }

    /// The module the setup driver will try first for `node`, if one is cached
    /// (in memory, or in the state directory from an earlier process).
    pub fn cached_module(&self, node: &NodeId) -> Option<SetupModule> {
        self.shared.cache.get(node)
    }

    /// Waits for the next authenticated inbound stream.
    pub async fn accept(&self) -> Result<ReachStream, EndpointError> {
        let mut stream = self
            .incoming
            .lock()
            .await
            .recv()
            .await
            .ok_or(EndpointError::Closed)?;
        let via = hubs_crossed(stream.info(), None);
        stream.track_in(&self.shared.streams, via);
        Ok(stream)
    }
}

/// The hubs a stream made as `info` crosses, as far as this node knows:
/// for a routed stream its own hub (the far end of its hub link), then
/// `peer_hub`, the hub the peer's address named, when that is another.
fn hubs_crossed(info: &StreamInfo, peer_hub: Option<&reach_proto::HubAddr>) -> Vec<SocketAddr> {
    if info.module != SetupModule::Routed {
        return Vec::new();
    }
    let mut via = vec![info.remote_addr];
    let theirs = peer_hub.and_then(|h| {
        let ip: std::net::IpAddr = h.host.parse().ok()?;
        Some(SocketAddr::new(ip.to_canonical(), h.port))
    });
    if let Some(theirs) = theirs.filter(|t| *t != info.remote_addr) {
        via.push(theirs);
    }
    via
}

/// AES-256-GCM where the CPU has AES and carry-less multiply instructions (about
/// 20% faster than ChaCha20-Poly1305 there), else ChaCha20-Poly1305, which is
/// fast and constant-time everywhere in software.
pub fn preferred_cipher() -> Cipher {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
        {
            return Cipher::AesGcm;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
        {
            return Cipher::AesGcm;
        }
    }
    Cipher::ChaChaPoly
}

/// Logs the `n`th event of a kind that a flood repeats: the first, then
/// at powers of two, so a flood leaves a few lines with running totals.
fn worth_logging(n: u64) -> bool {
    n.is_power_of_two()
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let slots = &shared.handshake_slots;
    loop {
        let (tcp, from) = crate::accept::accept(&listener, "endpoint").await;
        let counters = &shared.counters;
        let slot = match slots.take(from.ip()) {
            Ok((slot, evicted)) => {
                if let Some(e) = evicted {
                    e.abort();
                    let n = counters.handshakes_evicted.fetch_add(1, Ordering::Relaxed) + 1;
                    if worth_logging(n) {
                        tracing::warn!(
                            "handshake limit ({} in progress) reached: cut the oldest unfinished handshake ({n} so far)",
                            slots.in_progress()
                        );
                    }
                }
                slot
            }
            Err(full) => {
                let n = counters
                    .handshakes_refused_per_source
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if worth_logging(n) {
                    tracing::warn!(
                        %from,
                        "handshake limit: dropped the connection, {} in progress ({n} so far)",
                        full
                    );
                }
                continue;
            }
        };
        let id = slot.id();
        let shared2 = shared.clone();
        let task = tokio::spawn(async move {
            let shared = shared2;
            let _slot = slot;
            let timeout = shared.handshake_timeout;
            match tokio::time::timeout(timeout, accept_one(&shared, tcp)).await {
                Ok(Ok(())) => {}
                // A connector that does not know our id yet (a node pinning
                // its hub on first contact) learns it from this rejection.
                Ok(Err(
                    e @ AttemptError::Handshake(reach_proto::handshake::HandshakeError::WrongNode {
                        ..
                    }),
                )) => {
                    tracing::debug!(%from, "rejected connection: {e}")
                }
                Ok(Err(e)) => tracing::warn!(%from, "rejected connection: {e}"),
                Err(_) => {
                    crate::counters::bump(&shared.counters.handshakes_timed_out);
                    tracing::warn!(
                        %from,
                        "rejected connection: handshake not finished within {timeout:?}"
                    )
                }
            }
        });
        slots.set_task(id, task.abort_handle());
    }
}

/// Runs the handshake on one accepted connection and delivers the stream: to
/// `accept`, to the `connect` waiting for it when it answers a connect-back,
/// or to the routed stream it takes over.
async fn accept_one(shared: &Shared, mut tcp: TcpStream) -> Result<(), AttemptError> {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let mut moving = None;
    let admit = |k: &Knock<'_>| {
        if !k.hello.reverse {
            return shared.admit_inbound(k, &mut moving);
        }
        let pending = shared
            .pending_reverse
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if pending.contains_key(&(k.peer, k.hello.port)) {
            Admission::Accept
        } else {
            // Nobody here asked this node to connect back (or gave up).
            Admission::Refuse(Refusal::NotAdmitted)
        }
    };
    let pending = crate::handshake::respond_unconfirmed(&mut tcp, shared.responder(), admit).await;
    // A connect-back this node asked for, encrypted: handed to the waiting
    // `connect` at once, with the initiator's confirmation checked before
    // the first byte read from it (`Unconfirmed::defer`), which saves the
    // asker a round trip. Everything else waits for the confirmation.
    let defer = pending
        .as_ref()
        .is_ok_and(|p| p.established().reverse && p.established().keys.is_some());
    let (est, confirmation) = if defer {
        let (est, confirmation) = pending?.defer();
        (Ok(est), Some(confirmation))
    } else {
        let est = match pending {
            Ok(p) => crate::handshake::confirm(&mut tcp, &shared.counters, p).await,
            Err(e) => Err(e),
        };
        (est, None)
    };
    if est.as_ref().is_ok_and(|e| e.reverse) {
        let est = est?;
        let key = (est.peer, est.port);
        let mut stream =
            ReachStream::over_tcp(tcp, est, SetupModule::Reverse, Direction::Outbound, started)?;
        if let Some(c) = confirmation {
            stream.expect_confirmation(c);
        }
        let waiter = shared
            .pending_reverse
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        match waiter {
            Some(w) => {
                let _ = w.send(Ok(stream));
            }
            None => tracing::debug!(peer = %key.0, "connect-back arrived after its request ended"),
        }
        return Ok(());
    }
    shared
        .finish_inbound(tcp, est, moving, SetupModule::Direct, started)
        .await
}

/// The direct addresses to advertise for a listener bound to `local`.
fn discover_advertised(local: SocketAddr) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let v6_socket = local.is_ipv6();
    advertisable(&local_addrs())
        .into_iter()
        .filter(|ip| v6_socket || ip.is_ipv4())
        .map(|ip| SocketAddr::new(ip, local.port()))
        .collect()
}

fn bind_listener(
    ip: Option<IpAddr>,
    ports: ListenPorts,
) -> Result<std::net::TcpListener, EndpointError> {
    let (first, last) = match ports {
        ListenPorts::Any => (0, 0),
        ListenPorts::Fixed(p) => (p, p),
        ListenPorts::Range(a, b) if a > b => return Err(EndpointError::BadPortRange(a, b)),
        ListenPorts::Range(a, b) => (a, b),
    };
    let mut last_err = None;
    for port in first..=last {
        match bind_one(ip, port) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last_err = Some(e),
            Err(e) => return Err(bind_error(ip, ports, e)),
        }
    }
    let e = last_err.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into());
    Err(bind_error(ip, ports, e))
}

fn bind_error(ip: Option<IpAddr>, ports: ListenPorts, source: std::io::Error) -> EndpointError {
    let host = ip.map_or_else(|| "*".to_string(), |i| i.to_string());
    let what = match ports {
        ListenPorts::Any => format!("{host}, any port"),
        ListenPorts::Fixed(p) => format!("{host} port {p}"),
        ListenPorts::Range(a, b) => format!("{host} ports {a}-{b} (all in use)"),
    };
    EndpointError::Bind { what, source }
}

/// Binds one listening socket. Without an explicit IP, tries a dual-stack IPv6
/// socket first and falls back to IPv4 where IPv6 is unavailable.
fn bind_one(ip: Option<IpAddr>, port: u16) -> std::io::Result<std::net::TcpListener> {
    match ip {
        Some(ip) => listen_on(SocketAddr::new(ip, port), false),
        None => listen_on(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), true).or_else(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return Err(e);
            }
            listen_on(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port), false)
        }),
    }
}

fn listen_on(addr: SocketAddr, dual_stack: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    // Lets a restarted listener take its port back while old connections linger
    // in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
