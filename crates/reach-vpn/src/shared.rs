//! A reach stream shared by its reader and writer tasks, like
//! `tokio::io::split`, except that either half can also ask where the
//! stream moved (a routed stream upgrading to a direct path while packets
//! flow), which the vpn reports as the peer's path.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use reach::{ReachStream, Upgraded};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One handle on a shared stream; reads and writes go to the stream.
pub struct Shared(Arc<Mutex<ReachStream>>);

impl Shared {
    /// Two handles on `stream`: one to read, one to write.
    pub fn split(stream: ReachStream) -> (Shared, Shared) {
        let s = Arc::new(Mutex::new(stream));
        (Shared(s.clone()), Shared(s))
    }

    fn lock(&self) -> MutexGuard<'_, ReachStream> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the stream moved mid-stream, once it has.
    pub fn upgraded(&self) -> Option<Upgraded> {
        self.lock().upgraded()
    }
}

impl AsyncRead for Shared {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Shared {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}
