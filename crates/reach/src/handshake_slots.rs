//! Room for handshakes in progress: a total cap and a cap per source, with
//! the oldest unfinished handshake cut when the total is reached.
//!
//! ```text
//! accept --> take(source ip) --> refused: its source has `per_source` in progress
//!                            \-> granted (maybe evicting the oldest) --> task
//! task ends, or is evicted --> slot freed
//! ```
//! Why evict instead of refusing the newcomer: idle connections that never
//! send a hello would otherwise hold every slot until their deadline, and
//! a real node, whose handshake takes one round trip, could not get in. The
//! oldest is the most likely to be idle. A source is an IPv4 address or an
//! IPv6 /64 (what one host usually holds), so one host cannot fill the
//! table; many hosts can only churn it, and a real handshake is lost only
//! if `total` newer connections arrive within its round trip.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::task::AbortHandle;

/// Default cap on handshakes in progress at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Default cap on handshakes in progress from one source.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 16;

/// What counts as one source: an IPv4 address, an IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Source(u128);

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => Source((u128::from(v6) >> 64) | (1 << 127)),
        }
    }
}

#[derive(Debug)]
struct Pending {
    source: Source,
    abort: Option<AbortHandle>,
}

#[derive(Debug)]
struct Table {
    total: usize,
    per_source: usize,
    next: u64,
    by_source: HashMap<Source, usize>,
    /// In order of arrival: the first is the oldest.
    pending: BTreeMap<u64, Pending>,
}

impl Table {
    fn release(&mut self, id: u64) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Some(n) = self.by_source.get_mut(&p.source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&p.source);
            }
        }
        Some(p)
    }
}

/// Why a connection got no slot.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SourceFull {
    /// The per-source cap it hit.
    pub(crate) limit: usize,
}

/// The handshake slots of one listener.
#[derive(Debug)]
pub(crate) struct Slots {
    table: Mutex<Table>,
}

/// A handshake cut to make room: abort it.
#[derive(Debug)]
pub(crate) struct Evicted(Option<AbortHandle>);

impl Evicted {
    /// Ends the evicted handshake's task (if it had started).
    pub(crate) fn abort(self) {
        if let Some(a) = self.0 {
            a.abort();
        }
    }
}

/// A granted slot, freed when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

impl Slots {
    /// Slots for `total` handshakes, `per_source` from one source.
    pub(crate) fn new(total: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(Table {
                total: total.max(1),
                per_source: per_source.max(1),
                next: 0,
                by_source: HashMap::new(),
                pending: BTreeMap::new(),
            }),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection from `ip`, and the handshake it displaced
    /// (to be aborted), if the table was full.
    pub(crate) fn take(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<(Slot, Option<Evicted>), SourceFull> {
        let source = Source::of(ip);
        let mut t = self.table();
        let from_source = t.by_source.get(&source).copied().unwrap_or(0);
        if from_source >= t.per_source {
            return Err(SourceFull {
                limit: t.per_source,
            });
        }
        let mut evicted = None;
        if t.pending.len() >= t.total {
            if let Some(oldest) = t.pending.keys().next().copied() {
                evicted = t.release(oldest).map(|p| Evicted(p.abort));
            }
        }
        let id = t.next;
        t.next += 1;
        t.pending.insert(
            id,
            Pending {
                source,
                abort: None,
            },
        );
        *t.by_source.entry(source).or_insert(0) += 1;
        let slot = Slot {
            slots: self.clone(),
            id,
        };
        Ok((slot, evicted))
    }

    /// Ties slot `id` to its handshake task, which eviction aborts. A slot
    /// already freed (its task ended at once) is left alone.
    pub(crate) fn set_task(&self, id: u64, abort: AbortHandle) {
        if let Some(p) = self.table().pending.get_mut(&id) {
            p.abort = Some(abort);
        }
    }

    /// Handshakes in progress now.
    pub(crate) fn in_progress(&self) -> usize {
        self.table().pending.len()
    }
}

impl Slot {
    /// The slot's number, for [`Slots::set_task`].
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.table().release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test]
    async fn one_source_gets_its_share_and_a_full_table_evicts_the_oldest() {
        let slots = Slots::new(4, 2);
        let (a1, e) = slots.take(ip("192.0.2.1")).expect("first");
        assert!(e.is_none());
        let (_a2, _) = slots.take(ip("192.0.2.1")).expect("second");
        assert_eq!(
            slots.take(ip("192.0.2.1")).expect_err("third"),
            SourceFull { limit: 2 }
        );
        // An IPv6 /64 is one source; a different /64 is another.
        let (_b1, _) = slots.take(ip("2001:db8::1")).expect("v6");
        let (_b2, _) = slots.take(ip("2001:db8::2")).expect("same /64");
        assert!(slots.take(ip("2001:db8::3")).is_err(), "the /64 is full");
        assert_eq!(slots.in_progress(), 4);
        // The table is full: a newcomer from elsewhere displaces the oldest.
        let task = tokio::spawn(std::future::pending::<()>());
        slots.set_task(a1.id(), task.abort_handle());
        let (_c, evicted) = slots.take(ip("2001:db8:1::1")).expect("displaces");
        evicted.expect("the oldest").abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
        assert_eq!(slots.in_progress(), 4);
        // The evicted slot's source has room again; dropping it frees nothing twice.
        drop(a1);
        assert_eq!(slots.in_progress(), 4);
        let (_a3, e) = slots.take(ip("192.0.2.1")).expect("room again");
        assert!(e.is_some(), "still full, so the next oldest goes");
    }

    #[test]
    fn mapped_ipv4_is_the_same_source_as_ipv4() {
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.1")),
            Source::of(ip("192.0.2.1"))
        );
        assert_ne!(Source::of(ip("192.0.2.1")), Source::of(ip("192.0.2.2")));
    }
}
