//! `reach-bench run`: unmodified iperf3, client and server both under
//! `reach run`, beside the same iperf3 through `reach forward` and
//! `reach expose` and beside plain TCP, on the same two hosts in one run.
//!
//! ```text
//!   a: iperf3 -c B ----------------------------------> b: iperf3 -s :5201   plain TCP
//!   a: iperf3 -c 127.0.0.1:15201 -> reach forward ===> reach expose -> :5201 forward
//!   a: reach run -- iperf3 -c NODEID.reach:5202 =====> reach run -- iperf3 -s :5202
//! ```
//! The hosts are `a` and `b` of `lab/topologies/hub-chain.toml`; the
//! nodes attach to hub1 and connect Direct. Rounds go through the ways in
//! turn and each figure is the median of its rounds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use reach_lab::{Lab, Topology};

use crate::lab::{work_dir, Size};
use crate::Row;

const TOPOLOGY: &str = include_str!("../../../lab/topologies/hub-chain.toml");
/// How long a server has to come up.
const READY: Duration = Duration::from_secs(20);

/// Spawns `cmd` with its output in `log` and waits for `ready` there.
fn start(cmd: &mut Command, log: &Path, ready: &str) -> anyhow::Result<reach_lab::lab::Process> {
    let p = Lab::spawn_logged(cmd, log)?;
    reach_lab::wait::until(READY, || {
        std::fs::read_to_string(log)
            .ok()?
            .contains(ready)
            .then_some(())
    })
    .with_context(|| {
        format!(
            "no {ready:?} in {}: {}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    Ok(p)
}

/// The throughput iperf3 reports (its JSON on stdout), Gbit/s.
fn iperf3_gbit(mut cmd: Command, what: &str) -> anyhow::Result<f64> {
    let out = cmd
        .output()
        .context("cannot run iperf3 (apt-get install iperf3)")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 {what}: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 {what}: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 {what} reported no rate"))?;
    Ok(bps / 1e9)
}

/// `reach id` of a state directory.
fn node_id(reach: &Path, dir: &Path) -> anyhow::Result<String> {
    let out = Command::new(reach)
        .arg("--state-dir")
        .arg(dir)
        .arg("id")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "reach id: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs the benchmark, with logs and state in `keep` (kept) or in a
/// temporary directory.
pub fn run(size: Size, keep: Option<&Path>) -> anyhow::Result<Vec<Row>> {
    let (dir, _tmp) = work_dir(keep.map(Path::to_path_buf), "run")?;
    let t = Topology::from_toml(TOPOLOGY).context("bench topology")?;
    let lab = Lab::up(&t).context("cannot build the lab (needs root)")?;
    let tools = crate::tools_dir(&["reach", "reach-lab", "libreach_shim.so"])?;
    let reach: PathBuf = tools.join("reach");
    let shim = tools.join("libreach_shim.so");
    let hubs = reach_lab::hubs::start(&lab, &t, t.hubs.as_ref().context("[hubs]")?, &tools, &dir)?;
    let hub = |h: &str| hubs.target(&lab, h, "hub1").context("no hub1");
    let (hub_a, hub_b) = (hub("a")?, hub("b")?);
    let state = |name: &str| dir.join(name);
    let (fwd_id, run_id) = (
        node_id(&reach, &state("a-forward"))?,
        node_id(&reach, &state("a-run"))?,
    );
    let reach_in = |host: &str, name: &str| {
        let mut c = lab.command(host, &reach);
        c.arg("--state-dir").arg(state(name)).arg("-v");
        c
    };
    // b: iperf3 for plain TCP and forward; reach expose of it; iperf3
    // under reach run.
    let _plain = start(
        lab.command("b", "iperf3")
            .args(["-s", "--forceflush", "-p", "5201"]),
        &dir.join("iperf3-plain.log"),
        "Server listening",
    )?;
    let addr_file = dir.join("exposed.txt");
    let _expose = start(
        reach_in("b", "b-expose")
            .args([
                "expose",
                "127.0.0.1:5201",
                "--port",
                "5201",
                "--virtual-only",
            ])
            .args(["--allow", &fwd_id, "--hub", &hub_b, "--addr-file"])
            .arg(&addr_file),
        &dir.join("expose.log"),
        "exposing",
    )?;
    let vaddr = reach_lab::wait::for_file(&addr_file, READY).context("expose's address")?;
    let _forward = start(
        reach_in("a", "a-forward").args(["forward", "127.0.0.1:15201", &vaddr, "--hub", &hub_a]),
        &dir.join("forward.log"),
        "forwarding",
    )?;
    let _run_server = start(
        reach_in("b", "b-run")
            .args(["run", "--shim"])
            .arg(&shim)
            .args(["--allow", &run_id, "--virtual-only", "--hub", &hub_b, "--"])
            .args(["iperf3", "-s", "--forceflush", "-p", "5202"]),
        &dir.join("run-server.log"),
        "port 5202 served at",
    )?;
    let server_node = node_id(&reach, &state("b-run"))?;
    let b_ip = lab.host("b").lan.to_string();
    let mut rows = Vec::new();
    for streams in [1usize, 4] {
        let iperf_args = |to: &str, port: &str| -> Vec<String> {
            [
                "-c",
                to,
                "-p",
                port,
                "-J",
                "-t",
                &size.secs.to_string(),
                "-P",
                &streams.to_string(),
                "--connect-timeout",
                "10000",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let mut runs: [Vec<f64>; 3] = Default::default();
        for _ in 0..size.rounds.max(1) {
            let mut plain = lab.command("a", "iperf3");
            plain.args(iperf_args(&b_ip, "5201"));
            runs[0].push(iperf3_gbit(plain, "plain")?);
            let mut fwd = lab.command("a", "iperf3");
            fwd.args(iperf_args("127.0.0.1", "15201"));
            runs[1].push(iperf3_gbit(fwd, "through forward")?);
            let mut run = reach_in("a", "a-run");
            run.args(["run", "--shim"])
                .arg(&shim)
                .args(["--hub", &hub_a, "--", "iperf3"])
                .args(iperf_args(&format!("{server_node}.reach"), "5202"));
            runs[2].push(iperf3_gbit(run, "under reach run")?);
            eprintln!(
                "  x{streams}: plain {:.2}, forward {:.2}, reach run {:.2} Gbit/s",
                runs[0].last().unwrap_or(&0.0),
                runs[1].last().unwrap_or(&0.0),
                runs[2].last().unwrap_or(&0.0)
            );
        }
        let [plain, fwd, run] = runs.map(crate::median);
        let s = if streams > 1 { "s" } else { "" };
        rows.push(Row::new(
            format!("reach run throughput, iperf3 {streams} stream{s} (both ends under reach run)"),
            "Gbit/s",
            run,
            Some((&format!("reach forward + expose, {streams} stream{s}"), fwd)),
        ));
        rows.push(Row::new(
            format!("reach run throughput, iperf3 {streams} stream{s}"),
            "Gbit/s",
            run,
            Some((&format!("plain TCP, {streams} stream{s}"), plain)),
        ));
    }
    Ok(rows)
}
