//! Frame I/O on a hub link (node–hub or hub–hub), shared by nodes and hubs.
//!
//! A link is an authenticated [`ReachStream`] to virtual port
//! [`HUB_VPORT`](reach_proto::link::HUB_VPORT). Its write side belongs to one
//! writer task fed by an unbounded channel of encoded frames: every producer
//! (streams, control, the hub's relay) only queues, and the writer batches what
//! is queued into few large writes. The channel needs no bound of its own:
//! Data frames are bounded by each stream's credit, everything else is small
//! and answers something the peer sent.

use std::io;

use reach_proto::link::{decode_frame, frame_len, Frame, LinkError, MAX_FRAME_PAYLOAD};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Queue of encoded frames towards a link's writer task.
pub type FrameTx = mpsc::UnboundedSender<Vec<u8>>;

/// Bytes gathered into one write at most.
const WRITE_BATCH: usize = 256 * 1024;

/// Writes queued frames until the queue closes (every sender dropped) or the
/// transport fails; then shuts the write side down.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) -> io::Result<()> {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        if rx.is_empty() {
            w.write_all(&first).await?;
            continue;
        }
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        w.write_all(&batch).await?;
        batch.clear();
    }
    w.shutdown().await
}

/// Why reading a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkReadError {
    /// The transport failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer sent bytes that are not a valid frame.
    #[error("{0}")]
    Protocol(#[from] LinkError),
}

/// Reads frames from a link's read side, one at a time, without copying Data
/// payloads out of its buffer.
pub struct FrameReader<R> {
    r: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps the read side of a link.
    pub fn new(r: R) -> Self {
        Self {
            r,
            // Room for two largest frames, so compaction is rare and cheap.
            buf: vec![0u8; 2 * (MAX_FRAME_PAYLOAD + 64)].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The next frame; `None` at a clean end of the link.
    pub async fn next(&mut self) -> Result<Option<Frame<'_>>, LinkReadError> {
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(len) = frame_len(pending).filter(|l| *l <= pending.len()) {
                let at = self.start;
                self.start += len;
                return match decode_frame(&self.buf[at..at + len])? {
                    Some((frame, _)) => Ok(Some(frame)),
                    None => Err(LinkError::BadLength { kind: "frame", len }.into()),
                };
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.buf.len() - self.start < MAX_FRAME_PAYLOAD + 64 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.r.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                if self.start == self.end {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "link closed in the middle of a frame",
                )
                .into());
            }
            self.end += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::link::{encode_credit, encode_data};

    #[tokio::test]
    async fn frames_cross_a_link_in_order() {
        let (a, b) = tokio::io::duplex(1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_frames(a, rx));
        for i in 1..=100u32 {
            let mut f = Vec::new();
            encode_data(i, &vec![i as u8; (i as usize) * 300], &mut f);
            encode_credit(i, i, &mut f);
            tx.send(f).expect("queue");
        }
        drop(tx);
        let mut r = FrameReader::new(b);
        for i in 1..=100u32 {
            let f = r.next().await.expect("read").expect("frame");
            assert_eq!(
                f,
                Frame::Data {
                    stream: i,
                    data: &vec![i as u8; (i as usize) * 300]
                }
            );
            let f = r.next().await.expect("read").expect("frame");
            assert_eq!(
                f,
                Frame::Credit {
                    stream: i,
                    bytes: i
                }
            );
        }
        assert!(r.next().await.expect("clean end").is_none());
        writer.await.expect("join").expect("writer");
    }

    #[tokio::test]
    async fn a_link_cut_inside_a_frame_is_an_error() {
        let (mut a, b) = tokio::io::duplex(1000);
        let mut f = Vec::new();
        encode_data(1, &[0; 100], &mut f);
        a.write_all(&f[..50]).await.expect("write");
        drop(a);
        let mut r = FrameReader::new(b);
        assert!(matches!(r.next().await, Err(LinkReadError::Io(_))));
    }
}
