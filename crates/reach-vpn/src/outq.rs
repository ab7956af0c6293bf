//! A peer's outgoing packets, queued as the bytes its stream will carry:
//! the TUN reader appends each packet framed ([`reach_proto::datagram`])
//! to one buffer, and the stream's writer takes the whole buffer at once
//! and writes it with one call. No allocation per packet, and a burst of
//! packets becomes one write. The buffer is bounded: a packet that does
//! not fit is dropped and counted, as a router drops when its queue is
//! full (the TCP above resends it), and the reader never waits.

use std::sync::Mutex;

use tokio::sync::Notify;

/// A bounded queue of framed packets for one stream.
#[derive(Debug)]
pub struct OutQueue {
    buf: Mutex<Vec<u8>>,
    cap: usize,
    ready: Notify,
}

impl OutQueue {
    /// A queue holding at most `cap` bytes of framed packets.
    pub fn new(cap: usize) -> Self {
        Self {
            buf: Mutex::new(Vec::with_capacity(cap.min(64 * 1024))),
            cap,
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `pkt`; false (dropped) if it does not fit.
    pub fn push(&self, pkt: &[u8]) -> bool {
        let mut buf = self.lock();
        let len = reach_proto::datagram::HEADER_LEN + pkt.len();
        if buf.len() + len > self.cap || reach_proto::datagram::encode(pkt, &mut buf).is_err() {
            return false;
        }
        drop(buf);
        self.ready.notify_one();
        true
    }

    /// Waits until something is queued and swaps it into `out` (which
    /// must be empty; its allocation is reused for the next batch).
    pub async fn take(&self, out: &mut Vec<u8>) {
        while !self.take_now(out) {
            self.ready.notified().await;
        }
    }

    /// Swaps what is queued into `out` (which must be empty), if anything
    /// is; whether it did.
    pub fn take_now(&self, out: &mut Vec<u8>) -> bool {
        let mut buf = self.lock();
        if buf.is_empty() {
            return false;
        }
        std::mem::swap(&mut *buf, out);
        true
    }

    /// Moves every packet queued here to `to`; returns how many packets
    /// moved and how many did not fit there.
    pub fn move_to(&self, to: &OutQueue) -> (u64, u64) {
        let mut bytes = Vec::new();
        self.take_now(&mut bytes);
        let (mut moved, mut dropped) = (0, 0);
        let mut rest = &bytes[..];
        while let Some((pkt, used)) = reach_proto::datagram::decode(rest) {
            if to.push(pkt) {
                moved += 1;
            } else {
                dropped += 1;
            }
            rest = &rest[used..];
        }
        (moved, dropped)
    }

    /// Bytes queued now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_queue_as_framed_bytes_up_to_the_bound() {
        let q = OutQueue::new(10);
        assert!(q.push(b"abc"));
        assert!(q.push(b"de"));
        assert!(!q.push(b"f"), "5 + 4 + 3 bytes exceed 10");
        let mut out = Vec::new();
        q.take(&mut out).await;
        assert_eq!(out, b"\x00\x03abc\x00\x02de");
        assert!(q.is_empty());
        // The taken buffer's room comes back with the next swap.
        out.clear();
        assert!(q.push(b"ghijkl"));
        q.take(&mut out).await;
        assert_eq!(out, b"\x00\x06ghijkl");
    }

    #[test]
    fn queued_packets_move_whole_to_another_queue_up_to_its_bound() {
        let (from, to) = (OutQueue::new(100), OutQueue::new(9));
        assert!(from.push(b"abc") && from.push(b"de") && from.push(b"fgh"));
        assert_eq!(from.move_to(&to), (2, 1));
        assert!(from.is_empty());
        let mut out = Vec::new();
        assert!(to.take_now(&mut out));
        assert_eq!(out, b"\x00\x03abc\x00\x02de");
        let dropped = OutQueue::new(1);
        assert_eq!(dropped.move_to(&to), (0, 0));
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_for_a_packet() {
        let q = std::sync::Arc::new(OutQueue::new(100));
        let q2 = q.clone();
        let writer = tokio::spawn(async move {
            let mut out = Vec::new();
            q2.take(&mut out).await;
            out
        });
        tokio::task::yield_now().await;
        q.push(b"x");
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .expect("woken")
            .expect("no panic");
        assert_eq!(out, b"\x00\x01x");
    }
}
