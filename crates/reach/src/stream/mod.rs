//! The byte stream an application gets from `connect` or `accept`.
//!
//! ```text
//!  app <--AsyncRead/AsyncWrite--> ReachStream --> SecureStream (records) --> TCP
//!                                             \-> PlainStream (chunks, end mark) --> TCP
//!                                             \-> RoutedStream (hub link frames)
//!                                             \-> upgrade: routed now, moved onto
//!                                                 a direct connection mid-stream
//! ```
//! A [`ReachStream`] wraps whichever transport the setup driver made and
//! reports how ([`StreamInfo`]); [`upgrade`] is the in-place handover that
//! lets a routed stream move onto a better path while the application reads
//! and writes (the setup driver's background upgrade decides when).
//!
//! # Liveness
//! A peer that vanishes (its host gone, every packet dropped) is noticed
//! within [`LIVENESS`] on every kind of stream. Over TCP (direct, reverse,
//! spliced) the kernel does it: keepalive probes after 10 s of silence,
//! every 5 s, 4 unanswered end the connection, and `TCP_USER_TIMEOUT` ends
//! one whose sent data stays unacknowledged for as long; both need no
//! protocol messages and cost nothing while data flows. A routed stream
//! ends with its hub link, which pings every 15 s and is dead after 45 s of
//! silence. Either way the application's next read or write fails with an
//! error, never a clean end of file.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use reach_proto::handshake::Established;
use reach_proto::setup_plan::SetupModule;
use reach_proto::{NodeId, StreamMode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub(crate) mod track;
pub(crate) mod upgrade;

use crate::plain::PlainStream;
use crate::routed::RoutedStream;
use crate::secure::SecureStream;
use upgrade::{Handover, NewPath, Registration, Slot, Upgraded};

/// How long a vanished peer can go unnoticed on a TCP stream.
pub const LIVENESS: Duration = Duration::from_secs(30);

/// Sets the kernel's liveness checks on a stream's TCP connection (see the
/// module docs). Best effort: a platform without them keeps the defaults.
fn watch_liveness(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(4);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!("cannot set TCP keepalive: {e}");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(LIVENESS)) {
        tracing::debug!("cannot set TCP_USER_TIMEOUT: {e}");
    }
}

/// Which side opened the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// This endpoint connected.
    Outbound,
    /// This endpoint accepted.
    Inbound,
}

/// What a stream knows about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamInfo {
    /// The authenticated peer.
    pub peer: NodeId,
    /// The virtual port the stream was opened to.
    pub virtual_port: u16,
    /// Which module made the stream.
    pub module: SetupModule,
    /// Encrypted (with which cipher) or plaintext.
    pub mode: StreamMode,
    /// Who opened it.
    pub direction: Direction,
    /// Local socket address of the underlying connection (for a routed
    /// stream: of the hub link).
    pub local_addr: SocketAddr,
    /// Remote socket address of the underlying connection (for a routed
    /// stream: the hub's).
    pub remote_addr: SocketAddr,
    /// Time from the start of `connect` (or from the TCP accept) until the
    /// handshake finished.
    pub setup_time: Duration,
    /// Modules the setup driver tried, and that failed, before `module`
    /// worked (skipped ones are not listed). Empty when the first try worked,
    /// for instance the cached module.
    pub failed_before: Vec<SetupModule>,
    /// The peer proved it holds this node's network secret.
    pub peer_member: bool,
    /// The handshake resumed an earlier session between the two nodes (one
    /// Diffie-Hellman per side; `reach_proto::resume`).
    pub resumed: bool,
}

/// `a` with an IPv4-mapped IPv6 address (what a dual-stack socket reports
/// for an IPv4 peer) written as plain IPv4, so addresses compare and print
/// the same whichever socket saw them.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

enum Transport {
    Plain(Box<PlainStream>),
    // Boxed: the AEAD key schedules make it over a kilobyte.
    Secure(Box<SecureStream<TcpStream>>),
    Routed(RoutedStream),
    RoutedSecure(Box<SecureStream<RoutedStream>>),
    /// Routed, and able to move onto a direct connection.
    Upgradable(Box<Handover>),
}

/// Runs `$e` on whichever transport `$t` holds, pinned as `$io`.
macro_rules! on_transport {
    ($t:expr, $io:ident => $e:expr) => {
        match $t {
            Transport::Plain(t) => {
                let $io = Pin::new(&mut **t);
                $e
            }
            Transport::Secure(t) => {
                let $io = Pin::new(&mut **t);
                $e
            }
            Transport::Routed(t) => {
                let $io = Pin::new(t);
                $e
            }
            Transport::RoutedSecure(t) => {
                let $io = Pin::new(&mut **t);
                $e
            }
            Transport::Upgradable(t) => {
                let $io = Pin::new(&mut **t);
                $e
            }
        }
    };
}

/// An authenticated byte stream to another node: tokio `AsyncRead + AsyncWrite`.
///
/// Shutting down the write side (`AsyncWriteExt::shutdown`) ends this direction
/// cleanly: the peer reads end of file while it can still send.
pub struct ReachStream {
    /// Its entry in the endpoint's stream table, once handed out. First, so
    /// it is dropped (and lets go of the socket) before the transport.
    track: Option<track::Track>,
    transport: Transport,
    info: StreamInfo,
    /// For an encrypted routed stream: the id under which it can move.
    upgrade_id: Option<u16>,
}

impl std::fmt::Debug for ReachStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReachStream")
            .field("info", &self.info)
            .finish()
    }
}

impl ReachStream {
    /// A stream over a TCP connection whose handshake finished as `est`.
    pub(crate) fn over_tcp(
        tcp: TcpStream,
        est: Established,
        module: SetupModule,
        direction: Direction,
        started: Instant,
    ) -> io::Result<Self> {
        watch_liveness(&tcp);
        let info = StreamInfo {
            peer: est.peer,
            virtual_port: est.port,
            module,
            mode: est.mode,
            direction,
            local_addr: canonical(tcp.local_addr()?),
            remote_addr: canonical(tcp.peer_addr()?),
            setup_time: started.elapsed(),
            failed_before: Vec::new(),
            peer_member: est.peer_member,
            resumed: est.resumed,
        };
        let transport = match (est.mode, est.keys, est.end_keys) {
            (StreamMode::Encrypted(_), Some(keys), _) => {
                Transport::Secure(Box::new(SecureStream::new(tcp, &keys)))
            }
            (StreamMode::Plaintext, _, Some(end)) => {
                Transport::Plain(Box::new(PlainStream::new(tcp, end)))
            }
            (mode, ..) => {
                return Err(io::Error::other(format!(
                    "the handshake gave no keys for a {mode:?} stream"
                )))
            }
        };
        Ok(Self {
            track: None,
            transport,
            info,
            upgrade_id: None,
        })
    }

    /// A routed stream whose handshake finished as `est`; `link` holds the hub
    /// link's local and remote addresses.
    pub(crate) fn over_routed(
        routed: RoutedStream,
        est: Established,
        link: (SocketAddr, SocketAddr),
        direction: Direction,
        started: Instant,
    ) -> Self {
        let info = StreamInfo {
            peer: est.peer,
            virtual_port: est.port,
            module: SetupModule::Routed,
            mode: est.mode,
            direction,
            local_addr: link.0,
            remote_addr: link.1,
            setup_time: started.elapsed(),
            failed_before: Vec::new(),
            peer_member: est.peer_member,
            resumed: est.resumed,
        };
        let upgrade_id = est.keys.is_some().then(|| est.upgrade_id());
        let transport = match (est.mode, est.keys) {
            (StreamMode::Encrypted(_), Some(keys)) => {
                Transport::RoutedSecure(Box::new(SecureStream::new(routed, &keys)))
            }
            _ => Transport::Routed(routed),
        };
        Self {
            track: None,
            transport,
            info,
            upgrade_id,
        }
    }

    /// Changes what the stream reports about itself (a reverse stream carries
    /// the request's token on the wire, not the virtual port).
    /// The peer's key confirmation comes before its first record (see
    /// `SecureStream::expect_confirmation`); only encrypted TCP streams are
    /// handed out before it.
    pub(crate) fn expect_confirmation(
        &mut self,
        confirmation: [u8; reach_proto::handshake::CONFIRM_LEN],
    ) {
        if let Transport::Secure(s) = &mut self.transport {
            s.expect_confirmation(confirmation);
        }
    }

    pub(crate) fn info_mut(&mut self) -> &mut StreamInfo {
        &mut self.info
    }

    /// How this stream was made and whom it reaches.
    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    /// The authenticated peer.
    pub fn peer(&self) -> NodeId {
        self.info.peer
    }

    /// Where a routed stream moved to mid-stream (see [`SetupModule`]s after
    /// `Routed` in the endpoint's module order), once it has; [`info`]
    /// keeps describing how the stream was set up.
    ///
    /// [`info`]: Self::info
    pub fn upgraded(&self) -> Option<Upgraded> {
        match &self.transport {
            Transport::Upgradable(h) => h.upgraded(),
            _ => None,
        }
    }

    /// Waits until a background upgrade of this stream (see [`upgraded`])
    /// has either moved it or given up; returns where it moved. Returns at
    /// once for a stream with no upgrade under way.
    ///
    /// [`upgraded`]: Self::upgraded
    pub async fn upgrade_settled(&self) -> Option<Upgraded> {
        self.wait_upgrade(Handover::settled).await
    }

    /// Waits until a background upgrade has moved the stream onto a
    /// connection of a setup module (Direct, Reverse, Splice) or tried them
    /// all; a relay circuit may still come after. What the endpoint's module
    /// cache learns is known then. Returns where the stream moved, if it did.
    pub async fn upgrade_learned(&self) -> Option<Upgraded> {
        self.wait_upgrade(Handover::learned).await
    }

    /// Waits until the upgrade's flag `which` is up (at once for a stream
    /// with no upgrade); where the stream moved, if it did.
    async fn wait_upgrade(
        &self,
        which: fn(&Handover) -> tokio::sync::watch::Receiver<bool>,
    ) -> Option<Upgraded> {
        if let Transport::Upgradable(h) = &self.transport {
            let _ = which(h).wait_for(|up| *up).await;
        }
        self.upgraded()
    }

    /// Lets an encrypted routed stream move onto a new connection that
    /// `slot` will receive; other streams are returned as they are.
    pub(crate) fn into_upgradable(self, slot: Slot, registration: Option<Registration>) -> Self {
        let ReachStream {
            track,
            transport,
            info,
            upgrade_id,
        } = self;
        let transport = match transport {
            Transport::RoutedSecure(old) => {
                Transport::Upgradable(Box::new(Handover::new(*old, slot, registration)))
            }
            other => other,
        };
        ReachStream {
            track,
            transport,
            info,
            upgrade_id,
        }
    }

    /// Enters this stream in `table` as it is handed out, with the hubs
    /// it crosses (`via`).
    pub(crate) fn track_in(&mut self, table: &track::StreamTable, via: Vec<SocketAddr>) {
        use std::os::fd::AsRawFd;
        let (tcp, moved) = match &self.transport {
            Transport::Plain(t) => (Some(t.tcp().as_raw_fd()), None),
            Transport::Secure(t) => (Some(t.get_ref().as_raw_fd()), None),
            Transport::Routed(_) | Transport::RoutedSecure(_) => (None, None),
            Transport::Upgradable(h) => (None, Some(h.moved_cell())),
        };
        self.track = Some(table.track(self.info.clone(), tcp, moved, via));
    }

    /// The id under which an encrypted routed stream can move to another
    /// connection (both ends derive it from the handshake).
    pub(crate) fn upgrade_id(&self) -> Option<u16> {
        self.upgrade_id
    }

    /// The bare TCP connection of a plaintext direct stream, whose handshake
    /// read nothing past its own bytes and that nothing was read from or
    /// written to since (a relay circuit's connection: the hub hands it to
    /// the kernel, the nodes carry another stream's records on it); `None`
    /// for any other stream.
    pub fn into_plain_tcp(self) -> Option<TcpStream> {
        match self.transport {
            Transport::Plain(plain) => Some(plain.into_tcp()),
            _ => None,
        }
    }

    /// The encrypted TCP connection of a direct stream, to carry another
    /// stream's data from now on.
    pub(crate) fn into_new_path(self) -> Option<NewPath> {
        match self.transport {
            Transport::Secure(io) => Some(NewPath {
                io: *io,
                module: self.info.module,
                local: self.info.local_addr,
                remote: self.info.remote_addr,
                at: Instant::now(),
            }),
            _ => None,
        }
    }
}

impl AsyncRead for ReachStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = on_transport!(&mut this.transport, io => io.poll_read(cx, buf));
        if let (Some(t), Poll::Ready(Ok(()))) = (&this.track, &polled) {
            t.read(buf.filled().len() - before);
        }
        polled
    }
}

impl AsyncWrite for ReachStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = on_transport!(&mut this.transport, io => io.poll_write(cx, buf));
        if let (Some(t), Poll::Ready(Ok(n))) = (&this.track, &polled) {
            t.wrote(*n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_transport!(&mut self.transport, io => io.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_transport!(&mut self.transport, io => io.poll_shutdown(cx))
    }
}
