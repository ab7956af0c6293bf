//! `reach-bench vpn`: reach vpn between two network namespaces beside the
//! raw veth path and a boringtun (WireGuard) tunnel on the same hosts, in
//! one run: unmodified iperf3 with 1 and 4 streams, ping round trips, and
//! the CPU each tunnel's processes spend per gigabyte carried.
//!
//! ```text
//!   a ------------------ b     raw TCP (the hosts' own addresses)
//!   a ==reach0=========== b     reach vpn (virtual addresses; direct stream)
//!   a ==reach1=========== b     reach vpn --udp-first (the UDP path)
//!   a ==wgNN============= b     boringtun (its inner addresses)
//! ```
//! The hosts are `a` and `b` of `lab/topologies/hub-chain.toml`, each on a
//! site of its own; the vpn members attach to hub1, which keeps their
//! directory (packets go between `a` and `b` directly). Rounds go through
//! the variants in turn and each figure is the median of its rounds.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use reach_lab::{Lab, Topology};

use crate::lab::{cpu_of, work_dir, Size};
use crate::Row;

const TOPOLOGY: &str = include_str!("../../../lab/topologies/hub-chain.toml");
/// The iperf3 server's port in `b`.
const IPERF_PORT: u16 = 5201;
/// How long a server has to come up.
const READY: Duration = Duration::from_secs(20);

/// One way from `a` to `b`: its name, the address of `b` it uses, and the
/// processes that carry it (none for the raw path: the kernel does).
struct Way {
    name: &'static str,
    to: IpAddr,
    carriers: Vec<u32>,
}

/// What one iperf3 run measured.
struct Run {
    gbit_s: f64,
    /// CPU seconds of the carriers per gigabyte received.
    cpu_s_per_gb: f64,
    /// Segments the inner TCP senders sent again (losses inside the
    /// tunnel show here).
    retransmits: u64,
}

/// How long iperf3 may report its server busy before a run gives up: the
/// server still ends the previous test (a lossy tunnel's last segments)
/// for a moment after its client exited.
const BUSY_WAIT: Duration = Duration::from_secs(15);

fn iperf3(
    lab: &Lab,
    to: IpAddr,
    streams: usize,
    secs: f64,
    carriers: &[u32],
) -> anyhow::Result<Run> {
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    loop {
        match iperf3_once(lab, to, streams, secs, carriers) {
            Err(e)
                if e.to_string().contains("server is busy")
                    && std::time::Instant::now() < deadline =>
            {
                eprintln!("  iperf3 server busy, asking again: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

fn iperf3_once(
    lab: &Lab,
    to: IpAddr,
    streams: usize,
    secs: f64,
    carriers: &[u32],
) -> anyhow::Result<Run> {
    let before = cpu_of(carriers)?;
    let out = lab
        .command("a", "iperf3")
        .args(["-c", &to.to_string(), "-p", &IPERF_PORT.to_string(), "-J"])
        .args(["-t", &secs.to_string(), "-P", &streams.to_string()])
        .args(["--connect-timeout", "10000"])
        .output()
        .context("cannot run iperf3 (apt-get install iperf3)")?;
    let after = cpu_of(carriers)?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 to {to}: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 to {to}: {e}");
    }
    let received = &v["end"]["sum_received"];
    let bytes = received["bytes"]
        .as_f64()
        .context("iperf3 reported no bytes")?;
    let bps = received["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no rate")?;
    Ok(Run {
        gbit_s: bps / 1e9,
        cpu_s_per_gb: (after - before) / (bytes / 1e9),
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// The average of `count` pings from `a` to `to`, in microseconds.
fn ping_us(lab: &Lab, to: IpAddr, count: u32) -> anyhow::Result<f64> {
    let out = lab
        .command("a", "ping")
        .args([
            "-n",
            "-q",
            "-i",
            "0.002",
            "-c",
            &count.to_string(),
            "-w",
            "60",
        ])
        .arg(to.to_string())
        .output()
        .context("cannot run ping (apt-get install iputils-ping)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "rtt min/avg/max/mdev = 0.045/0.061/0.080/0.014 ms"
    let avg = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("ping to {to}: {text}"))?;
    Ok(avg * 1000.0)
}

/// Runs the vpn benchmark, with logs and state in `keep` (kept) or in a
/// temporary directory.
pub fn run(size: Size, keep: Option<&Path>) -> anyhow::Result<Vec<Row>> {
    let (dir, _tmp) = work_dir(keep.map(Path::to_path_buf), "vpn")?;
    let t = Topology::from_toml(TOPOLOGY).context("bench topology")?;
    let lab = Lab::up(&t).context("cannot build the lab (needs root)")?;
    let tools = crate::tools_dir(&["reach", "reach-lab"])?;
    let hubs = reach_lab::hubs::start(&lab, &t, t.hubs.as_ref().context("[hubs]")?, &tools, &dir)?;
    let member = |h: &str| {
        let hub = hubs.target(&lab, h, "hub1");
        reach_lab::vpn::start_member(&lab, &tools, h, hub.as_deref())
    };
    let (va, vb) = (member("a")?, member("b")?);
    // A second network on the same hosts whose members send over UDP
    // paths whenever one is up.
    let udp_member = |h: &str| {
        let hub = hubs.target(&lab, h, "hub1");
        let name = format!("{h}-udp");
        let options = reach_lab::vpn::Options {
            name: &name,
            dev: "reach1",
            network: "lab-udp",
            extra: &["--udp-first", "--prefix", "10.78.0.0/16"],
            servers: false,
        };
        reach_lab::vpn::start_with(&lab, &tools, h, hub.as_deref(), &options)
    };
    let (ua, ub) = (udp_member("a")?, udp_member("b")?);
    hubs.wait_converged(&lab, &tools, 4, READY)?;
    let ip = |h: &str| {
        let h = lab.host(h);
        h.public.unwrap_or(h.lan)
    };
    let tag = format!("{}", std::process::id() % 100_000);
    let tunnel = reach_lab::boringtun::Tunnel::start(
        &lab,
        ("a", ip("a")),
        ("b", ip("b")),
        &tag,
        &dir.join("boringtun"),
    )?;
    let log = dir.join("iperf3-server.log");
    let _server = Lab::spawn_logged(
        lab.command("b", "iperf3")
            .args(["-s", "--forceflush", "-p", &IPERF_PORT.to_string()]),
        &log,
    )?;
    reach_lab::wait::until(READY, || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("Server listening")
            .then_some(())
    })
    .context("the iperf3 server did not start")?;
    let ways = [
        Way {
            name: "raw veth TCP",
            to: ip("b").into(),
            carriers: Vec::new(),
        },
        Way {
            name: "reach vpn",
            to: vb.ip,
            carriers: vec![va.pid(), vb.pid()],
        },
        Way {
            name: "reach vpn, UDP path",
            to: ub.ip,
            carriers: vec![ua.pid(), ub.pid()],
        },
        Way {
            name: "boringtun (WireGuard)",
            to: reach_lab::boringtun::INNER_B.into(),
            carriers: tunnel.pids(),
        },
    ];
    // The first packets set the paths up (the vpn resolves and connects).
    for w in &ways {
        ping_us(&lab, w.to, 3).with_context(|| format!("{} is not up", w.name))?;
    }
    let mut rows = Vec::new();
    for streams in [1usize, 4] {
        let mut runs: Vec<Vec<Run>> = ways.iter().map(|_| Vec::new()).collect();
        for _ in 0..size.rounds.max(1) {
            for (i, w) in ways.iter().enumerate() {
                let r = iperf3(&lab, w.to, streams, size.secs, &w.carriers)
                    .with_context(|| format!("iperf3 over {}", w.name))?;
                eprintln!(
                    "  {} x{streams}: {:.2} Gbit/s, {:.2} CPU s/GB, {} retransmits",
                    w.name, r.gbit_s, r.cpu_s_per_gb, r.retransmits
                );
                if i == 1 {
                    // The sender's drops so far (queue full, ...).
                    let s = reach_lab::vpn::status(&lab, &tools, "a");
                    eprintln!(
                        "    a: {}",
                        s.map(|s| s["public"].to_string()).unwrap_or_default()
                    );
                }
                runs[i].push(r);
            }
        }
        let rate = |i: usize| crate::median(runs[i].iter().map(|r| r.gbit_s).collect());
        let cpu = |i: usize| crate::median(runs[i].iter().map(|r| r.cpu_s_per_gb).collect());
        let s = if streams > 1 { "s" } else { "" };
        let raw = format!("raw veth TCP, {streams} stream{s}");
        let bt = format!("boringtun, {streams} stream{s}");
        let bt_cpu = format!("boringtun (both ends), {streams} stream{s}");
        // Ways: 0 raw, 1 reach vpn (direct stream), 2 its UDP path, 3 boringtun.
        for (i, name) in [
            (1, "reach vpn"),
            (2, "reach vpn UDP path"),
            (3, "boringtun"),
        ] {
            rows.push(Row::new(
                format!("vpn throughput, {name}, iperf3 {streams} stream{s}"),
                "Gbit/s",
                rate(i),
                Some((&raw, rate(0))),
            ));
        }
        for (i, name) in [(1, "reach vpn"), (2, "reach vpn UDP path")] {
            rows.push(Row::new(
                format!("vpn throughput, {name}, iperf3 {streams} stream{s}"),
                "Gbit/s",
                rate(i),
                Some((&bt, rate(3))),
            ));
            rows.push(Row::new(
                format!("vpn CPU per GB, {name} (both ends), {streams} stream{s}"),
                "CPU s/GB",
                cpu(i),
                Some((&bt_cpu, cpu(3))),
            ));
        }
    }
    let count = size.count.max(10);
    let mut rtts: Vec<Vec<f64>> = ways.iter().map(|_| Vec::new()).collect();
    for _ in 0..size.rounds.max(1) {
        for (i, w) in ways.iter().enumerate() {
            rtts[i].push(ping_us(&lab, w.to, count)?);
        }
    }
    let rtt: Vec<f64> = rtts.into_iter().map(crate::median).collect();
    rows.push(Row::new(
        "vpn round trip, reach vpn (ping)",
        "us",
        rtt[1],
        Some(("raw veth (ping)", rtt[0])),
    ));
    rows.push(Row::new(
        "vpn round trip, reach vpn UDP path (ping)",
        "us",
        rtt[2],
        Some(("raw veth (ping)", rtt[0])),
    ));
    rows.push(Row::new(
        "vpn round trip, boringtun (ping)",
        "us",
        rtt[3],
        Some(("raw veth (ping)", rtt[0])),
    ));
    rows.push(Row::new(
        "vpn added round trip, reach vpn",
        "us",
        rtt[1] - rtt[0],
        Some(("boringtun", rtt[3] - rtt[0])),
    ));
    rows.push(Row::new(
        "vpn added round trip, reach vpn UDP path",
        "us",
        rtt[2] - rtt[0],
        Some(("boringtun", rtt[3] - rtt[0])),
    ));
    drop(tunnel);
    drop((va, vb, ua, ub));
    Ok(rows)
}
