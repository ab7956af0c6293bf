//! What an endpoint refused and dropped, counted: every limit and every
//! defence adds to one counter here, read by [`crate::Endpoint::counters`]
//! (and shown by `reach status`).

use std::sync::atomic::{AtomicU64, Ordering};

/// The live counters, shared by the endpoint's tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) refused_by_policy: AtomicU64,
    pub(crate) not_confirmed: AtomicU64,
    pub(crate) handshakes_evicted: AtomicU64,
    pub(crate) handshakes_refused_per_source: AtomicU64,
    pub(crate) handshakes_timed_out: AtomicU64,
    pub(crate) tickets_refused: AtomicU64,
}

/// Adds one to `counter`.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A snapshot of an endpoint's refusal counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct EndpointCounters {
    /// Authenticated peers the access policy refused.
    pub refused_by_policy: u64,
    /// Accepted handshakes whose initiator never confirmed the keys (a
    /// replayed hello, or a peer that vanished mid-handshake).
    pub not_confirmed: u64,
    /// Unfinished handshakes cut to make room for new ones.
    pub handshakes_evicted: u64,
    /// Connections refused because their source had too many handshakes
    /// in progress.
    pub handshakes_refused_per_source: u64,
    /// Handshakes not finished within the handshake deadline.
    pub handshakes_timed_out: u64,
    /// Resumption hellos whose ticket this node did not honour (issued
    /// before a restart, expired, or forged); each initiator then ran a
    /// full handshake.
    #[serde(default)]
    pub tickets_refused: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> EndpointCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EndpointCounters {
            refused_by_policy: get(&self.refused_by_policy),
            not_confirmed: get(&self.not_confirmed),
            handshakes_evicted: get(&self.handshakes_evicted),
            handshakes_refused_per_source: get(&self.handshakes_refused_per_source),
            handshakes_timed_out: get(&self.handshakes_timed_out),
            tickets_refused: get(&self.tickets_refused),
        }
    }
}
