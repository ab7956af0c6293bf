//! `reach-bench`: every figure beside its baseline, measured in the same run.
//!
//! `reach-bench loopback` compares direct reach streams with plain TCP on
//! loopback: bulk throughput (plaintext and both ciphers) and sequential
//! connection setup. Rounds alternate between the variants so that noise from a
//! shared machine hits all of them alike; the median of the rounds is reported.
//! Setup time is decomposed into TCP connect, one round trip and the handshake's
//! CPU cost, so the "TCP + one round trip" claim can be checked on any network.

mod agent;
mod chart;
mod gateway;
mod hub;
mod lab;
mod run;
mod vpn;

use std::time::Instant;

use anyhow::{ensure, Context};
use clap::{Parser, Subcommand};
use reach::proto::handshake::{
    self, Admission, Established, HelloHeader, Initiator, InitiatorOptions, ReplyHeader, Responded,
    ResponderOptions, Resumption, HELLO_HEADER_LEN, REPLY_HEADER_LEN,
};
use reach::proto::resume::{Ticket, TicketKey};
use reach::{Cipher, Endpoint, SecretKey, VirtualAddr};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUF: usize = 256 * 1024;

#[derive(Parser)]
#[command(
    name = "reach-bench",
    about = "Benchmarks reach beside its baselines, in one run"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Redraw the SVG charts from a recorded run (the JSON of `all`), e.g.
    /// after the charts' look changed, without measuring again.
    Charts {
        /// The recorded run.
        #[arg(long, default_value = "docs/bench-all.json")]
        json: std::path::PathBuf,
        /// Where the charts go.
        #[arg(long, default_value = "docs")]
        out_dir: std::path::PathBuf,
    },
    /// Direct streams versus plain TCP on loopback.
    Loopback {
        /// MiB moved per bulk transfer.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Sequential connections per setup measurement.
        #[arg(long, default_value_t = 1000)]
        connections: u32,
        /// Rounds per figure (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// A `reach hub` process: memory per attached node and per routed stream,
    /// and routed throughput beside direct. Runs the `reach` binary built
    /// beside this one.
    Hub {
        /// Nodes attached at once (held by helper processes of 2500 each).
        #[arg(long, default_value_t = 10_000)]
        nodes: u32,
        /// Routed streams open at once (over node pairs of 2048 each).
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        /// MiB moved per throughput figure.
        #[arg(long, default_value_t = 512)]
        size_mib: u64,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Routed connection setup with the module cached, in round trips of the
    /// hub path: both nodes reach a `reach hub` through a userspace delay.
    RoutedSetup {
        /// One-way delay between each node and the hub, in milliseconds.
        #[arg(long, default_value_t = 20)]
        delay_ms: u64,
        /// Connections measured (the median is reported).
        #[arg(long, default_value_t = 20)]
        connections: u32,
        /// MiB moved by the throughput figure (over a long path a transfer
        /// must be long to leave TCP's slow start behind).
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// reach vpn between two network namespaces beside the raw veth path and
    /// a boringtun (WireGuard) tunnel on the same hosts: iperf3 with 1 and 4
    /// streams, ping round trips, CPU per GB of each tunnel. Needs root,
    /// iperf3, iputils-ping, wireguard-tools and boringtun-cli
    /// (scripts/bench.sh installs them).
    #[command(verbatim_doc_comment)]
    Vpn(LabRun),
    /// reach gateway in a NAT gateway's namespace: mappings granted per
    /// second (NAT-PMP, 1 and 64 requests in flight), memory per mapping,
    /// and setup from the internet through a static forward beside plain
    /// TCP and reach Direct through mapped ports (DPF's comparison). Needs
    /// root, nftables and natpmpc (scripts/bench.sh installs them).
    #[command(verbatim_doc_comment)]
    Gateway(LabRun),
    /// Unmodified iperf3, client and server both under `reach run`, beside
    /// the same iperf3 through `reach forward` + `reach expose` and beside
    /// plain TCP on the same hosts. Needs root, iperf3, and the shim built
    /// beside this binary (cargo build --release -p reach-shim;
    /// scripts/bench.sh does).
    #[command(verbatim_doc_comment)]
    Run(LabRun),
    /// reach between network namespaces beside plain TCP, socat, rathole and
    /// boringtun on the same paths: direct throughput (1 and 4 streams,
    /// plaintext and encrypted), round trip and setup; routed through 1 and 3
    /// hubs with relay CPU per GB; the added round trip with the processes
    /// placed alike for reach and socat; throughput over a link losing 1%
    /// each way (lab/topologies/lossy.toml). Needs root, socat,
    /// wireguard-tools, rathole and boringtun-cli (scripts/bench.sh installs
    /// them).
    #[command(verbatim_doc_comment)]
    Lab(LabRun),
    /// Every benchmark, each figure beside its baseline, in one run: `lab`,
    /// then setup per module in the SmartSockets testbed with the paper's
    /// round trips (uncached and cached), then hub capacity (`hub`). Full run
    /// about 4 minutes on a 2-core machine, --quick under 1. Needs what `lab`
    /// needs (scripts/bench.sh installs it and runs this).
    #[command(verbatim_doc_comment)]
    All {
        /// Shorter transfers, 1 round, 200 nodes and streams.
        #[arg(long)]
        quick: bool,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Also write the results as a Markdown table into this file, between
        /// the lines `<!-- reach-bench all: begin -->` and `<!-- reach-bench
        /// all: end -->` (appended if it has none).
        #[arg(long)]
        markdown: Option<std::path::PathBuf>,
    },
    /// The measuring agent run inside lab hosts (used by `lab`).
    #[command(subcommand, hide = true)]
    Agent(agent::AgentCmd),
    /// Attach nodes to a hub and hold them until stdin closes (run by
    /// `hub`, several at once, so no process needs more open files than a
    /// default limit allows).
    #[command(hide = true)]
    HubNodes(hub::HubNodesArgs),
}

/// One figure of a report, beside its baseline (NaN, written as null, when
/// it has none).
/// How a lab benchmark runs (`lab`, `vpn`).
#[derive(clap::Args)]
struct LabRun {
    /// A short run (1 s transfers, 1 round).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Keep logs and state in this directory (default: a temporary one,
    /// removed at the end).
    #[arg(long, value_name = "DIR")]
    keep: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct Row {
    name: String,
    unit: String,
    value: f64,
    baseline_name: String,
    baseline: f64,
    ratio: f64,
}

impl Row {
    /// A figure, beside its baseline if it has one (the ratio follows).
    fn new(name: impl Into<String>, unit: &str, value: f64, base: Option<(&str, f64)>) -> Row {
        let (baseline_name, baseline) =
            base.map_or((String::new(), f64::NAN), |(n, b)| (n.into(), b));
        Row {
            name: name.into(),
            unit: unit.into(),
            value,
            ratio: value / baseline,
            baseline_name,
            baseline,
        }
    }
}

/// A run as `--json` recorded it, read back for its charts (a figure
/// without a baseline has no ratio: null).
#[derive(serde::Deserialize)]
struct Recorded {
    results: Vec<RecordedRow>,
}

#[derive(serde::Deserialize)]
struct RecordedRow {
    name: String,
    unit: String,
    baseline_name: String,
    ratio: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    results: Vec<Row>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Bench::Agent(cmd) => rt.block_on(agent::run(cmd))?,
        Bench::HubNodes(args) => rt.block_on(hub::hold_nodes(args))?,
        Bench::Gateway(LabRun { quick, json, keep }) => {
            let rows = gateway::run(lab_size(quick), keep.as_deref())?;
            report(rows, json.as_deref())?;
        }
        Bench::Run(LabRun { quick, json, keep }) => {
            let rows = run::run(lab_size(quick), keep.as_deref())?;
            report(rows, json.as_deref())?;
        }
        Bench::Vpn(LabRun { quick, json, keep }) => {
            let rows = vpn::run(lab_size(quick), keep.as_deref())?;
            report(rows, json.as_deref())?;
        }
        Bench::Lab(LabRun { quick, json, keep }) => {
            let mut rows = lab::run(lab_size(quick), keep.as_deref())?;
            rows.extend(lab::lossy(lab_size(quick), keep.as_deref())?);
            report(rows, json.as_deref())?;
        }
        Bench::All {
            quick,
            json,
            markdown,
        } => {
            let started = std::time::Instant::now();
            let progress = reach_progress::Progress::new(7, "reach-bench all");
            let stage = |what: &str| progress.doing(what);
            stage("throughput and round trips (lab)");
            let mut rows = lab::run(lab_size(quick), None)?;
            progress.step();
            stage("lossy links (lab)");
            rows.extend(lab::lossy(lab_size(quick), None)?);
            progress.step();
            stage("setup per module (SmartSockets testbed)");
            rows.extend(lab::setup_per_module()?);
            progress.step();
            stage("vpn beside boringtun");
            rows.extend(vpn::run(lab_size(quick), None)?);
            progress.step();
            stage("gateway mappings");
            rows.extend(gateway::run(lab_size(quick), None)?);
            progress.step();
            stage("reach run");
            rows.extend(run::run(lab_size(quick), None)?);
            progress.step();
            let (nodes, streams, mib) = if quick {
                (200, 200, 64)
            } else {
                (10_000, 10_000, 512)
            };
            stage("hub capacity");
            rows.extend(rt.block_on(hub::run(&reach_binary()?, nodes, streams, mib))?);
            progress.step();
            drop(progress);
            eprintln!(
                "all benchmarks ran in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            let report = report(rows, json.as_deref())?;
            if let Some(path) = markdown {
                write_markdown(&path, &report, quick)?;
            }
        }
        Bench::Charts { json, out_dir } => {
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("cannot read {}", json.display()))?;
            let run: Recorded = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a reach-bench run", json.display()))?;
            let bars = run.results.iter().map(|r| {
                (
                    r.unit.as_str(),
                    r.name.as_str(),
                    r.baseline_name.as_str(),
                    r.ratio.unwrap_or(f64::NAN),
                )
            });
            for (stem, _) in write_charts(&out_dir, bars)? {
                println!("{}", out_dir.join(format!("{stem}.svg")).display());
            }
        }
        Bench::Loopback {
            size_mib,
            connections,
            rounds,
            json,
        } => {
            let rows = rt.block_on(loopback(size_mib << 20, connections, rounds.max(1)))?;
            report(rows, json.as_deref())?;
        }
        Bench::Hub {
            nodes,
            streams,
            size_mib,
            json,
        } => {
            let rows = rt.block_on(hub::run(&reach_binary()?, nodes, streams.max(1), size_mib))?;
            report(rows, json.as_deref())?;
        }
        Bench::RoutedSetup {
            delay_ms,
            connections,
            size_mib,
            json,
        } => {
            let delay = std::time::Duration::from_millis(delay_ms);
            let rows = rt.block_on(hub::routed_setup(
                &reach_binary()?,
                delay,
                connections.max(1),
                size_mib.max(1),
            ))?;
            report(rows, json.as_deref())?;
        }
    }
    Ok(())
}

/// How much the lab benchmarks measure.
fn lab_size(quick: bool) -> lab::Size {
    if quick {
        lab::Size {
            secs: 1.0,
            count: 100,
            rounds: 1,
        }
    } else {
        lab::Size {
            secs: 3.0,
            count: 500,
            rounds: 3,
        }
    }
}

const MD_BEGIN: &str = "<!-- reach-bench all: begin -->";
const MD_END: &str = "<!-- reach-bench all: end -->";

/// Puts `r` as a Markdown table between the markers of the file at `path`.
fn write_markdown(path: &std::path::Path, r: &Report, quick: bool) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let num = |v: f64| {
        if v.is_nan() {
            String::new()
        } else if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else if v.abs() >= 1.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.3}")
        }
    };
    let mut t = String::new();
    let _ = writeln!(t, "{MD_BEGIN}");
    let _ = writeln!(
        t,
        "Machine: {}. Run of `reach-bench all{}`, {}.\n",
        r.machine,
        if quick { " --quick" } else { "" },
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    let _ = writeln!(
        t,
        "| figure | value | unit | baseline | baseline value | ratio |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|");
    for row in &r.results {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} |",
            row.name,
            num(row.value),
            row.unit,
            row.baseline_name,
            num(row.baseline),
            num(row.ratio)
        );
    }
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let bars = r.results.iter().map(|row| {
        (
            row.unit.as_str(),
            row.name.as_str(),
            row.baseline_name.as_str(),
            row.ratio,
        )
    });
    for (stem, title) in write_charts(dir, bars)? {
        let _ = writeln!(t, "\n![{title}]({stem}.svg)");
    }
    let _ = writeln!(t, "{MD_END}");
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(MD_BEGIN), old.find(MD_END)) {
        (Some(a), Some(b)) if a < b => {
            let end = b + MD_END.len();
            let end = end + usize::from(old[end..].starts_with('\n'));
            format!("{}{t}{}", &old[..a], &old[end..])
        }
        _ => format!("{old}\n{t}"),
    };
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes one SVG chart per kind of figure (`chart::kind_of`) into `dir`
/// from (unit, figure, baseline, ratio) rows; returns each chart's file
/// stem and title.
fn write_charts<'a>(
    dir: &std::path::Path,
    rows: impl Iterator<Item = (&'a str, &'a str, &'a str, f64)>,
) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    let mut charts: Vec<(&'static str, &'static str, chart::Better, Vec<chart::Bar>)> = Vec::new();
    for (unit, name, baseline, ratio) in rows {
        let Some((stem, title, better)) = chart::kind_of(unit) else {
            continue;
        };
        if !(ratio.is_finite() && ratio > 0.0) {
            continue;
        }
        let bar = chart::Bar {
            label: name.to_string(),
            baseline: baseline.to_string(),
            ratio,
        };
        match charts.iter_mut().find(|c| c.0 == stem) {
            Some(c) => c.3.push(bar),
            None => charts.push((stem, title, better, vec![bar])),
        }
    }
    let mut written = Vec::new();
    for (stem, title, better, bars) in charts {
        let file = dir.join(format!("{stem}.svg"));
        std::fs::write(&file, chart::svg(title, better, &bars))
            .with_context(|| format!("cannot write {}", file.display()))?;
        written.push((stem, title));
    }
    Ok(written)
}

/// The `reach` binary built beside this one.
fn reach_binary() -> anyhow::Result<std::path::PathBuf> {
    Ok(tools_dir(&["reach"])?.join("reach"))
}

/// The directory of this binary, checked to hold `needed` (the `reach` and
/// `reach-lab` binaries the benchmarks run) beside it.
fn tools_dir(needed: &[&str]) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no directory for this binary")?;
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|n| !dir.join(n).exists())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{} missing beside {}: cargo build --release -p reach-cli -p reach-lab -p reach-bench -p reach-shim",
        missing.join(" and "),
        exe.display()
    );
    Ok(dir.to_path_buf())
}

fn report(rows: Vec<Row>, json: Option<&std::path::Path>) -> anyhow::Result<Report> {
    let report = Report {
        machine: machine(),
        results: rows,
    };
    print_table(&report);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn print_table(r: &Report) {
    println!("machine: {}", r.machine);
    println!(
        "{:<44} {:>12} {:<6} {:<28} {:>12} {:>7}",
        "figure", "value", "unit", "baseline", "baseline", "ratio"
    );
    for row in &r.results {
        println!(
            "{:<44} {:>12.3} {:<6} {:<28} {:>12.3} {:>7.3}",
            row.name, row.value, row.unit, row.baseline_name, row.baseline, row.ratio
        );
    }
}

/// The middle value (NaN for none).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A temporary directory, removed on drop.
pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

impl TempDir {
    pub(crate) fn new(what: &str) -> std::io::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("reach-bench-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone, Copy)]
enum Variant {
    Tcp,
    Plain,
    Encrypted(Cipher),
    /// Encrypted, every handshake a full one (resumption off).
    FullHandshakes(Cipher),
}

impl Variant {
    fn name(self) -> String {
        match self {
            Variant::Tcp => "plain TCP".into(),
            Variant::Plain => "reach direct, plaintext".into(),
            Variant::Encrypted(c) => format!("reach direct, {}", c.name()),
            Variant::FullHandshakes(c) => {
                format!(
                    "reach direct, {}, full handshakes (no resumption)",
                    c.name()
                )
            }
        }
    }
}

async fn endpoint(seed: u8, v: Variant) -> anyhow::Result<Endpoint> {
    let (plaintext, cipher, resumption) = match v {
        Variant::Encrypted(c) => (false, c, true),
        Variant::FullHandshakes(c) => (false, c, false),
        _ => (true, Cipher::ChaChaPoly, true),
    };
    Ok(Endpoint::builder()
        .secret_key(SecretKey::from_seed([seed; 32]))
        .bind_ip([127, 0, 0, 1].into())
        .plaintext(plaintext)
        .cipher(cipher)
        .resumption(resumption)
        .bind()
        .await?)
}

pub(crate) async fn drain(mut s: impl AsyncRead + Unpin) -> std::io::Result<u64> {
    let mut buf = vec![0u8; BUF];
    let mut n = 0u64;
    loop {
        let got = s.read(&mut buf).await?;
        if got == 0 {
            return Ok(n);
        }
        n += got as u64;
    }
}

pub(crate) async fn pump(mut s: impl AsyncWrite + Unpin, bytes: u64) -> std::io::Result<()> {
    let buf = vec![0x5au8; BUF];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BUF as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await
}

/// Seconds to move `bytes` over an established connection of this variant.
async fn bulk(v: Variant, bytes: u64) -> anyhow::Result<f64> {
    let (secs, got) = match v {
        Variant::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let server = tokio::spawn(async move {
                let (s, _) = l.accept().await?;
                drain(s).await
            });
            let c = TcpStream::connect(addr).await?;
            c.set_nodelay(true)?;
            let t = Instant::now();
            pump(c, bytes).await?;
            let got = server.await??;
            (t.elapsed().as_secs_f64(), got)
        }
        Variant::Plain | Variant::Encrypted(_) | Variant::FullHandshakes(_) => {
            let server = endpoint(1, v).await?;
            let client = endpoint(2, v).await?;
            let target = server.virtual_addr(1);
            let srv = tokio::spawn(async move {
                let s = server.accept().await?;
                anyhow::Ok(drain(s).await?)
            });
            let c = client.connect(&target).await?;
            let t = Instant::now();
            pump(c, bytes).await?;
            let got = srv.await??;
            (t.elapsed().as_secs_f64(), got)
        }
    };
    ensure!(
        got == bytes,
        "{}: received {got} of {bytes} bytes",
        v.name()
    );
    Ok(secs)
}

/// Mean seconds per sequential connection setup of this variant.
async fn setup(v: Variant, n: u32) -> anyhow::Result<f64> {
    match v {
        Variant::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let acceptor = tokio::spawn(async move {
                for _ in 0..n {
                    drop(l.accept().await?);
                }
                anyhow::Ok(())
            });
            let t = Instant::now();
            for _ in 0..n {
                let c = TcpStream::connect(addr).await?;
                c.set_nodelay(true)?;
                drop(c);
            }
            let secs = t.elapsed().as_secs_f64();
            acceptor.await??;
            Ok(secs / f64::from(n))
        }
        Variant::Plain | Variant::Encrypted(_) | Variant::FullHandshakes(_) => {
            let server = endpoint(3, v).await?;
            let client = endpoint(4, v).await?;
            let target: VirtualAddr = server.virtual_addr(1);
            let acceptor = tokio::spawn(async move {
                for _ in 0..n {
                    drop(server.accept().await?);
                }
                anyhow::Ok(())
            });
            let t = Instant::now();
            for _ in 0..n {
                drop(client.connect(&target).await?);
            }
            let secs = t.elapsed().as_secs_f64();
            acceptor.await??;
            Ok(secs / f64::from(n))
        }
    }
}

/// Mean round-trip time of a one-byte ping-pong over loopback TCP.
async fn tcp_rtt(n: u32) -> anyhow::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let echo = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        for _ in 0..n {
            s.read_exact(&mut b).await?;
            s.write_all(&b).await?;
        }
        anyhow::Ok(())
    });
    let mut c = TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    let mut b = [0u8; 1];
    let t = Instant::now();
    for _ in 0..n {
        c.write_all(&b).await?;
        c.read_exact(&mut b).await?;
    }
    let secs = t.elapsed().as_secs_f64();
    echo.await??;
    Ok(secs / f64::from(n))
}

/// Mean CPU time of one whole handshake (both sides, in memory, no I/O):
/// full (Noise IK), or resumed with a ticket from a first full one.
fn handshake_cpu(n: u32, resumed: bool) -> anyhow::Result<f64> {
    let (a, b) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
    let opts = InitiatorOptions {
        plaintext: false,
        cipher: reach::preferred_cipher(),
        reverse: false,
        upgrade: false,
        network: None,
    };
    let ticket_key = TicketKey::new([3; 32], Instant::now());
    let one = |seed: [u8; 32], ticket: Option<&Ticket>| -> anyhow::Result<Established> {
        let (init, hello) = match ticket {
            Some(t) => Initiator::resume(&a, t, 1, opts, seed)?,
            None => Initiator::new(&a, b.node_id(), 1, opts, seed)?,
        };
        let hb: [u8; HELLO_HEADER_LEN] = hello[..HELLO_HEADER_LEN].try_into()?;
        let header = HelloHeader::decode(&hb)?;
        let (reply, outcome) = handshake::respond(
            &b,
            &header,
            &hello[HELLO_HEADER_LEN..],
            ResponderOptions {
                allow_plaintext: false,
                plaintext_port: None,
                reveal_identity: false,
                network: None,
            },
            Some(Resumption {
                key: &ticket_key,
                now: Instant::now(),
            }),
            |_| Admission::Accept,
            seed,
        );
        let rh: [u8; REPLY_HEADER_LEN] = reply[..REPLY_HEADER_LEN].try_into()?;
        let (est, confirmation) =
            init.handle_reply(ReplyHeader::decode(&rh)?, &reply[REPLY_HEADER_LEN..])?;
        let Responded::Accepted(pending) = outcome else {
            anyhow::bail!("the responder did not accept: {outcome:?}");
        };
        pending.confirm(&confirmation)?;
        Ok(est)
    };
    let ticket = match resumed {
        true => Some(
            one([0; 32], None)?
                .ticket
                .map(|t| *t)
                .ok_or_else(|| anyhow::anyhow!("no ticket issued"))?,
        ),
        false => None,
    };
    let t = Instant::now();
    for i in 0..n {
        let est = one([(i % 251) as u8; 32], ticket.as_ref())?;
        anyhow::ensure!(est.resumed == resumed, "resumed: {}", est.resumed);
    }
    Ok(t.elapsed().as_secs_f64() / f64::from(n))
}

async fn loopback(bytes: u64, conns: u32, rounds: usize) -> anyhow::Result<Vec<Row>> {
    let variants = [
        Variant::Tcp,
        Variant::Plain,
        Variant::Encrypted(Cipher::ChaChaPoly),
        Variant::Encrypted(Cipher::AesGcm),
    ];
    let mut secs = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        eprintln!(
            "bulk round {}/{rounds} ({} MiB per transfer)",
            round + 1,
            bytes >> 20
        );
        for (i, v) in variants.iter().enumerate() {
            secs[i].push(bulk(*v, bytes).await?);
        }
    }
    let gbps = |s: f64| bytes as f64 * 8.0 / s / 1e9;
    let tput: Vec<f64> = secs.into_iter().map(|s| gbps(median(s))).collect();
    let mut rows = Vec::new();
    for (i, v) in variants.iter().enumerate().skip(1) {
        rows.push(Row::new(
            format!("throughput, {}", v.name()),
            "Gbit/s",
            tput[i],
            Some(("plain TCP", tput[0])),
        ));
    }
    // Setup also without resumption: what a first contact costs.
    let variants = [
        variants[0],
        variants[1],
        variants[2],
        variants[3],
        Variant::FullHandshakes(reach::preferred_cipher()),
    ];
    let mut setup_secs = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        eprintln!(
            "setup round {}/{rounds} ({conns} sequential connections)",
            round + 1
        );
        for (i, v) in variants.iter().enumerate() {
            setup_secs[i].push(setup(*v, conns).await?);
        }
    }
    let us: Vec<f64> = setup_secs.into_iter().map(|s| median(s) * 1e6).collect();
    let rtt = tcp_rtt(conns).await? * 1e6;
    let cpu = handshake_cpu(conns, false)? * 1e6;
    let cpu_resumed = handshake_cpu(conns, true)? * 1e6;
    for (i, v) in variants.iter().enumerate().skip(1) {
        rows.push(Row::new(
            format!("setup, {}", v.name()),
            "us",
            us[i],
            Some(("plain TCP connect", us[0])),
        ));
    }
    let enc = us[2].min(us[3]);
    rows.push(Row::new(
        "setup, reach encrypted (best cipher), resumed",
        "us",
        enc,
        Some((
            "TCP + 1 RTT + resumed handshake CPU",
            us[0] + rtt + cpu_resumed,
        )),
    ));
    rows.push(Row::new(
        "setup, reach encrypted (best cipher), resumed",
        "us",
        enc,
        Some(("TCP connect + 1 round trip", us[0] + rtt)),
    ));
    rows.push(Row::new(
        "setup, reach encrypted (best cipher), full handshakes",
        "us",
        us[4],
        Some(("TCP + 1 RTT + handshake CPU", us[0] + rtt + cpu)),
    ));
    rows.push(Row::new(
        "one round trip, 1-byte ping-pong",
        "us",
        rtt,
        Some(("plain TCP connect", us[0])),
    ));
    rows.push(Row::new(
        "handshake CPU, both sides, no I/O",
        "us",
        cpu,
        Some(("plain TCP connect", us[0])),
    ));
    rows.push(Row::new(
        "handshake CPU, resumed, both sides, no I/O",
        "us",
        cpu_resumed,
        Some(("full handshake CPU", cpu)),
    ));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_replaces_its_block_and_keeps_the_rest() {
        let dir = TempDir::new("md-test").expect("dir");
        let path = dir.0.join("b.md");
        let report = |v: f64| Report {
            machine: "m".into(),
            results: vec![Row::new("x", "ms", v, None)],
        };
        std::fs::write(&path, "# Title\n\nbefore\n").expect("write");
        write_markdown(&path, &report(1.5), false).expect("first");
        let first = std::fs::read_to_string(&path).expect("read");
        assert!(first.starts_with("# Title\n\nbefore\n"), "{first}");
        assert!(first.contains("| x | 1.50 | ms |  |  |  |"), "{first}");
        std::fs::write(&path, format!("{first}after\n")).expect("write");
        write_markdown(&path, &report(250.0), true).expect("second");
        let second = std::fs::read_to_string(&path).expect("read");
        assert!(second.contains("| x | 250 | ms |"), "{second}");
        assert!(!second.contains("1.50"), "{second}");
        assert!(second.ends_with("after\n"), "{second}");
        assert_eq!(second.matches(MD_BEGIN).count(), 1, "{second}");
    }

    #[test]
    fn charts_are_written_beside_the_table_and_linked_from_it() {
        let dir = TempDir::new("chart-test").expect("dir");
        let path = dir.0.join("b.md");
        let report = Report {
            machine: "m".into(),
            results: vec![
                Row::new("reach", "Gbit/s", 9.0, Some(("plain TCP", 10.0))),
                Row::new("setup", "ms", 0.4, Some(("TCP connect", 0.1))),
                Row::new("rss", "MiB", 12.0, None),
            ],
        };
        write_markdown(&path, &report, false).expect("write");
        let md = std::fs::read_to_string(&path).expect("read");
        for stem in ["bench-throughput", "bench-time"] {
            assert!(md.contains(&format!("({stem}.svg)")), "{md}");
            let svg = std::fs::read_to_string(dir.0.join(format!("{stem}.svg"))).expect("svg");
            assert_eq!(svg.matches("<rect x=").count(), 1, "{svg}");
        }
        assert!(
            !dir.0.join("bench-cpu.svg").exists(),
            "no CPU figures, no chart"
        );
    }
}
