//! How many connections (or UDP mappings) an exposed service carries at
//! once: in all, and per peer node.
//!
//! ```text
//! accepted stream from PEER --> try_acquire(PEER) --> over a limit: refused, counted, logged
//!                                                 \-> Held (dropped when the connection ends)
//! ```
//! Admitted peers are trusted with the service, but not with all of its
//! capacity: one peer opening streams in a loop cannot starve the others or
//! exhaust the host's file descriptors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use reach::NodeId;

/// Default connections an exposed service carries at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default connections one peer may hold at once.
pub const DEFAULT_MAX_PER_PEER: usize = 64;

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitHit {
    /// The peer holds its share.
    #[error("the peer already holds {0} connections (the per-peer limit)")]
    PerPeer(usize),
    /// The service carries its most.
    #[error("{0} connections already (the total limit)")]
    Total(usize),
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_peer: HashMap<NodeId, usize>,
}

/// The limits of one service.
#[derive(Debug)]
pub struct ConnLimits {
    total: usize,
    per_peer: usize,
    counts: Mutex<Counts>,
}

/// One admitted connection; its place is freed when dropped.
#[derive(Debug)]
pub struct Held {
    limits: Arc<ConnLimits>,
    peer: NodeId,
}

impl ConnLimits {
    /// Limits of `total` connections, `per_peer` from one node.
    pub fn new(total: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            total: total.max(1),
            per_peer: per_peer.max(1),
            counts: Mutex::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a connection from `peer`, or the limit it hit.
    pub fn try_acquire(self: &Arc<Self>, peer: NodeId) -> Result<Held, LimitHit> {
        let mut c = self.counts();
        let mine = c.by_peer.get(&peer).copied().unwrap_or(0);
        if mine >= self.per_peer {
            return Err(LimitHit::PerPeer(self.per_peer));
        }
        if c.total >= self.total {
            return Err(LimitHit::Total(self.total));
        }
        c.total += 1;
        *c.by_peer.entry(peer).or_insert(0) += 1;
        Ok(Held {
            limits: self.clone(),
            peer,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_share_and_the_service_its_total() {
        let id = |n: u8| reach::SecretKey::from_seed([n; 32]).node_id();
        let limits = ConnLimits::new(3, 2);
        let a1 = limits.try_acquire(id(1)).expect("a1");
        let _a2 = limits.try_acquire(id(1)).expect("a2");
        assert_eq!(
            limits.try_acquire(id(1)).expect_err("a3"),
            LimitHit::PerPeer(2)
        );
        let _b1 = limits.try_acquire(id(2)).expect("b1");
        assert_eq!(
            limits.try_acquire(id(3)).expect_err("c1"),
            LimitHit::Total(3)
        );
        drop(a1);
        limits.try_acquire(id(3)).expect("room again");
    }
}
