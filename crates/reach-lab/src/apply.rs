//! Carrying out a plan with `ip` and `nft`, and tearing a lab down.
//!
//! Commands are batched (`ip -batch -` per namespace), so a lab of a dozen
//! namespaces comes up in a fraction of a second. Every failure names the
//! command and what it printed.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::plan::{HopPlan, Plan, Route};

/// Why building or tearing down a lab failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A required tool is missing.
    #[error("{tool} not found: install {package} (apt-get install {package})")]
    MissingTool {
        /// The command.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// A comparison baseline installed with `cargo install` is missing.
    #[error(
        "{tool} not found on PATH or in ~/.cargo/bin: run `cargo install {tool}` \
         (scripts/test.sh and scripts/bench.sh do it)"
    )]
    MissingCrate {
        /// The command, which is also the crate's name.
        tool: &'static str,
    },
    /// Not running as root.
    #[error("reach-lab needs root to create network namespaces (run it with sudo)")]
    NotRoot,
    /// A command failed.
    #[error("`{command}` failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        output: String,
    },
    /// The topology is invalid.
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
    /// Reading or writing lab state failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs a command, feeding it `input`, and turns failure into a `LabError`.
pub fn run(cmd: &mut Command, input: Option<&str>) -> Result<String, LabError> {
    let line = format!("{cmd:?}").replace('"', "");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Command {
            command: line.clone(),
            output: e.to_string(),
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: line,
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks that we are root and that `ip` and `nft` exist.
pub fn check_prerequisites() -> Result<(), LabError> {
    let uid = run(Command::new("id").arg("-u"), None)?;
    if uid.trim() != "0" {
        return Err(LabError::NotRoot);
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Err(LabError::MissingTool { tool, package });
        }
    }
    Ok(())
}

fn route_line(r: &Route) -> String {
    match r.dest {
        Some(net) => format!("route add {net} via {}", r.via),
        None => format!("route add default via {}", r.via),
    }
}

/// Builds every namespace, link, address, route and ruleset of `plan`, naming
/// namespaces `PREFIX-NAME`, and starts its delay hops with the `reach-lab`
/// binary `hop_bin`. On error the caller tears down what was built.
pub fn apply(prefix: &str, plan: &Plan, hop_bin: Option<&Path>) -> Result<(), LabError> {
    let full = |n: &str| format!("{prefix}-{n}");
    for ns in &plan.namespaces {
        run(
            Command::new("ip").args(["netns", "add", &full(&ns.name)]),
            None,
        )?;
        // IPv6 off except where the topology asks for it; where on, without
        // duplicate address detection (it would delay interfaces by a
        // second or more) or router advertisements (routes are static).
        // Forwarding only on routers.
        let ipv6 = !ns.addrs6.is_empty();
        let mut sysctls = if ipv6 {
            vec![
                "net.ipv6.conf.all.disable_ipv6=0",
                "net.ipv6.conf.default.disable_ipv6=0",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_ra=0",
                "net.ipv6.conf.default.accept_ra=0",
            ]
        } else {
            vec![
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]
        };
        if ns.forward {
            sysctls.push("net.ipv4.ip_forward=1");
            if ipv6 {
                sysctls.push("net.ipv6.conf.all.forwarding=1");
            }
        }
        sysctls.extend(ns.sysctls.iter().map(String::as_str));
        if ns.name == "inet" {
            // LAB-NOTES: unreachable destinations must answer at once, always.
            sysctls.push("net.ipv4.icmp_ratelimit=0");
        }
        run(
            Command::new("ip")
                .args(["netns", "exec", &full(&ns.name), "sysctl", "-qw"])
                .args(&sysctls),
            None,
        )?;
    }
    let mut links = String::new();
    for l in &plan.links {
        links += &format!(
            "link add {} netns {} type veth peer name {} netns {}\n",
            l.a.ifname,
            full(&l.a.ns),
            l.b.ifname,
            full(&l.b.ns)
        );
    }
    run(Command::new("ip").args(["-batch", "-"]), Some(&links))?;
    for ns in &plan.namespaces {
        let mut batch = String::from("link set lo up\n");
        for br in &ns.bridges {
            batch += &format!("link add {br} type bridge\nlink set {br} up\n");
        }
        if plan.hops.iter().any(|h| h.ns == ns.name) {
            batch += "tuntap add dev t0 mode tap\ntuntap add dev t1 mode tap\n";
            batch +=
                "link set t0 master b0\nlink set t1 master b1\nlink set t0 up\nlink set t1 up\n";
        }
        for l in &plan.links {
            for end in [&l.a, &l.b].into_iter().filter(|e| e.ns == ns.name) {
                if let Some(br) = &end.bridge {
                    batch += &format!("link set {} master {br}\n", end.ifname);
                }
                batch += &format!("link set {} up\n", end.ifname);
            }
        }
        for (ifname, ip, len) in &ns.addrs {
            batch += &format!("addr add {ip}/{len} dev {ifname}\n");
        }
        for r in &ns.routes {
            batch += &route_line(r);
            batch += "\n";
        }
        for (ifname, ip, len) in &ns.addrs6 {
            batch += &format!("addr add {ip}/{len} dev {ifname} nodad\n");
        }
        for (dest, via) in &ns.routes6 {
            match dest {
                Some((net, len)) => batch += &format!("route add {net}/{len} via {via}\n"),
                None => batch += &format!("route add ::/0 via {via}\n"),
            }
        }
        for line in &ns.ip_extra {
            batch += line;
            batch += "\n";
        }
        run(
            Command::new("ip").args(["-n", &full(&ns.name), "-batch", "-"]),
            Some(&batch),
        )?;
        if let Some(rules) = &ns.nft {
            run(
                Command::new("ip").args(["netns", "exec", &full(&ns.name), "nft", "-f", "-"]),
                Some(rules),
            )?;
        }
        if !ns.conntrack.is_empty() {
            run(
                Command::new("ip")
                    .args(["netns", "exec", &full(&ns.name), "sysctl", "-qw"])
                    .args(&ns.conntrack),
                None,
            )?;
        }
    }
    for hop in &plan.hops {
        let bin = hop_bin.ok_or(LabError::MissingTool {
            tool: "reach-lab (for delay hops; set REACH_LAB_BIN)",
            package: "reach-lab: cargo build -p reach-lab",
        })?;
        start_hop(&full(&hop.ns), hop, bin)?;
    }
    for link in plan.links.iter().filter(|l| l.rate_mbit.is_some()) {
        let rate = link.rate_mbit.unwrap_or_default();
        for end in [&link.a, &link.b]
            .into_iter()
            .filter(|e| !plan.hops.iter().any(|h| h.ns == e.ns))
        {
            shape(&full(&end.ns), &end.ifname, rate)?;
        }
    }
    // Last: TAP ports get their carrier only once a hop opens them.
    for ns in plan.namespaces.iter().filter(|n| !n.bridges.is_empty()) {
        wait_for_forwarding(&full(&ns.name))?;
    }
    Ok(())
}

/// Limits egress of `dev` in `ns` to `rate_mbit` with a token bucket. The
/// bucket holds 5 ms worth of traffic (at least 16 KiB, so one TSO burst fits)
/// and the queue at most 100 ms.
fn shape(ns: &str, dev: &str, rate_mbit: u32) -> Result<(), LabError> {
    let burst = (u64::from(rate_mbit) * 1_000_000 / 8 / 200).max(16 * 1024);
    run(
        Command::new("tc").args([
            "-n",
            ns,
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            &format!("{rate_mbit}mbit"),
            "burst",
            &burst.to_string(),
            "latency",
            "100ms",
        ]),
        None,
    )?;
    Ok(())
}

/// The command-line spelling of a behaviour (as in topology files).
fn arg_name(v: &impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// Starts a delay hop in `ns` on the TAP devices `t0` and `t1`, which exist
/// already: they are created persistent and bridged before any traffic flows,
/// because a bridge did not forward the first frame from a TAP port attached
/// while traffic was starting (a lost first ARP request cost a 1 s retry).
fn start_hop(ns: &str, hop: &HopPlan, bin: &Path) -> Result<(), LabError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(bin).args([
        "hop",
        "--a",
        "t0",
        "--b",
        "t1",
        "--delay-ms",
        &hop.delay_ms.to_string(),
    ]);
    if hop.loss_ppm > 0 || hop.jitter_ms > 0 {
        cmd.args(["--loss-ppm", &hop.loss_ppm.to_string()])
            .args(["--jitter-ms", &hop.jitter_ms.to_string()])
            .args(["--seed", &hop.seed.to_string()]);
    }
    if let Some(nat) = &hop.nat {
        cmd.args(["--nat-external", &nat.external.to_string()])
            .args(["--mapping", &arg_name(&nat.mapping)])
            .args(["--filtering", &arg_name(&nat.filtering)])
            .args(["--allocation", &arg_name(&nat.allocation)]);
        if nat.hairpin {
            cmd.arg("--hairpin");
        }
        if let Some(t) = nat.udp_timeout_s {
            cmd.args(["--udp-timeout-s", &t.to_string()]);
        }
        if let Some(t) = nat.tcp_timeout_s {
            cmd.args(["--tcp-timeout-s", &t.to_string()]);
        }
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // It outlives this process: it must not hold our stderr open.
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
    }
    if line.trim() != "ready" {
        let _ = child.kill();
        return Err(LabError::Command {
            command: format!("reach-lab hop in {ns}"),
            output: "exited before its TAP devices were ready".into(),
        });
    }
    // The hop keeps running after this process exits; teardown kills it with
    // the namespace.
    Ok(())
}

/// Waits until every bridge port in `ns` forwards. The kernel reports a new
/// veth's carrier through its link-watch queue, which can lag by about a second;
/// until then a bridge drops frames to that port (seen: a lab's first ARP
/// request lost, costing the first connection a 1 s retry).
fn wait_for_forwarding(ns: &str) -> Result<(), LabError> {
    let mut waiting = String::new();
    let all_forward = crate::wait::until(std::time::Duration::from_secs(10), || {
        let out = run(
            Command::new("bridge").args(["-n", ns, "link", "show"]),
            None,
        )
        .ok()?;
        waiting = out
            .lines()
            .filter(|l| !l.contains("state forwarding"))
            .collect::<Vec<_>>()
            .join("; ");
        waiting.is_empty().then_some(())
    });
    all_forward.ok_or_else(|| LabError::Command {
        command: format!("waiting for bridge ports in {ns} to forward"),
        output: waiting.clone(),
    })
}

/// Kills every process inside the namespace and deletes it. Errors are ignored:
/// teardown must get as far as it can.
pub fn remove_namespace(name: &str) {
    if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", name]), None) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = run(Command::new("ip").args(["netns", "del", name]), None);
}

/// Every namespace on the system whose name starts with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let list = run(Command::new("ip").args(["netns", "list"]), None).unwrap_or_default();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}
