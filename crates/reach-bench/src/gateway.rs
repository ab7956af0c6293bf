//! `reach-bench gateway`: reach gateway in a NAT gateway's namespace, in
//! one run (DPF's Tables 1-3, ours): how fast it grants mappings (NAT-PMP
//! requests one at a time and 64 in flight), the memory each mapping
//! costs, and the setup of connections from the internet to a host behind
//! it: plain TCP through a static forward (the administrator's DNAT rule)
//! beside plain TCP and a reach Direct connection through ports the
//! daemon mapped.
//!
//! ```text
//!   client (10.1.0.2) --NAT-PMP--> gw-home: reach gateway, nft
//!   outside --TCP--> gw:45000 (static DNAT)      --> client:9000 (agent, plain TCP)
//!   outside --TCP--> gw:MAPPED (daemon's DNAT)   --> client:9000
//!   outside --reach Direct--> gw:MAPPED2         --> client:9001 (agent, reach)
//! ```

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use reach_lab::{Lab, Topology};

use crate::agent::{Granted, Measured};
use crate::lab::{work_dir, Size};
use crate::Row;

const TOPOLOGY: &str = include_str!("../../../lab/topologies/gateway.toml");
/// The agent server's ports in `client`.
const TCP_PORT: u16 = 9000;
const REACH_PORT: u16 = 9001;
/// The administrator's static forward.
const STATIC_PORT: u16 = 45000;
/// How long a server has to come up.
const READY: Duration = Duration::from_secs(20);

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// Runs the agent's NAT-PMP load in `client`.
fn natpmp(
    lab: &Lab,
    exe: &Path,
    gateway: &str,
    count: u16,
    first: u16,
    window: usize,
    lifetime: u32,
) -> anyhow::Result<Granted> {
    let out = lab
        .command("client", exe)
        .args(["agent", "natpmp", "--gateway", gateway])
        .args(["--count", &count.to_string(), "--first", &first.to_string()])
        .args([
            "--window",
            &window.to_string(),
            "--lifetime",
            &lifetime.to_string(),
        ])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "agent natpmp: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("agent natpmp output")
}

/// Runs the agent's setup measurement in `outside` with `args`.
fn setup(lab: &Lab, exe: &Path, dir: &Path, count: u32, args: &[String]) -> anyhow::Result<f64> {
    let out = lab
        .command("outside", exe)
        .args([
            "agent",
            "run",
            "--op",
            "setup",
            "--count",
            &count.to_string(),
            "--state-dir",
        ])
        .arg(dir.join("outside"))
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "agent run {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let m: Measured = serde_json::from_slice(&out.stdout).context("agent output")?;
    Ok(m.value)
}

/// Maps `internal` in `client` to `external` at the gateway (natpmpc, the
/// real client).
fn natpmpc(lab: &Lab, internal: u16, external: u16) -> anyhow::Result<()> {
    let out = lab
        .command("client", "natpmpc")
        .args([
            "-a",
            &external.to_string(),
            &internal.to_string(),
            "tcp",
            "3600",
        ])
        .output()
        .context("cannot run natpmpc (apt-get install natpmpc)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains(&format!("Mapped public port {external}")) {
        bail!("natpmpc did not map {external}: {text}");
    }
    Ok(())
}

/// Runs the gateway benchmark, with logs and state in `keep` (kept) or in
/// a temporary directory.
pub fn run(size: Size, keep: Option<&Path>) -> anyhow::Result<Vec<Row>> {
    let (dir, _tmp) = work_dir(keep.map(Path::to_path_buf), "gateway")?;
    let t = Topology::from_toml(TOPOLOGY).context("bench topology")?;
    let lab = Lab::up(&t).context("cannot build the lab (needs root)")?;
    let tools = crate::tools_dir(&["reach"])?;
    let exe = std::env::current_exe()?;
    let daemon = reach_lab::gateway::start_at(
        &lab,
        "home",
        &tools,
        &dir.join("gateway"),
        &[
            "--no-upnp",
            "--ports",
            "20000-60999",
            "--max-per-client",
            "40000",
        ],
    )?;
    let client = lab.host("client");
    let gateway_lan = {
        let o = client.lan.octets();
        format!("{}.{}.{}.1", o[0], o[1], o[2])
    };
    let public = client.gateway.to_string();
    let mut rows = Vec::new();

    // Mapping rates: sequential, then 64 in flight (batched into one
    // journal sync and one nft transaction per wake-up).
    let n: u16 = if size.rounds > 1 { 2000 } else { 500 };
    let rss_before = rss_kib(daemon.id())?;
    let one = natpmp(&lab, &exe, &gateway_lan, n, 20000, 1, 3600)?;
    let many = natpmp(&lab, &exe, &gateway_lan, n, 30000, 64, 3600)?;
    if one.failed + many.failed > 0 {
        bail!("mappings refused or unanswered: {one:?} {many:?}");
    }
    let held = f64::from(one.granted + many.granted);
    let rss_after = rss_kib(daemon.id())?;
    rows.push(Row::new(
        "gateway mappings granted per second, 1 request in flight",
        "1/s",
        f64::from(one.granted) / one.secs,
        None,
    ));
    rows.push(Row::new(
        "gateway mapping round trip, 1 request in flight (median)",
        "us",
        one.median_us,
        None,
    ));
    rows.push(Row::new(
        "gateway mappings granted per second, 64 requests in flight",
        "1/s",
        f64::from(many.granted) / many.secs,
        Some(("1 request in flight", f64::from(one.granted) / one.secs)),
    ));
    rows.push(Row::new(
        format!("gateway memory per mapping ({held} held)"),
        "KiB",
        (rss_after - rss_before) / held,
        None,
    ));
    let gone = natpmp(&lab, &exe, &gateway_lan, n, 20000, 64, 0)?;
    rows.push(Row::new(
        "gateway mappings deleted per second, 64 requests in flight",
        "1/s",
        f64::from(gone.granted) / gone.secs,
        None,
    ));

    // Setup from the internet to the client: a static forward beside the
    // daemon's mappings.
    let agent_log = dir.join("agent.log");
    let addr_file = dir.join("agent.vaddr");
    let _agent = Lab::spawn_logged(
        lab.command("client", &exe)
            .args(["agent", "serve", "--tcp", &format!("0.0.0.0:{TCP_PORT}")])
            .args(["--reach", &format!("0.0.0.0:{REACH_PORT}"), "--state-dir"])
            .arg(dir.join("client"))
            .arg("--addr-file")
            .arg(&addr_file),
        &agent_log,
    )?;
    let vaddr = reach_lab::wait::for_file(&addr_file, READY).with_context(|| {
        format!(
            "the agent server did not start: {}",
            std::fs::read_to_string(&agent_log).unwrap_or_default()
        )
    })?;
    let rule = format!(
        "table ip admin {{\n chain prerouting {{\n type nat hook prerouting priority -110; policy accept;\n iifname \"wan\" tcp dport {STATIC_PORT} dnat to {}:{TCP_PORT}\n }}\n}}\n",
        client.lan
    );
    let mut nft = lab.gateway_command("home", "nft");
    let mut child = nft.args(["-f", "-"]).stdin(Stdio::piped()).spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().context("nft stdin")?, rule.as_bytes())?;
    if !child.wait()?.success() {
        bail!("the static forward was not added");
    }
    natpmpc(&lab, TCP_PORT, 45001)?;
    natpmpc(&lab, REACH_PORT, 45002)?;
    let mut direct: reach::VirtualAddr = vaddr
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("agent vaddr: {e}"))?;
    direct.direct = vec![format!("{public}:45002").parse()?];
    let count = size.count.clamp(20, 200);
    let tcp = |port: u16| vec!["--tcp".to_string(), format!("{public}:{port}")];
    let reach_args = vec![
        "--vaddr".to_string(),
        direct.to_string(),
        "--modules".into(),
        "direct".into(),
    ];
    let mut statics = Vec::new();
    let mut mapped = Vec::new();
    let mut reached = Vec::new();
    for _ in 0..size.rounds.max(1) {
        statics.push(setup(&lab, &exe, &dir, count, &tcp(STATIC_PORT))?);
        mapped.push(setup(&lab, &exe, &dir, count, &tcp(45001))?);
        reached.push(setup(&lab, &exe, &dir, count, &reach_args)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, m, r) = (
        median(&mut statics),
        median(&mut mapped),
        median(&mut reached),
    );
    rows.push(Row::new(
        "setup from the internet, plain TCP through a static forward",
        "ms",
        s,
        None,
    ));
    rows.push(Row::new(
        "setup from the internet, plain TCP through a mapped port",
        "ms",
        m,
        Some(("plain TCP, static forward", s)),
    ));
    rows.push(Row::new(
        "setup from the internet, reach Direct through a mapped port",
        "ms",
        r,
        Some(("plain TCP, static forward", s)),
    ));
    drop(daemon);
    Ok(rows)
}
