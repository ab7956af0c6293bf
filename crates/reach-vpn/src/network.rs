//! The vpn's driver: reads packets from the TUN device and carries each to
//! the member holding its destination address, over a reach stream to
//! that member (any module: Direct, Reverse, Splice, Routed, and the move
//! from routed to direct while packets flow); writes the packets peers
//! send to the device.
//!
//! ```text
//! TUN --packet--> route(dst) --+--> peer queue --> stream writer --> reach stream
//!                              +--> unknown dst: lookup_vip -> connect -> hello
//! reach stream --> stream reader --check src--> TUN
//! ```
//!
//! Who is who: a destination address is resolved through the hubs' member
//! directory ([`reach::Endpoint::lookup_vip`]); the stream's handshake
//! proves the peer's NodeId; each side's hello names the address it holds,
//! which must be the one the directory lists for that NodeId (the
//! connecting side checks it against what it looked up, the accepting side
//! looks it up). Packets from a peer must come from its own addresses, so
//! no member can speak for another. The endpoint's access policy decides
//! who may open a vpn stream at all.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reach::{Endpoint, NodeId, ReachStream, SetupModule, VirtualAddr};
use reach_proto::vpn::{ula, NetworkTag};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tun_rs::AsyncDevice;

use crate::control::FrameType;
use crate::hello::{Hello, HELLO_LEN};
use crate::outq::{Budget, OutQueue};
use crate::packet;
use crate::shared::Shared;

/// The first byte of a packet frame on a stream.
const PACKET: u8 = 0;

/// The virtual port vpn streams open to.
pub const VPORT: u16 = 65_520;
/// Bytes of frames queued for one peer at most: 64 segments of 64 KiB
/// (with offloads a frame is a whole TCP segment; a smaller queue drops
/// segments of several streams at once).
const PEER_QUEUE: usize = 4 << 20;
/// How long the device reader waits for room in a full peer queue before
/// it drops the packet.
const ROOM_WAIT: Duration = Duration::from_millis(5);
/// Bytes queued for all peers together at most.
const ALL_QUEUES: usize = 64 << 20;
/// Bytes queued for a destination still being resolved.
const PENDING_QUEUE: usize = 64 * 1024;
/// How long a hello may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a directory lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a destination nobody holds (or that could not be reached) is
/// not looked up again: a ping to a free address costs one lookup per
/// hold, not one per packet.
const UNREACHABLE_HOLD: Duration = Duration::from_secs(3);
/// Destinations resolved at once at most; packets to further new ones are
/// dropped (and counted) until some finish.
const MAX_RESOLVING: usize = 256;
/// Peers at once at most (members the policy admits are the only ones
/// that can add peers).
const MAX_PEERS: usize = 4096;
/// How often each peer's stream is pinged: its round trip shows in
/// `reach status`, queues included, at one small frame per peer.
const STREAM_PING: Duration = Duration::from_secs(10);
/// How often the member looks whether its hub changed.
const HUB_CHECK: Duration = Duration::from_secs(1);
/// Bytes a stream reader holds: room for a whole frame and more.
const READ_BUF: usize = 4 * crate::frame::MAX_FRAME;

/// The member's place in its network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// Its tag.
    pub network: NetworkTag,
    /// The member's IPv4 address.
    pub ipv4: Ipv4Addr,
    /// The member's ULA.
    pub ula: Ipv6Addr,
    /// The device MTU.
    pub mtu: u16,
    /// Packets take a peer's UDP path whenever one is up, not only while
    /// its stream is relayed.
    pub udp_first: bool,
    /// How often each UDP session's receive keys are renewed (normally
    /// [`crate::udp::keyring::REKEY_EVERY`]).
    pub rekey_every: Duration,
}

/// Counters of the vpn's data plane.
#[derive(Debug, Default)]
pub struct Stats {
    /// Packets sent to peers.
    pub packets_out: AtomicU64,
    /// Packets from peers written to the device.
    pub packets_in: AtomicU64,
    /// Bytes of those.
    pub bytes_out: AtomicU64,
    /// Bytes of those.
    pub bytes_in: AtomicU64,
    /// Packets dropped because their peer's queue was full.
    pub dropped_full: AtomicU64,
    /// Packets dropped because no member holds their destination (or it
    /// could not be reached), or too many were being resolved.
    pub dropped_unreachable: AtomicU64,
    /// Packets from the device or a peer that were not IP, or not for
    /// this network.
    pub dropped_bad: AtomicU64,
    /// Packets from a peer with a source address that is not the peer's.
    pub dropped_spoofed: AtomicU64,
    /// Peer streams set up (both directions).
    pub streams_up: AtomicU64,
    /// Peer streams that failed to set up, or were refused.
    pub streams_failed: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A member this one exchanges packets with.
#[derive(Debug)]
pub struct Peer {
    /// Its NodeId.
    pub node: NodeId,
    /// Its IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Its ULA.
    pub ula: Ipv6Addr,
    pub(crate) queue: OutQueue,
    /// Streams carrying its packets now.
    streams: AtomicUsize,
    /// Which stream writes: a newer stream takes over from an older one.
    writer: AtomicU64,
    /// The module of the newest stream and the address it runs to (for a
    /// routed stream, the hub's).
    stream: Mutex<(SetupModule, std::net::SocketAddr)>,
    /// Its UDP session and paths (None: this member has no UDP socket).
    pub(crate) udp: Option<Mutex<crate::udp_io::PeerUdp>>,
    /// The ping in flight on its stream: nonce, when sent.
    ping: Mutex<Option<(u64, Instant)>>,
    /// Its stream's latest round trip in microseconds (0: none yet).
    stream_rtt_us: AtomicU64,
    /// The hub it is attached to, as it told ([`crate::control::Control::Hub`]).
    hub: Mutex<Option<(NodeId, std::net::SocketAddr)>>,
    /// Packets and bytes each way.
    pub packets_out: AtomicU64,
    /// See `packets_out`.
    pub packets_in: AtomicU64,
    /// See `packets_out`.
    pub bytes_out: AtomicU64,
    /// See `packets_out`.
    pub bytes_in: AtomicU64,
}

impl Peer {
    /// The module of its newest stream.
    pub fn module(&self) -> SetupModule {
        self.stream.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    fn set_stream(&self, module: SetupModule, remote: std::net::SocketAddr) {
        *self.stream.lock().unwrap_or_else(|p| p.into_inner()) = (module, remote);
    }

    /// The peer's UDP address when a UDP path is up.
    pub fn udp_path(&self) -> Option<std::net::SocketAddr> {
        let udp = self.udp.as_ref()?;
        udp.lock().unwrap_or_else(|p| p.into_inner()).active()
    }

    /// How long the latest punch took to bring its UDP path up, while
    /// that path is up.
    pub fn udp_setup(&self) -> Option<Duration> {
        let udp = self.udp.as_ref()?;
        udp.lock().unwrap_or_else(|p| p.into_inner()).setup()
    }

    /// The hub it is attached to, as it told.
    pub fn hub(&self) -> Option<(NodeId, std::net::SocketAddr)> {
        *self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_hub(&self, node: NodeId, addr: std::net::SocketAddr) {
        *self.hub.lock().unwrap_or_else(|p| p.into_inner()) = Some((node, addr));
    }

    /// Its stream's latest round trip (a ping every [`STREAM_PING`],
    /// queued behind its packets as they are).
    pub fn stream_rtt(&self) -> Option<Duration> {
        match self.stream_rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Sends a ping on its stream (one in flight; a lost one is replaced).
    pub(crate) fn ping(&self, now: Instant) {
        let nonce = u64::from_be_bytes(crate::udp_io::random());
        *self.ping.lock().unwrap_or_else(|p| p.into_inner()) = Some((nonce, now));
        crate::Vpn::send_control(self, &crate::control::Control::Ping(nonce));
    }

    /// A pong came: if it answers the ping in flight, its round trip.
    pub(crate) fn pong(&self, nonce: u64, now: Instant) {
        let mut ping = self.ping.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, sent)) = *ping {
            if n == nonce {
                *ping = None;
                let us = now.saturating_duration_since(sent).as_micros().max(1);
                self.stream_rtt_us
                    .store(u64::try_from(us).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
        }
    }

    /// The UDP path's round trip (its latest probe), when one is up.
    pub fn udp_rtt(&self) -> Option<Duration> {
        let udp = self.udp.as_ref()?;
        udp.lock().unwrap_or_else(|p| p.into_inner()).rtt()
    }

    /// Its addresses.
    pub fn owner(&self) -> packet::Owner {
        packet::Owner {
            ipv4: self.ipv4,
            ula: self.ula,
        }
    }
}

/// Who the vpn talks to, and who it is finding.
#[derive(Default)]
struct Table {
    by_ip: HashMap<IpAddr, Arc<Peer>>,
    by_node: HashMap<NodeId, Arc<Peer>>,
    /// Destinations being resolved, with their first packets.
    pending: HashMap<IpAddr, Arc<OutQueue>>,
    /// Destinations found unreachable, until when.
    unreachable: HashMap<IpAddr, Instant>,
}

/// A running vpn member.
pub struct Vpn {
    endpoint: Arc<Endpoint>,
    dev: Arc<AsyncDevice>,
    me: Membership,
    table: Mutex<Table>,
    budget: Arc<Budget>,
    next_writer: AtomicU64,
    /// The UDP socket and sessions, if UDP paths are on.
    pub(crate) udp: Option<crate::udp_io::UdpPlane>,
    /// The data plane's counters.
    pub stats: Stats,
}

/// Why a peer stream was not set up.
#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("hello: {0}")]
    Io(#[from] io::Error),
    #[error("no hello within {HELLO_TIMEOUT:?}")]
    HelloTimeout,
    #[error("{0}")]
    Hello(#[from] crate::hello::HelloError),
    #[error("the peer is in another vpn network")]
    OtherNetwork,
    #[error("the peer says it holds {said}, but {wanted} was asked for")]
    WrongAddress { said: Ipv4Addr, wanted: IpAddr },
    #[error("the peer claims {0}, which the hubs list for another node (or none)")]
    NotHolder(Ipv4Addr),
    #[error("the directory lookup failed: {0}")]
    Lookup(reach::SessionError),
    #[error("too many peers ({MAX_PEERS})")]
    TooMany,
}

impl Vpn {
    /// A member on `dev`, reached through `endpoint` (which must accept
    /// streams on [`VPORT`] and hold `me`'s claim with its hub).
    /// `udp`: a bound socket for UDP paths (None: streams only).
    pub fn new(
        endpoint: Arc<Endpoint>,
        dev: AsyncDevice,
        me: Membership,
        udp: Option<tokio::net::UdpSocket>,
    ) -> Arc<Self> {
        let udp = udp.and_then(|s| match crate::udp_io::UdpPlane::new(s, me.mtu) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!("no UDP paths: the socket cannot be set up: {e}");
                None
            }
        });
        Arc::new(Self {
            endpoint,
            dev: Arc::new(dev),
            me,
            table: Mutex::new(Table::default()),
            budget: Budget::new(ALL_QUEUES),
            next_writer: AtomicU64::new(1),
            udp,
            stats: Stats::default(),
        })
    }

    /// Whether packets take UDP paths whenever one is up.
    pub fn udp_first(&self) -> bool {
        self.me.udp_first
    }

    /// The path `peer`'s packets take: `udp-direct ADDR` or `udp-punched
    /// ADDR` when they take a UDP path (always when one is up with
    /// `udp_first`, else while the stream is relayed), else the module of
    /// its stream.
    pub fn path(&self, peer: &Peer) -> String {
        match (peer.udp_path(), self.udp_crossing(peer)) {
            (Some(a), Some(c)) if crate::udp_io::prefers_udp(self.me.udp_first, peer) => {
                format!("{c} {a}")
            }
            _ => peer.module().to_string(),
        }
    }

    /// The hubs `peer`'s stream is relayed through, while it is: the one
    /// it runs to from here, then the peer's own hub when that is
    /// another (hubs between two federated hubs are not named).
    pub fn via(&self, peer: &Peer) -> Vec<std::net::SocketAddr> {
        let (module, remote) = *peer.stream.lock().unwrap_or_else(|p| p.into_inner());
        if module != SetupModule::Routed {
            return Vec::new();
        }
        let mine = self.endpoint.hub_status().map(|s| s.hub);
        let mut out = vec![remote];
        if let Some((hub, addr)) = peer.hub() {
            if Some(hub) != mine && addr != remote {
                out.push(addr);
            }
        }
        out
    }

    /// Tells `peer` which hub this member is attached to.
    fn announce_hub(&self, peer: &Peer) {
        if let Some(s) = self.endpoint.hub_status() {
            Self::send_control(
                peer,
                &crate::control::Control::Hub {
                    node: s.hub,
                    addr: s.remote,
                },
            );
        }
    }

    pub(crate) fn me(&self) -> &Membership {
        &self.me
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peers now.
    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.table().by_node.values().cloned().collect()
    }

    /// Runs the member until the device or the endpoint fails.
    pub async fn run(self: &Arc<Self>) -> io::Result<()> {
        tokio::select! {
            r = self.read_device() => r,
            r = self.accept() => r,
            r = self.read_udp() => r,
            () = self.tick_udp() => Ok(()),
            () = self.ping_streams() => Ok(()),
        }
    }

    /// Pings every peer's stream every [`STREAM_PING`], and tells every
    /// peer when this member's hub changed (a fallback hub took it),
    /// within [`HUB_CHECK`] (forever).
    async fn ping_streams(&self) {
        let mut tick = tokio::time::interval(HUB_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut pinged = Instant::now();
        let mut hub = self.endpoint.hub_status().map(|s| s.hub);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let ping = now.saturating_duration_since(pinged) >= STREAM_PING;
            let current = self.endpoint.hub_status().map(|s| s.hub);
            let moved = current.is_some() && current != hub;
            if !(ping || moved) {
                continue;
            }
            for peer in self.peers() {
                if ping {
                    peer.ping(now);
                }
                if moved {
                    self.announce_hub(&peer);
                }
            }
            if ping {
                pinged = now;
            }
            hub = current.or(hub);
        }
    }

    async fn read_device(self: &Arc<Self>) -> io::Result<()> {
        let mut buf = vec![0u8; crate::frame::MAX_FRAME];
        loop {
            let n = self.dev.recv(&mut buf).await?;
            let frame = &mut buf[..n];
            crate::vnet::device_to_wire(frame);
            if let Some(p) = self.route(frame) {
                // Its queue is full: wait a little for room (the kernel's
                // queue holds the senders back meanwhile, so TCP slows
                // down instead of losing whole segments), then try once
                // more. The wait is bounded: a stalled peer must not hold
                // up the others for long.
                let _ = tokio::time::timeout(ROOM_WAIT, p.queue.room()).await;
                if p.queue.push(&[&[PACKET], frame]) {
                    self.count_out(&p, 1, frame.len() as u64);
                } else {
                    bump(&self.stats.dropped_full);
                }
            }
        }
    }

    /// Whether `ip` is in this network (the IPv4 prefix is the device's
    /// route; the ULA /64 is derived from the network).
    fn in_network(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => !v4.is_broadcast() && !v4.is_multicast(),
            IpAddr::V6(v6) => {
                v6.octets()[..8] == reach_proto::vpn::ula_prefix(&self.me.network).octets()[..8]
            }
        }
    }

    /// Sends one frame (offload header and packet) from the device
    /// towards its destination.
    fn route(self: &Arc<Self>, pkt: &mut [u8]) -> Option<Arc<Peer>> {
        let dst = match pkt.get(crate::vnet::LEN..).map(packet::addrs) {
            Some(Ok(a)) if self.in_network(a.dst) => a.dst,
            _ => {
                // Not IP, or multicast (IPv6 neighbour discovery, mDNS):
                // the vpn is point to point.
                bump(&self.stats.dropped_bad);
                return None;
            }
        };
        let mut t = self.table();
        if let Some(p) = t.by_ip.get(&dst).cloned() {
            drop(t);
            if self.send_udp(&p, pkt) {
                return None;
            }
            if p.queue.push(&[&[PACKET], pkt]) {
                self.count_out(&p, 1, pkt.len() as u64);
                return None;
            }
            return Some(p);
        }
        if let Some(q) = t.pending.get(&dst) {
            if !q.push(&[&[PACKET], pkt]) {
                bump(&self.stats.dropped_full);
            }
            return None;
        }
        let now = Instant::now();
        if t.unreachable.get(&dst).is_some_and(|until| now < *until) {
            bump(&self.stats.dropped_unreachable);
            return None;
        }
        if t.pending.len() >= MAX_RESOLVING {
            bump(&self.stats.dropped_unreachable);
            tracing::debug!(%dst, "not resolved: {MAX_RESOLVING} destinations are being resolved");
            return None;
        }
        t.unreachable.retain(|_, until| now < *until);
        let q = Arc::new(OutQueue::new(PENDING_QUEUE, self.budget.clone()));
        q.push(&[&[PACKET], pkt]);
        t.pending.insert(dst, q);
        drop(t);
        let vpn = self.clone();
        tokio::spawn(async move { vpn.resolve(dst).await });
        None
    }

    /// Finds who holds `dst`, connects to it and hands it the packets
    /// queued meanwhile; or marks `dst` unreachable for a while.
    async fn resolve(self: Arc<Self>, dst: IpAddr) {
        let result = self.open(dst).await;
        let mut t = self.table();
        let pending = t.pending.remove(&dst);
        match result {
            Ok(peer) => {
                if let Some(q) = pending {
                    let (moved, dropped) = q.move_to(&peer.queue);
                    self.count_out(&peer, moved, 0);
                    self.stats
                        .dropped_full
                        .fetch_add(dropped, Ordering::Relaxed);
                }
                t.by_ip.insert(dst, peer);
            }
            Err(e) => {
                if let Some(q) = pending {
                    let (n, _) = q.move_to(&OutQueue::new(0, Budget::new(0)));
                    self.stats
                        .dropped_unreachable
                        .fetch_add(n, Ordering::Relaxed);
                }
                t.unreachable.insert(dst, Instant::now() + UNREACHABLE_HOLD);
                tracing::info!(%dst, "vpn destination unreachable: {e}");
            }
        }
    }

    /// Counts `packets` (of `bytes`; 0: not counted) queued for `peer`.
    fn count_out(&self, peer: &Peer, packets: u64, bytes: u64) {
        peer.packets_out.fetch_add(packets, Ordering::Relaxed);
        peer.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        self.stats.packets_out.fetch_add(packets, Ordering::Relaxed);
        self.stats.bytes_out.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A peer for `dst`: the one already connected to its holder, or a new
    /// stream to it.
    async fn open(self: &Arc<Self>, dst: IpAddr) -> Result<Arc<Peer>, String> {
        let holders = self
            .endpoint
            .lookup_vip(self.me.network, dst, LOOKUP_TIMEOUT)
            .await
            .map_err(|e| format!("directory lookup failed: {e}"))?;
        let Some(node) = holders.first().copied() else {
            return Err("no member holds it".into());
        };
        if holders.len() > 1 {
            tracing::warn!(%dst, holders = ?holders, "several members claim this address: using the first listed");
        }
        if let Some(p) = self.table().by_node.get(&node).cloned() {
            return Ok(p);
        }
        let target = VirtualAddr {
            node,
            port: VPORT,
            direct: Vec::new(),
            hub: None,
        };
        let stream = self.endpoint.connect(&target).await.map_err(|e| {
            bump(&self.stats.streams_failed);
            format!("cannot connect to {node}: {e}")
        })?;
        self.start_peer(stream, Some(dst)).await.map_err(|e| {
            bump(&self.stats.streams_failed);
            format!("vpn stream to {node} refused: {e}")
        })
    }

    async fn accept(self: &Arc<Self>) -> io::Result<()> {
        loop {
            let stream = self.endpoint.accept().await.map_err(io::Error::other)?;
            let vpn = self.clone();
            tokio::spawn(async move {
                let peer = stream.peer();
                if let Err(e) = vpn.start_peer(stream, None).await {
                    bump(&vpn.stats.streams_failed);
                    tracing::warn!(%peer, "vpn stream refused: {e}");
                }
            });
        }
    }

    /// Exchanges hellos on a new stream, checks who the peer is, and
    /// starts carrying packets on it. `wanted`: the address the stream was
    /// opened for (None: an accepted stream).
    async fn start_peer(
        self: &Arc<Self>,
        mut stream: ReachStream,
        wanted: Option<IpAddr>,
    ) -> Result<Arc<Peer>, PeerError> {
        let node = stream.peer();
        let (module, remote) = (stream.info().module, stream.info().remote_addr);
        let mine = Hello {
            network: self.me.network,
            ip: self.me.ipv4,
            mtu: self.me.mtu,
        };
        let theirs = tokio::time::timeout(HELLO_TIMEOUT, async {
            stream.write_all(&mine.encode()).await?;
            stream.flush().await?;
            let mut b = [0u8; HELLO_LEN];
            stream.read_exact(&mut b).await?;
            Ok::<_, io::Error>(b)
        })
        .await
        .map_err(|_| PeerError::HelloTimeout)??;
        let theirs = Hello::decode(&theirs)?;
        if theirs.network != self.me.network {
            return Err(PeerError::OtherNetwork);
        }
        let peer_ula = ula(&self.me.network, &node);
        match wanted {
            Some(w) if w != IpAddr::V4(theirs.ip) && w != IpAddr::V6(peer_ula) => {
                return Err(PeerError::WrongAddress {
                    said: theirs.ip,
                    wanted: w,
                })
            }
            Some(_) => {}
            None => {
                let holders = self
                    .endpoint
                    .lookup_vip(self.me.network, theirs.ip.into(), LOOKUP_TIMEOUT)
                    .await
                    .map_err(PeerError::Lookup)?;
                if holders.first() != Some(&node) {
                    return Err(PeerError::NotHolder(theirs.ip));
                }
            }
        }
        let peer = {
            let mut t = self.table();
            let peer = match t.by_node.get(&node) {
                Some(p) if p.ipv4 == theirs.ip => p.clone(),
                _ => {
                    if t.by_node.len() >= MAX_PEERS {
                        return Err(PeerError::TooMany);
                    }
                    let p = Arc::new(Peer {
                        node,
                        ipv4: theirs.ip,
                        ula: peer_ula,
                        queue: OutQueue::new(PEER_QUEUE, self.budget.clone()),
                        streams: AtomicUsize::new(0),
                        writer: AtomicU64::new(0),
                        stream: Mutex::new((module, remote)),
                        udp: self
                            .udp
                            .as_ref()
                            .map(|u| Mutex::new(u.new_peer(self.me.rekey_every))),
                        ping: Mutex::new(None),
                        stream_rtt_us: AtomicU64::new(0),
                        hub: Mutex::new(None),
                        packets_out: AtomicU64::new(0),
                        packets_in: AtomicU64::new(0),
                        bytes_out: AtomicU64::new(0),
                        bytes_in: AtomicU64::new(0),
                    });
                    t.by_node.insert(node, p.clone());
                    self.udp_session_added(&p);
                    t.by_ip.insert(IpAddr::V4(theirs.ip), p.clone());
                    t.by_ip.insert(IpAddr::V6(peer_ula), p.clone());
                    p
                }
            };
            peer.streams.fetch_add(1, Ordering::Relaxed);
            peer
        };
        peer.set_stream(module, remote);
        bump(&self.stats.streams_up);
        tracing::info!(peer = %node, ip = %theirs.ip, %module, "vpn peer up");
        let writer = self.next_writer.fetch_add(1, Ordering::Relaxed);
        peer.writer.store(writer, Ordering::Relaxed);
        // This member's UDP keys and addresses, so that the peer can try
        // a UDP path (again on every new stream: the peer may be new).
        self.offer_udp(&peer);
        self.announce_hub(&peer);
        peer.ping(Instant::now());
        let (r, w) = Shared::split(stream);
        let p = peer.clone();
        let out = tokio::spawn(async move { carry_out(&p, writer, w).await });
        let vpn = self.clone();
        let p = peer.clone();
        tokio::spawn(async move {
            let r = vpn.carry_in(&p, r).await;
            // The stream is done both ways.
            out.abort();
            let left = p.streams.fetch_sub(1, Ordering::Relaxed) - 1;
            match r {
                Ok(()) => tracing::info!(peer = %p.node, "vpn stream ended"),
                Err(e) => tracing::warn!(peer = %p.node, "vpn stream failed: {e}"),
            }
            if left == 0 {
                vpn.forget(&p);
            }
        });
        Ok(peer)
    }

    /// A peer with no stream left goes; its next packet resolves again.
    fn forget(&self, peer: &Arc<Peer>) {
        let mut t = self.table();
        if t.by_node
            .get(&peer.node)
            .is_some_and(|p| Arc::ptr_eq(p, peer))
        {
            t.by_node.remove(&peer.node);
            t.by_ip.retain(|_, p| !Arc::ptr_eq(p, peer));
            drop(t);
            self.udp_session_gone(peer);
        }
    }

    /// Writes the packets `peer` sends to the device.
    async fn carry_in(&self, peer: &Peer, mut r: Shared) -> io::Result<()> {
        let mut buf = vec![0u8; READ_BUF];
        let mut have = 0;
        let mut moved = false;
        loop {
            let n = r.read(&mut buf[have..]).await?;
            if !moved {
                if let Some(u) = r.upgraded() {
                    moved = true;
                    peer.set_stream(u.module, u.remote_addr);
                    tracing::info!(peer = %peer.node, ip = %peer.ipv4, module = %u.module, remote = %u.remote_addr, "vpn peer path moved");
                }
            }
            if n == 0 {
                return if have == 0 {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stream ended inside a packet",
                    ))
                };
            }
            have += n;
            let mut at = 0;
            loop {
                let used = match crate::frame::decode(&buf[at..have]) {
                    Ok(Some((_, used))) => used,
                    Ok(None) => break,
                    Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                };
                let (start, end) = (at, at + used);
                at = end;
                let frame = &mut buf[start + crate::frame::HEADER_LEN..end];
                let Some((kind, rest)) = frame.split_first_mut() else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "empty vpn frame",
                    ));
                };
                match FrameType::of(*kind) {
                    Some(FrameType::Packet) => self.deliver(peer, rest).await?,
                    Some(FrameType::Control) => match crate::control::Control::decode(rest) {
                        Ok(c) => self.handle_control(peer, c),
                        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                    },
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("unknown vpn frame type {kind}"),
                        ))
                    }
                }
            }
            buf.copy_within(at..have, 0);
            have -= at;
        }
    }

    /// Writes one frame (offload header and packet) from `peer` to the
    /// device, if the header is one a device makes, and the packet is the
    /// peer's to send and this member's to receive.
    pub(crate) async fn deliver(&self, peer: &Peer, frame: &mut [u8]) -> io::Result<()> {
        let Some(len) = self.admit(peer, frame).map(<[u8]>::len) else {
            return Ok(());
        };
        crate::vnet::wire_to_device(frame);
        self.dev.send(frame).await?;
        self.count_in(peer, 1, len as u64);
        Ok(())
    }

    /// The packet in `frame` (offload header and packet, from `peer`) if
    /// the header is one a device makes and the packet is the peer's to
    /// send and this member's to receive; drops are counted.
    pub(crate) fn admit<'a>(&self, peer: &Peer, frame: &'a [u8]) -> Option<&'a [u8]> {
        let me = packet::Owner {
            ipv4: self.me.ipv4,
            ula: self.me.ula,
        };
        let Ok(pkt) = crate::vnet::check(frame) else {
            bump(&self.stats.dropped_bad);
            return None;
        };
        match packet::inbound(pkt, &peer.owner(), &me) {
            packet::Inbound::Deliver => Some(pkt),
            packet::Inbound::Spoofed => {
                bump(&self.stats.dropped_spoofed);
                None
            }
            packet::Inbound::Bad | packet::Inbound::NotMine => {
                bump(&self.stats.dropped_bad);
                None
            }
        }
    }

    /// Counts `packets` of `bytes` from `peer` written to the device.
    pub(crate) fn count_in(&self, peer: &Peer, packets: u64, bytes: u64) {
        peer.packets_in.fetch_add(packets, Ordering::Relaxed);
        peer.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        self.stats.packets_in.fetch_add(packets, Ordering::Relaxed);
        self.stats.bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The device, for the UDP driver's batched writes.
    pub(crate) fn device(&self) -> &AsyncDevice {
        &self.dev
    }
}

/// Writes `peer`'s queued packets to its stream, in batches, while this
/// stream is the peer's writer.
async fn carry_out(peer: &Peer, writer: u64, mut w: Shared) {
    let mut batch = Vec::with_capacity(64 * 1024);
    while peer.writer.load(Ordering::Relaxed) == writer {
        peer.queue.take(&mut batch).await;
        if let Err(e) = w.write_all(&batch).await {
            tracing::debug!(peer = %peer.node, "vpn stream write failed: {e}");
            return;
        }
        batch.clear();
    }
}
