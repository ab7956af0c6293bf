//! When a splice sends its SYNs: the schedule of a TCP simultaneous open's
//! connection attempts, one per candidate endpoint of the peer (sans-IO).
//!
//! Every candidate starts at once, in candidate order: two sequential NATs
//! facing each other allocate their i-th mapping for each other's i-th
//! candidate only if each side's SYNs leave in the order predicted, so the
//! driver must start attempts in the order [`Punch::poll`] yields them. A
//! failed attempt (a reset from a rejecting firewall, usually because the
//! peer's own SYN has not opened its side yet) is retried after a pause that
//! starts at [`FIRST_RETRY`] and doubles up to [`MAX_RETRY`]: the SYN that
//! opens the way is usually less than a hub round trip behind, and the cap
//! bounds the SYN rate towards a candidate that keeps refusing (offers come
//! from other nodes, and a candidate could name a bystander).
//!
//! Driver loop: [`Punch::poll`] until it says [`PunchStep::Wait`] or
//! [`PunchStep::Finished`]; start each [`PunchStep::Connect`]; report each
//! outcome with [`Punch::handle_failed`] or [`Punch::handle_connected`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Pause before the first retry of a candidate.
pub const FIRST_RETRY: Duration = Duration::from_millis(2);
/// Longest pause between retries of a candidate: at most 10 SYNs a second.
pub const MAX_RETRY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Start an attempt at this time.
    Due(Instant),
    /// An attempt is in flight.
    Trying,
    /// Connected; nothing more to do.
    Done,
}

#[derive(Clone, Debug)]
struct Candidate {
    addr: SocketAddr,
    state: State,
    pause: Duration,
}

/// What the driver should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PunchStep {
    /// Start an attempt to candidate `.0` at `.1` now.
    Connect(usize, SocketAddr),
    /// Nothing to start before this time (or before an attempt ends).
    Wait(Instant),
    /// The deadline has passed, or every candidate connected.
    Finished,
}

/// The attempt schedule of one splice.
#[derive(Clone, Debug)]
pub struct Punch {
    candidates: Vec<Candidate>,
    deadline: Instant,
}

impl Punch {
    /// Every candidate due `now`, in order; nothing starts after `deadline`.
    pub fn new(candidates: &[SocketAddr], now: Instant, deadline: Instant) -> Self {
        Self {
            candidates: candidates
                .iter()
                .map(|addr| Candidate {
                    addr: *addr,
                    state: State::Due(now),
                    pause: FIRST_RETRY,
                })
                .collect(),
            deadline,
        }
    }

    /// The next thing to do at `now`. Due candidates come lowest index first.
    pub fn poll(&mut self, now: Instant) -> PunchStep {
        if now >= self.deadline || self.candidates.iter().all(|c| c.state == State::Done) {
            return PunchStep::Finished;
        }
        let mut next = self.deadline;
        for (i, c) in self.candidates.iter_mut().enumerate() {
            if let State::Due(at) = c.state {
                if at <= now {
                    c.state = State::Trying;
                    return PunchStep::Connect(i, c.addr);
                }
                next = next.min(at);
            }
        }
        PunchStep::Wait(next)
    }

    /// The attempt to candidate `i` failed at `now`: retry after a pause.
    pub fn handle_failed(&mut self, i: usize, now: Instant) {
        if let Some(c) = self.candidates.get_mut(i) {
            if c.state == State::Trying {
                c.state = State::Due(now + c.pause);
                c.pause = (c.pause * 2).min(MAX_RETRY);
            }
        }
    }

    /// The attempt to candidate `i` connected.
    pub fn handle_connected(&mut self, i: usize) {
        if let Some(c) = self.candidates.get_mut(i) {
            c.state = State::Done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([203, 0, 113, 7], 20_000 + i)))
            .collect()
    }

    #[test]
    fn every_candidate_starts_at_once_in_order() {
        let t0 = Instant::now();
        let c = addrs(6);
        let mut p = Punch::new(&c, t0, t0 + Duration::from_secs(2));
        for (i, a) in c.iter().enumerate() {
            assert_eq!(p.poll(t0), PunchStep::Connect(i, *a));
        }
        assert_eq!(p.poll(t0), PunchStep::Wait(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn refused_attempts_back_off_doubling_up_to_the_cap() {
        let t0 = Instant::now();
        let c = addrs(1);
        let mut p = Punch::new(&c, t0, t0 + Duration::from_secs(60));
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..10 {
            assert_eq!(p.poll(now), PunchStep::Connect(0, c[0]));
            p.handle_failed(0, now);
            let PunchStep::Wait(at) = p.poll(now) else {
                panic!("a retry is scheduled");
            };
            pauses.push((at - now).as_millis());
            now = at;
        }
        assert_eq!(pauses, [2, 4, 8, 16, 32, 64, 100, 100, 100, 100]);
    }

    #[test]
    fn connected_candidates_stop_and_the_deadline_ends_everything() {
        let t0 = Instant::now();
        let c = addrs(2);
        let end = t0 + Duration::from_secs(1);
        let mut p = Punch::new(&c, t0, end);
        assert_eq!(p.poll(t0), PunchStep::Connect(0, c[0]));
        assert_eq!(p.poll(t0), PunchStep::Connect(1, c[1]));
        p.handle_connected(0);
        p.handle_failed(1, t0);
        assert_eq!(p.poll(t0), PunchStep::Wait(t0 + FIRST_RETRY));
        assert_eq!(p.poll(t0 + FIRST_RETRY), PunchStep::Connect(1, c[1]));
        p.handle_connected(1);
        assert_eq!(p.poll(t0), PunchStep::Finished);
        let mut q = Punch::new(&c, t0, end);
        assert_eq!(q.poll(end), PunchStep::Finished);
    }

    proptest! {
        #[test]
        fn schedules_never_start_after_the_deadline_or_twice_at_once(
            events in proptest::collection::vec((0usize..8, any::<bool>(), 0u64..500), 0..200),
        ) {
            let t0 = Instant::now();
            let end = t0 + Duration::from_secs(10);
            let c = addrs(8);
            let mut p = Punch::new(&c, t0, end);
            let mut trying = [false; 8];
            let mut now = t0;
            for (i, ok, dt) in events {
                now += Duration::from_millis(dt);
                while let PunchStep::Connect(j, _) = p.poll(now) {
                    prop_assert!(now < end);
                    prop_assert!(!trying[j], "candidate {} started twice", j);
                    trying[j] = true;
                }
                if trying[i] {
                    trying[i] = false;
                    if ok { p.handle_connected(i) } else { p.handle_failed(i, now) }
                }
            }
        }
    }
}
