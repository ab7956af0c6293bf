//! The byte stream an application gets from `connect` or `accept`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use reach_proto::{NodeId, StreamMode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::secure::SecureStream;

/// How a stream was set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SetupModule {
    /// A TCP connection to one of the target's advertised addresses.
    Direct,
}

impl std::fmt::Display for SetupModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SetupModule::Direct => "direct",
        })
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
    /// Local socket address of the underlying connection.
    pub local_addr: SocketAddr,
    /// Remote socket address of the underlying connection.
    pub remote_addr: SocketAddr,
    /// Time from the start of `connect` (or from the TCP accept) until the
    /// handshake finished.
    pub setup_time: Duration,
}

enum Transport {
    Plain(TcpStream),
    // Boxed: the AEAD key schedules make it over a kilobyte.
    Secure(Box<SecureStream<TcpStream>>),
}

/// An authenticated byte stream to another node: tokio `AsyncRead + AsyncWrite`.
///
/// Shutting down the write side (`AsyncWriteExt::shutdown`) ends this direction
/// cleanly: the peer reads end of file while it can still send.
pub struct ReachStream {
    transport: Transport,
    info: StreamInfo,
}

impl std::fmt::Debug for ReachStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReachStream")
            .field("info", &self.info)
            .finish()
    }
}

impl ReachStream {
    pub(crate) fn plain(tcp: TcpStream, info: StreamInfo) -> Self {
        Self {
            transport: Transport::Plain(tcp),
            info,
        }
    }

    pub(crate) fn secure(s: SecureStream<TcpStream>, info: StreamInfo) -> Self {
        Self {
            transport: Transport::Secure(Box::new(s)),
            info,
        }
    }

    /// How this stream was made and whom it reaches.
    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    /// The authenticated peer.
    pub fn peer(&self) -> NodeId {
        self.info.peer
    }
}

impl AsyncRead for ReachStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.transport {
            Transport::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Transport::Secure(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ReachStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.transport {
            Transport::Plain(t) => Pin::new(t).poll_write(cx, buf),
            Transport::Secure(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.transport {
            Transport::Plain(t) => Pin::new(t).poll_flush(cx),
            Transport::Secure(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.transport {
            Transport::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Transport::Secure(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
