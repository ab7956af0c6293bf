//! The UDP hole-punching table of the vpn: every matrix host runs `reach
//! vpn up`; for each pair of hosts, a first packet sets up their stream
//! and UDP session, then each attempt moves both members to fresh UDP
//! sockets at once (`reach vpn rebind`: new ports, so new NAT mappings and
//! no conntrack state left from the attempt before) and waits until both
//! list the other on a UDP path, or until the punching window (3 s) and a
//! margin have passed. The time of an attempt is the longer of the two
//! members' own measures, from their first probe to the first answer.
//!
//! Both sides probe at once, so a pair is measured once, not in each
//! direction; the table fills its upper half.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::apply::LabError;
use crate::lab::Lab;
use crate::splice::{grid, median};
use crate::topology::Topology;
use crate::vpn::{self, Member, Options};

/// How long after the rebind an attempt may take: the first punching
/// round (3 s, `reach_vpn::udp::paths::FIRST_ROUND`) and a margin for the
/// status reads.
pub const ATTEMPT_WINDOW: Duration = Duration::from_millis(3500);
/// How long a pair's first stream and UDP session may take.
const FIRST_CONTACT: Duration = Duration::from_secs(20);
/// Between two reads of both members' status.
const POLL: Duration = Duration::from_millis(25);

/// One pair's attempts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PunchRate {
    /// One host.
    pub a: String,
    /// The other.
    pub b: String,
    /// Attempts made.
    pub attempts: u32,
    /// Attempts where both members had a UDP path within the window.
    pub punched: u32,
    /// Median setup time of those, in ms (the longer side's).
    pub median_ms: Option<f64>,
    /// The slowest of those, in ms.
    pub max_ms: Option<f64>,
    /// What the last failed attempt saw.
    pub last_error: Option<String>,
}

impl PunchRate {
    /// Share of attempts that punched.
    pub fn rate(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            f64::from(self.punched) / f64::from(self.attempts)
        }
    }
}

/// Every pair's attempts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PunchTable {
    /// The topology's name.
    pub topology: String,
    /// Attempts per pair.
    pub attempts: u32,
    /// The hosts in matrix order.
    pub hosts: Vec<String>,
    /// One entry per pair (a before b in matrix order).
    pub pairs: Vec<PunchRate>,
}

impl PunchTable {
    /// The pair of `a` and `b`, in either order.
    pub fn pair(&self, a: &str, b: &str) -> Option<&PunchRate> {
        self.pairs
            .iter()
            .find(|p| (p.a == a && p.b == b) || (p.a == b && p.b == a))
    }

    /// (punched, attempts) over the pairs `select` picks.
    pub fn total(&self, select: impl Fn(&PunchRate) -> bool) -> (u32, u32) {
        self.pairs
            .iter()
            .filter(|p| select(p))
            .fold((0, 0), |(s, a), p| (s + p.punched, a + p.attempts))
    }

    /// A Markdown table, its upper half filled: each cell is the share of
    /// attempts punched and the median setup time.
    pub fn markdown(&self) -> String {
        let order = |h: &str| self.hosts.iter().position(|x| x == h);
        let s = format!(
            "UDP hole punching of the vpn per pair of `{}` hosts, {} attempts each \
             (both members move to fresh UDP sockets with `reach vpn rebind`, then \
             punch at once; one pair at a time). Punching is symmetric, so each pair \
             is measured once. Each cell: share of attempts with a UDP path at both \
             members within {:.1} s, median setup time (first probe to first answer, \
             the slower member).\n\n",
            self.topology,
            self.attempts,
            ATTEMPT_WINDOW.as_secs_f64()
        );
        s + &grid(&self.hosts, |a, b| {
            if order(a) >= order(b) {
                return String::new();
            }
            match self.pair(a, b) {
                None => String::new(),
                Some(p) => match p.median_ms {
                    Some(ms) => format!("{:.0}% {ms:.1} ms", p.rate() * 100.0),
                    None => format!("{:.0}%", p.rate() * 100.0),
                },
            }
        })
    }
}

/// Runs `attempts` punches for every pair of the running lab's matrix
/// hosts (of those in `only`, when it names any). The topology must have
/// `[hubs]`.
pub fn run(
    lab: &Lab,
    topology: &Topology,
    tools: &Path,
    attempts: u32,
    only: &[String],
) -> Result<PunchTable, LabError> {
    let hubs_config = topology.hubs.as_ref().ok_or_else(|| LabError::Command {
        command: "reach-lab punch".into(),
        output: "the topology has no [hubs] table: the vpn needs a hub".into(),
    })?;
    let state = crate::matrix::reach_state(lab);
    let hubs = crate::hubs::start(lab, topology, hubs_config, tools, &state)?;
    let hosts: Vec<String> = lab
        .record()
        .matrix
        .iter()
        .filter(|h| only.is_empty() || only.contains(h))
        .cloned()
        .collect();
    let options = Options {
        servers: false,
        ..Options::default()
    };
    let mut members = BTreeMap::new();
    for h in &hosts {
        let hub = hubs.attach.get(h).map(String::as_str);
        members.insert(h.clone(), vpn::start_with(lab, tools, h, hub, &options)?);
    }
    let mut pairs = Vec::new();
    for (i, a) in hosts.iter().enumerate() {
        for b in &hosts[i + 1..] {
            pairs.push(pair(
                lab,
                tools,
                (a, &members[a]),
                (b, &members[b]),
                attempts,
            ));
        }
    }
    drop(members);
    drop(hubs);
    Ok(PunchTable {
        topology: lab.record().topology.clone(),
        attempts,
        hosts,
        pairs,
    })
}

/// Both members' UDP setup times for each other, in ms, once both have a
/// UDP path.
fn both_up(lab: &Lab, tools: &Path, a: (&str, IpAddr), b: (&str, IpAddr)) -> Option<f64> {
    let setup = |host: &str, peer: IpAddr| -> Option<f64> {
        let p = vpn::peer_status(lab, tools, host, peer)?;
        p["udp_path"].as_str()?;
        Some(p["udp_setup_us"].as_u64()? as f64 / 1000.0)
    };
    let sa = setup(a.0, b.1)?;
    let sb = setup(b.0, a.1)?;
    Some(sa.max(sb))
}

/// Runs `reach vpn rebind` on both hosts at once.
fn rebind_both(lab: &Lab, tools: &Path, hosts: [&str; 2]) -> Result<(), String> {
    let state = crate::matrix::reach_state(lab);
    let children: Vec<_> = hosts
        .iter()
        .map(|h| {
            lab.command(h, tools.join("reach"))
                .arg("--state-dir")
                .arg(state.join(h))
                .args(["vpn", "rebind"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run reach vpn rebind in {h}: {e}"))
        })
        .collect();
    let mut first_error = None;
    for (h, child) in hosts.iter().zip(children) {
        let result = child.and_then(|c| {
            c.wait_with_output()
                .map_err(|e| format!("reach vpn rebind in {h}: {e}"))
        });
        match result {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                first_error.get_or_insert(format!(
                    "reach vpn rebind in {h}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// One pair's attempts: a first packet from `a` to `b`, then
/// `attempts` rebinds of both.
pub fn pair(
    lab: &Lab,
    tools: &Path,
    (a, ma): (&str, &Member),
    (b, mb): (&str, &Member),
    attempts: u32,
) -> PunchRate {
    let mut rate = PunchRate {
        a: a.to_string(),
        b: b.to_string(),
        attempts,
        punched: 0,
        median_ms: None,
        max_ms: None,
        last_error: None,
    };
    // A first packet makes the stream, which hands over the UDP keys.
    let ping = lab
        .command(a, "ping")
        .args(["-n", "-c", "1", "-w", "10"])
        .arg(mb.ip.to_string())
        .stdout(Stdio::null())
        .status();
    if !ping.is_ok_and(|s| s.success()) {
        rate.last_error = Some(format!("no ping from {a} to {b} ({})", mb.ip));
        return rate;
    }
    let listed = crate::wait::until(FIRST_CONTACT, || {
        let p = vpn::peer_status(lab, tools, a, mb.ip)?;
        let q = vpn::peer_status(lab, tools, b, ma.ip)?;
        Some((p, q))
    });
    if listed.is_none() {
        rate.last_error = Some(format!("{a} and {b} do not list each other as peers"));
        return rate;
    }
    let mut times = Vec::new();
    for _ in 0..attempts {
        if let Err(e) = rebind_both(lab, tools, [a, b]) {
            rate.last_error = Some(e);
            continue;
        }
        let started = Instant::now();
        let up = loop {
            if let Some(ms) = both_up(lab, tools, (a, ma.ip), (b, mb.ip)) {
                break Some(ms);
            }
            if started.elapsed() >= ATTEMPT_WINDOW {
                break None;
            }
            std::thread::sleep(POLL);
        };
        match up {
            Some(ms) => {
                rate.punched += 1;
                times.push(ms);
            }
            None => {
                rate.last_error = Some(format!(
                    "no UDP path at both within {ATTEMPT_WINDOW:?} ({a}: {}, {b}: {})",
                    path_of(lab, tools, a, mb.ip),
                    path_of(lab, tools, b, ma.ip)
                ))
            }
        }
    }
    rate.max_ms = times.iter().copied().reduce(f64::max);
    rate.median_ms = median(times);
    rate
}

/// The path `host` has to `peer` now, for an error message.
fn path_of(lab: &Lab, tools: &Path, host: &str, peer: IpAddr) -> String {
    vpn::peer_status(lab, tools, host, peer)
        .and_then(|p| p["path"].as_str().map(str::to_string))
        .unwrap_or_else(|| "not a peer".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_totals_and_the_upper_half() {
        let p = |a: &str, b: &str, punched| PunchRate {
            a: a.into(),
            b: b.into(),
            attempts: 10,
            punched,
            median_ms: (punched > 0).then_some(2.0),
            max_ms: Some(3.0),
            last_error: None,
        };
        let t = PunchTable {
            topology: "t".into(),
            attempts: 10,
            hosts: vec!["x".into(), "y".into(), "z".into()],
            pairs: vec![p("x", "y", 10), p("x", "z", 0), p("y", "z", 9)],
        };
        assert_eq!(t.pair("z", "y").map(|p| p.punched), Some(9));
        assert_eq!(t.total(|_| true), (19, 30));
        assert_eq!(t.total(|p| p.a == "x"), (10, 20));
        let md = t.markdown();
        assert!(md.contains("| **x** |  | 100% 2.0 ms | 0% |"), "{md}");
        assert!(md.contains("| **y** |  |  | 90% 2.0 ms |"), "{md}");
        assert!(md.contains("| **z** |  |  |  |"), "{md}");
    }
}
