//! A peer's outgoing packets, queued as the bytes its stream will carry:
//! the TUN reader appends each packet framed ([`crate::frame`])
//! to one buffer, and the stream's writer takes the whole buffer at once
//! and writes it with one call. No allocation per packet, and a burst of
//! packets becomes one write. Each queue is bounded, and all queues
//! together share a [`Budget`]: a packet that does not fit is dropped and
//! counted, as a router drops when its queue is full (the TCP above resends
//! it), and the reader never waits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Bytes all queues of a vpn may hold together.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// Takes `n` bytes if they fit.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.max).then_some(u + n)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes queued now, in all queues.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// A bounded queue of framed packets for one stream.
#[derive(Debug)]
pub struct OutQueue {
    buf: Mutex<Vec<u8>>,
    cap: usize,
    budget: Arc<Budget>,
    ready: Notify,
    /// Wakes a reader waiting for room.
    room: Notify,
}

/// A buffer that grew past this is shrunk back once a batch smaller than
/// it shows the load is gone, so idle peers do not keep a burst's memory.
const KEEP: usize = 256 * 1024;

impl Drop for OutQueue {
    fn drop(&mut self) {
        self.budget.give(self.lock().len());
    }
}

impl OutQueue {
    /// A queue holding at most `cap` bytes of framed packets, within
    /// `budget`.
    pub fn new(cap: usize, budget: Arc<Budget>) -> Self {
        Self {
            buf: Mutex::new(Vec::new()),
            cap,
            budget,
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame of `parts`; false (dropped) if it does not fit.
    pub fn push(&self, parts: &[&[u8]]) -> bool {
        let mut buf = self.lock();
        let len = crate::frame::HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        if buf.len() + len > self.cap || !self.budget.take(len) {
            return false;
        }
        if crate::frame::encode(parts, &mut buf).is_err() {
            self.budget.give(len);
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
        // The queue now fills the writer's last buffer. Under load both
        // keep their size: shrinking one that a full batch will need
        // again would make it grow again, copying the batch each time.
        if out.len() < KEEP && buf.capacity() > KEEP {
            buf.shrink_to(KEEP);
        }
        self.budget.give(out.len());
        drop(buf);
        self.room.notify_one();
        true
    }

    /// Waits until the writer has taken what was queued (there is room).
    pub async fn room(&self) {
        let wait = self.room.notified();
        if self.lock().len() * 2 < self.cap {
            return;
        }
        wait.await;
    }

    /// Moves every packet queued here to `to`; returns how many packets
    /// moved and how many did not fit there.
    pub fn move_to(&self, to: &OutQueue) -> (u64, u64) {
        let mut bytes = Vec::new();
        self.take_now(&mut bytes);
        let (mut moved, mut dropped) = (0, 0);
        let mut rest = &bytes[..];
        while let Ok(Some((pkt, used))) = crate::frame::decode(rest) {
            if to.push(&[pkt]) {
                moved += 1;
            } else {
                dropped += 1;
            }
            rest = &rest[used..];
        }
        (moved, dropped)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.lock().capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_queue_as_framed_bytes_up_to_the_bound() {
        let q = OutQueue::new(14, Budget::new(1 << 20));
        assert!(q.push(&[&b"abc"[..]]));
        assert!(q.push(&[&b"de"[..]]));
        assert!(!q.push(&[&b"f"[..]]), "7 + 6 + 5 bytes exceed 14");
        let mut out = Vec::new();
        q.take(&mut out).await;
        assert_eq!(out, b"\x00\x00\x00\x03abc\x00\x00\x00\x02de");
        assert!(q.is_empty());
        // The taken buffer's room comes back with the next swap.
        out.clear();
        assert!(q.push(&[&b"ghijkl"[..]]));
        q.take(&mut out).await;
        assert_eq!(out, b"\x00\x00\x00\x06ghijkl");
    }

    #[test]
    fn buffers_keep_their_size_under_load_and_shrink_once_it_is_gone() {
        let q = OutQueue::new(8 << 20, Budget::new(8 << 20));
        let burst = |q: &OutQueue| {
            for _ in 0..64 {
                assert!(q.push(&[&[7u8; 16 * 1024][..]]));
            }
        };
        let mut out = Vec::new();
        burst(&q);
        assert!(q.take_now(&mut out));
        out.clear();
        burst(&q);
        assert!(q.take_now(&mut out));
        // Both buffers have held a full batch: the next one fits the
        // buffer the queue holds now, without growing.
        let big = q.capacity();
        assert!(big >= 64 * (16 * 1024 + 4), "{big}");
        out.clear();
        burst(&q);
        assert_eq!(q.capacity(), big, "grown again under load");
        assert!(q.take_now(&mut out));
        // A small batch: the buffer handed back is shrunk.
        out.clear();
        assert!(q.push(&[&b"x"[..]]));
        assert!(q.take_now(&mut out));
        assert!(q.capacity() <= KEEP, "{}", q.capacity());
    }

    #[test]
    fn queued_packets_move_whole_to_another_queue_up_to_its_bound() {
        let (from, to) = (
            OutQueue::new(100, Budget::new(1 << 20)),
            OutQueue::new(13, Budget::new(1 << 20)),
        );
        assert!(from.push(&[&b"abc"[..]]) && from.push(&[&b"de"[..]]) && from.push(&[&b"fgh"[..]]));
        assert_eq!(from.move_to(&to), (2, 1));
        assert!(from.is_empty());
        let mut out = Vec::new();
        assert!(to.take_now(&mut out));
        assert_eq!(out, b"\x00\x00\x00\x03abc\x00\x00\x00\x02de");
        let dropped = OutQueue::new(1, Budget::new(1));
        assert_eq!(dropped.move_to(&to), (0, 0));
    }

    #[test]
    fn queues_share_their_budget_and_give_it_back_when_taken() {
        let budget = Budget::new(20);
        let (a, b) = (
            OutQueue::new(100, budget.clone()),
            OutQueue::new(100, budget.clone()),
        );
        assert!(a.push(&[&[0u8; 8][..]]) && b.push(&[&[0u8; 4][..]]));
        assert_eq!(budget.used(), 20);
        assert!(!a.push(&[&[0u8; 1][..]]), "over the shared budget");
        let mut out = Vec::new();
        assert!(a.take_now(&mut out));
        assert_eq!(budget.used(), 8);
        drop(b);
        assert_eq!(budget.used(), 0, "a dropped queue gives its bytes back");
    }

    #[tokio::test]
    async fn a_full_queue_has_room_again_once_its_writer_takes() {
        let q = std::sync::Arc::new(OutQueue::new(16, Budget::new(1 << 20)));
        assert!(q.push(&[&[0u8; 12][..]]));
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.room().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "no room while 16 of 16 bytes wait");
        let mut out = Vec::new();
        assert!(q.take_now(&mut out));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
        // An emptyish queue has room at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), q.room())
            .await
            .expect("room at once");
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_for_a_packet() {
        let q = std::sync::Arc::new(OutQueue::new(100, Budget::new(1 << 20)));
        let q2 = q.clone();
        let writer = tokio::spawn(async move {
            let mut out = Vec::new();
            q2.take(&mut out).await;
            out
        });
        tokio::task::yield_now().await;
        q.push(&[&b"x"[..]]);
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .expect("woken")
            .expect("no panic");
        assert_eq!(out, b"\x00\x00\x00\x01x");
    }
}
