//! The vpn matrix: every matrix host runs `reach vpn up`, and every ordered
//! pair is checked with unmodified tools over the virtual addresses: `ping`
//! (the round trip), a TCP connection to the target's probe server (which
//! names itself, so reaching the wrong host does not count), and a bulk
//! transfer checked by sha256.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::apply::LabError;
use crate::lab::{Lab, Process};
use crate::matrix::{failed, new_cell, reach_state, Cell};
use crate::probe::{self, Outcome};

/// The vpn network the lab's members join.
pub const NETWORK: &str = "lab";
/// The TUN device each member makes.
pub const DEVICE: &str = "reach0";
/// The probe server's port on each member.
const PROBE_PORT: u16 = 7000;
/// The bulk sink's port on each member.
const SINK_PORT: u16 = 7001;
/// Bytes each pair's transfer carries.
const TRANSFER_BYTES: u64 = 1 << 20;
/// How long a member may take to come up.
const UP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running member: its virtual address and processes.
pub struct Member {
    /// Its virtual IPv4 address.
    pub ip: IpAddr,
    /// Its log.
    pub log: PathBuf,
    /// The member, its probe server and its sink (killed when dropped).
    procs: Vec<Process>,
}

/// The lab's network secret file for vpn members (made once).
fn secret_file(lab: &Lab) -> Result<PathBuf, LabError> {
    let path = reach_state(lab).join("vpn.secret");
    if !path.exists() {
        std::fs::create_dir_all(reach_state(lab))?;
        let mut secret = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut secret)?;
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&path, hex + "\n")?;
    }
    Ok(path)
}

/// Starts `reach vpn up` on `host` (attached to `hub`), with a probe
/// server and a bulk sink beside it, and waits until the member is up.
pub fn start_member(
    lab: &Lab,
    tools: &Path,
    host: &str,
    hub: Option<&str>,
) -> Result<Member, LabError> {
    start_with(lab, tools, host, hub, &Options::default())
}

/// How a member is started.
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    /// Its state directory's name under the lab's reach state (its
    /// identity); empty: the host's name.
    pub name: &'a str,
    /// The TUN device.
    pub dev: &'a str,
    /// The vpn network.
    pub network: &'a str,
    /// More arguments for `reach vpn up`.
    pub extra: &'a [&'a str],
    /// Whether a probe server and a bulk sink run beside it (on fixed
    /// ports: one member per host with them).
    pub servers: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            name: "",
            dev: DEVICE,
            network: NETWORK,
            extra: &[],
            servers: true,
        }
    }
}

/// Starts a member on `host` as `options` say, and waits until it is up.
pub fn start_with(
    lab: &Lab,
    tools: &Path,
    host: &str,
    hub: Option<&str>,
    options: &Options<'_>,
) -> Result<Member, LabError> {
    let name = if options.name.is_empty() {
        host
    } else {
        options.name
    };
    let dir = reach_state(lab).join(name);
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("vpn.log");
    let mut cmd = lab.command(host, tools.join("reach"));
    cmd.arg("--state-dir")
        .arg(&dir)
        .args([
            "-v",
            "vpn",
            "up",
            "--network",
            options.network,
            "--dev",
            options.dev,
        ])
        .arg("--network-secret-file")
        .arg(secret_file(lab)?);
    if let Some(hub) = hub {
        cmd.args(["--hub", hub]);
    }
    cmd.args(options.extra);
    let vpn = Lab::spawn_logged(cmd.stdin(Stdio::null()), &log)?;
    let up = format!("vpn {} up on {}: ", options.network, options.dev);
    let ip = crate::wait::until(UP_TIMEOUT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let rest = text.lines().find_map(|l| l.strip_prefix(up.as_str()))?;
        rest.split('/').next()?.parse::<IpAddr>().ok()
    })
    .ok_or_else(|| LabError::Command {
        command: format!("reach vpn up in {host}"),
        output: std::fs::read_to_string(&log).unwrap_or_default(),
    })?;
    let mut procs = vec![vpn];
    if options.servers {
        procs.push(probe::spawn_server(lab, tools, host, &[PROBE_PORT])?);
        procs.push(probe::spawn_sink(lab, tools, host, SINK_PORT)?);
    }
    Ok(Member { ip, log, procs })
}

impl Member {
    /// The `reach vpn up` process's id.
    pub fn pid(&self) -> u32 {
        self.procs[0].id()
    }
}

/// Starts a member on every matrix host.
pub fn start(
    lab: &Lab,
    tools: &Path,
    attach: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Member>, LabError> {
    lab.record()
        .matrix
        .iter()
        .map(|h| {
            Ok((
                h.clone(),
                start_member(lab, tools, h, attach.get(h).map(String::as_str))?,
            ))
        })
        .collect()
}

/// The vpn's entry in `host`'s `reach status --json` (the member's state
/// directory is the host's name under the lab's reach state).
pub fn status(lab: &Lab, tools: &Path, host: &str) -> Option<serde_json::Value> {
    let out = lab
        .command(host, tools.join("reach"))
        .arg("--state-dir")
        .arg(reach_state(lab).join(host))
        .args(["status", "--json"])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["proxies"]
        .as_array()?
        .iter()
        .find(|p| p["kind"] == "vpn")
        .cloned()
}

/// `host`'s vpn peer at `ip` in its status.
pub fn peer_status(lab: &Lab, tools: &Path, host: &str, ip: IpAddr) -> Option<serde_json::Value> {
    let vpn = status(lab, tools, host)?;
    vpn["peers"]
        .as_array()?
        .iter()
        .find(|p| p["ip"] == ip.to_string().as_str())
        .cloned()
}

/// The module of the latest line `event` in `log` about the peer at `ip`
/// ("vpn peer up": the stream's first module; "vpn peer path moved": where
/// a routed stream moved).
fn module_in(log: &Path, event: &str, ip: IpAddr) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let want = format!("ip={ip}");
    text.lines()
        .rev()
        .filter(|l| l.contains(event) && l.split_whitespace().any(|w| w == want))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("module="))
                .map(str::to_string)
        })
}

/// The average round trip `ping` printed, in milliseconds.
fn ping_avg(out: &str) -> Option<f64> {
    // "rtt min/avg/max/mdev = 0.045/0.061/0.080/0.014 ms"
    let stats = out.lines().find(|l| l.contains("min/avg/max"))?;
    stats
        .split('=')
        .nth(1)?
        .trim()
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

/// Checks one ordered pair over the vpn.
pub fn pair(
    lab: &Lab,
    tools: &Path,
    from: (&str, &Member),
    to: (&str, &Member),
    timeout: Duration,
) -> Cell {
    let ((from, src), (to, dst)) = (from, to);
    let secs = timeout.as_secs().max(1).to_string();
    let ping = lab
        .command(from, "ping")
        .args(["-n", "-c", "3", "-i", "0.2", "-w", &secs])
        .arg(dst.ip.to_string())
        .output();
    let rtt_ms = match ping {
        Ok(out) if out.status.success() => ping_avg(&String::from_utf8_lossy(&out.stdout)),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let last = text.lines().rev().find(|l| !l.is_empty()).unwrap_or("");
            return failed(lab, from, to, format!("ping {}: {last}", dst.ip));
        }
        Err(e) => return failed(lab, from, to, format!("cannot run ping: {e}")),
    };
    let addr = SocketAddr::new(dst.ip, PROBE_PORT);
    let connect_ms = match probe::connect_from(lab, tools, from, addr, timeout, None) {
        Outcome::Ok {
            server, connect_ms, ..
        } if server == to => connect_ms,
        other => return failed(lab, from, to, format!("tcp {addr}: {}", other.describe())),
    };
    let sink = SocketAddr::new(dst.ip, SINK_PORT);
    let out = lab
        .command(from, tools.join("reach-lab"))
        .args([
            "probe",
            "send",
            "--bytes",
            &TRANSFER_BYTES.to_string(),
            "--timeout",
            &secs,
        ])
        .arg(sink.to_string())
        .output();
    let bulk: Result<probe::Bulk, String> = match out {
        Ok(o) if o.status.success() => {
            serde_json::from_slice(&o.stdout).map_err(|e| format!("bulk report: {e}"))
        }
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(e.to_string()),
    };
    match bulk {
        Ok(b) if b.intact => {}
        Ok(b) => {
            return failed(
                lab,
                from,
                to,
                format!(
                    "transfer to {sink}: {} of {TRANSFER_BYTES} bytes, hash mismatch",
                    b.bytes
                ),
            )
        }
        Err(e) => return failed(lab, from, to, format!("transfer to {sink}: {e}")),
    }
    let first = module_in(&src.log, "vpn peer up", dst.ip);
    let moved = module_in(&src.log, "vpn peer path moved", dst.ip);
    Cell {
        ok: true,
        settled_module: moved.or_else(|| first.clone()),
        module: first.or_else(|| Some("?".into())),
        setup_ms: Some(connect_ms),
        rtt_ms,
        via: Some(dst.ip.to_string()),
        ..new_cell(lab, from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ping_summary_and_the_peer_line_are_read() {
        let out = "3 packets transmitted, 3 received, 0% packet loss, time 401ms\nrtt min/avg/max/mdev = 0.045/0.061/0.080/0.014 ms\n";
        assert_eq!(ping_avg(out), Some(0.061));
        assert_eq!(ping_avg("100% packet loss"), None);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vpn.log");
        std::fs::write(
            &log,
            "2026 INFO vpn peer up peer=abc ip=10.77.0.2 module=routed\n2026 INFO vpn peer up peer=abc ip=10.77.0.22 module=direct\n2026 INFO vpn peer path moved peer=abc ip=10.77.0.2 module=splice remote=203.0.113.1:4000\n",
        )
        .unwrap();
        let ip = "10.77.0.2".parse().unwrap();
        assert_eq!(module_in(&log, "vpn peer up", ip), Some("routed".into()));
        assert_eq!(
            module_in(&log, "vpn peer path moved", ip),
            Some("splice".into())
        );
        let other = "10.77.0.3".parse().unwrap();
        assert_eq!(module_in(&log, "vpn peer up", other), None);
    }
}
