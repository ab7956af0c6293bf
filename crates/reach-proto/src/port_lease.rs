//! When a node asks its gateway for a port mapping, sans-IO: ask at
//! start, renew at half the lease, retry a failed renewal until the lease
//! runs out, and ask again with a growing pause while no gateway answers
//! (a network without one is not asked every few seconds). The driver
//! does the asking (PCP, NAT-PMP, UPnP) and reports back; time comes in
//! as an argument.
//!
//! ```text
//! Unmapped --ask ok--> Mapped --renew at lifetime/2--> Mapped
//!    ^  ask failed: again after RETRY_FIRST, doubling to RETRY_MAX
//!    '------------- renewals failed until the lease ran out: Lost
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The first pause after a failed ask.
pub const RETRY_FIRST: Duration = Duration::from_secs(30);
/// The longest pause between asks.
pub const RETRY_MAX: Duration = Duration::from_secs(1800);
/// Between failed renewals of a mapping that still holds.
pub const RENEW_RETRY: Duration = Duration::from_secs(10);
/// The lease asked for.
pub const LEASE: Duration = Duration::from_secs(7200);

/// What the driver should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask for a mapping (none is held).
    Ask,
    /// Renew the mapping held.
    Renew,
}

/// What changed, for the node to advertise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A mapping is held at this external address (new, or moved).
    Mapped(SocketAddr),
    /// The mapping is gone: its lease ran out unrenewed.
    Lost(SocketAddr),
}

#[derive(Clone, Copy, Debug)]
enum State {
    Unmapped {
        at: Instant,
        pause: Duration,
    },
    Mapped {
        external: SocketAddr,
        expires: Instant,
        renew_at: Instant,
    },
}

/// One listening port's mapping.
#[derive(Debug)]
pub struct Lease {
    state: State,
    busy: bool,
    events: Vec<Event>,
}

impl Lease {
    /// Asks at once.
    pub fn new(now: Instant) -> Self {
        Self {
            state: State::Unmapped {
                at: now,
                pause: RETRY_FIRST,
            },
            busy: false,
            events: Vec::new(),
        }
    }

    /// The external address held, if any.
    pub fn external(&self) -> Option<SocketAddr> {
        match self.state {
            State::Mapped { external, .. } => Some(external),
            State::Unmapped { .. } => None,
        }
    }

    /// When the lease held ends.
    pub fn expires(&self) -> Option<Instant> {
        match self.state {
            State::Mapped { expires, .. } => Some(expires),
            State::Unmapped { .. } => None,
        }
    }

    /// When [`Lease::poll_action`] has something (None while the driver
    /// is busy with an action).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.busy {
            return None;
        }
        Some(match self.state {
            State::Unmapped { at, .. } => at,
            State::Mapped {
                renew_at, expires, ..
            } => renew_at.min(expires),
        })
    }

    /// The action due at `now`, if any; the driver reports its end with
    /// [`Lease::mapped`] or [`Lease::failed`].
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if self.busy {
            return None;
        }
        let action = match self.state {
            State::Unmapped { at, .. } if now >= at => Action::Ask,
            State::Mapped {
                external, expires, ..
            } if now >= expires => {
                self.events.push(Event::Lost(external));
                self.state = State::Unmapped {
                    at: now,
                    pause: RETRY_FIRST,
                };
                Action::Ask
            }
            State::Mapped { renew_at, .. } if now >= renew_at => Action::Renew,
            _ => return None,
        };
        self.busy = true;
        Some(action)
    }

    /// The action ended with a mapping at `external` for `lifetime`.
    pub fn mapped(&mut self, now: Instant, external: SocketAddr, lifetime: Duration) {
        self.busy = false;
        if self.external() != Some(external) {
            self.events.push(Event::Mapped(external));
        }
        let lifetime = lifetime.max(Duration::from_secs(2));
        self.state = State::Mapped {
            external,
            expires: now + lifetime,
            renew_at: now + lifetime / 2,
        };
    }

    /// The action failed: a renewal is tried again while the lease holds,
    /// an ask after a pause that doubles each time.
    pub fn failed(&mut self, now: Instant) {
        self.busy = false;
        self.state = match self.state {
            State::Mapped {
                external, expires, ..
            } if now < expires => State::Mapped {
                external,
                expires,
                renew_at: (now + RENEW_RETRY).min(expires),
            },
            State::Mapped { external, .. } => {
                self.events.push(Event::Lost(external));
                State::Unmapped {
                    at: now + RETRY_FIRST,
                    pause: RETRY_FIRST * 2,
                }
            }
            State::Unmapped { pause, .. } => State::Unmapped {
                at: now + pause,
                pause: (pause * 2).min(RETRY_MAX),
            },
        };
    }

    /// The next change to advertise.
    pub fn poll_event(&mut self) -> Option<Event> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_mapping_is_asked_at_once_and_renewed_at_half_its_lease() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        assert_eq!(l.poll_timeout(), Some(t0));
        assert_eq!(l.poll_action(t0), Some(Action::Ask));
        // Busy: nothing more until the driver reports.
        assert_eq!(l.poll_timeout(), None);
        assert_eq!(l.poll_action(t0), None);
        l.mapped(t0, addr("192.0.2.1:40022"), Duration::from_secs(3600));
        assert_eq!(l.poll_event(), Some(Event::Mapped(addr("192.0.2.1:40022"))));
        assert_eq!(l.poll_event(), None);
        assert_eq!(l.poll_timeout(), Some(t0 + Duration::from_secs(1800)));
        assert_eq!(l.poll_action(t0 + Duration::from_secs(1799)), None);
        let t1 = t0 + Duration::from_secs(1800);
        assert_eq!(l.poll_action(t1), Some(Action::Renew));
        // Renewed at the same address: nothing to advertise anew.
        l.mapped(t1, addr("192.0.2.1:40022"), Duration::from_secs(3600));
        assert_eq!(l.poll_event(), None);
        assert_eq!(l.expires(), Some(t1 + Duration::from_secs(3600)));
    }

    #[test]
    fn failed_renewals_are_retried_until_the_lease_runs_out() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        l.poll_action(t0);
        l.mapped(t0, addr("192.0.2.1:40022"), Duration::from_secs(60));
        l.poll_event();
        let mut now = t0 + Duration::from_secs(30);
        assert_eq!(l.poll_action(now), Some(Action::Renew));
        l.failed(now);
        // Retried every RENEW_RETRY while the lease holds.
        for _ in 0..2 {
            now = l.poll_timeout().unwrap();
            assert_eq!(l.poll_action(now), Some(Action::Renew));
            l.failed(now);
        }
        assert_eq!(now, t0 + Duration::from_secs(50));
        now = l.poll_timeout().unwrap();
        assert_eq!(now, t0 + Duration::from_secs(60));
        // The lease ran out: lost, and asked for anew.
        assert_eq!(l.poll_action(now), Some(Action::Ask));
        assert_eq!(l.poll_event(), Some(Event::Lost(addr("192.0.2.1:40022"))));
        assert_eq!(l.external(), None);
    }

    #[test]
    fn without_a_gateway_asks_pause_longer_each_time_up_to_half_an_hour() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..9 {
            assert_eq!(l.poll_action(now), Some(Action::Ask));
            l.failed(now);
            let next = l.poll_timeout().unwrap();
            pauses.push((next - now).as_secs());
            now = next;
        }
        assert_eq!(pauses, [30, 60, 120, 240, 480, 960, 1800, 1800, 1800]);
        assert_eq!(l.poll_event(), None);
    }
}
