//! `reach-sim`: runs reach's hub federation in virtual time.
//!
//! `reach-sim federation --hubs N --nodes M --seed S` builds N real hub cores
//! in a topology, attaches M simulated nodes, runs until every hub routes to
//! every other and resolves every node, and prints (and with `--json PATH`
//! writes) what it took. Same seed, same output, wall time and memory aside.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use reach_sim::federation::{self, Params};
use reach_sim::topology::Shape;

/// Deterministic simulations of reach networks: the real hub core and route
/// table, many hubs and nodes, in virtual time.
#[derive(Parser)]
#[command(name = "reach-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run hubs and nodes until the federation converges: every hub routes
    /// to every other hub and resolves every node. Prints one JSON object:
    /// hubs, nodes, seed, converged, rounds_to_converge (gossip intervals),
    /// virtual_ms_to_converge, messages, bytes, max_route_bytes_per_hub,
    /// max_directory_bytes_per_hub, wall_ms and more.
    Federation(FederationArgs),
}

#[derive(clap::Args)]
struct FederationArgs {
    /// Number of hubs.
    #[arg(long, default_value_t = 10)]
    hubs: usize,
    /// Number of nodes in all, spread evenly over the hubs.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Seed of every random choice (topology, latencies, timing, loss).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Shape of the hub graph.
    #[arg(long, value_enum, default_value_t = Shape::Random)]
    topology: Shape,
    /// Per-frame loss on every link, 0 to 0.5; a lost frame is resent after
    /// an RTO and holds up the frames behind it, as on a TCP connection.
    #[arg(long, default_value_t = 0.0, value_parser = parse_loss)]
    loss: f64,
    /// Nodes connect at random times within this many seconds of the start.
    #[arg(long, default_value_t = 1.0)]
    attach_secs: f64,
    /// Give up converging after this many virtual seconds.
    #[arg(long, default_value_t = 600.0)]
    limit_secs: f64,
    /// Once converged, crash this share of the hubs (0 to 1), restart them
    /// after --down-secs, and report how long recovery took.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    kill: f64,
    /// How long crashed hubs stay down, in virtual seconds.
    #[arg(long, default_value_t = 10.0)]
    down_secs: f64,
    /// Once converged (and after --kill's run), cut the federation in two
    /// halves for this many virtual seconds, then heal it; reports how long
    /// each side and then the whole took to reconverge.
    #[arg(long)]
    partition_secs: Option<f64>,
    /// Also write the report to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_loss(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=0.5).contains(&v) {
        Ok(v)
    } else {
        Err("loss must be between 0 and 0.5".into())
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("the share must be between 0 and 1".into())
    }
}

fn secs(what: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{what} must be a non-negative number of seconds"))
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reach-sim: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let Command::Federation(a) = Cli::parse().command;
    anyhow::ensure!(a.hubs >= 1, "--hubs must be at least 1");
    let params = Params {
        hubs: a.hubs,
        nodes: a.nodes,
        seed: a.seed,
        topology: a.topology,
        loss: a.loss,
        attach_window: secs("attach-secs", a.attach_secs)?,
        limit: secs("limit-secs", a.limit_secs)?,
        kill: a.kill,
        down: secs("down-secs", a.down_secs)?,
        partition: a
            .partition_secs
            .map(|v| secs("partition-secs", v))
            .transpose()?,
    };
    let report = federation::run(&params);
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = a.json {
        std::fs::write(&path, format!("{json}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !report.converged {
        anyhow::bail!(
            "the federation did not converge within {} virtual seconds",
            a.limit_secs
        );
    }
    Ok(())
}
