//! DPF's probe of clients that are gone, sans-IO: every round the daemon
//! tries a TCP connection to each TCP mapping's internal endpoint; a
//! mapping whose endpoint refuses (the program that asked for it is gone)
//! or does not answer (the host is gone) that many rounds in a row is
//! deleted before its lease ends. Time comes in as seconds since the Unix
//! epoch, like the table's.
//!
//! ```text
//! round due --targets--> driver connects (bounded, each within a timeout)
//!           <--outcomes-- Alive resets the count, Refused/Silent add one
//!           --> keys to delete: misses reached, mapping unchanged meanwhile
//! ```
//!
//! UDP mappings are left to their leases: a UDP endpoint does not say
//! whether anyone listens.

use std::collections::HashMap;
use std::net::SocketAddrV4;

use crate::table::{Key, Protocol, Table};

/// How the gateway probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Seconds between the end of a round and the start of the next (0:
    /// no probing).
    pub interval: u64,
    /// Rounds in a row without an answer before a mapping is deleted.
    pub misses: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            interval: 60,
            misses: 3,
        }
    }
}

/// What one probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint accepted the connection.
    Alive,
    /// The host refused it: nothing listens there any more.
    Refused,
    /// No answer within the timeout, or the host is unreachable.
    Silent,
}

/// The prober's state.
#[derive(Debug)]
pub struct Prober {
    settings: Settings,
    /// Misses in a row, per mapping (and the endpoint they were counted
    /// against: a mapping moved to another endpoint starts again).
    misses: HashMap<Key, (SocketAddrV4, u32)>,
    /// When the next round starts (None: one is under way, or probing is
    /// off).
    next: Option<u64>,
}

impl Prober {
    /// A prober whose first round comes one interval after `now`.
    pub fn new(settings: Settings, now: u64) -> Self {
        let next = (settings.interval > 0 && settings.misses > 0).then(|| now + settings.interval);
        Self {
            settings,
            misses: HashMap::new(),
            next,
        }
    }

    /// When the next round is due (None: under way, or probing is off).
    pub fn next_round(&self) -> Option<u64> {
        self.next
    }

    /// Starts a round if one is due at `now`: the TCP mappings' keys and
    /// internal endpoints to probe (empty when none is due).
    pub fn start_round(&mut self, table: &Table, now: u64) -> Vec<(Key, SocketAddrV4)> {
        if self.next.is_none_or(|at| now < at) {
            return Vec::new();
        }
        self.next = None;
        // Counts of mappings that are gone are forgotten.
        self.misses
            .retain(|k, (internal, _)| table.get(*k).is_some_and(|m| m.internal == *internal));
        table
            .mappings()
            .filter(|m| m.protocol == Protocol::Tcp)
            .map(|m| ((m.protocol, m.external_port), m.internal))
            .collect()
    }

    /// The round's outcomes: returns the keys of the mappings to delete
    /// (missed too many rounds, and still forwarding to the endpoint that
    /// missed), and schedules the next round an interval after `now`.
    pub fn finish_round(
        &mut self,
        outcomes: &[(Key, SocketAddrV4, Outcome)],
        table: &Table,
        now: u64,
    ) -> Vec<Key> {
        let mut gone = Vec::new();
        for &(key, internal, outcome) in outcomes {
            if table.get(key).is_none_or(|m| m.internal != internal) {
                // Deleted, or given to another endpoint, while probed.
                self.misses.remove(&key);
                continue;
            }
            if outcome == Outcome::Alive {
                self.misses.remove(&key);
                continue;
            }
            let count = self.misses.entry(key).or_insert((internal, 0));
            if count.0 != internal {
                *count = (internal, 0);
            }
            count.1 += 1;
            if count.1 >= self.settings.misses {
                self.misses.remove(&key);
                gone.push(key);
            }
        }
        self.next = Some(now + self.settings.interval);
        gone
    }

    /// Mappings with misses counted now (for tests and status).
    pub fn counted(&self) -> usize {
        self.misses.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{MapRequest, Policy, Source};

    fn table() -> Table {
        let mut t = Table::new(Policy {
            internal: vec![("10.0.0.0".parse().unwrap(), 24)],
            ports: 40000..=40099,
            max_per_client: 8,
            lease_max: 3600,
            max_total: 100,
        });
        for (protocol, port) in [
            (Protocol::Tcp, 7000),
            (Protocol::Tcp, 7001),
            (Protocol::Udp, 7002),
        ] {
            let r = MapRequest {
                protocol,
                client: "10.0.0.5".parse().unwrap(),
                internal: SocketAddrV4::new("10.0.0.5".parse().unwrap(), port),
                suggested_port: 40000 + port - 7000,
                exact: false,
                lifetime: 3600,
                source: Source::NatPmp,
                nonce: None,
            };
            t.map(&r, 1000).unwrap();
        }
        t
    }

    const S: Settings = Settings {
        interval: 10,
        misses: 2,
    };

    #[test]
    fn a_mapping_that_misses_rounds_in_a_row_is_deleted_and_an_answer_resets_it() {
        let t = table();
        let mut p = Prober::new(S, 1000);
        assert_eq!(p.next_round(), Some(1010));
        assert!(p.start_round(&t, 1009).is_empty(), "not due yet");
        let targets = p.start_round(&t, 1010);
        // TCP only.
        assert_eq!(targets.len(), 2);
        assert!(targets.iter().all(|(k, _)| k.0 == Protocol::Tcp));
        assert_eq!(p.next_round(), None, "under way");
        let result = |o7000, o7001| {
            vec![
                (targets[0].0, targets[0].1, o7000),
                (targets[1].0, targets[1].1, o7001),
            ]
        };
        // Round 1: 7000 refuses, 7001 silent.
        let gone = p.finish_round(&result(Outcome::Refused, Outcome::Silent), &t, 1011);
        assert!(gone.is_empty());
        assert_eq!(p.next_round(), Some(1021));
        assert_eq!(p.counted(), 2);
        // Round 2: 7000 answers again (reset), 7001 misses its second.
        p.start_round(&t, 1021);
        let gone = p.finish_round(&result(Outcome::Alive, Outcome::Silent), &t, 1022);
        assert_eq!(gone, vec![targets[1].0]);
        assert_eq!(p.counted(), 0);
        // Round 3 and 4: 7000 misses twice: gone.
        p.start_round(&t, 1032);
        assert!(p
            .finish_round(&result(Outcome::Refused, Outcome::Alive), &t, 1033)
            .is_empty());
        p.start_round(&t, 1043);
        let gone = p.finish_round(&result(Outcome::Refused, Outcome::Alive), &t, 1044);
        assert_eq!(gone, vec![targets[0].0]);
    }

    #[test]
    fn a_mapping_changed_or_deleted_while_probed_is_not_deleted() {
        let mut t = table();
        let mut p = Prober::new(
            Settings {
                interval: 10,
                misses: 1,
            },
            1000,
        );
        let targets = p.start_round(&t, 1010);
        t.remove(targets[0].0);
        let outcomes: Vec<_> = targets
            .iter()
            .map(|(k, _)| {
                (
                    *k,
                    SocketAddrV4::new("10.0.0.9".parse().unwrap(), 1),
                    Outcome::Refused,
                )
            })
            .collect();
        // One deleted, the other's endpoint is not the one probed.
        assert!(p.finish_round(&outcomes, &t, 1011).is_empty());
        assert_eq!(p.counted(), 0);
    }

    #[test]
    fn probing_off_never_comes_due() {
        let t = table();
        for s in [
            Settings {
                interval: 0,
                misses: 3,
            },
            Settings {
                interval: 5,
                misses: 0,
            },
        ] {
            let mut p = Prober::new(s, 1000);
            assert_eq!(p.next_round(), None);
            assert!(p.start_round(&t, u64::MAX).is_empty());
        }
    }
}
