//! `reach run`: starts a program with the shim preloaded (crate
//! `reach-shim`) and serves it as its agent (`reach_legacy::run_agent`),
//! so that the program's sockets reach `.reach` names without a change
//! to the program or root (GCB's layer injection; docs/run.md).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use reach_legacy::run_agent::Agent;

use crate::config::Config;

/// The shim's file name, as cargo builds it.
const SHIM_FILE: &str = "libreach_shim.so";
/// How long one connection's setup may take when the config says nothing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Flags of `reach run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// A host name that stands for a node inside the program, NAME=NODEID
    /// (repeatable), besides NODEID.reach.
    #[arg(long, value_name = "NAME=NODEID", value_parser = crate::parse_alias)]
    alias: Vec<(String, reach::NodeId)>,
    /// The shim library to preload [default: libreach_shim.so beside the
    /// reach program, or in ../lib/reach from it].
    #[arg(long, value_name = "PATH", env = "REACH_SHIM")]
    shim: Option<PathBuf>,
    /// Serve the ports the program listens on at the virtual address only,
    /// not on proxy ports of the hub.
    #[arg(long)]
    virtual_only: bool,
    /// Connections the program's listening ports carry at once; more are
    /// refused and counted.
    #[arg(long, value_name = "N", default_value_t = reach_legacy::limits::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Connections one peer node may hold at once.
    #[arg(long, value_name = "N", default_value_t = reach_legacy::limits::DEFAULT_MAX_PER_PEER)]
    max_per_peer: usize,
    /// Who may connect to the ports the program listens on (none by
    /// default: its ports are then not served).
    #[command(flatten)]
    policy: crate::PolicyArgs,
    #[command(flatten)]
    common: crate::CommonArgs,
    /// The program to run and its arguments (after --).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

/// Where the shim is: the flag, else beside this executable.
fn find_shim(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        anyhow::ensure!(p.is_file(), "the shim {} does not exist", p.display());
        return Ok(p);
    }
    let exe = std::env::current_exe().context("where is this program?")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [
        dir.join(SHIM_FILE),
        dir.join("../lib/reach").join(SHIM_FILE),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no {SHIM_FILE} beside {} (build it with `cargo build -p reach-shim`, or give --shim)",
                exe.display()
            )
        })
}

/// `LD_PRELOAD` with the shim first.
fn preload(shim: &Path) -> OsString {
    let mut v = OsString::from(shim);
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
        v.push(":");
        v.push(old);
    }
    v
}

/// Runs the program under the shim until it exits; exits with its status.
pub async fn run(args: RunArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let shim = find_shim(args.shim)?;
    let (b, has_hub) = crate::builder(config, state_dir, &args.common)?;
    let members =
        args.common.hub.network_secret_file.is_some() || config.network_secret_file.is_some();
    let policy = crate::access_policy(&args.policy, config, members, crate::Serving::Optional)?;
    let admits = policy.admits_anyone();
    // Every virtual port is accepted when someone may connect: the agent
    // ends streams to ports the program does not listen on.
    let b = if admits {
        b.policy(policy)
    } else {
        b.accept_ports(Vec::new())
    };
    // A private directory (mode 0700) for the agent's socket: only this
    // user's processes can ask the agent anything.
    let private = tempfile::Builder::new()
        .prefix("reach-run-")
        .tempdir()
        .context("cannot make a private directory for the agent's socket")?;
    let socket_path = private.path().join("agent.sock");
    let unix = tokio::net::UnixListener::bind(&socket_path)
        .with_context(|| format!("cannot listen on {}", socket_path.display()))?;
    let relay = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot listen on loopback for the relay")?;
    let relay_port = relay.local_addr()?.port();
    let endpoint = Arc::new(b.bind().await?);
    if has_hub {
        // The program's first connect should not find the hub session
        // still coming up.
        let status = endpoint
            .wait_hub(crate::HUB_WAIT)
            .await
            .context("cannot attach to the hub")?;
        tracing::info!(hub = %status.hub, "attached to hub");
    }
    let timeout = config
        .connect_timeout
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(CONNECT_TIMEOUT);
    let stats = Arc::new(reach_legacy::proxy::ProxyStats::default());
    let agent = Arc::new(Agent::new(
        endpoint.clone(),
        args.alias.into_iter().collect(),
        reach_legacy::run_agent::Serving {
            admits,
            on_hub: has_hub && !args.virtual_only,
            limits: reach_legacy::limits::ConnLimits::new(args.max_connections, args.max_per_peer),
        },
        timeout,
        relay_port,
        stats,
    ));
    let (program, program_args) = args.command.split_first().context("no program to run")?;
    let mut child = tokio::process::Command::new(program)
        .args(program_args)
        .env("LD_PRELOAD", preload(&shim))
        .env(reach_shim_wire::SOCKET_ENV, &socket_path)
        .spawn()
        .with_context(|| format!("cannot start {}", Path::new(program).display()))?;
    tracing::info!(program = %Path::new(program).display(), node = %endpoint.node_id(), "running under the shim");
    let status = tokio::select! {
        s = child.wait() => s.context("waiting for the program")?,
        r = agent.serve(unix, relay) => {
            // The agent stopped: the program's connects would fail, so it
            // is stopped too rather than left half-working.
            let _ = child.kill().await;
            return Err(anyhow::anyhow!("the agent stopped: {:?}", r.err()));
        }
    };
    endpoint.close(crate::CLOSE_TIMEOUT).await;
    drop(private);
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    if code != 0 {
        tracing::info!(code, "the program exited");
    }
    std::process::exit(code);
}
