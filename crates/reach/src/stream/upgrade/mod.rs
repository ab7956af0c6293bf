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
    read_waker: Option<Waker>,
}

/// Where the upgrade task (or the accept path) leaves the new connection.
#[derive(Clone)]
pub(crate) struct Slot {
    state: Arc<Mutex<SlotState>>,
    /// False while an upgrade is under way, for [`Handover::settled`].
    settled: Arc<watch::Sender<bool>>,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            settled: Arc::new(watch::Sender::new(true)),
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

    /// An upgrade has started.
    pub(crate) fn begin(&self) {
        self.lock().pending = true;
        self.settled.send_replace(false);
    }

    /// The new connection is ready.
    pub(crate) fn attach(&self, path: NewPath) {
        self.settle(|s| s.ready = Some(path));
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
        self.settled.send_replace(true);
    }
}

/// Streams that may be moved here, by (peer, upgrade id).
pub(crate) type Registry = Mutex<HashMap<(NodeId, u16), Slot>>;

/// Registers a stream for upgrades; the key is removed when the returned
/// guard (kept by the stream) drops. `None` when the key is taken (a 1 in
/// 65536 clash between two live streams of one peer): that stream just
/// stays routed.
pub(crate) fn register(
    registry: &Arc<Registry>,
    key: (NodeId, u16),
    slot: Slot,
) -> Option<Registration> {
    let mut r = registry.lock().unwrap_or_else(|p| p.into_inner());
    if r.contains_key(&key) {
        return None;
    }
    r.insert(key, slot);
    Some(Registration {
        registry: Arc::downgrade(registry),
        key,
    })
}

/// The stream for an upgrade hello from `peer` with `id`, if any.
pub(crate) fn lookup(registry: &Registry, peer: NodeId, id: u16) -> Option<Slot> {
    registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(peer, id))
        .cloned()
}

/// Removes a stream's registration when the stream ends.
pub(crate) struct Registration {
    registry: Weak<Registry>,
    key: (NodeId, u16),
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(r) = self.registry.upgrade() {
            r.lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.key);
        }
    }
}
