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
use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_proto::candidates::advertisable;
use reach_proto::handshake::{Admission, InitiatorOptions, Refusal, ResponderOptions};
use reach_proto::race::DEFAULT_ATTEMPT_DELAY;
use reach_proto::{Cipher, NodeId, SecretKey, VirtualAddr};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Mutex, Semaphore};

use crate::direct::{self, RaceSettings};
use crate::discovery::{local_addrs, LocalAddrCache};
use crate::error::{ConnectError, EndpointError};
use crate::keystore;
use crate::stream::ReachStream;

/// Default time `connect` may take before giving up.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an incoming handshake may take before the listener drops it.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Incoming handshakes in progress at once; more are dropped at accept, so a
/// flood of idle connections cannot exhaust memory or file descriptors.
const MAX_PENDING_HANDSHAKES: usize = 256;
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
    cipher: Option<Cipher>,
    accept_ports: Option<Vec<u16>>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    attempt_delay: Duration,
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
            cipher: None,
            accept_ports: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            attempt_delay: DEFAULT_ATTEMPT_DELAY,
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

    /// Opts in to plaintext streams: peers stay authenticated but payload is
    /// not encrypted. Used only when both ends opt in; for trusted fabrics.
    pub fn plaintext(mut self, yes: bool) -> Self {
        self.plaintext = yes;
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

    /// Loads the identity, binds the listening socket and starts accepting.
    pub async fn bind(self) -> Result<Endpoint, EndpointError> {
        let secret = match self.secret.clone() {
            Some(k) => k,
            None => {
                let dir = match &self.state_dir {
                    Some(d) => d.clone(),
                    None => keystore::default_state_dir()?,
                };
                keystore::load_or_create(&dir)?
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
        let shared = Arc::new(Shared {
            secret,
            local_addrs: LocalAddrCache::default(),
            plaintext: self.plaintext,
            cipher: self.cipher.unwrap_or_else(preferred_cipher),
            accept_ports: self.accept_ports,
            connect_timeout: self.connect_timeout,
            handshake_timeout: self.handshake_timeout,
            attempt_delay: self.attempt_delay,
        });
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let task = tokio::spawn(accept_loop(listener, shared.clone(), tx));
        Ok(Endpoint {
            shared,
            local,
            advertised,
            incoming: Mutex::new(rx),
            accept_task: task,
        })
    }
}

struct Shared {
    secret: SecretKey,
    local_addrs: LocalAddrCache,
    plaintext: bool,
    cipher: Cipher,
    accept_ports: Option<Vec<u16>>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    attempt_delay: Duration,
}

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
    advertised: Vec<SocketAddr>,
    incoming: Mutex<mpsc::Receiver<ReachStream>>,
    accept_task: tokio::task::JoinHandle<()>,
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
        self.accept_task.abort();
    }
}

impl Endpoint {
    /// A builder with default settings.
    pub fn builder() -> EndpointBuilder {
        EndpointBuilder::default()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.secret.node_id()
    }

    /// The socket address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The direct addresses this endpoint advertises.
    pub fn advertised(&self) -> &[SocketAddr] {
        &self.advertised
    }

    /// This node's virtual address for `port`, with its direct addresses as hints.
    pub fn virtual_addr(&self, port: u16) -> VirtualAddr {
        VirtualAddr::new(self.node_id(), port).with_direct(self.advertised.clone())
    }

    /// Connects to a virtual address within the configured connect timeout.
    pub async fn connect(&self, target: &VirtualAddr) -> Result<ReachStream, ConnectError> {
        self.connect_timeout(target, self.shared.connect_timeout)
            .await
    }

    /// Connects to a virtual address within `timeout`.
    pub async fn connect_timeout(
        &self,
        target: &VirtualAddr,
        timeout: Duration,
    ) -> Result<ReachStream, ConnectError> {
        let settings = RaceSettings {
            options: InitiatorOptions {
                plaintext: self.shared.plaintext,
                cipher: self.shared.cipher,
            },
            attempt_delay: self.shared.attempt_delay,
            timeout,
        };
        let local_addrs = self.shared.local_addrs.get();
        direct::connect(&self.shared.secret, &local_addrs, target, settings).await
    }

    /// Waits for the next authenticated inbound stream.
    pub async fn accept(&self) -> Result<ReachStream, EndpointError> {
        self.incoming
            .lock()
            .await
            .recv()
            .await
            .ok_or(EndpointError::Closed)
    }
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

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tx: mpsc::Sender<ReachStream>) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::warn!(%from, "dropping connection: too many handshakes in progress");
            continue;
        };
        let shared = shared.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let _ = tcp.set_nodelay(true);
            let options = ResponderOptions {
                allow_plaintext: shared.plaintext,
            };
            let admit = |_: &NodeId, port: u16| match &shared.accept_ports {
                Some(ports) if !ports.contains(&port) => Admission::Refuse(Refusal::NoSuchPort),
                _ => Admission::Accept,
            };
            let handshake = crate::handshake::respond(tcp, &shared.secret, options, admit, started);
            match tokio::time::timeout(shared.handshake_timeout, handshake).await {
                Ok(Ok(stream)) => {
                    tracing::debug!(%from, peer = %stream.peer(), "accepted stream");
                    let _ = tx.send(stream).await;
                }
                Ok(Err(e)) => tracing::warn!(%from, "rejected connection: {e}"),
                Err(_) => tracing::warn!(
                    %from,
                    "rejected connection: handshake not finished within {:?}",
                    shared.handshake_timeout
                ),
            }
        });
    }
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
