//! The transport of a stream that can move: the routed path until the new
//! connection is attached, each direction switching at its `Moved` record.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{Registration, Slot, Upgraded};
use crate::routed::RoutedStream;
use crate::secure::SecureStream;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Writing {
    Routed,
    /// The `Moved` record is sealed and going out on the routed path.
    Moving,
    New,
}

/// A routed stream that can move onto a new connection.
pub(crate) struct Handover {
    old: SecureStream<RoutedStream>,
    new: Option<SecureStream<TcpStream>>,
    slot: Slot,
    reading_new: bool,
    writing: Writing,
    sent_routed: u64,
    upgraded: Option<Upgraded>,
    _registration: Option<Registration>,
}

impl Drop for Handover {
    fn drop(&mut self) {
        // A move that completes after this (a first connection's background
        // upgrade) must not leave its connection in the slot.
        self.slot.end();
    }
}

impl Handover {
    pub(crate) fn new(
        old: SecureStream<RoutedStream>,
        slot: Slot,
        registration: Option<Registration>,
    ) -> Self {
        Self {
            old,
            new: None,
            slot,
            reading_new: false,
            writing: Writing::Routed,
            sent_routed: 0,
            upgraded: None,
            _registration: registration,
        }
    }

    /// Waits until no upgrade is under way any more.
    pub(crate) fn learned(&self) -> watch::Receiver<bool> {
        self.slot.learned.subscribe()
    }

    pub(crate) fn settled(&self) -> watch::Receiver<bool> {
        self.slot.settled.subscribe()
    }

    /// Where the move leaves its new connection, for the stream table.
    pub(crate) fn moved_cell(&self) -> super::MovedCell {
        self.slot.moved_cell()
    }

    /// Where the stream moved, once it has (or is about to: the new
    /// connection is attached at the next read or write).
    pub(crate) fn upgraded(&self) -> Option<Upgraded> {
        if let Some(u) = &self.upgraded {
            return Some(u.clone());
        }
        self.slot.lock().ready.as_ref().map(|p| Upgraded {
            module: p.module,
            local_addr: p.local,
            remote_addr: p.remote,
            at: p.at,
            sent_routed: None,
        })
    }

    fn try_attach(&mut self) {
        if self.new.is_some() {
            return;
        }
        if let Some(p) = self.slot.lock().ready.take() {
            tracing::debug!(module = %p.module, remote = %p.remote, "stream moving to a new connection");
            self.upgraded = Some(Upgraded {
                module: p.module,
                local_addr: p.local,
                remote_addr: p.remote,
                at: p.at,
                sent_routed: None,
            });
            self.new = Some(p.io);
        }
    }

    /// Moves the write direction if a new connection is attached and this
    /// direction is still open on the routed path.
    fn poll_switch_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.try_attach();
        if self.writing == Writing::Routed && self.new.is_some() && !self.old.write_closed() {
            self.writing = Writing::Moving;
        }
        if self.writing == Writing::Moving {
            ready!(self.old.poll_move(cx))?;
            self.writing = Writing::New;
            if let Some(u) = &mut self.upgraded {
                u.sent_routed = Some(self.sent_routed);
            }
        }
        Poll::Ready(Ok(()))
    }

    fn new_path(&mut self) -> io::Result<&mut SecureStream<TcpStream>> {
        self.new
            .as_mut()
            .ok_or_else(|| io::Error::other("upgraded stream lost its new connection"))
    }
}

impl AsyncRead for Handover {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            this.try_attach();
            if this.reading_new {
                return Pin::new(this.new_path()?).poll_read(cx, buf);
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.old).poll_read(cx, buf))?;
            if buf.filled().len() > before || !this.old.moved() {
                return Poll::Ready(Ok(()));
            }
            // The peer moved this direction: the rest comes on the new
            // connection, once this side has it.
            if this.new.is_some() {
                this.reading_new = true;
                continue;
            }
            let mut s = this.slot.lock();
            if s.ready.is_some() {
                continue;
            }
            if s.pending {
                s.read_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let why = s.failed.clone().unwrap_or_else(|| "none was made".into());
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the peer moved the stream to a new connection, but here it failed: {why}"),
            )));
        }
    }
}

impl AsyncWrite for Handover {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_switch_write(cx))?;
        match this.writing {
            Writing::New | Writing::Moving => Pin::new(this.new_path()?).poll_write(cx, buf),
            Writing::Routed => {
                let n = ready!(Pin::new(&mut this.old).poll_write(cx, buf))?;
                this.sent_routed += n as u64;
                Poll::Ready(Ok(n))
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.writing {
            Writing::New => Pin::new(this.new_path()?).poll_flush(cx),
            Writing::Moving => {
                ready!(this.poll_switch_write(cx))?;
                Pin::new(this.new_path()?).poll_flush(cx)
            }
            Writing::Routed => Pin::new(&mut this.old).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_switch_write(cx))?;
        match this.writing {
            Writing::New | Writing::Moving => Pin::new(this.new_path()?).poll_shutdown(cx),
            Writing::Routed => Pin::new(&mut this.old).poll_shutdown(cx),
        }
    }
}
