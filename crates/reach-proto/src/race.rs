//! Scheduling a race of connection attempts with staggered starts.
//!
//! RFC 8305 (Happy Eyeballs v2) starts the next candidate a short delay after the
//! previous one instead of waiting for it to time out, and starts it at once when
//! the previous attempt fails. The first attempt that completes the whole
//! handshake wins; the driver cancels the rest. This type only decides *when* to
//! start which candidate; the driver does the I/O and reports failures.
//!
//! Driver loop: call [`DirectRace::poll`] with the current time; on
//! [`RaceStep::Start`] begin that attempt and poll again; on [`RaceStep::Wait`]
//! sleep until the instant or until an attempt ends; report failed attempts
//! with [`DirectRace::handle_failure`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// RFC 8305 section 5: the recommended connection attempt delay is 250 ms.
pub const DEFAULT_ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// What the driver should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaceStep {
    /// Begin an attempt to this candidate (index into the candidate list).
    Start(usize, SocketAddr),
    /// Nothing to start before this instant; wait for it or for an attempt to end.
    Wait(Instant),
    /// Every candidate was tried and failed.
    Exhausted,
    /// The race's deadline passed.
    TimedOut,
}

/// The state of a staggered race over an ordered candidate list.
#[derive(Debug)]
pub struct DirectRace {
    candidates: Vec<SocketAddr>,
    next: usize,
    in_flight: usize,
    next_start: Instant,
    attempt_delay: Duration,
    deadline: Instant,
}

impl DirectRace {
    /// A race over `candidates` (already ordered) that gives up at `now + timeout`.
    pub fn new(
        candidates: Vec<SocketAddr>,
        now: Instant,
        attempt_delay: Duration,
        timeout: Duration,
    ) -> Self {
        Self {
            candidates,
            next: 0,
            in_flight: 0,
            next_start: now,
            attempt_delay,
            deadline: now + timeout,
        }
    }

    /// The instant after which the race has failed.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Decides the next step at time `now`.
    pub fn poll(&mut self, now: Instant) -> RaceStep {
        if now >= self.deadline {
            return RaceStep::TimedOut;
        }
        if self.next < self.candidates.len() {
            if now >= self.next_start || self.in_flight == 0 {
                let i = self.next;
                self.next += 1;
                self.in_flight += 1;
                self.next_start = now + self.attempt_delay;
                return RaceStep::Start(i, self.candidates[i]);
            }
            return RaceStep::Wait(self.next_start.min(self.deadline));
        }
        if self.in_flight == 0 {
            return RaceStep::Exhausted;
        }
        RaceStep::Wait(self.deadline)
    }

    /// Reports that an attempt failed; the next candidate may start at once.
    pub fn handle_failure(&mut self, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.next_start = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([192, 0, 2, 1], 1000 + i)))
            .collect()
    }

    #[test]
    fn starts_are_staggered_while_attempts_hang() {
        let t0 = Instant::now();
        let d = Duration::from_millis(250);
        let mut race = DirectRace::new(addrs(3), t0, d, Duration::from_secs(5));
        assert!(matches!(race.poll(t0), RaceStep::Start(0, _)));
        assert_eq!(race.poll(t0), RaceStep::Wait(t0 + d));
        assert!(matches!(race.poll(t0 + d), RaceStep::Start(1, _)));
        assert!(matches!(race.poll(t0 + 2 * d), RaceStep::Start(2, _)));
        assert_eq!(
            race.poll(t0 + 2 * d),
            RaceStep::Wait(t0 + Duration::from_secs(5))
        );
        assert_eq!(race.poll(t0 + Duration::from_secs(5)), RaceStep::TimedOut);
    }

    #[test]
    fn a_failure_starts_the_next_candidate_at_once() {
        let t0 = Instant::now();
        let mut race = DirectRace::new(addrs(2), t0, DEFAULT_ATTEMPT_DELAY, Duration::from_secs(5));
        assert!(matches!(race.poll(t0), RaceStep::Start(0, _)));
        let t1 = t0 + Duration::from_millis(3);
        race.handle_failure(t1);
        assert!(matches!(race.poll(t1), RaceStep::Start(1, _)));
        race.handle_failure(t1);
        assert_eq!(race.poll(t1), RaceStep::Exhausted);
    }

    #[test]
    fn empty_candidate_list_is_exhausted_at_once() {
        let t0 = Instant::now();
        let mut race = DirectRace::new(vec![], t0, DEFAULT_ATTEMPT_DELAY, Duration::from_secs(1));
        assert_eq!(race.poll(t0), RaceStep::Exhausted);
    }
}
