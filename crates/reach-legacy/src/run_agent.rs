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
//! A program that listens (TCP) has its port served at the node's
//! virtual address, same port, and on a proxy port of the hub where the
//! hub offers them (GCB's registered listening socket): inbound streams to
//! that virtual port are connected to the program's socket on loopback.
//!
//! ```text
//! shim: listen 0.0.0.0:P --------> served: virtual port P -> 127.0.0.1:P
//!                                  (and the hub's proxy port, published)
//! stream to NODEID:P ------------> TCP to 127.0.0.1:P, piped
//! ```
//!
//! Bounds: requests served at once, parked streams (and how long one
//! waits for its socket), the pool's size, ports served, inbound
//! connections (in all and per peer); each refusal is counted in the
//! proxy's stats and logged.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach::{ConnectError, Endpoint, ReachStream};
use reach_proto::{NodeId, VirtualAddr};
use reach_shim_wire::{pool_addr, ErrorKind, Reply, Request, MAX_LINE, SUFFIX, UDP_VPORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::limits::ConnLimits;
use crate::proxy::{admit, log_end, pipe, reset_on_close, ProxyStats, SERVICE_CONNECT_TIMEOUT};

/// Requests served at once.
const MAX_REQUESTS: usize = 128;
/// Streams parked for their sockets at once.
const MAX_PARKED: usize = 256;
/// How long a parked stream waits for its socket to reach the relay.
const PARK_FOR: Duration = Duration::from_secs(10);
/// How long the shim may take to send its request line.
const REQUEST_WITHIN: Duration = Duration::from_secs(5);
/// Ports a program may have served at once.
const MAX_SERVED: usize = 64;

/// A stream waiting for its program's socket at the relay.
enum Parked {
    /// Set up (a blocking connect).
    Ready(Box<ReachStream>),
    /// Being set up (a non-blocking connect).
    Pending(tokio::sync::oneshot::Receiver<Result<ReachStream, ConnectError>>),
}

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

/// How the agent serves a program that listens.
#[derive(Clone)]
pub struct Serving {
    /// Whether anyone may connect (the endpoint's policy admits someone);
    /// without, a listening port is not served.
    pub admits: bool,
    /// Whether listening ports are published on a proxy port of the hub.
    pub on_hub: bool,
    /// Inbound connections, in all and per peer.
    pub limits: Arc<ConnLimits>,
}

/// The agent's state.
pub struct Agent {
    endpoint: Arc<Endpoint>,
    aliases: Aliases,
    serving: Serving,
    /// Virtual port -> where the program listens.
    served: Mutex<HashMap<u16, SocketAddr>>,
    /// UDP port -> where the program's UDP socket is bound.
    served_udp: Mutex<HashMap<u16, SocketAddr>>,
    /// The agent's own port of each connection it makes to the program ->
    /// the node the connection carries (for `accept`'s peer address).
    accepted: Mutex<HashMap<u16, NodeId>>,
    connect_timeout: Duration,
    stats: Arc<ProxyStats>,
    pool: Mutex<Pool>,
    parked: Mutex<HashMap<u16, (Parked, Instant)>>,
    relay_port: u16,
    requests: Arc<tokio::sync::Semaphore>,
}

impl Agent {
    /// An agent connecting through `endpoint` within `connect_timeout`,
    /// whose relay listens at `relay_port` on loopback.
    pub fn new(
        endpoint: Arc<Endpoint>,
        aliases: Aliases,
        serving: Serving,
        connect_timeout: Duration,
        relay_port: u16,
        stats: Arc<ProxyStats>,
    ) -> Self {
        Self {
            endpoint,
            aliases,
            serving,
            served: Mutex::default(),
            served_udp: Mutex::default(),
            accepted: Mutex::default(),
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

    fn parked(&self) -> std::sync::MutexGuard<'_, HashMap<u16, (Parked, Instant)>> {
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
    async fn answer(self: &Arc<Self>, req: Request) -> Reply {
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
            } => self.connect(pool_ip, port, local_port, true).await,
            Request::Open {
                pool_ip,
                port,
                local_port,
            } => self.connect(pool_ip, port, local_port, false).await,
            Request::Listen(addr) => self.listen(addr),
            Request::ListenUdp(addr) => self.listen_udp(addr),
            Request::Udp {
                pool_ip,
                port,
                local_port,
            } => self.connect_udp(pool_ip, port, local_port).await,
            Request::Peer(port) => {
                let node = self
                    .accepted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&port)
                    .copied();
                match node.and_then(|n| self.pool().assign(n)) {
                    Some(ip) => Reply::Address(ip),
                    None => {
                        Reply::Error(ErrorKind::NoName, format!("no connection from port {port}"))
                    }
                }
            }
        }
    }

    /// The ports served now, with where the program listens.
    pub fn served(&self) -> Vec<(u16, SocketAddr)> {
        let mut v: Vec<_> = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, a)| (*p, *a))
            .collect();
        v.sort();
        v
    }

    /// The program listens at `addr`: its port is served.
    fn listen(self: &Arc<Self>, addr: SocketAddr) -> Reply {
        let port = addr.port();
        if !self.serving.admits {
            tracing::warn!(%addr, "the program listens, but no node may connect (give --allow, --allow-file, --network-secret-file or --open): not served");
            return Reply::Error(
                ErrorKind::Denied,
                "no node may connect: give reach run --allow, --allow-file, --network-secret-file or --open".into(),
            );
        }
        {
            let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
            if !served.contains_key(&port) && served.len() >= MAX_SERVED {
                tracing::warn!(%addr, "{MAX_SERVED} ports are served already: not served");
                return Reply::Error(
                    ErrorKind::Busy,
                    format!("{MAX_SERVED} ports served already"),
                );
            }
            served.insert(port, addr);
        }
        let vaddr = self.endpoint.virtual_addr(port);
        tracing::info!(%addr, %vaddr, "the program listens: served");
        eprintln!("reach run: port {port} served at {vaddr}");
        if self.serving.on_hub {
            let me = self.clone();
            tokio::spawn(async move {
                match me.endpoint.expose_on_hub(port, Vec::new()).await {
                    Ok(public) => {
                        tracing::info!(port, %public, "published on the hub");
                        eprintln!("reach run: port {port} exposed at {public} (the hub's proxy port, for any TCP client)");
                    }
                    Err(reach::ExposeError::NoProxyPorts) => {
                        tracing::info!(port, "the hub offers no proxy ports")
                    }
                    Err(e) => tracing::warn!(port, "not published on the hub: {e}"),
                }
            });
        }
        Reply::Done
    }

    /// A UDP socket of the program is bound at `addr`: datagrams to its
    /// port (on [`UDP_VPORT`]) are carried to it.
    fn listen_udp(&self, addr: SocketAddr) -> Reply {
        if !self.serving.admits {
            tracing::warn!(%addr, "the program binds a UDP port, but no node may connect: not served");
            return Reply::Error(
                ErrorKind::Denied,
                "no node may connect: give reach run --allow, --allow-file, --network-secret-file or --open".into(),
            );
        }
        let port = addr.port();
        {
            let mut served = self.served_udp.lock().unwrap_or_else(|p| p.into_inner());
            if !served.contains_key(&port) && served.len() >= MAX_SERVED {
                tracing::warn!(%addr, "{MAX_SERVED} UDP ports are served already: not served");
                return Reply::Error(
                    ErrorKind::Busy,
                    format!("{MAX_SERVED} UDP ports served already"),
                );
            }
            served.insert(port, addr);
        }
        tracing::info!(%addr, "the program binds a UDP port: served");
        eprintln!(
            "reach run: UDP port {port} served at {}",
            self.endpoint.virtual_addr(UDP_VPORT)
        );
        Reply::Done
    }

    /// A UDP socket of the program at loopback port `local_port` connects to
    /// the node behind `pool_ip`, UDP port `port`: a stream to the node's
    /// [`UDP_VPORT`] carries its datagrams, through a UDP socket of the
    /// agent's that the program's socket is connected to.
    async fn connect_udp(self: &Arc<Self>, pool_ip: Ipv4Addr, port: u16, local_port: u16) -> Reply {
        let Some(node) = self.pool().by_ip.get(&pool_ip).copied() else {
            return Reply::Error(
                ErrorKind::Unreachable,
                format!("{pool_ip} stands for no node (resolve its name first)"),
            );
        };
        let target = VirtualAddr::new(node, UDP_VPORT);
        let mut stream = match self
            .endpoint
            .connect_timeout(&target, self.connect_timeout)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                self.stats.failed();
                tracing::warn!(%node, port, "cannot reach it for UDP: {e}");
                let kind = match &e {
                    ConnectError::Refused { .. } => ErrorKind::Refused,
                    ConnectError::TimedOut { .. } => ErrorKind::TimedOut,
                    _ => ErrorKind::Unreachable,
                };
                return Reply::Error(kind, e.to_string());
            }
        };
        let client = SocketAddr::from((Ipv4Addr::LOCALHOST, local_port));
        let sock = async {
            stream.write_all(&port.to_be_bytes()).await?;
            stream.flush().await?;
            let sock = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            sock.connect(client).await?;
            Ok::<_, io::Error>(sock)
        }
        .await;
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                self.stats.failed();
                return Reply::Error(ErrorKind::Unreachable, format!("UDP relay: {e}"));
            }
        };
        let relay = match sock.local_addr() {
            Ok(a) => a.port(),
            Err(e) => return Reply::Error(ErrorKind::Unreachable, format!("UDP relay: {e}")),
        };
        tracing::info!(peer = %stream.peer(), port, module = %stream.info().module, "UDP socket brokered");
        let stats = self.stats.clone();
        tokio::spawn(async move {
            crate::udp_proxy::carry_socket(
                stream,
                sock,
                client,
                crate::udp_proxy::DEFAULT_UDP_IDLE,
                &stats,
            )
            .await;
        });
        Reply::Relay(relay)
    }

    /// A stream to [`UDP_VPORT`]: its first two bytes name the UDP port;
    /// its datagrams go to the program's socket bound there.
    async fn serve_udp_stream(&self, mut stream: ReachStream) {
        let peer = stream.peer();
        let mut port = [0u8; 2];
        let head = tokio::time::timeout(REQUEST_WITHIN, stream.read_exact(&mut port)).await;
        if !matches!(head, Ok(Ok(_))) {
            tracing::info!(%peer, "a UDP stream without its port: ended");
            return;
        }
        let port = u16::from_be_bytes(port);
        let bound = self
            .served_udp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&port)
            .copied();
        let Some(bound) = bound else {
            self.stats
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(%peer, port, "a UDP stream to a port the program has not bound: ended");
            return;
        };
        let service = match bound.ip() {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::from((Ipv4Addr::LOCALHOST, port))
            }
            // IPv6 loopback where the host has it (a v6-only socket needs
            // it), else IPv4 loopback, which a dual-stack socket also gets.
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
                let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
                if std::net::UdpSocket::bind((std::net::Ipv6Addr::LOCALHOST, 0)).is_ok() {
                    v6
                } else {
                    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
                }
            }
            _ => bound,
        };
        crate::udp_proxy::serve_mapping(
            stream,
            service,
            crate::udp_proxy::DEFAULT_UDP_IDLE,
            &self.stats,
        )
        .await;
    }

    /// Serves inbound streams: each to a port the program listens on is
    /// connected to it on loopback; others end at once.
    async fn serve_inbound(self: Arc<Self>) -> io::Result<()> {
        loop {
            let stream = self
                .endpoint
                .accept()
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            let port = stream.info().virtual_port;
            let peer = stream.peer();
            if port == UDP_VPORT
                && !self
                    .served_udp
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty()
            {
                let Some(held) = admit(&self.serving.limits, &self.stats, peer) else {
                    continue;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    let _held = held;
                    me.serve_udp_stream(stream).await;
                });
                continue;
            }
            let Some(listening) = self.served().into_iter().find(|(p, _)| *p == port) else {
                self.stats
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(%peer, port, "a stream to a port the program does not listen on: ended");
                continue;
            };
            let Some(held) = admit(&self.serving.limits, &self.stats, peer) else {
                continue;
            };
            let stats = self.stats.clone();
            let self_ = self.clone();
            tokio::spawn(async move {
                let _held = held;
                let mut stream = stream;
                stats.started();
                let mut tcp = match self_.connect_local(listening.1, peer).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(%peer, port, "the program does not accept on its port: {e}");
                        stats.failed();
                        return;
                    }
                };
                let _ = tcp.0.set_nodelay(true);
                tracing::info!(%peer, port, module = %stream.info().module, "connection to the program");
                let moved = pipe(&mut tcp.0, &mut stream, &stats).await;
                self_
                    .accepted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&tcp.1);
                log_end(&peer.to_string(), &moved);
                stats.ended();
            });
        }
    }

    /// Connects to where the program listens (its own address, or
    /// loopback for a wildcard: IPv6 loopback first for an IPv6 socket,
    /// IPv4 loopback for a dual-stack one whose host has no `::1`), noting
    /// the connection's own port for `node` before the program can
    /// accept it. Returns the connection and that port.
    async fn connect_local(
        &self,
        listening: SocketAddr,
        node: NodeId,
    ) -> io::Result<(tokio::net::TcpStream, u16)> {
        let port = listening.port();
        let tries: Vec<SocketAddr> = match listening.ip() {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
                vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))]
            }
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => vec![
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            ],
            _ => vec![listening],
        };
        let mut last = io::Error::from(io::ErrorKind::AddrNotAvailable);
        for addr in tries {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            let any: SocketAddr = match addr {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            socket.bind(any)?;
            let own = socket.local_addr()?.port();
            self.accepted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(own, node);
            match tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, socket.connect(addr)).await {
                Ok(Ok(t)) => return Ok((t, own)),
                Ok(Err(e)) => last = e,
                Err(_) => last = io::ErrorKind::TimedOut.into(),
            }
            self.accepted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&own);
        }
        Err(last)
    }

    /// Sets up a stream to the node behind `pool_ip`, virtual port
    /// `port`, for the socket at loopback port `local_port`: answered once
    /// it is up (`wait`, a blocking connect: a failure is the connect's
    /// errno), or at once with the setup going on (a non-blocking connect:
    /// a failure resets the socket at the relay).
    async fn connect(
        self: &Arc<Self>,
        pool_ip: Ipv4Addr,
        port: u16,
        local_port: u16,
        wait: bool,
    ) -> Reply {
        let Some(node) = self.pool().by_ip.get(&pool_ip).copied() else {
            return Reply::Error(
                ErrorKind::Unreachable,
                format!("{pool_ip} stands for no node (resolve its name first)"),
            );
        };
        {
            let mut parked = self.parked();
            parked.retain(|_, (_, at)| at.elapsed() < PARK_FOR);
            if parked.len() >= MAX_PARKED {
                drop(parked);
                self.stats.failed();
                tracing::warn!("{MAX_PARKED} streams wait for their sockets already: refused");
                return Reply::Error(ErrorKind::Busy, "too many connections being set up".into());
            }
        }
        self.stats.started();
        let target = VirtualAddr::new(node, port);
        let setup = {
            let me = self.clone();
            async move {
                let r = me
                    .endpoint
                    .connect_timeout(&target, me.connect_timeout)
                    .await;
                match &r {
                    Ok(s) => {
                        let info = s.info();
                        tracing::info!(peer = %info.peer, port, module = %info.module, "connection brokered");
                    }
                    Err(e) => {
                        me.stats.failed();
                        tracing::warn!(%node, port, "cannot reach it: {e}");
                    }
                }
                r
            }
        };
        if !wait {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _ = tx.send(setup.await);
            });
            self.parked()
                .insert(local_port, (Parked::Pending(rx), Instant::now()));
            return Reply::Relay(self.relay_port);
        }
        match setup.await {
            Ok(stream) => {
                self.parked().insert(
                    local_port,
                    (Parked::Ready(Box::new(stream)), Instant::now()),
                );
                Reply::Relay(self.relay_port)
            }
            Err(e) => {
                let kind = match &e {
                    ConnectError::Refused { .. } => ErrorKind::Refused,
                    ConnectError::TimedOut { .. } => ErrorKind::TimedOut,
                    _ => ErrorKind::Unreachable,
                };
                Reply::Error(kind, e.to_string())
            }
        }
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
            r = self.clone().serve_inbound() => r,
        }
    }

    async fn one_request(self: &Arc<Self>, mut conn: UnixStream) -> io::Result<()> {
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
        let Some((parked, _)) = parked else {
            tracing::warn!(%from, "a connection at the relay that no stream waits for: reset");
            reset_on_close(&tcp);
            return;
        };
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let mut stream = match parked {
                Parked::Ready(s) => *s,
                // The setup of a non-blocking connect, still under way
                // (bounded by the connect timeout): a failure resets the
                // program's socket, which must not take it for a clean end.
                Parked::Pending(rx) => match rx.await {
                    Ok(Ok(s)) => s,
                    _ => {
                        reset_on_close(&tcp);
                        return;
                    }
                },
            };
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
