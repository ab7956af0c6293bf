//! The `reach-lab` command: build, use and remove network-namespace labs.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use reach_lab::lab::{down_all, LabRecord};
use reach_lab::{probe, Lab, Topology};

/// reach-lab: a testbed of network namespaces with real NATs and firewalls.
///
/// Needs root. Public addresses come only from documentation ranges; nothing
/// leaves the lab's namespaces.
#[derive(Parser)]
#[command(name = "reach-lab", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab described by a topology file and leave it running.
    Up {
        /// Topology file (see lab/topologies/).
        file: PathBuf,
    },
    /// Remove a lab (its namespaces and every process in them).
    Down {
        /// The lab's prefix or topology name (default: the only running lab).
        lab: Option<String>,
        /// Remove every lab, also ones left behind by a crash.
        #[arg(long)]
        all: bool,
    },
    /// Run a command inside a host of a running lab.
    Exec {
        /// Host name from the topology.
        host: String,
        /// The lab's prefix or topology name, when several are running.
        #[arg(long)]
        lab: Option<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List running labs with their hosts and addresses.
    Status,
    /// Build a lab, try every ordered pair of hosts, print the matrix, remove the lab.
    Matrix {
        /// Topology file.
        file: PathBuf,
        /// plain: TCP sockets; reach: reach streams; vpn: the virtual IP network.
        #[arg(long, value_enum)]
        mode: reach_lab::matrix::Mode,
        /// Also write the matrix as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seconds each attempt may take [default: 2 plain, 10 reach, 20 vpn].
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Build a lab with its hubs, splice every ordered pair of matrix hosts
    /// ATTEMPTS times (one attempt at a time), print the success rate and
    /// median setup time per pair, remove the lab.
    Splice {
        /// Topology file (needs a [hubs] table).
        #[arg(default_value = "lab/topologies/nat-zoo.toml")]
        file: PathBuf,
        /// Attempts per ordered pair.
        #[arg(long, default_value_t = 50)]
        attempts: u32,
        /// Seconds each attempt may take.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        /// Also write the table as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also write the Markdown table here.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
    /// Build a lab with its hubs and a vpn member on every matrix host; for
    /// each pair, move both members to fresh UDP sockets (`reach vpn
    /// rebind`) ATTEMPTS times and see whether hole punching gives both a
    /// UDP path within 3.5 s; print the rate and median setup time per
    /// pair, remove the lab.
    Punch {
        /// Topology file (needs a [hubs] table).
        #[arg(default_value = "lab/topologies/nat-zoo.toml")]
        file: PathBuf,
        /// Attempts per pair.
        #[arg(long, default_value_t = 50)]
        attempts: u32,
        /// Only these matrix hosts (comma-separated; default: all).
        #[arg(long, value_delimiter = ',', value_name = "HOST,...")]
        hosts: Vec<String>,
        /// Also write the table as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also write the Markdown table here.
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Copy each member's log (run with -v) into this directory as
        /// HOST.log before the lab goes, to see why a punch failed.
        #[arg(long, value_name = "DIR")]
        logs: Option<PathBuf>,
    },
    /// Build a lab with its hubs and send the same bulk data from one host to
    /// another once per module order (default: routed only; splice only;
    /// routed first, then moving to splice mid-transfer), checked by sha256,
    /// and print throughput side by side; remove the lab.
    Transfer {
        /// Topology file (needs a [hubs] table).
        #[arg(default_value = "lab/topologies/nat-zoo.toml")]
        file: PathBuf,
        /// Sending host.
        #[arg(long, default_value = "nat-eim-2")]
        from: String,
        /// Receiving host.
        #[arg(long, default_value = "nat-eim")]
        to: String,
        /// Megabytes to send.
        #[arg(long, default_value_t = 200)]
        megabytes: u64,
        /// Module orders to run, each comma-separated, in turn.
        #[arg(long = "modules", default_values_t = ["routed".to_string(), "splice".to_string(), "routed,splice".to_string()])]
        modules: Vec<String>,
        /// Seconds each transfer may take.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
        /// Seconds a routed stream carries data before it moves (the
        /// connector's `--upgrade-after`): on a fast lab path a move can
        /// otherwise finish before the first byte is sent.
        #[arg(long, default_value_t = 0.2)]
        upgrade_after: f64,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Soak real reach processes: streams through two federated hubs on
    /// loopback while the hubs are killed and restarted at random; every
    /// byte checked; reports streams, bytes, faults, anything lost and any
    /// file descriptors or threads left behind. Exits 1 if anything was lost
    /// or leaked.
    Soak {
        /// Minutes to start streams for.
        #[arg(long, default_value_t = 2.0)]
        minutes: f64,
        /// Streams in flight at once.
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Seed of the payloads and the fault schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Build a lab, check that every gateway behaves as declared, remove the lab.
    Verify {
        /// Topology file.
        file: PathBuf,
        /// Seconds each probe may take.
        #[arg(long, default_value_t = 1.0)]
        timeout: f64,
        /// Also write the checks as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The main demo: the SmartSockets testbed checked, then connected with plain
    /// TCP and with reach, side by side.
    Demo {
        /// Topology (default: the SmartSockets testbed).
        #[arg(long, default_value = "lab/topologies/smartsockets.toml")]
        file: PathBuf,
    },
    /// Relay frames between two TAP devices with a delay (run by the lab itself).
    #[command(hide = true)]
    Hop {
        /// First TAP device to open (the internet side).
        #[arg(long)]
        a: String,
        /// Second TAP device to open (the site side).
        #[arg(long)]
        b: String,
        /// One-way delay in milliseconds, each direction.
        #[arg(long)]
        delay_ms: u32,
        /// Frames lost per million, each direction, independently.
        #[arg(long, default_value_t = 0)]
        loss_ppm: u32,
        /// Extra delay of up to this many milliseconds per frame (order kept).
        #[arg(long, default_value_t = 0)]
        jitter_ms: u32,
        /// Seeds the loss and jitter draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// NAT: seconds an idle UDP mapping lives (default: for ever).
        #[arg(long)]
        udp_timeout_s: Option<u32>,
        /// NAT: seconds an idle TCP mapping lives (default: for ever).
        #[arg(long)]
        tcp_timeout_s: Option<u32>,
        /// Run a userspace NAT with this external address (`b` is the inside).
        #[arg(long)]
        nat_external: Option<std::net::Ipv4Addr>,
        /// NAT mapping behaviour.
        #[arg(long, value_enum, default_value = "endpoint-independent")]
        mapping: reach_lab::topology::Mapping,
        /// NAT filtering behaviour.
        #[arg(long, value_enum, default_value = "address-and-port-dependent")]
        filtering: reach_lab::topology::Filtering,
        /// NAT port allocation.
        #[arg(long, value_enum, default_value = "preserve")]
        allocation: reach_lab::topology::Allocation,
        /// The NAT hairpins: inside hosts reach each other's mappings.
        #[arg(long)]
        hairpin: bool,
    },
    /// Probe helpers used by tests and checks (run inside lab hosts).
    #[command(subcommand)]
    Probe(ProbeCmd),
}

#[derive(Subcommand)]
enum ProbeCmd {
    /// Answer TCP connections on these ports with a greeting naming this host.
    Serve {
        /// The name to greet with.
        #[arg(long)]
        name: String,
        /// Ports to listen on.
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
    },
    /// Echo every TCP connection on a port back to its sender: a small
    /// tokio (epoll) server, for tests of programs under `reach run`.
    Echo {
        /// Port to listen on.
        #[arg(long)]
        port: u16,
    },
    /// Read bulk transfers on a port and confirm their size.
    Sink {
        /// Port to listen on.
        #[arg(long)]
        port: u16,
    },
    /// Send bytes to a sink and print the throughput as JSON.
    Send {
        /// The sink's address.
        addr: SocketAddr,
        /// How many bytes.
        #[arg(long)]
        bytes: u64,
        /// Seconds the whole transfer may take.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Connect to a probe server and print what happened as JSON.
    Connect {
        /// Address to connect to.
        addr: SocketAddr,
        /// Seconds to wait.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
        /// Connect from this local port.
        #[arg(long)]
        bind_port: Option<u16>,
        /// Send one UDP datagram instead and wait for the greeting.
        #[arg(long)]
        udp: bool,
        /// With --udp: ask for a second greeting this many seconds later and
        /// wait for that one (does an idle NAT mapping still let it in?).
        #[arg(long, requires = "udp")]
        later: Option<f64>,
    },
    /// The abuse suite's rogue hub: link to HUB with the federation's hub
    /// secret and try to take the route to VICTIM_HUB and the node
    /// VICTIM_NODE; one JSON line per attempt (see reach_lab::rogue).
    RogueHub {
        /// The hub to attack, NODEID@IP:PORT.
        #[arg(long)]
        hub: reach::HubTarget,
        /// File holding the federation's hub secret.
        #[arg(long)]
        hub_secret_file: PathBuf,
        /// A hub the attacked hub routes to.
        #[arg(long)]
        victim_hub: reach_proto::NodeId,
        /// A node attached to another hub.
        #[arg(long)]
        victim_node: reach_proto::NodeId,
        /// Seconds to keep claiming the node.
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
        /// Seed of the rogue's key.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("reach-lab: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn load(file: &Path) -> anyhow::Result<Topology> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Topology::from_toml(&text).with_context(|| format!("bad topology {}", file.display()))
}

fn find_lab(which: Option<&str>, host: Option<&str>) -> anyhow::Result<LabRecord> {
    let labs: Vec<LabRecord> = LabRecord::all()
        .into_iter()
        .filter(|l| which.is_none_or(|w| l.prefix == w || l.topology == w))
        .filter(|l| host.is_none_or(|h| l.host(h).is_some()))
        .collect();
    match labs.len() {
        1 => Ok(labs.into_iter().next().expect("one lab")),
        0 => bail!(
            "no running lab{} (start one with reach-lab up FILE)",
            host.map(|h| format!(" has host {h:?}")).unwrap_or_default()
        ),
        _ => bail!(
            "several running labs match; name one with --lab ({})",
            labs.iter()
                .map(|l| l.prefix.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Up { file } => {
            let topology = load(&file)?;
            let record = Lab::up(&topology)?.persist();
            println!("lab {} ({}) is up", record.prefix, record.topology);
            print_hosts(&record);
        }
        Cmd::Down { lab, all } => {
            if all {
                let n = down_all();
                println!("removed {n} recorded lab(s) and any orphaned lab namespaces");
            } else {
                let rec = find_lab(lab.as_deref(), None)?;
                rec.tear_down();
                println!("lab {} ({}) removed", rec.prefix, rec.topology);
            }
        }
        Cmd::Exec { host, lab, command } => {
            let rec = find_lab(lab.as_deref(), Some(&host))?;
            let h = rec.host(&host).context("host vanished")?;
            let err = std::process::Command::new("ip")
                .args(["netns", "exec", &rec.host_ns(h)])
                .args(&command)
                .exec();
            bail!("cannot run {:?} in {host}: {err}", command[0]);
        }
        Cmd::Status => {
            let labs = LabRecord::all();
            if labs.is_empty() {
                println!("no labs running");
            }
            for rec in labs {
                println!("lab {} ({})", rec.prefix, rec.topology);
                print_hosts(&rec);
            }
        }
        Cmd::Matrix {
            file,
            mode,
            json,
            timeout,
        } => {
            let topology = load(&file)?;
            let timeout = seconds(timeout.unwrap_or(match mode {
                reach_lab::matrix::Mode::Plain => 2.0,
                reach_lab::matrix::Mode::Reach => 10.0,
                reach_lab::matrix::Mode::Vpn => 20.0,
            }))?;
            let tools = if mode != reach_lab::matrix::Mode::Plain {
                tools_with_reach()?
            } else {
                tools_dir()?
            };
            let lab = Lab::up(&topology)?;
            let m = reach_lab::matrix::run(&lab, &topology, mode, timeout, &tools)?;
            print!("{}", m.render());
            for c in m.cells.iter().filter(|c| !c.ok) {
                println!(
                    "  {} -> {}: {}",
                    c.from_host,
                    c.to_host,
                    c.error.as_deref().unwrap_or("failed")
                );
            }
            if let Some(path) = json {
                write_json(&path, &m)?;
            }
        }
        Cmd::Splice {
            file,
            attempts,
            timeout,
            json,
            markdown,
        } => {
            let topology = load(&file)?;
            let timeout = seconds(timeout)?;
            let tools = tools_with_reach()?;
            let lab = Lab::up(&topology)?;
            let t = reach_lab::splice::run(&lab, &topology, &tools, attempts, timeout)?;
            let failed = t.pairs.iter().filter(|p| p.spliced < p.attempts).map(|p| {
                let last = p.last_error.as_deref().unwrap_or("-");
                let n = p.attempts - p.spliced;
                format!(
                    "{} -> {}: {n} of {} failed, last: {last}",
                    p.from, p.to, p.attempts
                )
            });
            print_table(&t.render(), &t.markdown(), failed, &t, json, markdown)?;
        }
        Cmd::Punch {
            file,
            attempts,
            hosts,
            json,
            markdown,
            logs,
        } => {
            let topology = load(&file)?;
            let tools = tools_with_reach()?;
            let lab = Lab::up(&topology)?;
            if let Some(h) = hosts.iter().find(|h| !lab.record().matrix.contains(h)) {
                bail!("--hosts: {h} is not a matrix host of {}", file.display());
            }
            let t = reach_lab::punch::run(&lab, &topology, &tools, attempts, &hosts)?;
            if let Some(dir) = logs {
                copy_member_logs(&lab, &t.hosts, &dir)?;
            }
            let failed = t.pairs.iter().filter(|p| p.punched < p.attempts).map(|p| {
                let last = p.last_error.as_deref().unwrap_or("-");
                let n = p.attempts - p.punched;
                format!(
                    "{} - {}: {n} of {} failed, last: {last}",
                    p.a, p.b, p.attempts
                )
            });
            let text = t.markdown();
            print_table(&text, &text, failed, &t, json, markdown)?;
        }
        Cmd::Transfer {
            file,
            from,
            to,
            megabytes,
            modules,
            timeout,
            upgrade_after,
            json,
        } => {
            let topology = load(&file)?;
            let timeout = seconds(timeout)?;
            let upgrade_after = Duration::try_from_secs_f64(upgrade_after)
                .context("--upgrade-after must be zero or a positive number of seconds")?;
            let tools = tools_with_reach()?;
            let lab = Lab::up(&topology)?;
            let bench =
                reach_lab::transfer::Bench::start(&lab, &topology, &tools, megabytes << 20)?
                    .upgrade_after(upgrade_after);
            let mut results = Vec::new();
            for m in &modules {
                results.push(bench.run(&lab, &tools, (&from, &to), m, timeout)?);
            }
            print!("{}", reach_lab::transfer::render(&results));
            if let Some(path) = json {
                write_json(&path, &results)?;
            }
            if results.iter().any(|t| !t.intact) {
                bail!("a transfer arrived corrupted");
            }
        }
        Cmd::Soak {
            minutes,
            workers,
            seed,
            json,
        } => {
            let duration = Duration::try_from_secs_f64(minutes * 60.0)
                .ok()
                .filter(|d| !d.is_zero())
                .context("--minutes must be a positive number")?;
            let dir = std::env::temp_dir().join(format!("reach-soak-{}", std::process::id()));
            let opts = reach_lab::soak::SoakOptions {
                duration,
                workers,
                reach: tools_with_reach()?.join("reach"),
                seed,
                dir: dir.clone(),
            };
            let report = reach_lab::soak::run(&opts)?;
            print!("{report}");
            if let Some(path) = json {
                write_json(&path, &report)?;
            }
            if !report.passed() {
                eprintln!("reach-lab: soak failed; logs in {}", dir.display());
                return Ok(ExitCode::FAILURE);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        Cmd::Verify {
            file,
            timeout,
            json,
        } => {
            let topology = load(&file)?;
            let timeout = seconds(timeout)?;
            let lab = Lab::up(&topology)?;
            let checks = reach_lab::verify::run(&lab, &topology, &tools_dir()?, timeout)?;
            print!("{}", reach_lab::verify::render(&checks));
            if let Some(path) = json {
                write_json(&path, &checks)?;
            }
            if checks.iter().any(|c| !c.pass) {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Demo { file } => return demo(&file),
        Cmd::Hop {
            a,
            b,
            delay_ms,
            loss_ppm,
            jitter_ms,
            seed,
            udp_timeout_s,
            tcp_timeout_s,
            nat_external,
            mapping,
            filtering,
            allocation,
            hairpin,
        } => {
            let nat = nat_external.map(|external| reach_lab::nat::NatConfig {
                external,
                mapping,
                filtering,
                allocation,
                // Random allocation is seeded per run, like a real NAT's.
                seed: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64),
                hairpin,
                udp_timeout: udp_timeout_s.map(|s| Duration::from_secs(u64::from(s))),
                tcp_timeout: tcp_timeout_s.map(|s| Duration::from_secs(u64::from(s))),
            });
            let impair = reach_lab::impair::ImpairConfig {
                loss: f64::from(loss_ppm.min(1_000_000)) / 1e6,
                jitter: Duration::from_millis(u64::from(jitter_ms)),
                seed,
            };
            let delay = Duration::from_millis(u64::from(delay_ms));
            reach_lab::hop::run(&a, &b, delay, impair, nat)?
        }
        Cmd::Probe(ProbeCmd::Serve { name, ports }) => probe::serve(&name, &ports)?,
        Cmd::Probe(ProbeCmd::Sink { port }) => probe::sink(port)?,
        Cmd::Probe(ProbeCmd::Echo { port }) => probe::echo(port)?,
        Cmd::Probe(ProbeCmd::Send {
            addr,
            bytes,
            timeout,
        }) => {
            let timeout = seconds(timeout)?;
            let bulk = probe::send(addr, bytes, timeout)
                .with_context(|| format!("bulk transfer to {addr}"))?;
            println!("{}", serde_json::to_string(&bulk)?);
        }
        Cmd::Probe(ProbeCmd::Connect {
            addr,
            timeout,
            bind_port,
            udp,
            later,
        }) => {
            let timeout = seconds(timeout)?;
            let later = later.map(seconds).transpose()?;
            let out = if udp {
                probe::udp(addr, timeout, bind_port, later)
            } else {
                probe::connect(addr, timeout, bind_port)
            };
            println!("{}", serde_json::to_string(&out)?);
            if !matches!(out, probe::Outcome::Ok { .. }) {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Probe(ProbeCmd::RogueHub {
            hub,
            hub_secret_file,
            victim_hub,
            victim_node,
            hold,
            seed,
        }) => {
            let secret = std::fs::read(&hub_secret_file)
                .with_context(|| format!("reading {}", hub_secret_file.display()))?;
            reach_lab::rogue::run(&reach_lab::rogue::Params {
                hub,
                secret: secret.trim_ascii().to_vec(),
                victim_hub,
                victim_node,
                hold: seconds(hold)?,
                seed,
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn demo(file: &Path) -> anyhow::Result<ExitCode> {
    use reach_lab::matrix::{self, Mode};
    let topology = load(file)?;
    let tools = tools_with_reach()?;
    println!(
        "== {}: every gateway checked against its declaration",
        topology.name
    );
    let checks = {
        let lab = Lab::up(&topology)?;
        reach_lab::verify::run(&lab, &topology, &tools, Duration::from_secs(1))?
    };
    let failed = checks.iter().filter(|c| !c.pass).count();
    println!("{} checks, {failed} failed", checks.len());
    if failed > 0 {
        print!("{}", reach_lab::verify::render(&checks));
        return Ok(ExitCode::FAILURE);
    }
    let mut scores = Vec::new();
    for (mode, title, timeout) in [
        (Mode::Plain, "plain TCP sockets", 2),
        (Mode::Reach, "reach (module per pair)", 10),
    ] {
        println!("\n== {title}");
        let lab = Lab::up(&topology)?;
        let m = matrix::run(&lab, &topology, mode, Duration::from_secs(timeout), &tools)?;
        print!("{}", m.render());
        if mode == Mode::Reach {
            for c in m.cells.iter().filter(|c| !c.ok) {
                let why = c.error.as_deref().unwrap_or("failed");
                println!("  {} -> {}: {why}", c.from_host, c.to_host);
            }
            let cached: Vec<f64> = m.cells.iter().filter_map(|c| c.cached_setup_ms).collect();
            if let Some(max) = cached.iter().copied().reduce(f64::max) {
                println!(
                    "second connection per pair, module cached: at most {max:.1} ms (a new process each time, attaching to its hub first)"
                );
            }
        }
        scores.push(m.score());
    }
    println!(
        "\nplain TCP connected {} of {} pairs; reach connected {} of {}, each stream authenticated and encrypted.",
        scores[0].0, scores[0].1, scores[1].0, scores[1].1
    );
    if scores[1].0 < scores[1].1 {
        println!("reach left pairs unconnected: the lines under its matrix say why.");
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses a `--timeout` in seconds.
fn seconds(secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--timeout must be a positive number of seconds")
}

/// Copies the vpn log of each of `hosts` (kept in the lab's state, which
/// goes with the lab) to `dir/HOST.log`.
fn copy_member_logs(lab: &Lab, hosts: &[String], dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let state = reach_lab::matrix::reach_state(lab);
    for h in hosts {
        let from = state.join(h).join("vpn.log");
        let to = dir.join(format!("{h}.log"));
        std::fs::copy(&from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// Prints a table (`text`) and its failed pairs, and writes it as JSON
/// and as Markdown (`md`) where asked.
fn print_table<T: serde::Serialize>(
    text: &str,
    md: &str,
    failed: impl Iterator<Item = String>,
    table: &T,
    json: Option<PathBuf>,
    markdown: Option<PathBuf>,
) -> anyhow::Result<()> {
    print!("{text}");
    for f in failed {
        println!("  {f}");
    }
    if let Some(path) = json {
        write_json(&path, table)?;
    }
    if let Some(path) = markdown {
        write_markdown(&path, md)?;
    }
    Ok(())
}

/// Writes a `--json` result file.
/// Writes a generated Markdown table, headed by the command and machine
/// that made it.
fn write_markdown(path: &Path, table: &str) -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = format!(
        "<!-- Generated by `reach-lab {}` on {}. -->\n\n{table}",
        args.join(" "),
        machine(),
    );
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// [`tools_dir`], checked to hold the `reach` binary too.
fn tools_with_reach() -> anyhow::Result<PathBuf> {
    let tools = tools_dir()?;
    if !tools.join("reach").exists() {
        bail!(
            "no reach binary beside reach-lab in {}: build it with cargo build -p reach-cli",
            tools.display()
        );
    }
    Ok(tools)
}

/// The machine a result was measured on: kernel, CPUs, build profile.
fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    format!("Linux {}, {cpus} CPUs, {profile} build", kernel.trim())
}

/// The directory of this binary, where cargo also puts `reach`.
fn tools_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    Ok(exe
        .parent()
        .context("program has no directory")?
        .to_path_buf())
}

fn print_hosts(rec: &LabRecord) {
    // Write errors (a closed pipe, say) end the listing quietly.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "  {:<12} {:<10} {:<16} {:<16} {:<16} ipv6",
        "host", "site", "lan", "public", "site gateway"
    );
    for h in &rec.hosts {
        let public = h.public.map_or("-".to_string(), |p| p.to_string());
        let lan = match (h.ipv4, h.routed) {
            (false, _) => "- (IPv6 only)".to_string(),
            (true, true) => h.lan.to_string(),
            (true, false) => format!("{} (non-routed)", h.lan),
        };
        let v6 = h.lan6.map_or("-".to_string(), |a| a.to_string());
        let _ = writeln!(
            out,
            "  {:<12} {:<10} {:<16} {:<16} {:<16} {v6}",
            h.name, h.site, lan, public, h.gateway
        );
    }
}
