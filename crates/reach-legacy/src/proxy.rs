//! Legacy applications: plain TCP on one side, reach streams on the other.
//!
//! ```text
//!  forward:  app --TCP--> LISTEN --[reach stream to VADDR]--> expose --TCP--> service
//! ```
//! [`expose`] serves an endpoint's inbound streams by connecting each to a
//! local TCP service (sshd, a web server, a database); [`forward`] accepts
//! local TCP connections and carries each over a reach stream to a virtual
//! address. Both ends of a forwarded connection are authenticated by the
//! reach handshake; the TCP legs stay on their hosts (usually loopback).
//! [`socks`] is a SOCKS5 proxy whose host names `NODEID.reach` (and
//! configured aliases) are virtual addresses, the SOCKS port being the
//! virtual port; other names go out as plain TCP only when pass-through is
//! on. Each connection runs in its own task, both directions at once, and a
//! half-close on one side is passed on to the other (so protocols that end
//! their request with a shutdown work).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reach_proto::{socks, NodeId, VirtualAddr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use reach::accept::accept;

use crate::limits::ConnLimits;
use reach::{Endpoint, EndpointError};

/// How long connecting to the exposed service may take.
pub const SERVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy buffer per direction: one record's worth, so a full record goes out
/// in one write.
const COPY_BUF: usize = 64 * 1024;

/// What a proxy has done so far (shared with its tasks; read any time).
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections started.
    pub connections: AtomicU64,
    /// Connections running now.
    pub active: AtomicU64,
    /// Connections that failed to set up (service or peer unreachable).
    pub failed: AtomicU64,
    /// Connections refused by an access list or a connection limit, never
    /// started.
    pub refused: AtomicU64,
    /// Bytes from the TCP side into reach streams.
    pub bytes_to_reach: AtomicU64,
    /// Bytes from reach streams to the TCP side.
    pub bytes_from_reach: AtomicU64,
}

/// A copy of [`ProxyStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProxyCounters {
    /// Connections started.
    pub connections: u64,
    /// Connections running now.
    pub active: u64,
    /// Connections that failed to set up.
    pub failed: u64,
    /// Connections refused by an access list or a connection limit.
    pub refused: u64,
    /// Bytes from the TCP (or UDP) side into reach streams.
    pub bytes_to_reach: u64,
    /// Bytes from reach streams to the TCP (or UDP) side.
    pub bytes_from_reach: u64,
}

impl ProxyStats {
    /// The counters now. Bytes are counted when a connection ends, so a
    /// running connection's bytes show up once it is done.
    pub fn snapshot(&self) -> ProxyCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProxyCounters {
            connections: get(&self.connections),
            active: get(&self.active),
            failed: get(&self.failed),
            refused: get(&self.refused),
            bytes_to_reach: get(&self.bytes_to_reach),
            bytes_from_reach: get(&self.bytes_from_reach),
        }
    }

    /// Counts a connection that starts.
    pub fn started(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a started connection that ended.
    pub fn ended(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a started connection that could not be set up.
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.ended();
    }

    /// Counts bytes from the plain side into reach.
    pub fn to_reach(&self, bytes: usize) {
        self.bytes_to_reach
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts bytes from reach to the plain side.
    pub fn from_reach(&self, bytes: usize) {
        self.bytes_from_reach
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Told of the bytes that move through an [`Observed`] stream.
pub trait Observer {
    /// `n` bytes (at least one) were read from the stream.
    fn read(&self, n: usize);
    /// `n` bytes were written to it.
    fn wrote(&self, n: usize);
}

/// The plain side of a proxied connection counts into [`ProxyStats`]: what
/// is read from it goes to reach, what is written to it came from reach.
impl Observer for ProxyStats {
    fn read(&self, n: usize) {
        self.to_reach(n);
    }

    fn wrote(&self, n: usize) {
        self.from_reach(n);
    }
}

/// A stream that tells an [`Observer`] of every read and write as it
/// happens, so a long connection shows its traffic while it runs: one
/// relaxed atomic operation per read or write (at most a copy buffer each).
pub struct Observed<'a, T: ?Sized, O> {
    inner: &'a mut T,
    observer: &'a O,
}

/// A stream counting into [`ProxyStats`].
pub type Metered<'a, T> = Observed<'a, T, ProxyStats>;

impl<'a, T: ?Sized, O: Observer> Observed<'a, T, O> {
    /// Wraps `inner`, telling `observer` what moves.
    pub fn new(inner: &'a mut T, observer: &'a O) -> Self {
        Self { inner, observer }
    }
}

impl<T: AsyncRead + Unpin + ?Sized, O: Observer> AsyncRead for Observed<'_, T, O> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.observer.read(n);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized, O: Observer> AsyncWrite for Observed<'_, T, O> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut *this.inner).poll_write(cx, data);
        if let std::task::Poll::Ready(Ok(n)) = r {
            this.observer.wrote(n);
        }
        r
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Copies both ways like `tokio::io::copy_bidirectional` (a half-close is
/// passed on), but ends the whole connection with a `TimedOut` error once
/// neither direction has moved a byte for `idle`, or when no byte at all
/// moved within `first_byte` of the start (an idle client holding a
/// connection). Returns (bytes from `a`, bytes from `b`).
pub async fn copy_with_idle<A, B>(
    a: &mut A,
    b: &mut B,
    first_byte: Duration,
    idle: Duration,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let clock = Activity::new();
    let mut a = Observed::new(a, &clock);
    let mut b = Observed::new(b, &clock);
    let both = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUF, COPY_BUF);
    let watchdog = async {
        loop {
            let (limit, what) = if clock.moved() {
                (idle, "nothing moved for")
            } else {
                (first_byte, "no first byte within")
            };
            tokio::time::sleep_until(clock.last() + limit).await;
            if clock.last().elapsed() >= limit {
                return io::Error::new(io::ErrorKind::TimedOut, format!("{what} {limit:?}"));
            }
        }
    };
    tokio::select! {
        r = both => r,
        e = watchdog => Err(e),
    }
}

/// When bytes last moved, shared by both directions of a connection.
struct Activity {
    started: tokio::time::Instant,
    /// Milliseconds since `started` of the last read that moved bytes.
    last_ms: AtomicU64,
    /// Whether any byte moved yet.
    moved: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            moved: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
        self.moved.store(true, Ordering::Relaxed);
    }

    fn moved(&self) -> bool {
        self.moved.load(Ordering::Relaxed)
    }

    fn last(&self) -> tokio::time::Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Reads that moved bytes mark the connection active.
impl Observer for Activity {
    fn read(&self, _: usize) {
        self.touch();
    }

    fn wrote(&self, _: usize) {}
}

/// Copies both ways until both directions end, counting into `stats` as it
/// goes; returns (bytes from `tcp`, bytes from `stream`). An abnormal end
/// resets `tcp` (see [`reset_if_failed`]).
pub(crate) async fn pipe<S>(
    tcp: &mut TcpStream,
    stream: &mut S,
    stats: &ProxyStats,
) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let moved = {
        let mut tcp = Metered::new(&mut *tcp, stats);
        tokio::io::copy_bidirectional_with_sizes(&mut tcp, stream, COPY_BUF, COPY_BUF).await
    };
    reset_if_failed(tcp, &moved);
    moved
}

/// Makes the coming close of `tcp` a reset (RST) when the copy failed: a
/// reach stream that was cut (a truncated stream, a reset routed stream, a
/// vanished peer) must reach the legacy program as an abnormal end, never
/// as the clean end of file that would make a truncated transfer look
/// complete. A clean end of the reach stream was passed on as a FIN by the
/// copy itself.
pub fn reset_if_failed<T>(tcp: &TcpStream, moved: &io::Result<T>) {
    if moved.is_err() {
        reset_on_close(tcp);
    }
}

/// Makes the coming close of `tcp` a reset (RST): for a client whose
/// stream could not be set up at all, which must not look like a service
/// that answered nothing and closed.
pub fn reset_on_close(tcp: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO)) {
        tracing::debug!("cannot make the close a reset: {e}");
    }
}

/// A place for a stream of an exposed service under `limits`; a refusal is
/// counted in `stats` and logged (at powers of two) naming the limit.
pub fn admit(
    limits: &Arc<ConnLimits>,
    stats: &ProxyStats,
    peer: NodeId,
) -> Option<crate::limits::Held> {
    match limits.try_acquire(peer) {
        Ok(held) => Some(held),
        Err(hit) => {
            let n = stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(%peer, "connection refused: {hit} ({n} refused so far)");
            }
            None
        }
    }
}

/// Serves `endpoint`'s inbound streams: each is connected to the TCP
/// service at `service`, within `limits`. Runs until the endpoint stops
/// accepting.
pub async fn expose(
    endpoint: Arc<Endpoint>,
    service: SocketAddr,
    limits: Arc<ConnLimits>,
    stats: Arc<ProxyStats>,
) -> Result<(), EndpointError> {
    loop {
        let mut stream = endpoint.accept().await?;
        // Dropping a refused stream ends it abnormally at the peer.
        let Some(held) = admit(&limits, &stats, stream.peer()) else {
            continue;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let _held = held;
            stats.started();
            let peer = stream.peer();
            let tcp = tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, TcpStream::connect(service))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
            let mut tcp = match tcp {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(%peer, %service, "cannot reach the exposed service: {e}");
                    stats.failed();
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            tracing::info!(%peer, %service, module = %stream.info().module, "connection exposed");
            let moved = pipe(&mut tcp, &mut stream, &stats).await;
            log_end(&peer.to_string(), &moved);
            stats.ended();
        });
    }
}

/// Accepts TCP connections on `listener` and carries each over a reach
/// stream from `endpoint` to `target`. Runs until accepting fails for good.
pub async fn forward(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    target: VirtualAddr,
    stats: Arc<ProxyStats>,
) -> io::Result<()> {
    loop {
        let (mut tcp, from) = accept(&listener, "proxy").await;
        let (endpoint, target, stats) = (endpoint.clone(), target.clone(), stats.clone());
        tokio::spawn(async move {
            stats.started();
            let _ = tcp.set_nodelay(true);
            let mut stream = match endpoint.connect(&target).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%from, "cannot reach {}: {e}", target.node);
                    stats.failed();
                    // The client must not take this for a service that
                    // answered nothing and closed.
                    reset_on_close(&tcp);
                    return;
                }
            };
            let info = stream.info();
            tracing::info!(%from, peer = %info.peer, module = %info.module, "connection forwarded");
            let moved = pipe(&mut tcp, &mut stream, &stats).await;
            log_end(&from.to_string(), &moved);
            stats.ended();
        });
    }
}

/// How the SOCKS proxy resolves host names.
#[derive(Clone, Debug, Default)]
pub struct SocksRules {
    /// Names (lowercase) that stand for a node, besides `NODEID.reach`.
    pub aliases: HashMap<String, NodeId>,
    /// Connect other names and IP addresses directly over plain TCP (off by
    /// default: a client misconfigured to send everything through the proxy
    /// would otherwise leak around reach without noticing).
    pub pass_through: bool,
}

/// How long a SOCKS client may take to send its greeting and request.
const SOCKS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The suffix that marks a NodeId as a host name.
pub const REACH_SUFFIX: &str = ".reach";

/// What a SOCKS target resolves to.
enum Resolved {
    Node(VirtualAddr),
    Plain(socks::Target),
}

impl SocksRules {
    fn resolve(&self, target: socks::Target) -> Result<Resolved, socks::Reply> {
        if let socks::Target::Name(name, port) = &target {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(id) = name.strip_suffix(REACH_SUFFIX) {
                let node: NodeId = id.parse().map_err(|_| socks::Reply::HostUnreachable)?;
                return Ok(Resolved::Node(VirtualAddr::new(node, *port)));
            }
            if let Some(node) = self.aliases.get(&name) {
                return Ok(Resolved::Node(VirtualAddr::new(*node, *port)));
            }
        }
        if self.pass_through {
            Ok(Resolved::Plain(target))
        } else {
            Err(socks::Reply::NotAllowed)
        }
    }
}

/// Serves SOCKS5 CONNECT on `listener`, carrying each connection over a
/// reach stream from `endpoint` (or plain TCP, when `rules` allow).
pub async fn socks(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    rules: Arc<SocksRules>,
    stats: Arc<ProxyStats>,
) -> io::Result<()> {
    loop {
        let (tcp, from) = accept(&listener, "proxy").await;
        let (endpoint, rules, stats) = (endpoint.clone(), rules.clone(), stats.clone());
        tokio::spawn(async move {
            stats.started();
            match socks_one(tcp, &endpoint, &rules, &stats).await {
                Ok(moved) => {
                    log_end(&from.to_string(), &Ok(moved));
                    stats.ended();
                }
                Err(e) => {
                    tracing::info!(%from, "SOCKS connection failed: {e}");
                    stats.failed();
                }
            }
        });
    }
}

/// Reads from `tcp` into `buf` until `parse` yields a message.
async fn read_message<T>(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, socks::SocksError>,
) -> io::Result<T> {
    loop {
        match parse(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
            Some((msg, used)) => {
                buf.drain(..used);
                return Ok(msg);
            }
            None if buf.len() > 600 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "SOCKS message too long",
                ))
            }
            None => {
                let mut chunk = [0u8; 512];
                let n = tcp.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// One SOCKS connection: greeting, request, connect, reply, then piping.
async fn socks_one(
    mut tcp: TcpStream,
    endpoint: &Endpoint,
    rules: &SocksRules,
    stats: &ProxyStats,
) -> io::Result<(u64, u64)> {
    let _ = tcp.set_nodelay(true);
    let mut buf = Vec::new();
    let request = tokio::time::timeout(SOCKS_HANDSHAKE_TIMEOUT, async {
        let methods = read_message(&mut tcp, &mut buf, socks::parse_greeting).await?;
        let choice = socks::choose_method(&methods);
        tcp.write_all(&choice).await?;
        if choice[1] != socks::METHOD_NONE {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the client offers no method without authentication",
            ));
        }
        read_message(&mut tcp, &mut buf, socks::parse_request).await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SOCKS handshake too slow"))??;
    let unbound = SocketAddr::from(([0, 0, 0, 0], 0));
    let fail = |reply: socks::Reply| socks::encode_reply(reply, unbound);
    if request.command != socks::CMD_CONNECT {
        tcp.write_all(&fail(socks::Reply::CommandNotSupported))
            .await?;
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "only CONNECT is served",
        ));
    }
    let resolved = match rules.resolve(request.target.clone()) {
        Ok(r) => r,
        Err(reply) => {
            tcp.write_all(&fail(reply)).await?;
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{:?} is not a reach name and pass-through is off",
                    request.target
                ),
            ));
        }
    };
    match resolved {
        Resolved::Node(vaddr) => {
            let mut stream = match endpoint.connect(&vaddr).await {
                Ok(s) => s,
                Err(e) => {
                    let reply = match &e {
                        reach::ConnectError::Refused { .. } => socks::Reply::ConnectionRefused,
                        _ => socks::Reply::HostUnreachable,
                    };
                    tcp.write_all(&fail(reply)).await?;
                    return Err(io::Error::other(e.to_string()));
                }
            };
            tcp.write_all(&socks::encode_reply(socks::Reply::Succeeded, unbound))
                .await?;
            tracing::info!(peer = %stream.peer(), module = %stream.info().module, "SOCKS connection to a node");
            stream.write_all(&buf).await?;
            stream.flush().await?;
            stats.to_reach(buf.len());
            pipe(&mut tcp, &mut stream, stats).await
        }
        Resolved::Plain(target) => {
            let connected = match &target {
                socks::Target::Addr(a) => TcpStream::connect(*a).await,
                socks::Target::Name(n, p) => TcpStream::connect((n.as_str(), *p)).await,
            };
            let mut out = match connected {
                Ok(s) => s,
                Err(e) => {
                    tcp.write_all(&fail(socks::Reply::HostUnreachable)).await?;
                    return Err(e);
                }
            };
            let bound = out.local_addr().unwrap_or(unbound);
            tcp.write_all(&socks::encode_reply(socks::Reply::Succeeded, bound))
                .await?;
            out.write_all(&buf).await?;
            stats.to_reach(buf.len());
            pipe(&mut tcp, &mut out, stats).await
        }
    }
}

pub(crate) fn log_end(who: &str, moved: &io::Result<(u64, u64)>) {
    match moved {
        Ok((up, down)) => tracing::debug!(who, up, down, "connection done"),
        Err(e) => tracing::debug!(who, "connection ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_cut_and_a_busy_one_is_not() {
        use tokio::io::duplex;
        let idle = Duration::from_secs(30);
        // Busy: bytes every 20 s (under the idle time) for two minutes, then
        // both sides finish: it ends normally.
        let (mut a, mut a_peer) = duplex(1024);
        let (mut b, mut b_peer) = duplex(1024);
        let relay = tokio::spawn(async move { copy_with_idle(&mut a, &mut b, idle, idle).await });
        for _ in 0..6 {
            a_peer.write_all(b"tick").await.expect("write");
            let mut got = [0u8; 4];
            b_peer.read_exact(&mut got).await.expect("relayed");
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        a_peer.shutdown().await.expect("shutdown");
        b_peer.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        b_peer.read_to_end(&mut rest).await.expect("end");
        assert_eq!(relay.await.expect("join").expect("ended normally"), (24, 0));
        // Idle: nothing after the first bytes; cut after `idle`.
        let (mut a, mut a_peer) = duplex(1024);
        let (mut b, _b_peer) = duplex(1024);
        let started = tokio::time::Instant::now();
        let relay = tokio::spawn(async move { copy_with_idle(&mut a, &mut b, idle, idle).await });
        a_peer.write_all(b"hi").await.expect("write");
        let err = relay.await.expect("join").expect_err("cut");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(waited >= idle && waited < idle * 2, "{waited:?}");
        // Silent from the start: cut at the first-byte deadline.
        let (mut a, _a_peer) = duplex(1024);
        let (mut b, _b_peer) = duplex(1024);
        let first = Duration::from_secs(5);
        let started = tokio::time::Instant::now();
        let relay = tokio::spawn(async move { copy_with_idle(&mut a, &mut b, first, idle).await });
        let err = relay.await.expect("join").expect_err("cut");
        assert!(err.to_string().contains("no first byte"), "{err}");
        let waited = started.elapsed();
        assert!(waited >= first && waited < idle, "{waited:?}");
    }

    #[test]
    fn stats_count_connections() {
        let s = ProxyStats::default();
        s.started();
        s.started();
        s.started();
        s.ended();
        s.failed();
        let c = s.snapshot();
        assert_eq!((c.connections, c.active, c.failed), (3, 1, 1));
    }

    #[tokio::test]
    async fn bytes_are_counted_while_a_connection_runs() {
        let stats = Arc::new(ProxyStats::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let (mut far, mut near) = tokio::io::duplex(1 << 16);
        let relay = {
            let stats = stats.clone();
            tokio::spawn(async move { pipe(&mut tcp, &mut near, &stats).await })
        };
        client.write_all(&[7u8; 3000]).await.expect("write");
        let mut got = vec![0u8; 3000];
        far.read_exact(&mut got).await.expect("relayed");
        far.write_all(&[9u8; 500]).await.expect("write back");
        let mut back = vec![0u8; 500];
        client.read_exact(&mut back).await.expect("relayed back");
        // The connection is still open, and its bytes already show.
        let c = stats.snapshot();
        assert_eq!((c.bytes_to_reach, c.bytes_from_reach), (3000, 500));
        drop(client);
        drop(far);
        let _ = relay.await.expect("join");
    }
}
