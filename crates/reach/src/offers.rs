//! The bookkeeping of splice rendezvous: this node's offers waiting for
//! answers, and the offers from other nodes it is answering (bounded per
//! node).
//!
//! Data flow: `splice::connect` registers an offer here and waits; the hub
//! session's answer (a `Request`) resolves it by (target, token).
//! `splice::answer` takes a turn of the asker's before it punches, and gives
//! it back when done.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use reach_proto::NodeId;
use tokio::sync::oneshot;

/// Offers one node may have answered at once here; more are declined.
pub(crate) const ANSWERS_PER_ASKER: usize = 4;

/// Why an offer got no candidates back.
#[derive(Debug)]
pub(crate) enum SpliceRefusal {
    /// The target declined (its reason).
    Declined(String),
    /// The hubs could not deliver the offer (their reason).
    Undeliverable(String),
}

/// The target's candidates, or why it will not splice.
type Answer = Result<Vec<SocketAddr>, SpliceRefusal>;
/// Where a splice answer goes, by (target, token).
type SpliceWaiter = oneshot::Sender<Answer>;

/// Splice offers of this node, and the answers it runs for others.
#[derive(Default)]
pub(crate) struct Offers {
    pending: Mutex<HashMap<(NodeId, u32), SpliceWaiter>>,
    /// Answers running here, per asking node.
    answering: Mutex<HashMap<NodeId, usize>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Offers {
    fn lock(&self) -> MutexGuard<'_, HashMap<(NodeId, u32), SpliceWaiter>> {
        lock(&self.pending)
    }

    /// Registers a new offer to `target`; returns its token.
    pub(crate) fn register(
        &self,
        target: NodeId,
    ) -> Result<(u32, oneshot::Receiver<Answer>), getrandom::Error> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.lock();
        let mut b = [0u8; 4];
        loop {
            getrandom::fill(&mut b)?;
            let token = u32::from_le_bytes(b);
            if let std::collections::hash_map::Entry::Vacant(v) = pending.entry((target, token)) {
                v.insert(tx);
                return Ok((token, rx));
            }
        }
    }

    pub(crate) fn remove(&self, target: NodeId, token: u32) {
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
pub(crate) struct AskerTurn<'a> {
    offers: &'a Offers,
    from: NodeId,
}

impl<'a> AskerTurn<'a> {
    pub(crate) fn take(offers: &'a Offers, from: NodeId) -> Option<Self> {
        let mut busy = lock(&offers.answering);
        let n = busy.entry(from).or_insert(0);
        if *n >= ANSWERS_PER_ASKER {
            return None;
        }
        *n += 1;
        Some(Self { offers, from })
    }
}

impl Drop for AskerTurn<'_> {
    fn drop(&mut self) {
        let mut busy = lock(&self.offers.answering);
        if let Some(n) = busy.get_mut(&self.from) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.from);
            }
        }
    }
}
