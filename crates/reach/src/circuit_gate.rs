//! How many relay circuits an endpoint joins at once, and the pause after
//! its hub said it offers none (`circuit`). Apart from `circuit` so that
//! the endpoint's shared state can hold it without importing `circuit`.

use std::time::{Duration, Instant};

/// Circuits this node joins at once: a node with hundreds of routed streams
/// must not flood its hub with circuit handshakes (they share the hub's
/// per-source handshake slots with everything else from this host).
const JOINS_AT_ONCE: usize = 4;

/// How long a node asks its hub for no circuits after the hub said it
/// offers none now (none at all, or a limit reached).
const BACK_OFF: Duration = Duration::from_secs(60);

/// Circuit joins of one endpoint: how many at once, and when the hub last
/// said it offers none.
pub(crate) struct Gate {
    /// Permits for joins in progress.
    joins: tokio::sync::Semaphore,
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
    /// A turn to join a circuit: waits (up to `wait`) for one of the
    /// [`JOINS_AT_ONCE`] permits, and refuses while the hub said it offers
    /// none, before the wait and after it (joins that waited while one
    /// before them learned that give up too, rather than each asking again).
    pub(crate) async fn turn(
        &self,
        wait: Duration,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, String> {
        const PAUSED: &str = "the hub offered no circuits lately";
        if self.paused() {
            return Err(PAUSED.into());
        }
        let Ok(Ok(permit)) = tokio::time::timeout(wait, self.joins.acquire()).await else {
            return Err(format!(
                "{JOINS_AT_ONCE} circuits were being joined already"
            ));
        };
        if self.paused() {
            return Err(PAUSED.into());
        }
        Ok(permit)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_bounded_and_refused_while_paused_even_after_waiting() {
        let gate = Gate::default();
        let held: Vec<_> = take_turns(&gate, JOINS_AT_ONCE).await;
        // All permits held: the next waits out its bound.
        let busy = gate.turn(Duration::from_millis(10)).await;
        assert!(busy.is_err_and(|e| e.contains("being joined already")));
        // A join waiting for its turn when the gate pauses gives up once
        // it gets the turn.
        let waiting = gate.turn(Duration::from_secs(5));
        tokio::pin!(waiting);
        assert!(still_pending(waiting.as_mut()).await);
        gate.pause("no circuit port");
        drop(held);
        assert!(waiting
            .await
            .is_err_and(|e| e.contains("offered no circuits")));
        assert!(gate.turn(Duration::from_secs(5)).await.is_err());
    }

    async fn take_turns(gate: &Gate, n: usize) -> Vec<tokio::sync::SemaphorePermit<'_>> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(
                gate.turn(Duration::from_secs(1))
                    .await
                    .expect("a free turn"),
            );
        }
        v
    }

    /// Polls `f` once: whether it is still pending.
    async fn still_pending<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        let mut f = f;
        std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx).is_pending())).await
    }
}
