//! Splice success rates per NAT-type pair: every ordered pair of a
//! topology's matrix hosts tries `reach connect --modules splice` a number of
//! times, one attempt at a time (concurrent splices through one sequential
//! NAT would shift each other's ports, which measures load, not the NAT
//! types), and the table reports the share that spliced and the median setup
//! time of those that did.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::apply::LabError;
use crate::lab::Lab;
use crate::matrix::{reach_connect, reach_state, start_reach};
use crate::topology::Topology;

/// How long hubs may take to learn every node.
const HUB_CONVERGENCE: Duration = Duration::from_secs(30);

/// One ordered pair's attempts.
#[derive(Clone, Debug, Serialize)]
pub struct PairRate {
    /// Connecting host.
    pub from: String,
    /// Listening host.
    pub to: String,
    /// Attempts made.
    pub attempts: u32,
    /// Attempts that spliced.
    pub spliced: u32,
    /// Median setup time of the attempts that spliced, in ms.
    pub median_ms: Option<f64>,
    /// Longest time a failed attempt took to give up (the whole `reach
    /// connect` process, start-up included), in ms.
    pub max_failure_ms: Option<f64>,
    /// Longest time a failed setup took by reach's own account (the
    /// "(after ...)" of its error), in ms: how fast Splice declines, without
    /// the process's start-up, which a loaded machine stretches.
    pub max_decline_ms: Option<f64>,
    /// The last failure's message.
    pub last_error: Option<String>,
}

impl PairRate {
    /// Share of attempts that spliced, 0..=1.
    pub fn rate(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            f64::from(self.spliced) / f64::from(self.attempts)
        }
    }
}

/// The whole table.
#[derive(Clone, Debug, Serialize)]
pub struct SpliceTable {
    /// Topology name.
    pub topology: String,
    /// Attempts per pair.
    pub attempts: u32,
    /// Hosts in matrix order.
    pub hosts: Vec<String>,
    /// Every ordered pair.
    pub pairs: Vec<PairRate>,
}

impl SpliceTable {
    /// The pair from `from` to `to`.
    pub fn pair(&self, from: &str, to: &str) -> Option<&PairRate> {
        self.pairs.iter().find(|p| p.from == from && p.to == to)
    }

    /// Spliced and attempted over the pairs `select` picks.
    pub fn total(&self, select: impl Fn(&PairRate) -> bool) -> (u32, u32) {
        self.pairs
            .iter()
            .filter(|p| select(p))
            .fold((0, 0), |(s, a), p| (s + p.spliced, a + p.attempts))
    }

    /// A Markdown table: rows connect, columns listen; each cell is the
    /// splice rate and the median setup time.
    pub fn markdown(&self) -> String {
        let s = format!(
            "Splice success per ordered pair of `{}` hosts, {} attempts each \
             (`reach connect --modules splice`, one at a time). Rows connect, \
             columns listen; each cell: share spliced, median setup time.\n\n",
            self.topology, self.attempts
        );
        s + &grid(&self.hosts, |from, to| match self.pair(from, to) {
            None => String::new(),
            Some(p) => match p.median_ms {
                Some(ms) => format!("{:.0}% {ms:.1} ms", p.rate() * 100.0),
                None => format!("{:.0}%", p.rate() * 100.0),
            },
        })
    }

    /// A plain-text rendering for the terminal (the Markdown table).
    pub fn render(&self) -> String {
        self.markdown()
    }
}

/// A Markdown grid of `hosts` by `hosts`, each cell as `cell(row,
/// column)` says.
pub(crate) fn grid(hosts: &[String], cell: impl Fn(&str, &str) -> String) -> String {
    let mut s = "| from \\ to |".to_string();
    for h in hosts {
        s += &format!(" {h} |");
    }
    s += "\n|---|";
    s += &"---|".repeat(hosts.len());
    s += "\n";
    for from in hosts {
        s += &format!("| **{from}** |");
        for to in hosts {
            s += &format!(" {} |", cell(from, to));
        }
        s += "\n";
    }
    s
}

pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Runs `attempts` splices per ordered pair of the running lab's matrix
/// hosts, each within `timeout`. The topology must have `[hubs]`.
pub fn run(
    lab: &Lab,
    topology: &Topology,
    tools: &Path,
    attempts: u32,
    timeout: Duration,
) -> Result<SpliceTable, LabError> {
    let hubs_config = topology.hubs.as_ref().ok_or_else(|| LabError::Command {
        command: "reach-lab splice".into(),
        output: "the topology has no [hubs] table: splicing needs a hub".into(),
    })?;
    let hubs = crate::hubs::start(lab, topology, hubs_config, tools, &reach_state(lab))?;
    let targets = start_reach(lab, tools, &hubs.attach)?;
    hubs.wait_converged(lab, tools, hubs.attach.len(), HUB_CONVERGENCE)?;
    let hosts = lab.record().matrix.clone();
    let n = hosts.len() as u64;
    let progress =
        reach_progress::Progress::new(n * n.saturating_sub(1) * u64::from(attempts), "splice");
    let mut pairs = Vec::new();
    for from in &hosts {
        for to in hosts.iter().filter(|h| *h != from) {
            progress.doing(format!("{from} -> {to}"));
            let Some((_, vaddr, _)) = targets.iter().find(|(h, _, _)| h == to) else {
                continue;
            };
            let hub = hubs.attach.get(from).map(String::as_str);
            let mut times = Vec::new();
            let mut rate = PairRate {
                from: from.clone(),
                to: to.clone(),
                attempts,
                spliced: 0,
                median_ms: None,
                max_failure_ms: None,
                max_decline_ms: None,
                last_error: None,
            };
            for _ in 0..attempts {
                progress.step();
                let started = Instant::now();
                let token = format!("splice {from} -> {to}\n");
                let extra = ["--modules", "splice"];
                match reach_connect(lab, tools, from, vaddr, hub, &token, timeout, &extra) {
                    Ok(c) if c.module == "splice" => {
                        rate.spliced += 1;
                        times.push(c.setup_ms);
                    }
                    Ok(c) => rate.last_error = Some(format!("used {}", c.module)),
                    Err(e) => {
                        let ms = started.elapsed().as_secs_f64() * 1000.0;
                        rate.max_failure_ms = Some(rate.max_failure_ms.unwrap_or(0.0).max(ms));
                        if let Some(ms) = failed_after_ms(&e) {
                            rate.max_decline_ms = Some(rate.max_decline_ms.unwrap_or(0.0).max(ms));
                        }
                        rate.last_error = Some(e);
                    }
                }
            }
            rate.median_ms = median(times);
            pairs.push(rate);
        }
    }
    drop(targets);
    drop(hubs);
    Ok(SpliceTable {
        topology: lab.record().topology.clone(),
        attempts,
        hosts,
        pairs,
    })
}

/// The setup time in a `reach connect` error ("cannot reach node X (after
/// 1.7ms): ..."), in ms.
fn failed_after_ms(error: &str) -> Option<f64> {
    let rest = &error[error.find("(after ")? + "(after ".len()..];
    let text = &rest[..rest.find(')')?];
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let value: f64 = text[..number_end].parse().ok()?;
    let scale = match &text[number_end..] {
        "s" => 1e3,
        "ms" => 1.0,
        "µs" | "us" => 1e-3,
        "ns" => 1e-6,
        _ => return None,
    };
    Some(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setup_time_is_read_from_a_connect_error() {
        let e = "reach: error: cannot reach node yvz2 (after 1.7ms): splice: random ports";
        assert_eq!(failed_after_ms(e), Some(1.7));
        assert_eq!(failed_after_ms("x (after 2.5s): y"), Some(2500.0));
        assert_eq!(failed_after_ms("x (after 250.0µs): y"), Some(0.25));
        assert_eq!(failed_after_ms("reach: error: no hub"), None);
        assert_eq!(failed_after_ms("x (after soon): y"), None);
    }

    #[test]
    fn medians_and_totals() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let p = |from: &str, spliced| PairRate {
            from: from.into(),
            to: "b".into(),
            attempts: 10,
            spliced,
            median_ms: Some(1.0),
            max_failure_ms: None,
            max_decline_ms: None,
            last_error: None,
        };
        let t = SpliceTable {
            topology: "t".into(),
            attempts: 10,
            hosts: vec!["a".into(), "b".into(), "c".into()],
            pairs: vec![p("a", 10), p("c", 5)],
        };
        assert_eq!(t.total(|_| true), (15, 20));
        assert_eq!(t.total(|p| p.from == "c"), (5, 10));
        let md = t.markdown();
        assert!(md.contains("| **a** |  | 100% 1.0 ms |  |"), "{md}");
        assert!(md.contains("| **c** |  | 50% 1.0 ms |  |"), "{md}");
    }
}
