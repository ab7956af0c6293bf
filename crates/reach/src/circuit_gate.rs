//! How many relay circuits an endpoint joins at once, and the pause after
//! its hub said it offers none (`circuit`). Apart from `circuit` so that
//! the endpoint's shared state can hold it without importing `circuit`.

use std::time::{Duration, Instant};

/// Circuits this node joins at once: a node with hundreds of routed streams
/// must not flood its hub with circuit handshakes (they share the hub's
/// per-source handshake slots with everything else from this host).
pub(crate) const JOINS_AT_ONCE: usize = 4;

/// How long a node asks its hub for no circuits after the hub said it
/// offers none now (none at all, or a limit reached).
const BACK_OFF: Duration = Duration::from_secs(60);

/// Circuit joins of one endpoint: how many at once, and when the hub last
/// said it offers none.
pub(crate) struct Gate {
    /// Permits for joins in progress.
    pub(crate) joins: tokio::sync::Semaphore,
    paused_until: std::sync::Mutex<Option<Instant>>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            joins: tokio::sync::Semaphore::new(JOINS_AT_ONCE),
            paused_until: std::sync::Mutex::new(None),
        }
    }
}

impl Gate {
    pub(crate) fn paused(&self) -> bool {
        let until = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    pub(crate) fn pause(&self, why: &str) {
        tracing::debug!("no circuits for {BACK_OFF:?}: {why}");
        *self.paused_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + BACK_OFF);
    }
}
