//! The agent of `reach run`: it answers the preloaded shim (crate
//! `reach-shim`) over a private Unix socket and carries the program's
//! brokered sockets over reach streams (GCB's broker side, on the
//! program's host).
//!
//! ```text
//! shim: resolve NODEID.reach ----> pool address 127.77.x.y (one per node)
//! shim: connect 127.77.x.y P L --> reach stream to NODEID:P (any module),
//!                                  parked for the socket at loopback port L
//!                             <--- ok RELAY_PORT
//! program's socket --TCP--> relay 127.0.0.1:RELAY_PORT: admitted by its
//!                           port L, piped to the parked stream
//! ```
//!
//! Bounds: requests served at once, parked streams (and how long one
//! waits for its socket), the pool's size; each refusal is counted in the
//! proxy's stats and logged.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach::{ConnectError, Endpoint, ReachStream};
use reach_proto::{NodeId, VirtualAddr};
use reach_shim_wire::{pool_addr, ErrorKind, Reply, Request, MAX_LINE, SUFFIX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::proxy::{log_end, pipe, reset_on_close, ProxyStats};

/// Requests served at once.
const MAX_REQUESTS: usize = 128;
/// Streams parked for their sockets at once.
const MAX_PARKED: usize = 256;
/// How long a parked stream waits for its socket to reach the relay.
const PARK_FOR: Duration = Duration::from_secs(10);
/// How long the shim may take to send its request line.
const REQUEST_WITHIN: Duration = Duration::from_secs(5);

/// Names that stand for nodes, besides `NODEID.reach`.
pub type Aliases = HashMap<String, NodeId>;

/// Which pool address stands for which node.
#[derive(Default)]
struct Pool {
    by_node: HashMap<NodeId, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, NodeId>,
}

impl Pool {
    /// The node's pool address, given out on first use; None when the
    /// pool is used up.
    fn assign(&mut self, node: NodeId) -> Option<Ipv4Addr> {
        if let Some(ip) = self.by_node.get(&node) {
            return Some(*ip);
        }
        let n = u32::try_from(self.by_node.len()).ok()? + 1;
        let ip = pool_addr(n)?;
        self.by_node.insert(node, ip);
        self.by_ip.insert(ip, node);
        Some(ip)
    }
}

/// The agent's state.
pub struct Agent {
    endpoint: Arc<Endpoint>,
    aliases: Aliases,
    connect_timeout: Duration,
    stats: Arc<ProxyStats>,
    pool: Mutex<Pool>,
    parked: Mutex<HashMap<u16, (ReachStream, Instant)>>,
    relay_port: u16,
    requests: Arc<tokio::sync::Semaphore>,
}

impl Agent {
    /// An agent connecting through `endpoint` within `connect_timeout`,
    /// whose relay listens at `relay_port` on loopback.
    pub fn new(
        endpoint: Arc<Endpoint>,
        aliases: Aliases,
        connect_timeout: Duration,
        relay_port: u16,
        stats: Arc<ProxyStats>,
    ) -> Self {
        Self {
            endpoint,
            aliases,
            connect_timeout,
            stats,
            pool: Mutex::default(),
            parked: Mutex::default(),
            relay_port,
            requests: Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS)),
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, HashMap<u16, (ReachStream, Instant)>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node a name stands for: `NODEID.reach` or an alias.
    fn node_of(&self, name: &str) -> Option<NodeId> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if let Some(node) = self.aliases.get(&name) {
            return Some(*node);
        }
        name.strip_suffix(SUFFIX)?.parse().ok()
    }

    /// Answers one request.
    async fn answer(&self, req: Request) -> Reply {
        match req {
            Request::Resolve(name) => {
                let Some(node) = self.node_of(&name) else {
                    tracing::info!(%name, "unknown .reach name");
                    return Reply::Error(ErrorKind::NoName, format!("{name} names no node"));
                };
                match self.pool().assign(node) {
                    Some(ip) => {
                        tracing::debug!(%name, %ip, "resolved");
                        Reply::Address(ip)
                    }
                    None => {
                        tracing::warn!(%name, "the pool of addresses is used up");
                        Reply::Error(ErrorKind::Busy, "the address pool is used up".into())
                    }
                }
            }
            Request::Connect {
                pool_ip,
                port,
                local_port,
            } => self.connect(pool_ip, port, local_port).await,
        }
    }

    async fn connect(&self, pool_ip: Ipv4Addr, port: u16, local_port: u16) -> Reply {
        let Some(node) = self.pool().by_ip.get(&pool_ip).copied() else {
            return Reply::Error(
                ErrorKind::Unreachable,
                format!("{pool_ip} stands for no node (resolve its name first)"),
            );
        };
        self.stats.started();
        let target = VirtualAddr::new(node, port);
        let stream = match self
            .endpoint
            .connect_timeout(&target, self.connect_timeout)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                self.stats.failed();
                tracing::warn!(%node, port, "cannot reach it: {e}");
                let kind = match &e {
                    ConnectError::Refused { .. } => ErrorKind::Refused,
                    ConnectError::TimedOut { .. } => ErrorKind::TimedOut,
                    _ => ErrorKind::Unreachable,
                };
                return Reply::Error(kind, e.to_string());
            }
        };
        let info = stream.info();
        tracing::info!(peer = %info.peer, port, module = %info.module, "connection brokered");
        let mut parked = self.parked();
        parked.retain(|_, (_, at)| at.elapsed() < PARK_FOR);
        if parked.len() >= MAX_PARKED {
            drop(parked);
            self.stats.failed();
            tracing::warn!("{MAX_PARKED} streams wait for their sockets already: refused");
            return Reply::Error(ErrorKind::Busy, "too many connections being set up".into());
        }
        parked.insert(local_port, (stream, Instant::now()));
        Reply::Relay(self.relay_port)
    }

    /// Serves the shim's requests on `unix` and the brokered sockets on
    /// `relay`, until either fails for good.
    pub async fn serve(self: Arc<Self>, unix: UnixListener, relay: TcpListener) -> io::Result<()> {
        let requests = {
            let me = self.clone();
            async move {
                loop {
                    let (conn, _) = unix.accept().await?;
                    let me = me.clone();
                    let Ok(permit) = me.requests.clone().try_acquire_owned() else {
                        tracing::warn!("{MAX_REQUESTS} requests in progress: one refused");
                        tokio::spawn(async move {
                            let busy = Reply::Error(ErrorKind::Busy, "the agent is busy".into());
                            let mut conn = conn;
                            let _ = conn.write_all(busy.encode().as_bytes()).await;
                        });
                        continue;
                    };
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(e) = me.one_request(conn).await {
                            tracing::info!("shim request failed: {e}");
                        }
                    });
                }
            }
        };
        let relayed = async {
            loop {
                let (tcp, from) = reach::accept::accept(&relay, "reach run relay").await;
                self.relay_one(tcp, from);
            }
        };
        tokio::select! {
            r = requests => r,
            r = relayed => r,
        }
    }

    async fn one_request(&self, mut conn: UnixStream) -> io::Result<()> {
        let mut line = Vec::with_capacity(64);
        tokio::time::timeout(REQUEST_WITHIN, async {
            let mut byte = [0u8; 1];
            while !line.ends_with(b"\n") && line.len() <= MAX_LINE {
                if conn.read(&mut byte).await? == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                line.push(byte[0]);
            }
            Ok(())
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request line within 5 s"))??;
        let reply = match Request::decode(&line) {
            Ok(req) => self.answer(req).await,
            Err(e) => {
                tracing::info!("bad request from the shim: {e}");
                Reply::Error(ErrorKind::Denied, e.to_string())
            }
        };
        conn.write_all(reply.encode().as_bytes()).await
    }

    /// A socket at the relay: piped to the stream parked for its port.
    fn relay_one(&self, mut tcp: tokio::net::TcpStream, from: SocketAddr) {
        let parked = if from.ip().is_loopback() {
            self.parked().remove(&from.port())
        } else {
            None
        };
        let Some((mut stream, _)) = parked else {
            tracing::warn!(%from, "a connection at the relay that no stream waits for: reset");
            reset_on_close(&tcp);
            return;
        };
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let moved = pipe(&mut tcp, &mut stream, &stats).await;
            log_end(&from.to_string(), &moved);
            stats.ended();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_gets_one_pool_address_for_good() {
        let mut pool = Pool::default();
        let a = reach_proto::SecretKey::from_seed([1; 32]).node_id();
        let b = reach_proto::SecretKey::from_seed([2; 32]).node_id();
        let ia = pool.assign(a).unwrap();
        let ib = pool.assign(b).unwrap();
        assert_ne!(ia, ib);
        assert_eq!(pool.assign(a), Some(ia));
        assert!(reach_shim_wire::in_pool(ia) && reach_shim_wire::in_pool(ib));
        assert_eq!(pool.by_ip.get(&ib), Some(&b));
    }
}
