//! Room for work an outsider starts before it is admitted (handshakes in
//! progress, hub links not yet registered): a total cap and a cap per
//! source. For handshakes, the oldest unfinished one is cut when the total
//! is reached ([`Slots::take`]); [`Slots::try_take`] refuses instead.
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
pub struct Source(u128);

impl Source {
    /// The source an address belongs to.
    pub fn of(ip: IpAddr) -> Self {
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
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Full {
    /// Its source holds its share.
    #[error("{limit} already from its address (the per-source limit)")]
    Source {
        /// The per-source cap.
        limit: usize,
    },
    /// Every slot is taken.
    #[error("{limit} already in all (the total limit)")]
    Total {
        /// The total cap.
        limit: usize,
    },
}

/// The slots of one listener.
#[derive(Debug)]
pub struct Slots {
    table: Mutex<Table>,
}

/// A handshake cut to make room: abort it.
#[derive(Debug)]
pub struct Evicted(Option<AbortHandle>);

impl Evicted {
    /// Ends the evicted handshake's task (if it had started).
    pub fn abort(self) {
        if let Some(a) = self.0 {
            a.abort();
        }
    }
}

/// A granted slot, freed when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

impl Slots {
    /// Slots for `total` handshakes, `per_source` from one source.
    pub fn new(total: usize, per_source: usize) -> Arc<Self> {
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
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<(Slot, Option<Evicted>), Full> {
        let mut t = self.table();
        let source = Self::room_at_source(&t, ip)?;
        let mut evicted = None;
        if t.pending.len() >= t.total {
            if let Some(oldest) = t.pending.keys().next().copied() {
                evicted = t.release(oldest).map(|p| Evicted(p.abort));
            }
        }
        Ok((self.insert(&mut t, source), evicted))
    }

    /// A slot for a connection from `ip`, refused when the table is full.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        let mut t = self.table();
        let source = Self::room_at_source(&t, ip)?;
        if t.pending.len() >= t.total {
            return Err(Full::Total { limit: t.total });
        }
        Ok(self.insert(&mut t, source))
    }

    fn room_at_source(t: &Table, ip: IpAddr) -> Result<Source, Full> {
        let source = Source::of(ip);
        if t.by_source.get(&source).copied().unwrap_or(0) >= t.per_source {
            return Err(Full::Source {
                limit: t.per_source,
            });
        }
        Ok(source)
    }

    fn insert(self: &Arc<Self>, t: &mut Table, source: Source) -> Slot {
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
        Slot {
            slots: self.clone(),
            id,
        }
    }

    /// Ties slot `id` to its handshake task, which eviction aborts. A slot
    /// already freed (its task ended at once) is left alone.
    pub fn set_task(&self, id: u64, abort: AbortHandle) {
        if let Some(p) = self.table().pending.get_mut(&id) {
            p.abort = Some(abort);
        }
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.table().pending.len()
    }
}

impl Slot {
    /// The slot's number, for [`Slots::set_task`].
    pub fn id(&self) -> u64 {
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
            Full::Source { limit: 2 }
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
    fn try_take_refuses_when_full_instead_of_evicting() {
        let slots = Slots::new(2, 1);
        let a = slots.try_take(ip("192.0.2.1")).expect("a");
        assert_eq!(
            slots.try_take(ip("192.0.2.1")).expect_err("its share"),
            Full::Source { limit: 1 }
        );
        let _b = slots.try_take(ip("192.0.2.2")).expect("b");
        assert_eq!(
            slots.try_take(ip("192.0.2.3")).expect_err("full"),
            Full::Total { limit: 2 }
        );
        drop(a);
        slots.try_take(ip("192.0.2.3")).expect("room again");
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
