//! UDP forwarding over reach streams, as GCB relays UDP: one stream per
//! client source address (a *mapping*), datagrams framed on it
//! (`reach_proto::datagram`), and a mapping that carries nothing for the
//! idle time is closed at both ends.
//!
//! ```text
//!  client --UDP--> forward_udp --[stream per client address]--> expose_udp --UDP--> service
//! ```
//! A datagram that arrives while its mapping's queue is full is dropped, as
//! a congested UDP path would: UDP senders expect loss, not back-pressure.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reach_proto::{datagram, VirtualAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use reach::{Endpoint, EndpointError, ReachStream};

use crate::proxy::ProxyStats;

/// Default idle time after which a UDP mapping is closed.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams queued per mapping before more are dropped.
const QUEUE: usize = 256;

/// Carries datagrams between `stream` and `socket` (datagrams from the
/// stream go to `dest`; those for the stream come from `rx`) until either
/// side ends or nothing moves for `idle`, counting datagram bytes into
/// `stats` as they move.
async fn relay(
    mut stream: ReachStream,
    mut rx: mpsc::Receiver<Vec<u8>>,
    socket: &UdpSocket,
    dest: SocketAddr,
    idle: Duration,
    stats: &ProxyStats,
) -> io::Result<()> {
    let mut inbuf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(2048);
    let mut deadline = Instant::now() + idle;
    loop {
        tokio::select! {
            gram = rx.recv() => {
                let Some(gram) = gram else { break };
                out.clear();
                datagram::encode(&gram, &mut out).map_err(io::Error::other)?;
                stream.write_all(&out).await?;
                // A datagram goes out now, not when the next one comes.
                stream.flush().await?;
                stats.to_reach(gram.len());
                deadline = Instant::now() + idle;
            }
            n = stream.read(&mut chunk) => {
                let n = n?;
                if n == 0 {
                    break;
                }
                inbuf.extend_from_slice(&chunk[..n]);
                let mut at = 0;
                while let Some((gram, used)) = datagram::decode(&inbuf[at..]) {
                    // A failed send drops the datagram, as UDP does.
                    match socket.send_to(gram, dest).await {
                        Ok(n) => stats.from_reach(n),
                        Err(e) => tracing::debug!("datagram dropped: {e}"),
                    }
                    at += used;
                }
                inbuf.drain(..at);
                deadline = Instant::now() + idle;
            }
            () = tokio::time::sleep_until(deadline) => {
                tracing::info!("UDP mapping expired after {idle:?} idle");
                break;
            }
        }
    }
    let _ = stream.shutdown().await;
    Ok(())
}

/// Serves `endpoint`'s inbound streams as UDP mappings to `service`: each
/// stream gets its own UDP socket, so the service sees one client address
/// per mapping. Runs until the endpoint stops accepting.
pub async fn expose_udp(
    endpoint: Arc<Endpoint>,
    service: SocketAddr,
    idle: Duration,
    limits: Arc<crate::limits::ConnLimits>,
    stats: Arc<ProxyStats>,
) -> Result<(), EndpointError> {
    loop {
        let stream = endpoint.accept().await?;
        let Some(held) = crate::proxy::admit(&limits, &stats, stream.peer()) else {
            continue;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let _held = held;
            serve_mapping(stream, service, idle, &stats).await;
        });
    }
}

/// Serves one inbound stream as a UDP mapping to `service`, from a UDP
/// socket of its own (the service sees one client address per mapping),
/// until either side ends or nothing moves for `idle`.
pub async fn serve_mapping(
    stream: ReachStream,
    service: SocketAddr,
    idle: Duration,
    stats: &ProxyStats,
) {
    stats.started();
    let peer = stream.peer();
    let any: SocketAddr = if service.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = match UdpSocket::bind(any).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot open a UDP socket: {e}");
            stats.failed();
            return;
        }
    };
    let sock = Arc::new(sock);
    let reader = answers_of(sock.clone(), service);
    tracing::info!(%peer, %service, "UDP mapping opened");
    if let Err(e) = relay(stream, reader.1, &sock, service, idle, stats).await {
        tracing::debug!(%peer, "UDP mapping ended: {e}");
    }
    reader.0.abort();
    stats.ended();
}

/// Reads the datagrams `sock` receives from `from` (others are dropped)
/// into a queue for [`relay`]; the task ends with the socket.
fn answers_of(
    sock: Arc<UdpSocket>,
    from: SocketAddr,
) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; datagram::MAX_DATAGRAM];
        while let Ok((n, src)) = sock.recv_from(&mut buf).await {
            if src == from && tx.try_send(buf[..n].to_vec()).is_err() {
                tracing::debug!("mapping queue full: datagram dropped");
            }
        }
    });
    (task, rx)
}

/// Carries the datagrams of one program's UDP socket at `client` (on
/// loopback) over `stream`: they arrive on `sock` and the stream's come
/// back to `client`, until either side ends or nothing moves for `idle`
/// (`reach run`'s client side of a UDP socket).
pub async fn carry_socket(
    stream: ReachStream,
    sock: UdpSocket,
    client: SocketAddr,
    idle: Duration,
    stats: &ProxyStats,
) {
    stats.started();
    let peer = stream.peer();
    let sock = Arc::new(sock);
    let reader = answers_of(sock.clone(), client);
    tracing::info!(%peer, %client, "UDP socket carried");
    if let Err(e) = relay(stream, reader.1, &sock, client, idle, stats).await {
        tracing::debug!(%peer, "UDP socket's stream ended: {e}");
    }
    reader.0.abort();
    stats.ended();
}

/// Default UDP mappings `forward --udp` keeps at once.
pub const DEFAULT_MAX_MAPPINGS: usize = 1024;

/// Receives datagrams on `socket` and carries each client address's over its
/// own reach stream to `target`; answers go back to that client. Mappings
/// idle for `idle` close; at most `max_mappings` live at once (source
/// addresses of datagrams can be forged, so each new one must not cost a
/// stream without bound). Runs until the socket fails.
pub async fn forward_udp(
    socket: UdpSocket,
    endpoint: Arc<Endpoint>,
    target: VirtualAddr,
    idle: Duration,
    max_mappings: usize,
    stats: Arc<ProxyStats>,
) -> io::Result<()> {
    let socket = Arc::new(socket);
    let mut mappings: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; datagram::MAX_DATAGRAM];
    loop {
        let (n, client) = socket.recv_from(&mut buf).await?;
        let gram = buf[..n].to_vec();
        // A mapping whose task ended (expired, or its stream failed) has a
        // closed queue: start a new one.
        let tx = match mappings.get(&client).filter(|tx| !tx.is_closed()) {
            Some(tx) => tx.clone(),
            None => {
                mappings.retain(|_, tx| !tx.is_closed());
                if mappings.len() >= max_mappings {
                    let n = stats
                        .refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(%client, "UDP mapping limit ({max_mappings}) reached: datagram from a new client dropped ({n} so far)");
                    }
                    continue;
                }
                let (tx, rx) = mpsc::channel(QUEUE);
                mappings.insert(client, tx.clone());
                let (endpoint, target, socket, stats) = (
                    endpoint.clone(),
                    target.clone(),
                    socket.clone(),
                    stats.clone(),
                );
                tokio::spawn(async move {
                    stats.started();
                    match endpoint.connect(&target).await {
                        Ok(stream) => {
                            tracing::info!(%client, peer = %stream.peer(), module = %stream.info().module, "UDP mapping opened");
                            if let Err(e) = relay(stream, rx, &socket, client, idle, &stats).await {
                                tracing::debug!(%client, "UDP mapping ended: {e}");
                            }
                            stats.ended();
                        }
                        Err(e) => {
                            tracing::warn!(%client, "cannot reach {}: {e}", target.node);
                            stats.failed();
                        }
                    }
                });
                tx
            }
        };
        if tx.try_send(gram).is_err() {
            tracing::debug!(%client, "mapping queue full: datagram dropped");
        }
    }
}
