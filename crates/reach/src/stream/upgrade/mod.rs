//! Moving a routed stream onto a direct connection mid-stream, with no break
//! the application can see (ordered handover).
//!
//! ```text
//!   A (connected)                                   B (accepted)
//!   routed stream up, app starts writing            registers the stream under
//!   background: Direct / Splice to B with           (A, upgrade id) for moves
//!   FLAG_UPGRADE, port = upgrade id  ---- TCP ---->  admits: that stream exists
//!   new connection attached                         new connection attached
//!   next write: Moved record on routed, then        next write: Moved record on
//!   everything on the new connection                routed, then the new one
//!   reader: routed until the peer's Moved, then     (same)
//!   the new connection
//! ```
//! Each direction moves on its own: the writer seals a `Moved` record as the
//! last thing on the routed path and writes on the new connection after it;
//! the reader drains the routed path up to that record and then reads the new
//! connection. Both paths are encrypted end to end with their own keys, and
//! the `Moved` record is authenticated, so a hub cannot cut a stream short or
//! splice data in. The upgrade id comes from the routed handshake's hash on
//! both sides, and only the peer itself can complete the upgrade handshake,
//! so nobody else can take a stream over.
//!
//! A reader that sees `Moved` before its own side has the new connection (B
//! attaches before A does, and may write first) waits for it; if the upgrade
//! then fails, the read fails loudly instead of ending early.

mod handover;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;
use std::time::Instant;

use reach_proto::setup_plan::SetupModule;
use reach_proto::NodeId;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::secure::SecureStream;

pub(crate) use handover::Handover;

/// Where a stream moved to, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgraded {
    /// The module that made the new connection.
    pub module: SetupModule,
    /// The new connection's local address.
    pub local_addr: SocketAddr,
    /// The new connection's remote address.
    pub remote_addr: SocketAddr,
    /// When this side had it ready.
    pub at: Instant,
    /// Bytes this side had written on the routed path before moving (known
    /// once the write direction moved).
    pub sent_routed: Option<u64>,
}

/// Where a stream moved and its new connection's socket, for the stream
/// table (`stream::track`): set when the new connection is attached to
/// the slot, cleared (under the lock) before that connection can close.
pub(crate) type MovedCell = Arc<Mutex<Option<(Upgraded, std::os::fd::RawFd)>>>;

/// A new connection for a stream, ready to take over.
pub(crate) struct NewPath {
    pub(crate) io: SecureStream<TcpStream>,
    pub(crate) module: SetupModule,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    /// When it was made.
    pub(crate) at: Instant,
}

#[derive(Default)]
struct SlotState {
    /// An upgrade is under way: a reader that met `Moved` waits.
    pending: bool,
    ready: Option<NewPath>,
    failed: Option<String>,
    /// The stream is gone: a path attached now is dropped (closed) at once,
    /// not kept for nobody.
    ended: bool,
    read_waker: Option<Waker>,
}

/// Where the upgrade task (or the accept path) leaves the new connection.
#[derive(Clone)]
pub(crate) struct Slot {
    state: Arc<Mutex<SlotState>>,
    /// False while an upgrade is under way, for [`Handover::settled`].
    settled: Arc<watch::Sender<bool>>,
    /// False until the upgrade has found its path or given up on the setup
    /// modules (a relay circuit may still come), for [`Handover::learned`].
    learned: Arc<watch::Sender<bool>>,
    /// Where the stream moved, for the stream table.
    moved: MovedCell,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            settled: Arc::new(watch::Sender::new(true)),
            learned: Arc::new(watch::Sender::new(true)),
            moved: MovedCell::default(),
        }
    }
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the stream this slot belongs to is gone (only the upgrade
    /// task still holds the slot): no point making a new path for it.
    pub(crate) fn abandoned(&self) -> bool {
        Arc::strong_count(&self.state) == 1
    }

    /// The setup modules are done with (what remains is a relay circuit,
    /// which teaches the module cache nothing).
    pub(crate) fn modules_done(&self) {
        self.learned.send_replace(true);
    }

    /// An upgrade has started.
    pub(crate) fn begin(&self) {
        self.lock().pending = true;
        self.settled.send_replace(false);
        self.learned.send_replace(false);
    }

    /// The new connection is ready.
    pub(crate) fn attach(&self, path: NewPath) {
        let moved = &self.moved;
        self.settle(|s| {
            if !s.ended {
                let upgraded = Upgraded {
                    module: path.module,
                    local_addr: path.local,
                    remote_addr: path.remote,
                    at: path.at,
                    sent_routed: None,
                };
                let fd = std::os::fd::AsRawFd::as_raw_fd(path.io.get_ref());
                *moved.lock().unwrap_or_else(|p| p.into_inner()) = Some((upgraded, fd));
                s.ready = Some(path);
            }
        });
    }

    /// Where the stream moved, for the stream table.
    pub(crate) fn moved_cell(&self) -> MovedCell {
        self.moved.clone()
    }

    /// The stream that owns this slot is gone: drop what waits here.
    pub(crate) fn end(&self) {
        let mut s = self.lock();
        s.ended = true;
        // The table must let go of the socket before it closes.
        *self.moved.lock().unwrap_or_else(|p| p.into_inner()) = None;
        s.ready = None;
    }

    /// The upgrade failed; the stream stays routed.
    pub(crate) fn fail(&self, reason: String) {
        self.settle(|s| s.failed = Some(reason));
    }

    fn settle(&self, f: impl FnOnce(&mut SlotState)) {
        let mut s = self.lock();
        s.pending = false;
        f(&mut s);
        if let Some(w) = s.read_waker.take() {
            w.wake();
        }
        drop(s);
        self.learned.send_replace(true);
        self.settled.send_replace(true);
    }
}

/// How long a stream that ended stays in the registry: a first connection's
/// background move (`setup::race`) may come after a short stream ended, and
/// it still teaches the peer's module cache where the stream would settle.
pub(crate) const ENDED_GRACE: std::time::Duration = std::time::Duration::from_secs(15);

/// A registered stream: its slot, and when it ended, if it did.
struct Entry {
    slot: Slot,
    // tokio's clock, so tests can run the grace in virtual time.
    ended: Option<tokio::time::Instant>,
}

/// Streams that may be moved here, by (peer, upgrade id).
#[derive(Default)]
pub(crate) struct Registry {
    entries: Mutex<HashMap<(NodeId, u16), Entry>>,
    /// Wakes [`lookup_soon`] when a stream registers.
    registered: tokio::sync::Notify,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(NodeId, u16), Entry>> {
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        m.retain(|_, e| {
            e.ended
                .is_none_or(|at| now.saturating_duration_since(at) < ENDED_GRACE)
        });
        m
    }
}

/// Registers a stream for upgrades; the key is released [`ENDED_GRACE`]
/// after the returned guard (kept by the stream) drops. `None` when the key
/// is taken (a 1 in 65536 clash between two live streams of one peer): that
/// stream just stays routed.
pub(crate) fn register(
    registry: &Arc<Registry>,
    key: (NodeId, u16),
    slot: Slot,
) -> Option<Registration> {
    let mut r = registry.lock();
    if r.get(&key).is_some_and(|e| e.ended.is_none()) {
        return None;
    }
    r.insert(key, Entry { slot, ended: None });
    drop(r);
    registry.registered.notify_waiters();
    Some(Registration {
        registry: Arc::downgrade(registry),
        key,
    })
}

/// The stream for an upgrade hello from `peer` with `id`, if any (live, or
/// ended within [`ENDED_GRACE`]).
pub(crate) fn lookup(registry: &Registry, peer: NodeId, id: u16) -> Option<Slot> {
    registry.lock().get(&(peer, id)).map(|e| e.slot.clone())
}

/// [`lookup`], waiting up to `within` for the stream to register: a request
/// to move it (a connect-back, a circuit offer) can overtake the end of its
/// handshake here, since the two are handled by different tasks.
pub(crate) async fn lookup_soon(
    registry: &Registry,
    peer: NodeId,
    id: u16,
    within: std::time::Duration,
) -> Option<Slot> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        // Armed before the check, so a registration in between wakes it.
        let registered = registry.registered.notified();
        tokio::pin!(registered);
        registered.as_mut().enable();
        if let Some(slot) = lookup(registry, peer, id) {
            return Some(slot);
        }
        if tokio::time::timeout_at(deadline, registered).await.is_err() {
            return None;
        }
    }
}

/// How long a request to move a stream waits for the stream to register.
pub(crate) const REGISTER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether the stream with `id` from `peer` is registered and still open.
pub(crate) fn is_live(registry: &Registry, peer: NodeId, id: u16) -> bool {
    registry
        .lock()
        .get(&(peer, id))
        .is_some_and(|e| e.ended.is_none())
}

/// Marks a stream's registration ended when the stream ends.
pub(crate) struct Registration {
    registry: Weak<Registry>,
    key: (NodeId, u16),
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(r) = self.registry.upgrade() {
            if let Some(e) = r.lock().get_mut(&self.key) {
                e.ended = Some(tokio::time::Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::SecretKey;
    use std::time::Duration;

    fn peer() -> NodeId {
        SecretKey::from_seed([3; 32]).node_id()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_overtakes_the_registration_waits_for_it_within_a_bound() {
        let registry = Arc::new(Registry::default());
        let late = {
            let registry = registry.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                register(&registry, (peer(), 7), Slot::default())
            })
        };
        let found = lookup_soon(&registry, peer(), 7, REGISTER_WAIT).await;
        assert!(found.is_some(), "found once registered");
        let _registration = late.await.expect("task").expect("registered");
        let started = tokio::time::Instant::now();
        assert!(lookup_soon(&registry, peer(), 8, REGISTER_WAIT)
            .await
            .is_none());
        assert_eq!(started.elapsed(), REGISTER_WAIT, "gives up at the bound");
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_stream_can_still_be_moved_for_a_while_but_not_reregistered_over_a_live_one() {
        let registry = Arc::new(Registry::default());
        let registration = register(&registry, (peer(), 1), Slot::default()).expect("free");
        assert!(
            register(&registry, (peer(), 1), Slot::default()).is_none(),
            "taken"
        );
        assert!(is_live(&registry, peer(), 1));
        drop(registration);
        assert!(!is_live(&registry, peer(), 1));
        assert!(lookup(&registry, peer(), 1).is_some(), "within the grace");
        tokio::time::advance(ENDED_GRACE).await;
        assert!(lookup(&registry, peer(), 1).is_none(), "forgotten after it");
        // An ended key may be taken by a new stream at once.
        let r2 = register(&registry, (peer(), 2), Slot::default()).expect("free");
        drop(r2);
        assert!(register(&registry, (peer(), 2), Slot::default()).is_some());
    }
}
