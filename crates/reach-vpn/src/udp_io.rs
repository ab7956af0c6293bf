//! The vpn's UDP paths, the driver side: one UDP socket per member, a
//! session per peer (keys handed over the peer's stream), hole punching
//! and keepalives run by [`crate::udp::paths`], and packets sent as
//! sealed datagrams while a UDP path is up (the stream carries them
//! otherwise, and always carries the control messages).
//!
//! ```text
//! stream up -> each side sends Keys (seal to me with these) and
//!              Candidates (my UDP addresses) -> both punch at once
//! probe/answer validate a path -> packets go as datagrams, cut from the
//!              device's segments (crate::split), one per packet
//! path silent 25 s -> packets go back to the stream; rounds go on
//! ```
//!
//! A UDP path carries packets while the peer's stream is relayed through
//! hubs, or always with `--udp-first` ([`prefers_udp`]): a direct stream
//! moves whole offloaded segments and measured faster than datagrams on
//! clean links.
//!
//! Datagrams go out in GSO batches (one sendmsg per run of equal
//! datagrams) and come in several at a time (recvmmsg and GRO), and the
//! packets they carry are coalesced back into segments for the device.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use reach_proto::Cipher;

use crate::birthday::{Birthday, SpareCount, SpareDatagram};
use crate::control::{self, Control, FrameType};
use crate::network::{bump, Peer, Vpn};
use crate::split::Splitter;
use crate::udp::datagram::{self, Keys, Kind, Sealer, HEADER_LEN, TAG_LEN};
use crate::udp::keyring::Keyring;
use crate::udp::paths::{Crossing, Event, Message, Paths, PeerNat};
use crate::vnet;

/// How often the driver runs the paths' timers.
const TICK: Duration = Duration::from_millis(20);
/// A peer's candidates make it punch again at most this often.
const PUNCH_AGAIN: Duration = Duration::from_secs(1);
/// Socket buffers asked for (the kernel may give less).
const SOCKET_BUFFER: usize = 4 << 20;
/// Bytes one GSO send may carry (the kernel's limit is a UDP payload of
/// 65507 bytes).
const GSO_BYTES: usize = 65_000;
/// Receive buffers, each taking one message (or a GRO run of datagrams).
const RECV_BATCH: usize = 16;
/// Bytes of one receive buffer: a GRO run of up to 64 KiB.
const RECV_BUF: usize = 65_536;
/// Spare sockets are opened for one peer at most this often (a move
/// allows it at once).
const BIRTHDAY_AGAIN: Duration = Duration::from_secs(10);
/// How long into a first round spares open, if no path is up by then
/// (before the peer's spray begins: `udp::paths::SPRAY_AFTER`).
const BIRTHDAY_AFTER: Duration = Duration::from_millis(200);
/// How often the member asks its hub's UDP echoes how its NAT maps its
/// socket.
const ECHO_EVERY: Duration = Duration::from_secs(60);

/// What the hub's UDP echoes told this member about its NAT.
#[derive(Default)]
struct Echo {
    /// The latest answer of each echo.
    obs: Vec<reach_proto::nat::Observation>,
    asked: Option<Instant>,
    /// Where peers may reach the socket through the NAT, most likely first.
    reflexive: Vec<SocketAddr>,
    /// How the NAT maps the socket (None: not known yet).
    nat: Option<PeerNat>,
}

impl Echo {
    /// Takes one echo's answer (`echoes`: the hub's echoes, in the order
    /// the requests went to them); returns whether the reflexive
    /// addresses and whether the NAT hint changed.
    fn observe(
        &mut self,
        o: reach_proto::nat::Observation,
        echoes: &[SocketAddr],
        port: u16,
    ) -> (bool, bool) {
        self.obs.retain(|x| x.server != o.server);
        self.obs.push(o);
        // classify reads the steps between mappings in the order they
        // were made, which is the order the requests went out; answers
        // may come back in any order.
        self.obs
            .sort_by_key(|x| echoes.iter().position(|e| *e == x.server));
        let profile = reach_proto::nat::classify(&self.obs);
        let reflexive = reach_proto::nat::predict(&profile, &[], port);
        let nat = nat_hint(&profile);
        let changed = (reflexive != self.reflexive, nat != self.nat);
        if changed.0 || changed.1 {
            tracing::info!(%profile, ?reflexive, "vpn UDP socket as the hub's echoes see it");
            self.reflexive = reflexive;
            self.nat = nat;
        }
        changed
    }
}

/// Counters of the UDP paths.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Datagrams sent.
    pub sent: AtomicU64,
    /// Datagrams received that opened.
    pub received: AtomicU64,
    /// Datagrams dropped: no session, forged, replayed, or not sent (a
    /// full socket buffer).
    pub dropped: AtomicU64,
    /// Paths that came up.
    pub paths_up: AtomicU64,
    /// Paths that went down.
    pub paths_down: AtomicU64,
    /// Times the member moved to a fresh socket ([`Vpn::rebind_udp`]).
    pub rebinds: AtomicU64,
    /// Many-port rounds this member opened spare sockets for (its NAT
    /// maps ports at random, the peer's predictably).
    pub birthdays: AtomicU64,
    /// Many-port rounds not opened: the spare sockets' bound was reached
    /// or a socket could not be opened.
    pub birthdays_refused: AtomicU64,
    /// Paths that came up on a spare socket.
    pub birthday_hits: AtomicU64,
    /// Times a session's receive keys were renewed.
    pub rekeys: AtomicU64,
}

/// One bound UDP socket with its GSO and GRO state.
pub(crate) struct Socket {
    pub(crate) io: tokio::net::UdpSocket,
    state: quinn_udp::UdpSocketState,
    pub(crate) port: u16,
}

impl Socket {
    pub(crate) fn new(io: tokio::net::UdpSocket) -> io::Result<Self> {
        let port = io.local_addr()?.port();
        let state = quinn_udp::UdpSocketState::new((&io).into())?;
        Ok(Self { io, state, port })
    }
}

/// A member's UDP socket and sessions.
pub(crate) struct UdpPlane {
    /// The socket now; a rebind puts a fresh one here.
    socket: Mutex<Arc<Socket>>,
    /// Bumped by each rebind: the receive loop moves to the new socket.
    moved: tokio::sync::watch::Sender<u64>,
    /// Datagrams that came in on spare sockets, for the driver.
    spare_tx: tokio::sync::mpsc::Sender<SpareDatagram>,
    spare_rx: Mutex<Option<tokio::sync::mpsc::Receiver<SpareDatagram>>>,
    /// Spare sockets open.
    spares: Arc<SpareCount>,
    /// This member's receive index to the peer that seals to it.
    sessions: Mutex<HashMap<u32, Weak<Peer>>>,
    /// Scratch for cutting and sealing outgoing segments.
    split: Mutex<Splitter>,
    cipher: Cipher,
    echo: Mutex<Echo>,
    pub(crate) stats: UdpStats,
}

/// The receive loop's buffers, kept across rebinds.
struct Receive {
    bufs: [Vec<u8>; RECV_BATCH],
    metas: Vec<quinn_udp::RecvMeta>,
    out: Vec<Vec<u8>>,
    gro: tun_rs::GROTable,
}

impl Receive {
    fn new() -> Self {
        Receive {
            bufs: std::array::from_fn(|_| vec![0u8; RECV_BUF]),
            metas: vec![quinn_udp::RecvMeta::default(); RECV_BATCH],
            out: (0..tun_rs::IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(tun_rs::VIRTIO_NET_HDR_LEN + 2048))
                .collect(),
            gro: tun_rs::GROTable::default(),
        }
    }
}

/// How the NAT maps, for the peers ([`Echo::nat`]; None: not known).
fn nat_hint(profile: &reach_proto::nat::NatProfile) -> Option<PeerNat> {
    use reach_proto::nat::{Allocation, Mapping};
    let ext = profile.external?;
    let ip = ext.ip().to_canonical();
    Some(match (profile.mapping, profile.allocation) {
        (Mapping::Unknown, _) => return None,
        (_, Allocation::Random) => PeerNat::Random(ip),
        (Mapping::Dependent, Allocation::Sequential { step }) => PeerNat::Sequential {
            ip,
            after: ext.port(),
            step: i16::try_from(step).ok()?,
        },
        // One echo address cannot tell an address-dependent mapping from
        // an endpoint-independent one.
        (Mapping::EndpointIndependent, _) if !profile.across_addresses => PeerNat::PerAddress {
            ip,
            after: ext.port(),
        },
        _ => PeerNat::Predictable,
    })
}

/// One peer's UDP session.
pub(crate) struct PeerUdp {
    /// What the peer seals with: this member made it and handed it over.
    keys: Keyring,
    /// How to seal to the peer, once it handed its keys over.
    sealer: Option<Sealer>,
    paths: Paths,
    last_punch: Option<Instant>,
    /// How the peer's NAT maps (None: not told yet).
    peer_nat: Option<PeerNat>,
    /// Spare sockets while punching many-port (this side's NAT maps
    /// ports at random).
    birthday: Option<Birthday>,
    /// When spares were last opened for this peer.
    last_birthday: Option<Instant>,
    /// The spare that a spray hit: this peer's path runs on it.
    own: Option<Own>,
    /// The peer's candidates on its own interfaces (what it told last).
    peer_interfaces: Vec<SocketAddr>,
}

/// A spare socket that carries one peer's path, with its receive loop.
struct Own {
    socket: Arc<Socket>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Own {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for PeerUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerUdp")
            .field("index", &self.keys.current().index)
            .field("keyed", &self.sealer.is_some())
            .field("active", &self.paths.active())
            .finish()
    }
}

impl PeerUdp {
    /// The peer's UDP address, when a path is up and the peer's keys are
    /// known.
    pub(crate) fn active(&self) -> Option<SocketAddr> {
        self.sealer.as_ref().and(self.paths.active())
    }

    /// The active path's round trip.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        self.active().and(self.paths.rtt())
    }

    /// This side or the peer moved to another socket: the path, the
    /// spare sockets and the socket a spray won go; punching starts
    /// afresh (with `candidates`, the peer's new ones).
    fn moved(&mut self, now: Instant, candidates: Option<Vec<SocketAddr>>) {
        self.own = None;
        self.birthday = None;
        self.last_birthday = None;
        self.paths.moved(now, candidates);
        self.last_punch = Some(now);
    }

    /// How long the latest punch took to bring the path up.
    pub(crate) fn setup(&self) -> Option<Duration> {
        self.active().and(self.paths.setup())
    }
}

pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // Without an OS random source nothing here is safe; getrandom fails
    // only on systems that lack one.
    if getrandom::fill(&mut b).is_err() {
        tracing::error!("no OS random source: UDP session keys are not random");
    }
    b
}

/// Binds the member's UDP socket: dual-stack where the host has IPv6.
pub fn bind(port: u16) -> io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
        Ok(s)
    });
    let socket = match v6 {
        Ok(s) => s,
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from(([0u8; 4], port)).into())?;
            s
        }
    };
    // As root the caps (net.core.rmem_max, wmem_max) do not apply; a
    // burst of 45 datagrams per offloaded segment needs the room.
    {
        use nix::sys::socket::{setsockopt, sockopt};
        if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
            let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        }
        if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
            let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        }
    }
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket.into())
}

impl UdpPlane {
    pub(crate) fn new(socket: tokio::net::UdpSocket, mtu: u16) -> io::Result<Self> {
        let (spare_tx, spare_rx) = tokio::sync::mpsc::channel(crate::birthday::QUEUE);
        Ok(Self {
            spare_tx,
            spare_rx: Mutex::new(Some(spare_rx)),
            spares: Arc::default(),
            socket: Mutex::new(Arc::new(Socket::new(socket)?)),
            moved: tokio::sync::watch::Sender::new(0),
            sessions: Mutex::new(HashMap::new()),
            split: Mutex::new(Splitter::new(
                HEADER_LEN + vnet::LEN,
                usize::from(mtu),
                TAG_LEN,
            )),
            cipher: reach::preferred_cipher(),
            echo: Mutex::new(Echo::default()),
            stats: UdpStats::default(),
        })
    }

    /// The socket now.
    fn socket(&self) -> Arc<Socket> {
        self.socket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A dual-stack socket sends to IPv4 peers as mapped addresses.
    fn to(socket: &Socket, to: SocketAddr) -> SocketAddr {
        match (to, socket.io.local_addr()) {
            (SocketAddr::V4(v4), Ok(SocketAddr::V6(_))) => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => to,
        }
    }

    /// Sends `contents`: one datagram, or with `segment` datagrams of that
    /// size (the last may be shorter) in one GSO send. Never waits: a full
    /// socket buffer drops them (counted).
    fn send(&self, contents: &[u8], segment: Option<usize>, to: SocketAddr) {
        self.send_on(&self.socket(), contents, segment, to);
    }

    /// [`UdpPlane::send`] on a socket the caller holds.
    fn send_on(&self, socket: &Socket, contents: &[u8], segment: Option<usize>, to: SocketAddr) {
        let transmit = quinn_udp::Transmit {
            destination: Self::to(socket, to),
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        let count = segment.map_or(1, |s| contents.len().div_ceil(s.max(1))) as u64;
        match socket.state.try_send((&socket.io).into(), &transmit) {
            Ok(()) => {
                self.stats.sent.fetch_add(count, Ordering::Relaxed);
            }
            Err(e) => {
                let before = self.stats.dropped.fetch_add(count, Ordering::Relaxed);
                if before < 3 {
                    tracing::debug!(%to, len = contents.len(), ?segment, "UDP send failed: {e}");
                }
            }
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<u32, Weak<Peer>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new peer's session: fresh keys and an index no other session
    /// of this member has.
    pub(crate) fn new_peer(&self, rekey_every: Duration) -> PeerUdp {
        let keys = fresh_keys(&self.sessions());
        PeerUdp {
            keys: Keyring::new(self.cipher, keys, Instant::now(), rekey_every),
            sealer: None,
            paths: Paths::new(Instant::now(), u64::from_be_bytes(random())),
            last_punch: None,
            peer_nat: None,
            birthday: None,
            last_birthday: None,
            own: None,
            peer_interfaces: Vec::new(),
        }
    }

    /// The member's UDP port.
    pub(crate) fn port(&self) -> u16 {
        self.socket().port
    }
}

/// Whether `peer`'s packets take its UDP path when one is up: always
/// with `udp_first`, else while its stream is relayed through hubs. A
/// direct stream (Direct, Reverse, Splice, or a routed one that moved)
/// carries whole offloaded segments and measured faster than datagrams
/// here (docs/vpn.md), but TCP inside TCP stalls on lossy links.
pub(crate) fn prefers_udp(udp_first: bool, peer: &Peer) -> bool {
    udp_first || peer.module() == reach::SetupModule::Routed
}

/// Whether a socket error is about one destination rather than the
/// socket.
pub(crate) fn transient(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionRefused | K::ConnectionReset | K::HostUnreachable | K::NetworkUnreachable
    )
}

/// New receive keys, under an index no session of this member has.
fn fresh_keys(sessions: &HashMap<u32, Weak<Peer>>) -> Keys {
    let mut index = u32::from_be_bytes(random());
    while index == 0 || sessions.contains_key(&index) {
        index = index.wrapping_add(1);
    }
    Keys {
        index,
        key: random(),
    }
}

fn lock(m: &Mutex<PeerUdp>) -> MutexGuard<'_, PeerUdp> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vpn {
    fn plane(&self) -> Option<&UdpPlane> {
        self.udp.as_ref()
    }

    /// The UDP counters (None: no UDP socket).
    pub fn udp_stats(&self) -> Option<&UdpStats> {
        self.plane().map(|p| &p.stats)
    }

    /// The member's UDP port (None: no UDP socket).
    pub fn udp_port(&self) -> Option<u16> {
        self.plane().map(UdpPlane::port)
    }

    pub(crate) fn udp_session_added(&self, peer: &Arc<Peer>) {
        if let (Some(plane), Some(u)) = (self.plane(), &peer.udp) {
            let index = lock(u).keys.current().index;
            plane.sessions().insert(index, Arc::downgrade(peer));
        }
    }

    pub(crate) fn udp_session_gone(&self, peer: &Peer) {
        if let (Some(plane), Some(u)) = (self.plane(), &peer.udp) {
            let indices: Vec<u32> = lock(u).keys.indices().collect();
            let mut sessions = plane.sessions();
            for i in indices {
                sessions.remove(&i);
            }
        }
    }

    /// Where this member's UDP socket may be reached: its interface
    /// addresses (not the vpn's own) and its hub-observed public address,
    /// each with the socket's port (a NAT that keeps ports maps it there).
    fn local_candidates(&self, port: u16) -> Vec<SocketAddr> {
        let reflexive = self
            .plane()
            .map(|p| {
                p.echo
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reflexive
                    .clone()
            })
            .unwrap_or_default();
        let mut out = self.interface_addrs(port);
        if let Some(status) = self.endpoint().hub_status() {
            let public = SocketAddr::new(status.observed.ip().to_canonical(), port);
            if !out.contains(&public) {
                out.insert(0, public);
            }
        }
        for a in reflexive.into_iter().rev() {
            out.retain(|x| *x != a);
            out.insert(0, a);
        }
        out.truncate(control::MAX_CANDIDATES);
        out
    }

    /// This member's interface addresses (not the vpn's, not loopback or
    /// link-local) with `port`.
    fn interface_addrs(&self, port: u16) -> Vec<SocketAddr> {
        let me = self.me();
        let ula_net = reach_proto::vpn::ula_prefix(&me.network).octets();
        let ours = |ip: &IpAddr| match ip {
            IpAddr::V4(v4) => *v4 == me.ipv4,
            IpAddr::V6(v6) => v6.octets()[..8] == ula_net[..8],
        };
        // Not the addresses of TUN devices (this vpn's, another vpn's):
        // a path through a tunnel would carry the vpn inside itself.
        let tunnel =
            |name: &str| std::path::Path::new(&format!("/sys/class/net/{name}/tun_flags")).exists();
        let mut out: Vec<SocketAddr> = if_addrs::get_if_addrs()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| !tunnel(&i.name))
            .map(|i| i.ip())
            .filter(|ip| !ip.is_loopback() && !ours(ip))
            .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
            .map(|ip| SocketAddr::new(ip, port))
            .collect();
        out.truncate(control::MAX_CANDIDATES);
        out
    }

    /// How `peer`'s UDP path crosses the network, while one is up.
    pub fn udp_crossing(&self, peer: &Peer) -> Option<Crossing> {
        let (plane, u) = (self.plane()?, peer.udp.as_ref()?);
        self.crossing(plane, &lock(u))
    }

    fn crossing(&self, plane: &UdpPlane, u: &PeerUdp) -> Option<Crossing> {
        u.active()?;
        let mine = self.interface_addrs(Self::socket_for(plane, u).port);
        u.paths.crossing(|a| mine.contains(&a), &u.peer_interfaces)
    }

    /// Asks the hub's UDP echoes how the NAT maps the socket (every
    /// [`ECHO_EVERY`]).
    fn ask_echoes(&self, plane: &UdpPlane, now: Instant) {
        let Some(status) = self.endpoint().hub_status() else {
            return;
        };
        {
            let mut e = plane.echo.lock().unwrap_or_else(|p| p.into_inner());
            if e.asked
                .is_some_and(|at| now.saturating_duration_since(at) < ECHO_EVERY)
            {
                return;
            }
            e.asked = Some(now);
        }
        let request = reach_proto::nat::udp_echo_request();
        for server in status.echo {
            plane.send(&request, None, server);
        }
    }

    /// An answer from one of the hub's echoes: the NAT's mapping of the
    /// socket towards it. New reflexive addresses go to every peer.
    fn echo_answer(&self, plane: &UdpPlane, socket: &Socket, from: SocketAddr, d: &[u8]) {
        if socket.port != plane.port() {
            // For a socket given up since (a rebind): says nothing of
            // the new one.
            return;
        }
        let Ok(mapped) = reach_proto::nat::decode_echo(d) else {
            bump(&plane.stats.dropped);
            return;
        };
        let canonical = |e: &SocketAddr| SocketAddr::new(e.ip().to_canonical(), e.port());
        let echoes: Vec<SocketAddr> = self
            .endpoint()
            .hub_status()
            .map(|s| s.echo.iter().map(canonical).collect())
            .unwrap_or_default();
        if !echoes.contains(&from) {
            bump(&plane.stats.dropped);
            return;
        }
        let local = socket
            .io
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0u8; 4], socket.port)));
        let observed = reach_proto::nat::Observation {
            local,
            server: from,
            mapped,
        };
        let changed = plane
            .echo
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(observed, &echoes, socket.port);
        if changed.0 {
            // The interfaces are read once for all peers.
            let candidates = Control::Candidates(self.local_candidates(socket.port));
            for peer in self.peers() {
                Self::send_control(&peer, &candidates);
            }
        }
        if changed.1 {
            let nat = plane.echo.lock().unwrap_or_else(|p| p.into_inner()).nat;
            let now = Instant::now();
            for peer in self.peers() {
                if let Some(hint) = nat {
                    Self::send_control(&peer, &Control::Nat(hint));
                }
                if let Some(u) = &peer.udp {
                    let mut u = lock(u);
                    self.plan_many_port(plane, &mut u, now);
                    self.flush_udp(plane, &peer, &mut u);
                }
            }
        }
    }

    /// Many-port punching where the two NATs call for it: this side
    /// sprays random ports of the peer's address when the peer's NAT maps
    /// ports at random and its own predictably (and punches again with
    /// the spray); it opens spare sockets in the opposite case.
    fn plan_many_port(&self, plane: &UdpPlane, u: &mut PeerUdp, now: Instant) {
        if u.active().is_some() || u.sealer.is_none() {
            return;
        }
        let mine = plane.echo.lock().unwrap_or_else(|p| p.into_inner()).nat;
        // Spraying from behind a NAT that maps each destination anew
        // would only make more mappings.
        let spray = match (mine, u.peer_nat) {
            (Some(m), Some(p)) if m.one_mapping_per_address() => Some(p),
            _ => None,
        };
        if spray != u.paths.spraying() {
            u.paths.spray(spray);
            if spray.is_some() && !u.paths.candidates().is_empty() {
                u.last_punch = Some(now);
                u.paths.punch(now);
            }
        }
        let (Some(PeerNat::Random(_)), Some(peer)) = (mine, u.peer_nat) else {
            return;
        };
        if !peer.one_mapping_per_address() {
            return;
        }
        let again = u
            .last_birthday
            .is_none_or(|at| now.saturating_duration_since(at) >= BIRTHDAY_AGAIN);
        // The member's own socket first: where the peer's filter lets it
        // through (no NAT, a full cone) the path is up before spares
        // would open, and no spray is needed.
        let tried = u
            .last_punch
            .is_some_and(|at| now.saturating_duration_since(at) >= BIRTHDAY_AFTER);
        if u.birthday.is_some() || u.own.is_some() || !again || !tried {
            return;
        }
        let targets: Vec<SocketAddr> = u
            .paths
            .candidates()
            .iter()
            .filter(|a| crate::birthday::public(a.ip()))
            .take(crate::birthday::MAX_TARGETS)
            .copied()
            .collect();
        if targets.is_empty() {
            return;
        }
        u.last_birthday = Some(now);
        match Birthday::open(targets, &plane.spares, &plane.spare_tx, now) {
            Ok(b) => {
                bump(&plane.stats.birthdays);
                tracing::debug!(targets = ?b.targets(), "vpn spare sockets open: this NAT maps ports at random, the peer's predictably");
                u.birthday = Some(b);
            }
            Err(e) => {
                bump(&plane.stats.birthdays_refused);
                tracing::info!("no many-port punching: {e}");
            }
        }
        self.probe_from_spares(plane, u, now);
    }

    /// Probes the peer from every spare socket, if due.
    fn probe_from_spares(&self, plane: &UdpPlane, u: &mut PeerUdp, now: Instant) {
        let PeerUdp {
            birthday,
            sealer,
            paths,
            ..
        } = u;
        let (Some(b), Some(sealer)) = (birthday.as_mut(), sealer.as_mut()) else {
            return;
        };
        let Some((sockets, targets)) = b.due(now) else {
            return;
        };
        let mut buf = [0u8; HEADER_LEN + 8 + TAG_LEN];
        for socket in sockets {
            for to in targets {
                let id = paths.probe_id(*to, now);
                buf[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&control::probe(id));
                match sealer.seal(Kind::Probe, &mut buf, 8) {
                    Ok(n) => plane.send_on(socket, &buf[..n], None, *to),
                    Err(e) => {
                        tracing::warn!("{e}");
                        return;
                    }
                }
            }
        }
    }

    /// A datagram on a spare socket: an authenticated probe or answer
    /// from the peer means a spray hit this spare's mapping (or the
    /// peer's filter let a spare's probe in), so the spare carries the
    /// peer's path from now on and the other spares close.
    fn spare_datagram(self: &Arc<Self>, plane: &UdpPlane, d: SpareDatagram) {
        let peer = datagram::index_of(&d.bytes)
            .and_then(|i| plane.sessions().get(&i).and_then(Weak::upgrade));
        let Some(peer) = peer else {
            bump(&plane.stats.dropped);
            return;
        };
        let Some(u) = &peer.udp else { return };
        let mut u = lock(u);
        if !u.birthday.as_ref().is_some_and(|b| b.holds(&d.socket)) {
            // The round is over, or another spare won.
            return;
        }
        let mut bytes = d.bytes;
        let (kind, payload) = match u.keys.open(&mut bytes) {
            Ok((kind, _, payload)) => (kind, payload),
            Err(e) => {
                bump(&plane.stats.dropped);
                tracing::trace!(from = %d.from, "spare datagram dropped: {e}");
                return;
            }
        };
        bump(&plane.stats.received);
        let now = Instant::now();
        match kind {
            Kind::Probe => {
                let Some(id) = control::read_probe(payload) else {
                    return;
                };
                self.adopt(plane, &mut u, d.socket);
                u.paths.handle_probe(d.from, id, now);
            }
            Kind::ProbeAck => {
                let Some((id, seen)) = control::read_ack(payload) else {
                    return;
                };
                self.adopt(plane, &mut u, d.socket);
                u.paths.handle_ack(d.from, id, seen, now);
            }
            Kind::Data => return,
        }
        self.flush_udp(plane, &peer, &mut u);
    }

    /// The spare `socket` carries the peer's path from now on; the other
    /// spares close.
    fn adopt(self: &Arc<Self>, plane: &UdpPlane, u: &mut PeerUdp, socket: Arc<Socket>) {
        u.birthday = None;
        bump(&plane.stats.birthday_hits);
        let vpn = self.clone();
        let reading = socket.clone();
        let reader = tokio::spawn(async move {
            let Some(plane) = vpn.plane() else { return };
            if let Err(e) = vpn.read_socket(plane, &reading, &mut Receive::new()).await {
                tracing::debug!("a peer's own UDP socket failed: {e}");
            }
        });
        tracing::debug!(
            port = socket.port,
            "vpn spare socket hit: it carries the peer's path"
        );
        u.own = Some(Own { socket, reader });
    }

    /// The socket `u`'s peer is reached on: its own spare, or the
    /// member's.
    fn socket_for(plane: &UdpPlane, u: &PeerUdp) -> Arc<Socket> {
        u.own
            .as_ref()
            .map_or_else(|| plane.socket(), |o| o.socket.clone())
    }

    pub(crate) fn send_control(peer: &Peer, c: &Control) {
        let mut b = Vec::with_capacity(64);
        c.encode(&mut b);
        if !peer.queue.push(&[&[FrameType::Control.code()], &b]) {
            tracing::debug!(peer = %peer.node, "vpn control message dropped: the stream's queue is full");
        }
    }

    /// Hands the peer this member's UDP keys and addresses over its
    /// stream.
    pub(crate) fn offer_udp(&self, peer: &Arc<Peer>) {
        let (Some(plane), Some(u)) = (self.plane(), &peer.udp) else {
            return;
        };
        let keys = lock(u).keys.current();
        Self::send_control(
            peer,
            &Control::Keys {
                keys,
                cipher: plane.cipher,
            },
        );
        Self::send_control(
            peer,
            &Control::Candidates(self.local_candidates(plane.port())),
        );
        Self::send_control(
            peer,
            &Control::Interfaces(self.interface_addrs(plane.port())),
        );
        if let Some(hint) = plane.echo.lock().unwrap_or_else(|p| p.into_inner()).nat {
            Self::send_control(peer, &Control::Nat(hint));
        }
    }

    /// A control message from `peer`'s stream.
    pub(crate) fn handle_control(&self, peer: &Peer, c: Control) {
        match c {
            Control::Ping(n) => return Self::send_control(peer, &Control::Pong(n)),
            Control::Pong(n) => return peer.pong(n, Instant::now()),
            Control::Hub { node, addr } => return peer.set_hub(node, addr),
            _ => {}
        }
        let (Some(plane), Some(u)) = (self.plane(), &peer.udp) else {
            return;
        };
        let mut u = lock(u);
        match c {
            Control::Keys { keys, cipher } => Sealer::renew(&mut u.sealer, cipher, &keys),
            Control::Candidates(addrs) => {
                u.paths.add_candidates(addrs);
            }
            Control::Interfaces(addrs) => {
                u.peer_interfaces = addrs
                    .iter()
                    .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                    .collect();
                u.paths.add_candidates(addrs);
            }
            Control::Moved(addrs) => {
                // Punched afresh now (the peer does too): not again on
                // the next candidates.
                let now = Instant::now();
                u.moved(now, Some(addrs));
                // What its NAT does to the new socket, and which of its
                // addresses are its own, it tells anew.
                u.peer_nat = None;
                u.peer_interfaces.clear();
            }
            Control::Nat(hint) => u.peer_nat = Some(hint),
            Control::Ping(_) | Control::Pong(_) | Control::Hub { .. } => {}
        }
        let now = Instant::now();
        self.plan_many_port(plane, &mut u, now);
        let due = u
            .last_punch
            .is_none_or(|at| now.saturating_duration_since(at) >= PUNCH_AGAIN);
        if u.sealer.is_some() && !u.paths.candidates().is_empty() && u.active().is_none() && due {
            u.last_punch = Some(now);
            u.paths.punch(now);
        }
        self.flush_udp(plane, peer, &mut u);
    }

    /// Sends what `peer`'s paths want sent and acts on what changed.
    fn flush_udp(&self, plane: &UdpPlane, peer: &Peer, u: &mut PeerUdp) {
        self.flush_udp_via(plane, peer, u, None);
    }

    /// [`Vpn::flush_udp`], sending on `via` if given (else on the
    /// peer's socket).
    fn flush_udp_via(&self, plane: &UdpPlane, peer: &Peer, u: &mut PeerUdp, via: Option<&Socket>) {
        let mut buf = [0u8; HEADER_LEN + 27 + TAG_LEN];
        let owned;
        let socket = match via {
            Some(s) => s,
            None => {
                owned = Self::socket_for(plane, u);
                &owned
            }
        };
        while let Some(t) = u.paths.poll_transmit() {
            let Some(sealer) = u.sealer.as_mut() else {
                continue;
            };
            let (kind, len) = match t.message {
                Message::Probe(id) => {
                    buf[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&control::probe(id));
                    (Kind::Probe, 8)
                }
                Message::Ack { id, seen } => {
                    let mut p = [0u8; 27];
                    let n = control::ack(id, seen, &mut p);
                    buf[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&p[..n]);
                    (Kind::ProbeAck, n)
                }
            };
            match sealer.seal(kind, &mut buf, len) {
                Ok(n) => plane.send_on(socket, &buf[..n], None, t.to),
                Err(e) => tracing::warn!(peer = %peer.node, "{e}"),
            }
        }
        while let Some(ev) = u.paths.poll_event() {
            match ev {
                Event::Up { addr, rtt } => {
                    bump(&plane.stats.paths_up);
                    u.birthday = None;
                    let rtt_us = rtt.as_micros() as u64;
                    if prefers_udp(self.me().udp_first, peer) {
                        let module = self.crossing(plane, u).unwrap_or(Crossing::Punched);
                        tracing::info!(peer = %peer.node, ip = %peer.ipv4, %module, %addr, rtt_us, "vpn peer path moved");
                    } else {
                        tracing::info!(peer = %peer.node, ip = %peer.ipv4, %addr, rtt_us, "vpn peer UDP path up, kept in reserve: the stream is direct");
                    }
                }
                Event::Down { addr } => {
                    bump(&plane.stats.paths_down);
                    tracing::info!(peer = %peer.node, ip = %peer.ipv4, %addr, module = %peer.module(), "vpn peer path moved: UDP path silent, back to the stream");
                }
                Event::SeenAs(addr) => {
                    Self::send_control(peer, &Control::Candidates(vec![addr]));
                }
            }
        }
    }

    /// Sends `frame` (offload header and packet, from the device) to
    /// `peer` over its UDP path, if one is up; false if none is (the
    /// frame is then untouched).
    pub(crate) fn send_udp(&self, peer: &Peer, frame: &mut [u8]) -> bool {
        let (Some(plane), Some(u)) = (self.plane(), &peer.udp) else {
            return false;
        };
        if !prefers_udp(self.me().udp_first, peer) {
            return false;
        }
        let mut u = lock(u);
        let Some(to) = u.active() else {
            return false;
        };
        let Some(sealer) = u.sealer.as_mut() else {
            return false;
        };
        // A session near its last counter leaves packets to the stream
        // (keys are renewed long before: 2^48 datagrams is years at line
        // rate).
        if sealer.sealed() + crate::split::MAX_SEGMENTS as u64 >= datagram::MAX_COUNTER {
            return false;
        }
        let mut split = plane.split.lock().unwrap_or_else(|p| p.into_inner());
        let n = match split.split(frame) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(peer = %peer.node, "segment not sent over UDP: {e}");
                bump(&self.stats.dropped_bad);
                return true;
            }
        };
        let (mut bytes, mut total) = (0u64, 0usize);
        for i in 0..n {
            let (slot, len) = split.packet(i);
            slot[HEADER_LEN..HEADER_LEN + vnet::LEN].copy_from_slice(&vnet::PLAIN);
            match sealer.seal(Kind::Data, slot, vnet::LEN + len) {
                Ok(sealed) => total = i * split.stride() + sealed,
                Err(e) => {
                    tracing::warn!(peer = %peer.node, "{e}");
                    return true;
                }
            }
            bytes += len as u64;
        }
        // Every datagram but the last fills its slot: one GSO send per
        // batch the kernel takes.
        let stride = split.stride();
        // A GSO send is one UDP payload of at most 64 KiB to the kernel.
        let socket = Self::socket_for(plane, &u);
        let per_send = socket
            .state
            .max_gso_segments()
            .min(GSO_BYTES / stride.max(1))
            .max(1);
        let all = split.slots(total);
        if n == 1 || per_send == 1 {
            for d in all.chunks(stride) {
                plane.send_on(&socket, d, None, to);
            }
        } else {
            for batch in all.chunks(stride * per_send) {
                plane.send_on(&socket, batch, Some(stride), to);
            }
        }
        u.paths.sent(Instant::now());
        peer.packets_out.fetch_add(n as u64, Ordering::Relaxed);
        peer.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        self.stats
            .packets_out
            .fetch_add(n as u64, Ordering::Relaxed);
        self.stats.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        true
    }

    /// Receives datagrams until the socket fails (forever without one):
    /// several at a time (recvmmsg, and GRO's runs of equal datagrams),
    /// and the packets they carry go to the device together, coalesced
    /// back into segments where they allow (the device's GRO).
    pub(crate) async fn read_udp(self: &Arc<Self>) -> io::Result<()> {
        let Some(plane) = self.plane() else {
            return std::future::pending().await;
        };
        let mut moved = plane.moved.subscribe();
        let mut rx = Receive::new();
        loop {
            let socket = plane.socket();
            tokio::select! {
                r = self.read_socket(plane, &socket, &mut rx) => return r,
                // A rebind: receive on the new socket (the old one closes
                // when the last sender lets it go).
                r = moved.changed() => {
                    if r.is_err() {
                        return std::future::pending().await;
                    }
                }
            }
        }
    }

    /// [`Vpn::read_udp`] on one socket, until it fails.
    async fn read_socket(
        self: &Arc<Self>,
        plane: &UdpPlane,
        socket: &Socket,
        rx: &mut Receive,
    ) -> io::Result<()> {
        let Receive {
            bufs,
            metas,
            out,
            gro,
        } = rx;
        loop {
            socket.io.readable().await?;
            let got = socket.io.try_io(tokio::io::Interest::READABLE, || {
                // On the stack: nothing allocated per receive.
                let mut iovs = bufs.each_mut().map(|b| std::io::IoSliceMut::new(b));
                socket.state.recv((&socket.io).into(), &mut iovs, metas)
            });
            let msgs = match got {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // An ICMP error for an earlier send (a candidate with no
                // listener, no route): about that destination, not this
                // socket, which carries on.
                Err(e) if transient(&e) => {
                    tracing::debug!("UDP receive: {e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut ready = 0;
            for (buf, meta) in bufs.iter_mut().zip(metas.iter()).take(msgs) {
                let from = SocketAddr::new(meta.addr.ip().to_canonical(), meta.addr.port());
                let stride = if meta.stride == 0 {
                    meta.len
                } else {
                    meta.stride
                };
                for d in buf[..meta.len].chunks_mut(stride.max(1)) {
                    let Some(slot) = out.get_mut(ready) else {
                        break;
                    };
                    if self.take_datagram(plane, socket, from, d, slot) {
                        ready += 1;
                    }
                    if ready == out.len() {
                        self.write_batch(gro, out, ready).await?;
                        ready = 0;
                    }
                }
            }
            if ready > 0 {
                self.write_batch(gro, out, ready).await?;
            }
        }
    }

    /// Writes the first `n` packets of `out` (each after an offload
    /// header's room) to the device, coalesced where they allow.
    async fn write_batch(
        &self,
        gro: &mut tun_rs::GROTable,
        out: &mut [Vec<u8>],
        n: usize,
    ) -> io::Result<()> {
        if let Err(e) = self
            .device()
            .send_multiple(gro, &mut out[..n], tun_rs::VIRTIO_NET_HDR_LEN)
            .await
        {
            // One bad packet fails the batch's write: count, and go on.
            tracing::debug!("vpn device write failed: {e}");
            bump(&self.stats.dropped_bad);
        }
        Ok(())
    }

    /// Opens one datagram from `from`: a packet for the device goes into
    /// `slot` (after an offload header's room) and true is returned;
    /// probes, answers and echo answers are handled here.
    fn take_datagram(
        &self,
        plane: &UdpPlane,
        socket: &Socket,
        from: SocketAddr,
        d: &mut [u8],
        slot: &mut Vec<u8>,
    ) -> bool {
        if d.first() == Some(&b'r') {
            self.echo_answer(plane, socket, from, d);
            return false;
        }
        let peer =
            datagram::index_of(d).and_then(|i| plane.sessions().get(&i).and_then(Weak::upgrade));
        let Some(peer) = peer else {
            bump(&plane.stats.dropped);
            return false;
        };
        let Some(u) = &peer.udp else {
            return false;
        };
        let mut u = lock(u);
        let (kind, payload) = match u.keys.open(d) {
            Ok((kind, _, payload)) => (kind, payload),
            Err(e) => {
                bump(&plane.stats.dropped);
                tracing::trace!(%from, "datagram dropped: {e}");
                return false;
            }
        };
        bump(&plane.stats.received);
        let now = Instant::now();
        match kind {
            Kind::Data => {
                u.paths.heard(from, now);
                drop(u);
                let Some(pkt) = self.admit(&peer, payload) else {
                    return false;
                };
                slot.clear();
                slot.resize(tun_rs::VIRTIO_NET_HDR_LEN, 0);
                slot.extend_from_slice(pkt);
                self.count_in(&peer, 1, pkt.len() as u64);
                true
            }
            Kind::Probe => {
                if let Some(id) = control::read_probe(payload) {
                    u.paths.handle_probe(from, id, now);
                }
                // The answer leaves by the socket the probe reached: the
                // peer checks that answers come from where it probed.
                self.flush_udp_via(plane, &peer, &mut u, Some(socket));
                false
            }
            Kind::ProbeAck => {
                if let Some((id, seen)) = control::read_ack(payload) {
                    u.paths.handle_ack(from, id, seen, now);
                }
                self.flush_udp(plane, &peer, &mut u);
                false
            }
        }
    }

    /// Moves the UDP paths to a fresh socket, as after the host changed
    /// networks (or to measure punching afresh): `port` 0 binds a new
    /// ephemeral port; the port the member has now keeps its socket.
    /// The hub's echoes are asked again, every peer is told where the
    /// socket is now ([`Control::Moved`]), and both sides punch anew.
    /// Returns the port.
    pub fn rebind_udp(&self, port: u16) -> io::Result<u16> {
        let plane = self
            .plane()
            .ok_or_else(|| io::Error::other("this member has no UDP socket (--no-udp)"))?;
        if port == 0 || port != plane.port() {
            let fresh = Arc::new(Socket::new(bind(port)?)?);
            *plane.socket.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
            plane.moved.send_modify(|g| *g += 1);
        }
        *plane.echo.lock().unwrap_or_else(|p| p.into_inner()) = Echo::default();
        bump(&plane.stats.rebinds);
        let port = plane.port();
        let now = Instant::now();
        self.ask_echoes(plane, now);
        let moved = Control::Moved(self.local_candidates(port));
        let interfaces = Control::Interfaces(self.interface_addrs(port));
        for peer in self.peers() {
            let Some(u) = &peer.udp else { continue };
            {
                let mut u = lock(u);
                u.moved(now, None);
                self.flush_udp(plane, &peer, &mut u);
            }
            Self::send_control(&peer, &moved);
            Self::send_control(&peer, &interfaces);
        }
        tracing::info!(port, "vpn UDP socket moved: peers told, punching afresh");
        Ok(port)
    }

    /// Renews the keys `peer` seals to this member with: the new index
    /// opens at once, the previous keys until the next renewal, and the
    /// peer hears of them over its stream.
    fn rekey(&self, plane: &UdpPlane, peer: &Arc<Peer>, u: &mut PeerUdp, now: Instant) {
        let keys = {
            let mut sessions = plane.sessions();
            let keys = fresh_keys(&sessions);
            if let Some(retired) = u.keys.rekey(keys, now) {
                sessions.remove(&retired);
            }
            sessions.insert(keys.index, Arc::downgrade(peer));
            keys
        };
        bump(&plane.stats.rekeys);
        Self::send_control(
            peer,
            &Control::Keys {
                keys,
                cipher: plane.cipher,
            },
        );
    }

    /// Runs every peer's path timers (forever; idle without a socket).
    pub(crate) async fn tick_udp(self: &Arc<Self>) {
        let Some(plane) = self.plane() else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let Some(mut spare) = plane
            .spare_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            tracing::error!("the vpn's UDP timers run twice");
            return std::future::pending().await;
        };
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(d) = spare.recv() => {
                    self.spare_datagram(plane, d);
                    continue;
                }
            }
            let now = Instant::now();
            self.ask_echoes(plane, now);
            for peer in self.peers() {
                let Some(u) = &peer.udp else { continue };
                let mut u = lock(u);
                if u.birthday.as_ref().is_some_and(|b| b.over(now)) {
                    u.birthday = None;
                }
                if u.sealer.is_some() && u.keys.due(now) {
                    self.rekey(plane, &peer, &mut u, now);
                }
                self.plan_many_port(plane, &mut u, now);
                self.probe_from_spares(plane, &mut u, now);
                if now >= u.paths.poll_timeout() {
                    u.paths.handle_timeout(now);
                    self.flush_udp(plane, &peer, &mut u);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::nat::Observation;

    fn at(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn seen(local: u16, server: &str, mapped: u16) -> Observation {
        Observation {
            local: at(&format!("10.0.0.2:{local}")),
            server: at(server),
            mapped: at(&format!("203.0.113.9:{mapped}")),
        }
    }

    #[test]
    fn echo_answers_are_read_in_the_order_the_requests_went_out() {
        let echoes = [at("192.0.2.1:7701"), at("192.0.2.1:7702")];
        // A sequential NAT mapped the first request to 20000 and the
        // second to 20001; the second answer came back first.
        let mut e = Echo::default();
        e.observe(seen(5000, "192.0.2.1:7702", 20_001), &echoes, 5000);
        e.observe(seen(5000, "192.0.2.1:7701", 20_000), &echoes, 5000);
        assert_eq!(
            e.nat,
            Some(PeerNat::Sequential {
                ip: "203.0.113.9".parse().expect("ip"),
                after: 20_001,
                step: 1
            })
        );
    }

    #[test]
    fn one_echo_address_may_hide_a_mapping_per_address() {
        let one = [at("192.0.2.1:7701"), at("192.0.2.1:7702")];
        let mut e = Echo::default();
        for server in one {
            e.observe(seen(5000, &server.to_string(), 5000), &one, 5000);
        }
        let ip = "203.0.113.9".parse().expect("ip");
        assert_eq!(e.nat, Some(PeerNat::PerAddress { ip, after: 5000 }));
        // Echoes on two addresses tell: the same mapping is predictable.
        let two = [at("192.0.2.1:7701"), at("198.51.100.1:7701")];
        let mut e = Echo::default();
        for server in two {
            e.observe(seen(5000, &server.to_string(), 5000), &two, 5000);
        }
        assert_eq!(e.nat, Some(PeerNat::Predictable));
    }
}
