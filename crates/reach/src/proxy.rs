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
//! Each connection runs in its own task, both directions at once, and a
//! half-close on one side is passed on to the other (so protocols that end
//! their request with a shutdown work).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reach_proto::VirtualAddr;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::endpoint::Endpoint;
use crate::error::EndpointError;

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
    /// Bytes from the TCP side into reach streams.
    pub bytes_to_reach: AtomicU64,
    /// Bytes from reach streams to the TCP side.
    pub bytes_from_reach: AtomicU64,
}

impl ProxyStats {
    fn started(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    fn ended(&self, (to_reach, from_reach): (u64, u64)) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.bytes_to_reach.fetch_add(to_reach, Ordering::Relaxed);
        self.bytes_from_reach
            .fetch_add(from_reach, Ordering::Relaxed);
    }
}

/// Copies both ways until both directions end; returns (bytes from `tcp`,
/// bytes from `stream`).
async fn pipe<S>(tcp: &mut TcpStream, stream: &mut S) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(tcp, stream, COPY_BUF, COPY_BUF).await
}

/// Serves `endpoint`'s inbound streams: each is connected to the TCP
/// service at `service`. Runs until the endpoint stops accepting.
pub async fn expose(
    endpoint: Arc<Endpoint>,
    service: SocketAddr,
    stats: Arc<ProxyStats>,
) -> Result<(), EndpointError> {
    loop {
        let mut stream = endpoint.accept().await?;
        let stats = stats.clone();
        tokio::spawn(async move {
            stats.started();
            let peer = stream.peer();
            let tcp = tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, TcpStream::connect(service))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
            let mut tcp = match tcp {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(%peer, %service, "cannot reach the exposed service: {e}");
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    stats.ended((0, 0));
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            tracing::info!(%peer, %service, module = %stream.info().module, "connection exposed");
            let moved = pipe(&mut tcp, &mut stream).await;
            log_end(&peer.to_string(), &moved);
            stats.ended(moved.unwrap_or_default());
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
        let (mut tcp, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (endpoint, target, stats) = (endpoint.clone(), target.clone(), stats.clone());
        tokio::spawn(async move {
            stats.started();
            let _ = tcp.set_nodelay(true);
            let mut stream = match endpoint.connect(&target).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%from, "cannot reach {}: {e}", target.node);
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    stats.ended((0, 0));
                    return;
                }
            };
            let info = stream.info();
            tracing::info!(%from, peer = %info.peer, module = %info.module, "connection forwarded");
            let moved = pipe(&mut tcp, &mut stream).await;
            log_end(&from.to_string(), &moved);
            stats.ended(moved.unwrap_or_default());
        });
    }
}

fn log_end(who: &str, moved: &io::Result<(u64, u64)>) {
    match moved {
        Ok((up, down)) => tracing::debug!(who, up, down, "connection done"),
        Err(e) => tracing::debug!(who, "connection ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_connections_and_bytes() {
        let s = ProxyStats::default();
        s.started();
        s.started();
        s.ended((10, 20));
        assert_eq!(s.connections.load(Ordering::Relaxed), 2);
        assert_eq!(s.active.load(Ordering::Relaxed), 1);
        assert_eq!(s.bytes_to_reach.load(Ordering::Relaxed), 10);
        assert_eq!(s.bytes_from_reach.load(Ordering::Relaxed), 20);
    }
}
