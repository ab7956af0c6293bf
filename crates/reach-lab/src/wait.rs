//! Waiting, with a deadline, for something outside this process to become true:
//! a file another process writes, a kernel state. Processes that can say they
//! are ready on a pipe do so instead (probe servers, hops); this is for the
//! ones that cannot (sshd's pid file, `reach listen`'s address file, bridge
//! port states, data arriving at a listener).

use std::time::{Duration, Instant};

/// How often a condition is checked.
pub const POLL: Duration = Duration::from_millis(20);

/// Checks `condition` until it yields a value, or gives `None` once `timeout`
/// has passed (it is always checked at least once).
pub fn until<T>(timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = condition() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// The trimmed content of a file written atomically (by rename), once it has
/// any, within `timeout`.
pub fn for_file(path: &std::path::Path, timeout: Duration) -> Option<String> {
    until(timeout, || {
        let text = std::fs::read_to_string(path).ok()?;
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_the_first_value_and_gives_up_at_the_deadline() {
        let mut n = 0;
        assert_eq!(
            until(Duration::from_secs(5), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            Some(3)
        );
        let started = Instant::now();
        assert_eq!(until(Duration::from_millis(50), || None::<()>), None);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
