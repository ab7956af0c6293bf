//! The gate for dial-backs: a registered node asks the hub to connect to
//! its own observed address from another port or address
//! ([`Control::DialBack`](reach_proto::link::Control::DialBack)), to learn
//! how inbound connections are filtered on its way (`reach doctor`).
//!
//! The hub only ever dials the address the node's session came from, so a
//! node cannot aim it at anyone else; what a node (or many) can still do
//! is make it dial often. The gate bounds that: so many running at once in
//! all and per link, and so many started a second.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::LinkId;

/// Dial-backs running at once, in all.
pub const MAX_RUNNING: usize = 16;
/// Dial-backs running at once for one link.
pub const MAX_RUNNING_PER_LINK: usize = 2;
/// Dial-backs started per second, in all.
pub const MAX_PER_SECOND: u32 = 20;

/// Admits dial-backs within the bounds; the driver reports each one's end.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    running: usize,
    per_link: HashMap<LinkId, usize>,
    window: Option<Instant>,
    started: u32,
}

impl Gate {
    /// Admits one dial-back for `link` at `now`, or says why not.
    pub(crate) fn admit(&mut self, link: LinkId, now: Instant) -> Result<(), &'static str> {
        if self
            .window
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.started = 0;
        }
        if self.started >= MAX_PER_SECOND {
            return Err("the hub is dialling back too often: try again in a second");
        }
        if self.running >= MAX_RUNNING {
            return Err("the hub has too many dial-backs running: try again shortly");
        }
        let mine = self.per_link.entry(link).or_default();
        if *mine >= MAX_RUNNING_PER_LINK {
            return Err("this session has too many dial-backs running");
        }
        *mine += 1;
        self.running += 1;
        self.started += 1;
        Ok(())
    }

    /// One dial-back of `link` ended.
    pub(crate) fn done(&mut self, link: LinkId) {
        if let Some(n) = self.per_link.get_mut(&link) {
            *n -= 1;
            if *n == 0 {
                self.per_link.remove(&link);
            }
            self.running -= 1;
        }
    }

    /// Dial-backs running now.
    pub(crate) fn running(&self) -> usize {
        self.running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_backs_are_bounded_per_link_in_all_and_per_second() {
        let mut g = Gate::default();
        let t = Instant::now();
        let (a, b): (LinkId, LinkId) = (1, 2);
        assert_eq!(g.admit(a, t), Ok(()));
        assert_eq!(g.admit(a, t), Ok(()));
        assert!(g.admit(a, t).is_err(), "a third for one link");
        g.done(a);
        assert_eq!(g.admit(a, t), Ok(()));
        // Across links, the total bound.
        let mut link = 10;
        while g.running() < MAX_RUNNING {
            assert_eq!(g.admit(link, t), Ok(()));
            link += 1;
        }
        assert!(g.admit(b, t).is_err(), "over the total");
        // Ends free room, but not the per-second budget.
        for l in 10..link {
            g.done(l);
        }
        let mut admitted = 0;
        while g.admit(link, t).is_ok() {
            g.done(link);
            link += 1;
            admitted += 1;
        }
        assert_eq!(admitted + 3 + (MAX_RUNNING as u32 - 2), MAX_PER_SECOND);
        // A second later the budget is back.
        assert_eq!(g.admit(b, t + Duration::from_secs(1)), Ok(()));
        // An unknown end changes nothing.
        let before = g.running();
        g.done(999);
        assert_eq!(g.running(), before);
    }
}
