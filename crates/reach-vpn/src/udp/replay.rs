//! The replay window of a UDP session (the idea of RFC 6479): counters
//! may arrive out of order over UDP, so each receiver remembers which of
//! the last [`WINDOW`] counters it has taken, and refuses a counter it has
//! seen or one older than the window. It is consulted only after a
//! datagram authenticated, so a forger cannot move it.

/// Counters remembered behind the highest one taken.
pub const WINDOW: u64 = 8192;
const WORDS: usize = (WINDOW / 64) as usize;

/// Which recent counters were taken.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// One past the highest counter taken (0: none yet).
    next: u64,
    /// Bit `c % WINDOW` is set when counter `c` (within the window) was
    /// taken.
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self {
            next: 0,
            bits: [0; WORDS],
        }
    }
}

/// Why a counter was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Replay {
    /// Taken before.
    #[error("counter {0} seen before (a replay or a duplicate)")]
    Seen(u64),
    /// Older than the window.
    #[error("counter {0} is older than the replay window")]
    TooOld(u64),
}

impl ReplayWindow {
    fn slot(c: u64) -> (usize, u64) {
        let bit = c % WINDOW;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    }

    /// Whether `c` would be taken, without taking it.
    pub fn check(&self, c: u64) -> Result<(), Replay> {
        if c >= self.next {
            return Ok(());
        }
        if self.next - c > WINDOW {
            return Err(Replay::TooOld(c));
        }
        let (w, m) = Self::slot(c);
        if self.bits[w] & m != 0 {
            return Err(Replay::Seen(c));
        }
        Ok(())
    }

    /// Takes `c` if it is new and inside the window.
    pub fn take(&mut self, c: u64) -> Result<(), Replay> {
        self.check(c)?;
        if c >= self.next {
            // Clear the slots of the counters the window moves past.
            let gap = c - self.next;
            if gap >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for old in self.next..=c {
                    let (w, m) = Self::slot(old);
                    self.bits[w] &= !m;
                }
            }
            self.next = c + 1;
        }
        let (w, m) = Self::slot(c);
        self.bits[w] |= m;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_late_duplicate_and_too_old_counters() {
        let mut w = ReplayWindow::default();
        for c in 0..100 {
            assert_eq!(w.take(c), Ok(()));
        }
        assert_eq!(w.take(50), Err(Replay::Seen(50)));
        assert_eq!(w.take(200), Ok(()));
        assert_eq!(w.take(150), Ok(()), "late but inside the window");
        assert_eq!(w.take(150), Err(Replay::Seen(150)));
        assert_eq!(w.take(200 + WINDOW), Ok(()));
        assert_eq!(w.take(150), Err(Replay::TooOld(150)));
        assert_eq!(w.take(201), Ok(()), "inside the window again, never seen");
    }

    proptest! {
        /// Against a model that remembers every counter: the window takes
        /// a counter exactly when it is new and not older than the window.
        #[test]
        fn the_window_agrees_with_a_model(cs in proptest::collection::vec(0u64..40_000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::HashSet::new();
            let mut next = 0u64;
            for c in cs {
                let expect_ok = !seen.contains(&c) && (c >= next || next - c <= WINDOW);
                prop_assert_eq!(w.take(c).is_ok(), expect_ok, "counter {}", c);
                if expect_ok {
                    seen.insert(c);
                    next = next.max(c + 1);
                }
            }
        }
    }
}
