//! The connectivity matrix: which host can open a connection to which.
//!
//! For every ordered pair of hosts, the source tries to reach the destination:
//! - `plain`: a plain TCP connection to each of the destination's addresses,
//!   public first, accepted only if the greeting names the destination (the
//!   paper's identity check, so an overlapping private address does not count);
//! - `reach`: `reach connect` to the virtual address that `reach listen` printed
//!   in the destination, with a token sent through the stream and checked.
//!
//! Pairs run in parallel; every attempt has a timeout. The result prints as a
//! SmartSockets Table 3-style grid and serialises to JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::apply::LabError;
use crate::lab::Lab;
use crate::lab::Process;
use crate::probe::{self, Outcome};
use crate::topology::Topology;

/// Which kind of connection the matrix tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Plain TCP sockets.
    Plain,
    /// reach streams (`reach connect` to `reach listen`).
    Reach,
    /// The virtual IP network (`reach vpn up` on every host; ping, a TCP
    /// connection and a hashed transfer between virtual addresses).
    Vpn,
}

/// The result for one ordered pair.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    /// Source site.
    pub from: String,
    /// Target site.
    pub to: String,
    /// Source host.
    pub from_host: String,
    /// Target host.
    pub to_host: String,
    /// Whether a connection to the right host was made (and, for reach, the
    /// data arrived).
    pub ok: bool,
    /// The reach module that made the stream (the first path data flowed
    /// on); `null` for plain TCP.
    pub module: Option<String>,
    /// Where the first connection's stream settled: `module`, or the
    /// module of the connection a routed stream moved onto in the
    /// background (a first connection starts routed while better paths are
    /// still being tried).
    pub settled_module: Option<String>,
    /// Setup time of the first connection, in milliseconds.
    pub setup_ms: Option<f64>,
    /// The average ping round trip, in milliseconds (vpn mode).
    pub rtt_ms: Option<f64>,
    /// Setup time of a second connection to the same target (reach caches the
    /// working module per target), in milliseconds.
    pub cached_setup_ms: Option<f64>,
    /// The module of the second connection (the first path its data
    /// flowed on: Routed beats a cached Reverse or Splice to the first byte).
    pub cached_module: Option<String>,
    /// Where the second connection settled.
    pub cached_settled_module: Option<String>,
    /// Modules the second connection tried, and saw fail, before its module
    /// worked: empty when the cache sent it straight to a working module.
    pub cached_failed_before: Vec<String>,
    /// The address used (plain mode).
    pub via: Option<String>,
    /// Why the pair failed.
    pub error: Option<String>,
}

/// A whole matrix.
#[derive(Clone, Debug, Serialize)]
pub struct Matrix {
    /// The topology's name.
    pub topology: String,
    /// The mode.
    pub mode: Mode,
    /// Hosts in topology order.
    pub hosts: Vec<String>,
    /// One entry per ordered pair.
    #[serde(rename = "pairs")]
    pub cells: Vec<Cell>,
}

/// The paper's letter for a module: d direct, r reverse, s splice, v routed
/// (and for a vpn's UDP path: u when no NAT translates it, p punched).
fn letter(module: &str) -> &'static str {
    match module {
        "direct" => "d",
        "reverse" => "r",
        "splice" => "s",
        "routed" => "v",
        "udp-direct" => "u",
        "udp-punched" => "p",
        _ => "?",
    }
}

impl Matrix {
    /// How many pairs connected, out of how many.
    pub fn score(&self) -> (usize, usize) {
        (self.cells.iter().filter(|c| c.ok).count(), self.cells.len())
    }

    /// The cell for a pair of hosts.
    pub fn cell(&self, from: &str, to: &str) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.from_host == from && c.to_host == to)
    }

    /// The grid as text, like the paper's Table 3: a row per target, a column
    /// per source, each cell the setup time in milliseconds and, for reach, the
    /// letter of the module the stream settled on (d direct, r reverse, s
    /// splice, v routed).
    pub fn render(&self) -> String {
        let w = self
            .hosts
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(4)
            .max(10);
        let mut s = format!("{:<w$} |", "target\\source");
        for h in &self.hosts {
            s += &format!(" {h:^w$}");
        }
        s += "\n";
        s += &"-".repeat(w + 2 + (w + 1) * self.hosts.len());
        s += "\n";
        for to in &self.hosts {
            s += &format!("{to:<w$} |");
            for from in &self.hosts {
                let mark = match self.cell(from, to) {
                    None => String::new(),
                    Some(c) if !c.ok => "-".to_string(),
                    Some(c) => {
                        let ms = c.setup_ms.map_or("?".to_string(), |m| format!("{m:.1}"));
                        // Where the stream settled (data may have flowed
                        // routed first).
                        match c.settled_module.as_ref().or(c.module.as_ref()) {
                            Some(m) => format!("{ms} {}", letter(m)),
                            None => ms,
                        }
                    }
                };
                s += &format!(" {mark:^w$}");
            }
            s += "\n";
        }
        let (ok, total) = self.score();
        s += &format!(
            "{ok} of {total} pairs connected ({:?}; setup time in ms",
            self.mode
        );
        match self.mode {
            Mode::Reach => s += "; settled on d direct, r reverse, s splice, v routed",
            Mode::Vpn => s += " of a TCP connection between virtual addresses; packets settled on UDP (u direct, p punched through NATs), or a stream: d direct, r reverse, s splice, v routed",
            Mode::Plain => {}
        }
        s += ")\n";
        s
    }
}

/// How long hubs may take to link up and learn every node.
const HUB_CONVERGENCE: Duration = Duration::from_secs(30);

/// Probe port used by the plain matrix.
const PROBE_PORT: u16 = 7000;

/// Runs the matrix on a running lab of `topology`. `tools` is the directory
/// holding the `reach-lab` and `reach` binaries. In reach mode the topology's
/// `[hubs]`, if any, run first and every node attaches to its hub.
pub fn run(
    lab: &Lab,
    topology: &Topology,
    mode: Mode,
    timeout: Duration,
    tools: &Path,
) -> Result<Matrix, LabError> {
    let hosts = lab.record().matrix.clone();
    let hubs = match (mode, &topology.hubs) {
        (Mode::Reach | Mode::Vpn, Some(hubs)) => Some(crate::hubs::start(
            lab,
            topology,
            hubs,
            tools,
            &reach_state(lab),
        )?),
        _ => None,
    };
    // Gateways that map ports serve before any node asks them.
    let gateways = match mode {
        Mode::Reach | Mode::Vpn => crate::gateway::start(lab, topology, tools, &reach_state(lab))?,
        Mode::Plain => Vec::new(),
    };
    let attach = hubs.as_ref().map(|h| h.attach.clone()).unwrap_or_default();
    let (targets, members) = match mode {
        Mode::Plain => (start_probes(lab, tools)?, BTreeMap::new()),
        Mode::Reach => (start_reach(lab, tools, &attach)?, BTreeMap::new()),
        Mode::Vpn => (Vec::new(), crate::vpn::start(lab, tools, &attach)?),
    };
    if let Some(hubs) = &hubs {
        hubs.wait_converged(lab, tools, attach.len(), HUB_CONVERGENCE)?;
    }
    let pairs: Vec<(String, String)> = hosts
        .iter()
        .flat_map(|a| {
            hosts
                .iter()
                .filter(move |b| *b != a)
                .map(move |b| (a.clone(), b.clone()))
        })
        .collect();
    let mut cells: Vec<Cell> = std::thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(from, to)| {
                let target = targets
                    .iter()
                    .find(|(h, _, _)| h == to)
                    .map(|(_, t, _)| t.clone());
                let hub = attach.get(from).cloned();
                let members = &members;
                scope.spawn(move || match mode {
                    Mode::Plain => plain_pair(lab, tools, from, to, timeout),
                    Mode::Reach => {
                        let target = target.as_deref();
                        reach_pair(lab, tools, from, to, target, hub.as_deref(), timeout)
                    }
                    Mode::Vpn => match (members.get(from), members.get(to)) {
                        (Some(a), Some(b)) => {
                            crate::vpn::pair(lab, tools, (from, a), (to, b), timeout)
                        }
                        _ => failed(lab, from, to, "no vpn member".into()),
                    },
                })
            })
            .collect();
        let progress = reach_progress::Progress::new(pairs.len() as u64, "pairs");
        handles
            .into_iter()
            .zip(&pairs)
            .map(|(h, (from, to))| {
                progress.doing(format!("{from} -> {to}"));
                let cell = h
                    .join()
                    .unwrap_or_else(|_| failed(lab, from, to, "probe thread panicked".into()));
                progress.step();
                cell
            })
            .collect()
    });
    if mode == Mode::Reach {
        check_tokens(lab, &mut cells);
    }
    drop(targets);
    drop(members);
    drop(hubs);
    drop(gateways);
    Ok(Matrix {
        topology: lab.record().topology.clone(),
        mode,
        hosts,
        cells,
    })
}

/// A matrix target: host, its virtual address (reach mode), its server.
type Target = (String, String, Process);

/// A cell with the pair's sites filled in and nothing else yet.
pub(crate) fn new_cell(lab: &Lab, from: &str, to: &str) -> Cell {
    Cell {
        from: lab.host(from).site.clone(),
        to: lab.host(to).site.clone(),
        from_host: from.into(),
        to_host: to.into(),
        ok: false,
        module: None,
        settled_module: None,
        setup_ms: None,
        rtt_ms: None,
        cached_setup_ms: None,
        cached_module: None,
        cached_settled_module: None,
        cached_failed_before: Vec::new(),
        via: None,
        error: None,
    }
}

/// A failed cell, and why.
pub(crate) fn failed(lab: &Lab, from: &str, to: &str, error: String) -> Cell {
    Cell {
        error: Some(error),
        ..new_cell(lab, from, to)
    }
}

fn start_probes(lab: &Lab, tools: &Path) -> Result<Vec<Target>, LabError> {
    lab.record()
        .matrix
        .iter()
        .map(|h| {
            let server = probe::spawn_server(lab, tools, h, &[PROBE_PORT])?;
            Ok((h.clone(), String::new(), server))
        })
        .collect()
}

fn plain_pair(lab: &Lab, tools: &Path, from: &str, to: &str, timeout: Duration) -> Cell {
    let mut details = Vec::new();
    for ip in lab.host(to).addrs() {
        let addr = SocketAddr::from((ip, PROBE_PORT));
        match probe::connect_from(lab, tools, from, addr, timeout, None) {
            Outcome::Ok {
                server, connect_ms, ..
            } if server == to => {
                return Cell {
                    ok: true,
                    setup_ms: Some(connect_ms),
                    via: Some(addr.to_string()),
                    ..new_cell(lab, from, to)
                }
            }
            Outcome::Ok { server, .. } => details.push(format!("{addr}: reached {server} instead")),
            other => details.push(format!("{addr}: {}", other.describe())),
        }
    }
    failed(lab, from, to, details.join("; "))
}

/// Where the lab's reach processes keep their state and logs: inside the
/// lab's own directory, so its teardown removes them.
pub fn reach_state(lab: &Lab) -> std::path::PathBuf {
    lab.record().state_dir().join("reach")
}

pub(crate) fn start_reach(
    lab: &Lab,
    tools: &Path,
    attach: &BTreeMap<String, String>,
) -> Result<Vec<Target>, LabError> {
    let state = reach_state(lab);
    let mut out = Vec::new();
    for name in &lab.record().matrix {
        let h = lab.host(name);
        let dir = state.join(&h.name);
        std::fs::create_dir_all(&dir)?;
        let addr_file = dir.join("addr.txt");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = lab.command(&h.name, tools.join("reach"));
        cmd.arg("--state-dir")
            .arg(&dir)
            .args(["-v", "listen", "--keep", "--addr-file"])
            .arg(&addr_file);
        if let Some(hub) = attach.get(name) {
            cmd.args(["--hub", hub]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("received"))?)
            .stderr(std::fs::File::create(dir.join("listen.log"))?)
            .spawn()?;
        let guard = Process::new(child);
        let vaddr =
            crate::wait::for_file(&addr_file, Duration::from_secs(20)).ok_or_else(|| {
                LabError::Command {
                    command: format!("reach listen in {}", h.name),
                    output: std::fs::read_to_string(dir.join("listen.log")).unwrap_or_default(),
                }
            })?;
        out.push((h.name.clone(), vaddr, guard));
    }
    Ok(out)
}

fn token(from: &str, to: &str) -> String {
    format!("token {from} -> {to}\n")
}

/// A reach pair counts only if its token reached the destination's stdout.
/// Listeners write what they receive as it arrives; give each a deadline.
fn check_tokens(lab: &Lab, cells: &mut [Cell]) {
    let state = reach_state(lab);
    let deadline = Instant::now() + Duration::from_secs(10);
    for cell in cells.iter_mut().filter(|c| c.ok) {
        let file = state.join(&cell.to_host).join("received");
        let want = token(&cell.from_host, &cell.to_host);
        let left = deadline.saturating_duration_since(Instant::now());
        let arrived = crate::wait::until(left, || {
            let got = std::fs::read_to_string(&file).unwrap_or_default();
            got.contains(&want).then_some(())
        });
        if arrived.is_none() {
            cell.ok = false;
            cell.error = Some("stream opened but the token never arrived".into());
        }
    }
}

/// What one `reach connect` reported.
pub(crate) struct Connected {
    pub(crate) module: String,
    /// Where the stream settled (`reach connect`'s "settled" line).
    pub(crate) settled_module: Option<String>,
    pub(crate) setup_ms: f64,
    pub(crate) failed_before: Vec<String>,
}

impl Connected {
    /// What `reach connect -v` logged: the "connected ... module=X ...
    /// setup_ms=Y" and "settled settled_module=Z" lines only (time, level,
    /// message, fields), since debug lines name modules too.
    fn from_log(log: &str) -> Self {
        let line = |message: &str| {
            log.lines()
                .find(|l| l.split_whitespace().nth(2) == Some(message))
                .unwrap_or_default()
        };
        let (connected, settled) = (line("connected"), line("settled"));
        let field = |line: &str, name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
        };
        let module = field(connected, "module=").unwrap_or_else(|| "?".into());
        let settled_module = field(settled, "settled_module=");
        let setup_ms = field(connected, "setup_ms=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        let failed_before = field(connected, "failed_before=")
            .filter(|v| v != "-")
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        Connected {
            module,
            settled_module,
            setup_ms,
            failed_before,
        }
    }
}

/// One `reach connect` carrying `token`, with `extra` arguments (modules).
#[allow(clippy::too_many_arguments)]
pub(crate) fn reach_connect(
    lab: &Lab,
    tools: &Path,
    from: &str,
    vaddr: &str,
    hub: Option<&str>,
    token: &str,
    timeout: Duration,
    extra: &[&str],
) -> Result<Connected, String> {
    let dir = reach_state(lab).join(from);
    let mut cmd = lab.command(from, tools.join("reach"));
    cmd.arg("--state-dir")
        .arg(&dir)
        .args(["-v", "connect", "--timeout"])
        .arg(timeout.as_secs_f64().to_string());
    if let Some(hub) = hub {
        cmd.args(["--hub", hub]);
    }
    let mut child = cmd
        .args(extra)
        .arg(vaddr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run reach: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        let _ = stdin.write_all(token.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(log
            .lines()
            .last()
            .unwrap_or("reach connect failed")
            .to_string());
    }
    Ok(Connected::from_log(&log))
}

fn reach_pair(
    lab: &Lab,
    tools: &Path,
    from: &str,
    to: &str,
    vaddr: Option<&str>,
    hub: Option<&str>,
    timeout: Duration,
) -> Cell {
    let Some(vaddr) = vaddr else {
        return failed(lab, from, to, "no listener".into());
    };
    let token = token(from, to);
    let first = match reach_connect(lab, tools, from, vaddr, hub, &token, timeout, &[]) {
        Ok(x) => x,
        Err(e) => return failed(lab, from, to, e),
    };
    // The second connection measures setup once the working module is known.
    let cached = reach_connect(lab, tools, from, vaddr, hub, &token, timeout, &[]).ok();
    Cell {
        ok: true,
        settled_module: first.settled_module.or_else(|| Some(first.module.clone())),
        module: Some(first.module),
        setup_ms: Some(first.setup_ms),
        cached_setup_ms: cached.as_ref().map(|c| c.setup_ms),
        cached_module: cached.as_ref().map(|c| c.module.clone()),
        cached_settled_module: cached
            .as_ref()
            .map(|c| c.settled_module.clone().unwrap_or_else(|| c.module.clone())),
        cached_failed_before: cached.map(|c| c.failed_before).unwrap_or_default(),
        ..new_cell(lab, from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connect_log_is_read_from_its_connected_and_settled_lines_only() {
        let log = "\
2026-12-02T08:16:02.409Z DEBUG direct race node=x candidates=[198.51.100.50:41075]
2026-12-02T08:16:02.413Z DEBUG setup module failed node=x module=direct error=refused
2026-12-02T08:16:02.433Z  INFO connected peer=x to=198.51.100.50:53930 module=reverse failed_before=direct mode=Encrypted(AesGcm) setup_ms=54.506
2026-12-02T08:16:02.440Z DEBUG upgrade connection made node=x module=splice
2026-12-02T08:16:02.455Z  INFO settled settled_module=reverse
";
        let c = Connected::from_log(log);
        assert_eq!(c.module, "reverse");
        assert_eq!(c.settled_module.as_deref(), Some("reverse"));
        assert_eq!(c.setup_ms, 54.506);
        assert_eq!(c.failed_before, ["direct"]);
        let none = Connected::from_log("reach: error: no route\n");
        assert_eq!(none.module, "?");
        assert!(none.settled_module.is_none() && none.setup_ms.is_nan());
    }
}
