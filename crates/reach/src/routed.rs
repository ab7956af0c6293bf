//! One routed stream: a byte stream multiplexed over the node's hub link.
//!
//! The link's reader task delivers frames into the stream's shared state
//! ([`StreamShared`]); the application reads and writes through
//! [`RoutedStream`]. Flow control is the credit scheme of
//! `reach_proto::link`: a write waits for credit, a read grants credit back as
//! the application consumes, so at most one window of this stream is buffered
//! anywhere on the path. The end-to-end handshake and records run on top, so
//! what crosses the hubs is ciphertext.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use reach_proto::link::{
    encode_credit, encode_fin, encode_reset, Credit, FlowViolation, Grant, ResetCode, Window,
    MAX_DATA_CHUNK,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::link::FrameTx;

/// The routed streams open on one link, by stream id.
pub(crate) type StreamMap = Mutex<HashMap<u32, Arc<StreamShared>>>;

/// Locks a link's stream table (a panic elsewhere leaves it usable).
pub(crate) fn lock_map(
    m: &StreamMap,
) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<StreamShared>>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Inner {
    recv: VecDeque<u8>,
    window: Window,
    fin_in: bool,
    reset: Option<(ResetCode, String)>,
    read_waker: Option<Waker>,
    credit: Credit,
    write_waker: Option<Waker>,
}

impl Inner {
    fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

/// The state a link's reader shares with one stream.
#[derive(Default)]
pub(crate) struct StreamShared {
    inner: Mutex<Inner>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding this lock leaves only byte counters behind;
    // carrying on is better than poisoning every later stream operation.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StreamShared {
    /// Bytes arrived for the application.
    pub(crate) fn on_data(&self, data: &[u8]) -> Result<(), FlowViolation> {
        let mut s = lock(&self.inner);
        s.window.on_data(data.len())?;
        s.recv.extend(data);
        if let Some(w) = s.read_waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// The peer granted more credit.
    pub(crate) fn on_credit(&self, n: u32) {
        let mut s = lock(&self.inner);
        s.credit.add(n);
        if let Some(w) = s.write_waker.take() {
            w.wake();
        }
    }

    /// The peer finished its direction.
    pub(crate) fn on_fin(&self) {
        let mut s = lock(&self.inner);
        s.fin_in = true;
        if let Some(w) = s.read_waker.take() {
            w.wake();
        }
    }

    /// The stream is gone (peer reset, hub reset, or the link went down).
    pub(crate) fn on_reset(&self, code: ResetCode, reason: String) {
        let mut s = lock(&self.inner);
        if s.reset.is_none() {
            s.reset = Some((code, reason));
        }
        s.wake_all();
    }
}

/// The application's side of a routed stream.
pub struct RoutedStream {
    id: u32,
    shared: Arc<StreamShared>,
    streams: Arc<StreamMap>,
    tx: FrameTx,
    grant: Grant,
    fin_sent: bool,
    /// After Fin: resolves once the link's writer has written it.
    flushing: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    /// While the link's queue is long: resolves once it has room.
    room: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for RoutedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RoutedStream({})", self.id)
    }
}

fn reset_error(code: ResetCode, reason: &str) -> io::Error {
    let kind = match code {
        ResetCode::Cancelled => io::ErrorKind::ConnectionReset,
        ResetCode::NoRoute => io::ErrorKind::HostUnreachable,
        ResetCode::Refused => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::ConnectionAborted,
    };
    if reason.is_empty() {
        io::Error::new(kind, format!("routed stream reset: {code}"))
    } else {
        io::Error::new(kind, format!("routed stream reset: {code}: {reason}"))
    }
}

impl RoutedStream {
    /// Registers a stream with id `id` on a link; frames for it go to the
    /// returned stream from now on.
    pub(crate) fn register(id: u32, streams: Arc<StreamMap>, tx: FrameTx) -> Self {
        let shared = Arc::new(StreamShared::default());
        streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, shared.clone());
        Self {
            id,
            shared,
            streams,
            tx,
            grant: Grant::default(),
            fin_sent: false,
            flushing: None,
            room: None,
        }
    }

    fn send(&self, frame: Vec<u8>) -> io::Result<()> {
        self.tx.send(frame).map_err(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "routed stream lost: the hub link is down",
            )
        })
    }
}

/// Bytes by which this process's routed streams have grown their receive
/// windows beyond [`reach_proto::link::STREAM_WINDOW`], and the most they may:
/// memory for fast streams over long paths, bounded for the whole process.
static GROWN: AtomicU64 = AtomicU64::new(0);
const GROWTH_BUDGET: u64 = 256 * 1024 * 1024;

impl Drop for RoutedStream {
    fn drop(&mut self) {
        let grown = u64::from(self.grant.window() - reach_proto::link::STREAM_WINDOW);
        let _ = GROWN.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| {
            Some(g.saturating_sub(grown))
        });
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        let s = lock(&self.shared.inner);
        if s.reset.is_none() && !(s.fin_in && self.fin_sent) {
            let mut f = Vec::new();
            encode_reset(self.id, ResetCode::Cancelled, "stream dropped", &mut f);
            let _ = self.tx.send(f);
        }
    }
}

impl AsyncRead for RoutedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut s = lock(&this.shared.inner);
        if !s.recv.is_empty() {
            let n = s.recv.len().min(buf.remaining());
            let (a, b) = s.recv.as_slices();
            let from_a = n.min(a.len());
            buf.put_slice(&a[..from_a]);
            buf.put_slice(&b[..n - from_a]);
            s.recv.drain(..n);
            let keeping_up = s.recv.is_empty();
            let grant = this.grant.on_consumed(n, keeping_up, |extra| {
                // Growth beyond the initial window counts against a budget
                // for the whole process.
                let extra = u64::from(extra);
                GROWN
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| {
                        (g + extra <= GROWTH_BUDGET).then_some(g + extra)
                    })
                    .is_ok()
            });
            if let Some(grant) = grant {
                s.window.on_credit(grant);
                drop(s);
                let mut f = Vec::with_capacity(16);
                encode_credit(this.id, grant, &mut f);
                // A lost link shows up on the next read or write.
                let _ = this.send(f);
            }
            return Poll::Ready(Ok(()));
        }
        if s.fin_in {
            return Poll::Ready(Ok(()));
        }
        if let Some((code, reason)) = &s.reset {
            return Poll::Ready(Err(reset_error(*code, reason)));
        }
        s.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for RoutedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.fin_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        // The link's queue is long (a burst on many streams): wait for it
        // rather than overflow it, which would end every stream on it.
        if this.room.is_none() && !this.tx.has_room() {
            this.room = Some(Box::pin(this.tx.room()));
        }
        if let Some(wait) = this.room.as_mut() {
            std::task::ready!(wait.as_mut().poll(cx));
            this.room = None;
        }
        let n = {
            let mut s = lock(&this.shared.inner);
            if let Some((code, reason)) = &s.reset {
                return Poll::Ready(Err(reset_error(*code, reason)));
            }
            let n = s.credit.take(buf.len().min(MAX_DATA_CHUNK));
            if n == 0 && !buf.is_empty() {
                s.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            n
        };
        let mut f = Vec::with_capacity(reach_proto::link::FRAME_HEADER_LEN + n);
        reach_proto::link::encode_data(this.id, &buf[..n], &mut f);
        this.send(f)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends Fin and completes once it (and all data before it) has left
    /// this process, so a program that exits after shutdown loses nothing.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.fin_sent {
            let mut f = Vec::with_capacity(8);
            encode_fin(self.id, &mut f);
            self.send(f)?;
            self.fin_sent = true;
            self.flushing = Some(Box::pin(self.tx.flushed()));
        }
        if let Some(flushing) = self.flushing.as_mut() {
            if flushing.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.flushing = None;
        }
        Poll::Ready(Ok(()))
    }
}
