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
    /// A name for this run, shown by `reach status` and accepted by `reach
    /// stop` (which ends the program with SIGTERM).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
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

/// The file `program` names: as given when it holds a slash, else the
/// first match on `PATH`.
fn on_path(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return Some(program.to_path_buf());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Whether an ELF image (its first bytes, program headers included) is
/// linked statically: no program interpreter (`PT_INTERP`) to load a
/// preloaded library. None when it is not an ELF file this can read (a
/// script, say: its interpreter is what runs).
fn linked_statically(image: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if image.get(..4)? != b"\x7fELF" || *image.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(image.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(image.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(image.get(o..o + 8)?.try_into().ok()?));
    let (phoff, phentsize, phnum) = match image.get(4)? {
        1 => (u64::from(u32_at(0x1c)?), u16_at(0x2a)?, u16_at(0x2c)?),
        2 => (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?),
        _ => return None,
    };
    let phoff = usize::try_from(phoff).ok()?;
    let mut interp = false;
    for i in 0..usize::from(phnum) {
        // A header past what was read: cannot tell.
        interp |= u32_at(phoff.checked_add(i.checked_mul(usize::from(phentsize))?)?)? == PT_INTERP;
    }
    Some(!interp)
}

/// Warns when `program` is a statically linked executable: the shim is
/// never loaded into it, so `.reach` names do not resolve there.
fn warn_if_static(program: &Path) {
    let Some(path) = on_path(program) else {
        return;
    };
    let mut head = vec![0u8; 64 * 1024];
    let n = std::fs::File::open(&path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    if linked_statically(&head[..n]) == Some(true) {
        tracing::warn!(program = %path.display(), "statically linked: the shim cannot be loaded into it");
        eprintln!(
            "reach run: {} is statically linked: the shim cannot be loaded into it, so .reach names will not resolve and its sockets stay off the reach network",
            path.display()
        );
    }
}

/// Answers `reach status` and `reach stop` for the run: the program, the
/// ports it listens on as they are served (virtual address, hub proxy
/// port) and the connections carried both ways.
fn status_report(
    state_dir: &Path,
    agent: &Arc<Agent>,
    endpoint: &Arc<reach::Endpoint>,
    counted: Arc<reach_legacy::proxy::ProxyStats>,
    program: &std::ffi::OsStr,
    name: Option<String>,
) -> crate::control::Control {
    let program = Path::new(program).display().to_string();
    let template = crate::control::ProxyReport::new("run".into(), program.clone(), None, name);
    let (agent, endpoint) = (agent.clone(), endpoint.clone());
    crate::control::Control::start_live(state_dir, move || {
        let ports: Vec<u16> = agent.served().iter().map(|(p, _)| *p).collect();
        let public: Vec<String> = ports
            .iter()
            .filter_map(|p| {
                endpoint.hub_exposure(*p).map(|e| match e {
                    reach::HubExposure::Published(a) => format!("{p}: {a}"),
                    reach::HubExposure::Pending => format!("{p}: pending"),
                    reach::HubExposure::Refused(e) => format!("{p}: refused: {e}"),
                })
            })
            .collect();
        let listening: Vec<String> = ports.iter().map(u16::to_string).collect();
        crate::control::ProxyReport {
            local: if ports.is_empty() {
                program.clone()
            } else {
                format!("{program}, listening on {}", listening.join(", "))
            },
            vaddr: ports.first().map(|p| endpoint.virtual_addr(*p).to_string()),
            public: (!public.is_empty()).then(|| public.join(", ")),
            counters: counted.snapshot(),
            ..template.clone()
        }
        .with_streams(&endpoint)
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
    let counted = stats.clone();
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
    warn_if_static(Path::new(program));
    let mut child = tokio::process::Command::new(program)
        .args(program_args)
        .env("LD_PRELOAD", preload(&shim))
        .env(reach_shim_wire::SOCKET_ENV, &socket_path)
        .spawn()
        .with_context(|| format!("cannot start {}", Path::new(program).display()))?;
    tracing::info!(program = %Path::new(program).display(), node = %endpoint.node_id(), "running under the shim");
    let control = status_report(state_dir, &agent, &endpoint, counted, program, args.name);
    let status = tokio::select! {
        s = child.wait() => s.context("waiting for the program")?,
        () = control.stopped() => {
            // `reach stop`: the program ends as at a SIGTERM of its own.
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            }
            child.wait().await.context("waiting for the program")?
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian ELF64 header with `types` as its program headers.
    fn elf64(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    #[test]
    fn static_executables_are_told_from_dynamic_ones() {
        // PT_PHDR, PT_INTERP, PT_LOAD: dynamic; PT_LOAD only: static.
        assert_eq!(linked_statically(&elf64(&[6, 3, 1])), Some(false));
        assert_eq!(linked_statically(&elf64(&[1, 1])), Some(true));
        assert_eq!(linked_statically(b"#!/bin/sh\n"), None);
        assert_eq!(linked_statically(&elf64(&[1])[..40]), None);
        // Program headers past what was read: cannot tell.
        let mut cut = elf64(&[1, 3]);
        cut.truncate(64 + 56);
        assert_eq!(linked_statically(&cut), None);
        // The real thing.
        let sh = std::fs::read("/bin/sh").expect("/bin/sh");
        assert_eq!(linked_statically(&sh), Some(false));
    }
}
