//! Bulk transfers through reach between two lab hosts, checked by sha256:
//! `reach listen` on one host writes what it receives to a file, `reach
//! connect` on the other sends a file, and the log lines of both say how the
//! stream was made, whether it moved off the hub mid-transfer (an upgrade)
//! and the send rate before and after.
//!
//! `reach-lab transfer` runs the same transfer with several module orders in
//! one run, so a routed stream that upgrades is measured beside a routed-only
//! and a direct (spliced) one on the same path.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::apply::LabError;
use crate::hubs::HubSet;
use crate::lab::{Lab, Process};
use crate::topology::Topology;

/// What one transfer did.
#[derive(Clone, Debug, Serialize)]
pub struct Transfer {
    /// The `--modules` order the connector used.
    pub modules: String,
    /// Bytes sent.
    pub bytes: u64,
    /// The module that set the stream up.
    pub module: String,
    /// Wall time of the whole transfer, process start-up included.
    pub secs: f64,
    /// Bytes over wall time, in Mbit/s.
    pub mbit_s: f64,
    /// The connector's send rate over its piping time (no process start-up
    /// or connection setup), Mbit/s.
    pub stream_mbit_s: Option<f64>,
    /// The received file's sha256 equals the sent one's.
    pub intact: bool,
    /// sha256 of what was sent.
    pub sha256: String,
    /// Where the stream moved mid-transfer, if it did.
    pub upgraded: Option<String>,
    /// Bytes sent on the routed path before the move.
    pub sent_routed: Option<u64>,
    /// Send rate before the move, Mbit/s.
    pub routed_mbit_s: Option<f64>,
    /// Send rate after the move, Mbit/s.
    pub upgraded_mbit_s: Option<f64>,
}

/// Hubs started for transfers, and the data file.
pub struct Bench {
    hubs: HubSet,
    dir: PathBuf,
    data: PathBuf,
    bytes: u64,
    sha256: String,
    upgrade_after: Option<Duration>,
    /// Nodes every hub must know before the connector starts.
    converge_on: Option<usize>,
}

/// Writes `bytes` of pseudo-random data (incompressible, reproducible).
fn write_data(path: &Path, bytes: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()
}

fn sha256(path: &Path) -> Result<String, LabError> {
    let out = std::process::Command::new("sha256sum").arg(path).output()?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: format!("sha256sum {}", path.display()),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The value of `name=` in the last `stream done` line of a log.
fn field(log: &str, name: &str) -> Option<String> {
    let line = log.lines().rev().find(|l| l.contains("stream done"))?;
    let key = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key.as_str()))
        .map(str::to_string)
}

impl Bench {
    /// Starts the topology's hubs and writes `bytes` of data to send.
    pub fn start(
        lab: &Lab,
        topology: &Topology,
        tools: &Path,
        bytes: u64,
    ) -> Result<Bench, LabError> {
        let hubs_config = topology.hubs.as_ref().ok_or_else(|| LabError::Command {
            command: "reach-lab transfer".into(),
            output: "the topology has no [hubs] table".into(),
        })?;
        // Inside the lab's directory: its teardown removes the data too.
        let dir = lab.record().state_dir().join("transfer");
        std::fs::create_dir_all(&dir)?;
        // `start` returns once every hub listens. A listener writes its
        // address only once registered, so on a one-hub topology `run` needs
        // no further wait (several hubs would need the entry to spread).
        let hubs = crate::hubs::start(lab, topology, hubs_config, tools, &dir)?;
        let data = dir.join("data.bin");
        write_data(&data, bytes)?;
        let sha256 = sha256(&data)?;
        Ok(Bench {
            hubs,
            dir,
            data,
            bytes,
            sha256,
            upgrade_after: None,
            converge_on: None,
        })
    }

    /// Connectors hold a routed stream's move this long (`reach connect
    /// --upgrade-after`), so that it happens mid-transfer rather than
    /// before the first byte, which on a fast lab path it otherwise may.
    pub fn upgrade_after(mut self, after: Duration) -> Self {
        self.upgrade_after = Some(after);
        self
    }

    /// Before each connector starts, waits until every hub knows `nodes`
    /// nodes (attached, or learned from other hubs): across several hubs a
    /// fresh listener's entry takes a moment to spread. With 1, meant for a
    /// bench's first transfer (an earlier listener's entry may linger).
    pub fn converge_on(mut self, nodes: usize) -> Self {
        self.converge_on = Some(nodes);
        self
    }

    /// The hubs the transfers go through.
    pub fn hubs(&self) -> &HubSet {
        &self.hubs
    }

    /// Sends the data from `from` to a fresh listener on `to`, the connector
    /// trying `modules` in order; each process may take `timeout`.
    pub fn run(
        &self,
        lab: &Lab,
        tools: &Path,
        (from, to): (&str, &str),
        modules: &str,
        timeout: Duration,
    ) -> Result<Transfer, LabError> {
        let reach = tools.join("reach");
        let hub = |h: &str| {
            self.hubs
                .attach
                .get(h)
                .cloned()
                .ok_or_else(|| LabError::Command {
                    command: "reach-lab transfer".into(),
                    output: format!("host {h} attaches to no hub"),
                })
        };
        let run_dir = self
            .dir
            .join(format!("{from}-{to}-{}", modules.replace(',', "-")));
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir)?;
        let addr_file = run_dir.join("addr.txt");
        let received = run_dir.join("received.bin");
        let mut listen = lab.command(to, &reach);
        listen
            .arg("--state-dir")
            .arg(run_dir.join("listener"))
            .args(["-v", "listen", "--hub"])
            .arg(hub(to)?)
            .arg("--addr-file")
            .arg(&addr_file)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&received)?)
            .stderr(std::fs::File::create(run_dir.join("listen.log"))?);
        let mut listener = Process::new(listen.spawn()?);
        let vaddr =
            crate::wait::for_file(&addr_file, Duration::from_secs(20)).ok_or_else(|| {
                LabError::Command {
                    command: format!("reach listen in {to}"),
                    output: std::fs::read_to_string(run_dir.join("listen.log")).unwrap_or_default(),
                }
            })?;
        if let Some(nodes) = self.converge_on {
            self.hubs
                .wait_converged(lab, tools, nodes, Duration::from_secs(20))?;
        }
        let started = Instant::now();
        let mut connect = lab.command(from, &reach);
        connect
            .arg("--state-dir")
            .arg(run_dir.join("connector"))
            .args(["-v", "connect", "--modules", modules, "--hub"])
            .arg(hub(from)?)
            .args(
                self.upgrade_after
                    .map(|d| ["--upgrade-after".to_string(), d.as_secs_f64().to_string()])
                    .into_iter()
                    .flatten(),
            )
            .arg(&vaddr)
            .stdin(std::fs::File::open(&self.data)?)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(run_dir.join("connect.log"))?);
        let mut connector = Process::new(connect.spawn()?);
        let failed = |what: &str| LabError::Command {
            command: format!("reach connect {from} -> {to} ({modules})"),
            output: format!(
                "{what}\n{}",
                std::fs::read_to_string(run_dir.join("connect.log")).unwrap_or_default()
            ),
        };
        match connector.wait_timeout(timeout) {
            Some(s) if s.success() => {}
            Some(_) => return Err(failed("failed")),
            None => return Err(failed("did not finish in time")),
        }
        if listener.wait_timeout(timeout).is_none() {
            return Err(failed("the listener did not finish in time"));
        }
        let secs = started.elapsed().as_secs_f64();
        let log = std::fs::read_to_string(run_dir.join("connect.log"))?;
        let got = sha256(&received)?;
        let number = |name: &str| field(&log, name).and_then(|v| v.parse::<f64>().ok());
        let module = log
            .lines()
            .find(|l| l.contains(" connected "))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("module=")))
            .unwrap_or("?")
            .to_string();
        Ok(Transfer {
            modules: modules.to_string(),
            bytes: self.bytes,
            module,
            secs,
            mbit_s: self.bytes as f64 * 8.0 / secs / 1e6,
            stream_mbit_s: number("mbit_s"),
            intact: got == self.sha256,
            sha256: got,
            upgraded: field(&log, "upgraded"),
            sent_routed: number("sent_routed").map(|v| v as u64),
            routed_mbit_s: number("routed_mbit_s"),
            upgraded_mbit_s: number("upgraded_mbit_s"),
        })
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // The logs and files of a corrupted transfer are worth a look.
        if std::env::var_os("REACH_LAB_KEEP").is_some() {
            eprintln!("kept transfer files in {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A table of transfers, one per line.
pub fn render(transfers: &[Transfer]) -> String {
    let mut s = format!(
        "{:<16} {:<8} {:>10} {:>8} {:>10} {:>13} {:<9} {:>12} {:>14} {:>15}\n",
        "modules",
        "setup",
        "bytes",
        "secs",
        "Mbit/s",
        "stream Mbit/s",
        "upgraded",
        "sent routed",
        "routed Mbit/s",
        "after Mbit/s"
    );
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
    for t in transfers {
        s += &format!(
            "{:<16} {:<8} {:>10} {:>8.2} {:>10.0} {:>13} {:<9} {:>12} {:>14} {:>15}{}\n",
            t.modules,
            t.module,
            t.bytes,
            t.secs,
            t.mbit_s,
            opt(t.stream_mbit_s),
            t.upgraded.as_deref().unwrap_or("-"),
            t.sent_routed
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            opt(t.routed_mbit_s),
            opt(t.upgraded_mbit_s),
            if t.intact { "" } else { "  CORRUPTED" },
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_fields_come_from_the_last_stream_done_line() {
        let log = "x INFO connected module=routed\n\
                   y INFO stream done received=0 sent=10 upgraded=splice sent_routed=4 routed_mbit_s=80 upgraded_mbit_s=900\n";
        assert_eq!(field(log, "upgraded").as_deref(), Some("splice"));
        assert_eq!(field(log, "sent_routed").as_deref(), Some("4"));
        assert_eq!(field(log, "missing"), None);
        assert_eq!(field("no such line", "sent"), None);
    }

    #[test]
    fn data_is_reproducible_and_sized() {
        let dir = std::env::temp_dir().join(format!("reach-transfer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (a, b) = (dir.join("a"), dir.join("b"));
        write_data(&a, 100_003).expect("write");
        write_data(&b, 100_003).expect("write");
        let (a, b) = (std::fs::read(a).expect("a"), std::fs::read(b).expect("b"));
        assert_eq!(a.len(), 100_003);
        assert_eq!(a, b);
        assert!(a.iter().any(|x| *x != a[0]));
        let _ = std::fs::remove_dir_all(dir);
    }
}
