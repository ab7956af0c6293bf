//! The endpoint's table of its live streams, for `reach status`: each
//! stream it hands out counts its bytes, and the table reads, when asked,
//! where each stream runs now (its first module and the one it moved to),
//! the hubs it crosses and the kernel's round trip on its connection.
//!
//! The table holds weak references, so a stream that ends leaves it by
//! itself; dead entries are swept whenever the table has doubled, which
//! keeps it within twice the live streams.

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::upgrade::{MovedCell, Upgraded};
use super::StreamInfo;

/// One live stream, as [`crate::Endpoint::streams`] reports it.
#[derive(Clone, Debug)]
pub struct LiveStream {
    /// Numbers the endpoint's streams in the order they were handed out.
    pub id: u64,
    /// How the stream was made: peer, port, first module, addresses.
    pub info: StreamInfo,
    /// Where a routed stream moved to mid-stream, once it has: a
    /// connection of the setup module it names, or, when that is
    /// `Routed`, a relay circuit the hub splices.
    pub moved: Option<Upgraded>,
    /// The hubs a routed stream's path crosses (kept once it moved) that
    /// this node knows of: its own hub, then the peer's when the peer's
    /// address named another (hubs between two federated hubs are not
    /// named). Empty for streams that never were routed.
    pub via: Vec<SocketAddr>,
    /// Time since it was handed out.
    pub age: Duration,
    /// Bytes the application read from it.
    pub bytes_in: u64,
    /// Bytes the application wrote to it.
    pub bytes_out: u64,
    /// The kernel's smoothed round trip on the TCP connection the stream
    /// runs on now; `None` on a routed stream (its connection is the hub
    /// link, shared with other streams) or before the first sample.
    pub rtt: Option<Duration>,
}

/// What the table and the stream share.
#[derive(Debug)]
struct Tracked {
    id: u64,
    info: StreamInfo,
    opened: Instant,
    via: Vec<SocketAddr>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// The stream's own TCP socket; cleared (under the lock) by the
    /// stream's [`Track`] before the socket closes, so the table never
    /// reads a closed or reused descriptor.
    tcp: Mutex<Option<RawFd>>,
    /// Where a routed stream's move leaves its new connection.
    moved: Option<MovedCell>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tracked {
    fn report(&self) -> LiveStream {
        let (moved, moved_rtt) = match &self.moved {
            Some(cell) => {
                let m = lock(cell);
                match &*m {
                    // SAFETY of the borrow: the descriptor stays open while
                    // the cell's lock is held (the stream clears the cell
                    // before it closes the connection).
                    Some((u, fd)) => (Some(u.clone()), rtt_of(*fd)),
                    None => (None, None),
                }
            }
            None => (None, None),
        };
        let rtt = match moved {
            Some(_) => moved_rtt,
            None => lock(&self.tcp).and_then(rtt_of),
        };
        LiveStream {
            id: self.id,
            info: self.info.clone(),
            via: self.via.clone(),
            moved,
            age: self.opened.elapsed(),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            rtt,
        }
    }
}

/// The kernel's round trip on `fd`, which the caller keeps open.
fn rtt_of(fd: RawFd) -> Option<Duration> {
    #[allow(unsafe_code)]
    // SAFETY: every caller holds the lock that the descriptor's owner takes
    // to clear it before closing it, so `fd` is open for this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    crate::tcp_rtt::smoothed(fd)
}

/// A stream's handle on its table entry; the stream counts its bytes
/// through it. Dropped before the stream's connection (it is the stream's
/// first field), it clears the socket the table reads.
#[derive(Debug)]
pub(crate) struct Track(Arc<Tracked>);

impl Track {
    /// `n` bytes were read from the stream.
    pub(crate) fn read(&self, n: usize) {
        self.0.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `n` bytes were written to the stream.
    pub(crate) fn wrote(&self, n: usize) {
        self.0.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Drop for Track {
    fn drop(&mut self) {
        *lock(&self.0.tcp) = None;
    }
}

/// The live streams of one endpoint.
#[derive(Default)]
pub(crate) struct StreamTable {
    next_id: AtomicU64,
    live: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    list: Vec<Weak<Tracked>>,
    /// Sweep dead entries when the list reaches this length.
    sweep_at: usize,
}

/// Entries kept before the first sweep.
const FIRST_SWEEP: usize = 64;

impl StreamTable {
    /// Enters a stream about to be handed out: `tcp` is its own TCP
    /// socket (none for a routed stream), `moved` where a move leaves its
    /// new one, `via` the hubs it crosses.
    pub(crate) fn track(
        &self,
        info: StreamInfo,
        tcp: Option<RawFd>,
        moved: Option<MovedCell>,
        via: Vec<SocketAddr>,
    ) -> Track {
        let tracked = Arc::new(Tracked {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            info,
            opened: Instant::now(),
            via,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            tcp: Mutex::new(tcp),
            moved,
        });
        let mut live = lock(&self.live);
        live.list.push(Arc::downgrade(&tracked));
        if live.list.len() >= live.sweep_at.max(FIRST_SWEEP) {
            live.list.retain(|w| w.strong_count() > 0);
            live.sweep_at = (live.list.len() * 2).max(FIRST_SWEEP);
        }
        Track(tracked)
    }

    /// The live streams, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<LiveStream> {
        let alive: Vec<Arc<Tracked>> = lock(&self.live)
            .list
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        alive.iter().map(|t| t.report()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Direction;
    use reach_proto::setup_plan::SetupModule;
    use reach_proto::{SecretKey, StreamMode};

    fn info() -> StreamInfo {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        StreamInfo {
            peer: SecretKey::from_seed([7; 32]).node_id(),
            virtual_port: 7,
            module: SetupModule::Routed,
            mode: StreamMode::Plaintext,
            direction: Direction::Outbound,
            local_addr: addr,
            remote_addr: addr,
            setup_time: Duration::ZERO,
            failed_before: Vec::new(),
            peer_member: false,
            resumed: false,
        }
    }

    #[test]
    fn streams_count_their_bytes_and_leave_the_table_when_they_end() {
        let table = StreamTable::default();
        let hub: SocketAddr = "192.0.2.1:7700".parse().unwrap();
        let a = table.track(info(), None, None, vec![hub]);
        let b = table.track(info(), None, None, Vec::new());
        a.read(10);
        a.wrote(3);
        a.wrote(4);
        let now = table.snapshot();
        assert_eq!(now.len(), 2);
        assert_eq!((now[0].id, now[0].bytes_in, now[0].bytes_out), (1, 10, 7));
        assert_eq!(now[0].via, vec![hub]);
        assert_eq!(now[0].rtt, None, "a routed stream has no TCP of its own");
        drop(a);
        let now = table.snapshot();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].id, 2);
        drop(b);
        assert!(table.snapshot().is_empty());
    }

    #[test]
    fn the_table_stays_within_twice_the_live_streams() {
        let table = StreamTable::default();
        let keep: Vec<Track> = (0..10)
            .map(|_| table.track(info(), None, None, Vec::new()))
            .collect();
        for _ in 0..10_000 {
            drop(table.track(info(), None, None, Vec::new()));
        }
        let len = lock(&table.live).list.len();
        assert!(len <= FIRST_SWEEP.max(2 * keep.len()), "{len} entries");
        assert_eq!(table.snapshot().len(), keep.len());
    }
}
