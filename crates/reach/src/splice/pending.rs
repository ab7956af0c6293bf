//! The bookkeeping of rendezvous: this node's offers waiting for answers,
//! and the offers from other nodes it is answering (bounded per node).

use std::collections::HashMap;
use std::net::SocketAddr;

use reach_proto::NodeId;
use tokio::sync::oneshot;

use crate::endpoint::Shared;

/// Offers one node may have answered at once here; more are declined.
pub(super) const ANSWERS_PER_ASKER: usize = 4;

/// The target's candidates, or why it will not splice.
type Answer = Result<Vec<SocketAddr>, String>;
/// Where a splice answer goes, by (target, token).
type SpliceWaiter = oneshot::Sender<Answer>;

/// Pending offers of this endpoint.
#[derive(Default)]
pub(crate) struct Pending(std::sync::Mutex<HashMap<(NodeId, u32), SpliceWaiter>>);

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(NodeId, u32), SpliceWaiter>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new offer to `target`; returns its token.
    pub(super) fn register(
        &self,
        target: NodeId,
    ) -> Result<(u32, oneshot::Receiver<Answer>), String> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.lock();
        let mut b = [0u8; 4];
        loop {
            getrandom::fill(&mut b).map_err(|e| e.to_string())?;
            let token = u32::from_le_bytes(b);
            if let std::collections::hash_map::Entry::Vacant(v) = pending.entry((target, token)) {
                v.insert(tx);
                return Ok((token, rx));
            }
        }
    }

    pub(super) fn remove(&self, target: NodeId, token: u32) {
        self.lock().remove(&(target, token));
    }

    /// Hands an answer (or a refusal) to the offer it belongs to.
    pub(crate) fn resolve(&self, from: NodeId, token: u32, result: Answer) {
        match self.lock().remove(&(from, token)) {
            Some(w) => {
                let _ = w.send(result);
            }
            None => tracing::debug!(%from, token, "splice answer for no pending offer"),
        }
    }
}

/// One of the [`ANSWERS_PER_ASKER`] answers a node may have running here.
pub(super) struct AskerTurn<'a> {
    shared: &'a Shared,
    from: NodeId,
}

impl<'a> AskerTurn<'a> {
    pub(super) fn take(shared: &'a Shared, from: NodeId) -> Option<Self> {
        let mut busy = shared
            .splice_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = busy.entry(from).or_insert(0);
        if *n >= ANSWERS_PER_ASKER {
            return None;
        }
        *n += 1;
        Some(Self { shared, from })
    }
}

impl Drop for AskerTurn<'_> {
    fn drop(&mut self) {
        let mut busy = self
            .shared
            .splice_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = busy.get_mut(&self.from) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.from);
            }
        }
    }
}

/// A splice offer another node sent.
pub(crate) struct Offer {
    pub(crate) from: NodeId,
    pub(crate) token: u32,
    pub(crate) vport: u16,
    pub(crate) upgrade: bool,
    pub(crate) candidates: Vec<SocketAddr>,
}
