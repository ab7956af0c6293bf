//! The `reach` command: node identity, listen and connect like netcat.
//!
//! Every failure ends as one line on stderr (`reach: error: ...`) and exit code 1;
//! usage errors exit with 2 (clap's convention).

mod config;
mod control;
mod diagnosis;
#[cfg(test)]
mod dist_units;
mod doctor;
mod gateway;
mod hub;
mod inbound;
mod manual;
mod pipe;
mod run;
mod status;
mod vpn;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use reach::{Endpoint, EndpointBuilder, HubTarget, ListenPorts, SetupModule, VirtualAddr};

use config::{parse_port_range, Config};

/// reach: connect any process to any other across NATs and firewalls, by a
/// cryptographic node identity instead of an IP address.
///
/// Quick start, on two machines (or two terminals):
///   reach listen --addr-file addr.txt > received.bin
///   reach connect "$(cat addr.txt)" < file.bin
#[derive(Parser, Debug)]
#[command(name = "reach", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// More log output on stderr: -v info, -vv debug, -vvv trace (RUST_LOG also works).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// Configuration file (default: $XDG_CONFIG_HOME/reach/config.toml if it exists).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Directory holding the node identity (default: $XDG_STATE_HOME/reach or
    /// ~/.local/state/reach). Created with a new key on first use.
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print this node's NodeId (creating the identity on first use).
    Id,
    /// Wait for one stream and pipe it to stdout, and stdin to it (like `nc -l`).
    ///
    /// Prints "listening on <virtual address>" to stderr; give that address to
    /// `reach connect` on the other side. On stdin EOF the sending direction is
    /// closed; the command exits once both directions are done.
    #[command(verbatim_doc_comment)]
    Listen(ListenArgs),
    /// Connect to a virtual address and pipe stdin to it, and it to stdout.
    ///
    /// VADDR is what `reach listen` printed: NODEID:PORT/a=IP:PORT,...
    /// On stdin EOF the sending direction is closed; the command exits once both
    /// directions are done.
    #[command(verbatim_doc_comment)]
    Connect(ConnectArgs),
    /// Run a hub: nodes attach to it; it federates with peer hubs, routes and
    /// relays streams, and brokers reverse connections.
    ///
    /// Prints "hub NODEID@IP:PORT" to stderr once listening; nodes attach with
    /// `--hub NODEID@IP:PORT`. Runs until SIGINT or SIGTERM.
    ///
    /// Admission: nodes listed with --allow, or proving the network secret
    /// (--network-secret-file), may attach. With neither configured the hub is
    /// open to every node (a warning says so).
    #[command(verbatim_doc_comment)]
    Hub(Box<hub::HubArgs>),
    /// Run on a Linux NAT gateway: open port forwards on demand for LAN
    /// hosts that ask by NAT-PMP (RFC 6886) or PCP (RFC 6887, MAP), and
    /// close them when their lease ends.
    ///
    /// Forwards are DNAT rules (with the matching accept) in the gateway's
    /// own nftables table; nothing outside it is touched. A journal in the
    /// state directory keeps the mappings across a crash or reboot: at start
    /// the kernel table is made to match it. Needs root (nftables) and the
    /// nft program. Runs until SIGINT or SIGTERM; the mappings stay until
    /// their leases end. E.g.
    ///   reach gateway --lan eth1 --wan eth0 --allow-internal 10.0.0.0/24
    #[command(verbatim_doc_comment)]
    Gateway(gateway::GatewayArgs),
    /// Show the proxies running here (expose, forward, socks, run, vpn)
    /// with their connections and bytes and each open stream's path (the
    /// module that made it, the hubs it crosses, where it moved), round
    /// trip, bytes and age, then the hub's state: its links to other hubs,
    /// routes, attached nodes, proxy ports and counters (the hub named by
    /// --hub, else the configured one; none if neither).
    #[command(verbatim_doc_comment)]
    Status(status::StatusArgs),
    /// Stop a proxy that `reach status` lists (expose, forward, socks), by its
    /// ID or --name, or all of them: it closes its hub session gracefully, so
    /// the hub frees its proxy port at once.
    #[command(verbatim_doc_comment)]
    Stop(StopArgs),
    /// Serve a local TCP service (e.g. 127.0.0.1:22) at this node's virtual
    /// address: every stream accepted there is connected to the service.
    ///
    /// Prints "listening on <virtual address>" to stderr; clients that run
    /// reach connect to it with `reach forward`. Runs until SIGINT or SIGTERM.
    #[command(verbatim_doc_comment)]
    Expose(ExposeArgs),
    /// Accept TCP connections on a local address and carry each to a virtual
    /// address (a service `reach expose` serves), e.g.
    ///   reach forward 127.0.0.1:2222 NODEID:22/hub=... ; ssh -p 2222 localhost
    /// Runs until SIGINT or SIGTERM.
    #[command(verbatim_doc_comment)]
    Forward(ForwardArgs),
    /// A SOCKS5 proxy (CONNECT, no authentication) into the reach network:
    /// the host name NODEID.reach, or an --alias, with port P is the virtual
    /// address NODEID:P; e.g.
    ///   curl --socks5-hostname 127.0.0.1:1080 http://NODEID.reach/
    /// Other names and IP addresses are refused unless --pass-through is
    /// given. Runs until SIGINT or SIGTERM.
    #[command(verbatim_doc_comment)]
    Socks(SocksArgs),
    /// Run a program with its sockets on the reach network, without root
    /// and without changing it: inside it, the host name NODEID.reach (or
    /// an --alias) resolves to a private loopback address, and a TCP
    /// connection to it is carried over a reach stream to NODEID, at the
    /// port the program connects to. Other names and addresses are left
    /// alone. Works through a preloaded library (LD_PRELOAD), so not for
    /// static binaries; see docs/run.md. The exit status is the program's.
    /// E.g.
    ///   reach run --hub HUB -- curl http://NODEID.reach:8000/
    #[command(verbatim_doc_comment)]
    Run(run::RunArgs),
    /// Probe the NAT in front of this host with the hub's address echoes, as
    /// a splice does, and print what it does: how it maps a local port
    /// (endpoint-independent or per destination), how it allocates external
    /// ports (preserved, sequential with a step, random), and the endpoints a
    /// peer would be told to aim at (none: splicing is skipped).
    #[command(verbatim_doc_comment)]
    Nat(NatArgs),
    /// Check what this host's network lets reach do, in plain words:
    /// interfaces, each hub's reachability and round trip, the NAT's
    /// mapping (through the hub's address echoes), whether UDP gets out,
    /// whether the gateway forwards ports on request; and for a target
    /// VADDR, which setup modules reach it and why the others cannot.
    /// Uses this node's identity, changes none of its state. E.g.
    ///   reach doctor --hub HUB
    ///   reach doctor --hub HUB --json NODEID:22
    #[command(verbatim_doc_comment)]
    Doctor(Box<doctor::DoctorArgs>),
    /// A virtual IP network across NATs and firewalls: `reach vpn up` joins
    /// it with a TUN device, `reach vpn down` leaves.
    #[command(subcommand)]
    Vpn(vpn::VpnCommand),
    /// Print a shell completion script, e.g.
    ///   reach completions bash > /etc/bash_completion.d/reach
    ///   reach completions zsh > "${fpath[1]}/_reach"
    #[command(verbatim_doc_comment)]
    Completions(manual::CompletionsArgs),
    /// Print the man page reach.1, or write one page per command with
    /// --out-dir, e.g.
    ///   reach man --out-dir /usr/local/share/man/man1
    #[command(verbatim_doc_comment)]
    Man(manual::ManArgs),
}

/// Settings every node command shares: how to reach peers.
#[derive(Args, Debug)]
struct CommonArgs {
    /// Send payload unencrypted (peers and the stream's end are still
    /// authenticated). Takes effect only when both ends ask for it; for
    /// trusted fabrics.
    #[arg(long)]
    plaintext: bool,
    /// Do not ask the gateway in front of this host which internal address
    /// a peer behind the same gateway has. By default, before connecting to
    /// a peer at this host's own public address, the node asks (a PCP query
    /// `reach gateway` answers) and connects on the LAN.
    #[arg(long)]
    no_gateway_query: bool,
    #[command(flatten)]
    hub: HubArgs,
}

/// How a node finds and joins its hub.
#[derive(Args, Debug)]
struct HubArgs {
    /// Attach to this hub, [NODEID@]HOST:PORT (NODEID pins the hub's identity;
    /// without it, the identity met first is pinned in STATE_DIR/known_hubs).
    /// Give it again for fallback hubs of the same network: when the hub
    /// cannot be reached or its link ends, the node attaches to the next.
    #[arg(long, value_name = "HUB")]
    hub: Vec<String>,
    /// File holding the network secret that admits this node to hubs.
    #[arg(long, value_name = "PATH")]
    network_secret_file: Option<PathBuf>,
    /// Setup modules to try, in order, comma-separated (default:
    /// direct,reverse,splice,routed). Modules that cannot work for a target are
    /// skipped; splice needs a hub that runs address echoes.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    modules: Vec<SetupModule>,
    /// Seconds a routed stream carries data before it tries to move to a
    /// better path (Direct, Reverse, Splice, a relay circuit) [default: 0, at
    /// once]. Sites of short requests can spare the moves' hole punching.
    #[arg(long, value_name = "SECS")]
    upgrade_after: Option<f64>,
}

/// How a serving node listens (`listen`, `expose`).
#[derive(Args, Debug)]
struct ServeArgs {
    /// Virtual port to accept streams on; streams to other ports are refused.
    #[arg(long, default_value_t = 0, value_name = "N")]
    port: u16,
    /// TCP port to listen on (default: any free port).
    #[arg(long, value_name = "P", conflicts_with = "port_range")]
    tcp_port: Option<u16>,
    /// Listen on the first free TCP port of this range, for sites whose firewall
    /// opens a range, e.g. 40000-40100.
    #[arg(long, value_name = "A-B", value_parser = parse_port_range)]
    port_range: Option<(u16, u16)>,
    /// IP address to listen on (default: all, IPv6 and IPv4).
    #[arg(long, value_name = "IP")]
    bind: Option<IpAddr>,
    /// Advertise this address instead of the discovered ones (repeatable), e.g. a
    /// port your NAT forwards.
    #[arg(long, value_name = "IP:PORT")]
    advertise: Vec<SocketAddr>,
    /// Also write the bare virtual address to this file (atomically).
    #[arg(long, value_name = "PATH")]
    addr_file: Option<PathBuf>,
    /// Do not ask the gateway to forward the listening port. By default a
    /// serving node asks (PCP, then NAT-PMP, then UPnP IGD), renews the
    /// mapping, advertises the mapped address so that peers connect Direct,
    /// and deletes it on exit; not with --advertise or a loopback --bind.
    #[arg(long)]
    no_port_mapping: bool,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    common: CommonArgs,
}

/// Who may open streams to a serving node. Rules add up: a node is admitted
/// if any of them admits it. With --network-secret-file, nodes proving the
/// same secret are admitted too.
#[derive(Args, Debug)]
struct PolicyArgs {
    /// Admit this node (repeatable).
    #[arg(long, value_name = "NODEID")]
    allow: Vec<reach::NodeId>,
    /// Admit the nodes listed in this file, one NodeId a line (# starts a
    /// comment). Re-read when it changes, and on SIGHUP; an edit that does
    /// not parse keeps the previous list (and is logged).
    #[arg(long, value_name = "PATH")]
    allow_file: Option<PathBuf>,
    /// Admit every authenticated node.
    #[arg(long, conflicts_with_all = ["allow", "allow_file"])]
    open: bool,
}

#[derive(Args, Debug)]
struct ListenArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Keep listening after a stream ends, serving one stream at a time.
    #[arg(long)]
    keep: bool,
}

#[derive(Args, Debug)]
struct StopArgs {
    /// The proxy's ID or name (as `reach status` shows them), or `all`.
    #[arg(value_name = "ID")]
    id: String,
}

#[derive(Args, Debug)]
struct ExposeArgs {
    /// The TCP service to expose, IP:PORT (usually on this host, e.g.
    /// 127.0.0.1:22).
    #[arg(value_name = "SERVICE")]
    service: SocketAddr,
    /// Only clients from this range may use the hub's proxy port, IP/LEN or
    /// IP (repeatable; default: any client).
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    allow_from: Vec<(IpAddr, u8)>,
    /// Do not ask the hub for a proxy port: serve the virtual address only.
    #[arg(long)]
    virtual_only: bool,
    /// A name for this exposure, shown by `reach status` and accepted by
    /// `reach stop`.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Connections (UDP: mappings) the service carries at once; more are
    /// refused and counted.
    #[arg(long, value_name = "N", default_value_t = reach_legacy::limits::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Connections (UDP: mappings) one peer node may hold at once.
    #[arg(long, value_name = "N", default_value_t = reach_legacy::limits::DEFAULT_MAX_PER_PEER)]
    max_per_peer: usize,
    #[command(flatten)]
    udp: UdpArgs,
    #[command(flatten)]
    serve: ServeArgs,
}

/// UDP instead of TCP, for `expose` and `forward`.
#[derive(Args, Debug)]
struct UdpArgs {
    /// The service is UDP: each client address gets its own stream (a
    /// mapping) carrying its datagrams.
    #[arg(long)]
    udp: bool,
    /// Seconds a UDP mapping may carry nothing before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, requires = "udp")]
    idle: f64,
}

impl UdpArgs {
    /// `what`, or `what udp`: the kind of proxy `reach status` shows.
    fn kind(&self, what: &str) -> String {
        if self.udp {
            format!("{what} udp")
        } else {
            what.to_string()
        }
    }

    fn idle(&self) -> anyhow::Result<Duration> {
        Duration::try_from_secs_f64(self.idle)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--idle must be a positive number of seconds")
    }
}

#[derive(Args, Debug)]
struct SocksArgs {
    /// Where the proxy listens.
    #[arg(long, default_value = "127.0.0.1:1080", value_name = "IP:PORT")]
    listen: SocketAddr,
    /// A host name that stands for a node, NAME=NODEID (repeatable).
    #[arg(long, value_name = "NAME=NODEID", value_parser = parse_alias)]
    alias: Vec<(String, reach::NodeId)>,
    /// Connect names that are not reach names (and IP addresses) directly,
    /// over plain TCP.
    #[arg(long)]
    pass_through: bool,
    #[command(flatten)]
    common: CommonArgs,
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| format!("bad address in {s:?}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("bad prefix length in {s:?} (0 to {max})"))?,
        None => max,
    };
    Ok((ip, len))
}

fn parse_alias(s: &str) -> Result<(String, reach::NodeId), String> {
    let (name, id) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=NODEID, got {s:?}"))?;
    let node = id
        .parse()
        .map_err(|e| format!("bad NodeId in alias {s:?}: {e}"))?;
    Ok((name.trim_end_matches('.').to_ascii_lowercase(), node))
}

#[derive(Args, Debug)]
struct ForwardArgs {
    /// Local TCP address to accept connections on, IP:PORT (e.g.
    /// 127.0.0.1:2222).
    #[arg(value_name = "LISTEN")]
    listen: SocketAddr,
    /// The virtual address of an exposed service (what `reach expose` printed).
    #[arg(value_name = "VADDR")]
    vaddr: String,
    /// UDP mappings (client addresses) kept at once; datagrams from further
    /// new clients are dropped and counted.
    #[arg(long, value_name = "N", default_value_t = reach_legacy::udp_proxy::DEFAULT_MAX_MAPPINGS, requires = "udp")]
    max_mappings: usize,
    #[command(flatten)]
    udp: UdpArgs,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Debug)]
struct ConnectArgs {
    /// The virtual address to connect to.
    #[arg(value_name = "VADDR")]
    vaddr: String,
    /// Seconds to try before giving up (default 10).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    #[command(flatten)]
    common: CommonArgs,
}

/// `reach nat`.
#[derive(Args, Debug)]
struct NatArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    init_logging(cli.verbose, config.log.as_deref());
    // The vpn's data plane hands every packet between tasks (device
    // reader, stream writers and readers): on one thread those hand-offs
    // wake no other thread. Measured in the lab: a third less round trip,
    // the same throughput (docs/vpn.md).
    let mut builder = if matches!(cli.command, Command::Vpn(vpn::VpnCommand::Up(_))) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let code = match runtime.block_on(run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    };
    // A blocking read of stdin may still run (the peer failed while stdin
    // stays open): exit without waiting for it.
    runtime.shutdown_background();
    code
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("reach: error: {}", one_line(e));
    ExitCode::FAILURE
}

/// The chain of causes joined into one line. A cause whose text its parent
/// already shows (library errors often embed their source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text.replace('\n', " ")
}

fn init_logging(verbose: u8, config_filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .ok()
        .or_else(|| {
            (verbose == 0)
                .then(|| config_filter.and_then(|f| EnvFilter::try_new(f).ok()))
                .flatten()
        })
        .unwrap_or_else(|| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    // Commands that describe the program need no identity or state.
    match &cli.command {
        Command::Completions(args) => return manual::completions(args),
        Command::Man(args) => return manual::man(args),
        _ => {}
    }
    let state_dir = match cli.state_dir.or(config.state_dir.clone()) {
        Some(d) => d,
        None => reach::keystore::default_state_dir()?,
    };
    match cli.command {
        Command::Id => {
            let key = reach::keystore::load_or_create(&state_dir)?;
            println!("{}", key.node_id());
            Ok(())
        }
        Command::Listen(args) => listen(args, &config, &state_dir).await,
        Command::Connect(args) => connect(args, &config, &state_dir).await,
        Command::Hub(args) => hub::run(*args, &config, &state_dir).await,
        Command::Gateway(args) => gateway::run(args, &state_dir).await,
        Command::Status(args) => status::run(args, &config, &state_dir).await,
        Command::Stop(args) => {
            for id in control::stop(&state_dir, &args.id).await? {
                println!("stopped {id}");
            }
            Ok(())
        }
        Command::Nat(args) => nat(args, &config, &state_dir).await,
        Command::Doctor(args) => doctor::run(*args, &config, &state_dir).await,
        Command::Expose(args) => expose(args, &config, &state_dir).await,
        Command::Forward(args) => forward(args, &config, &state_dir).await,
        Command::Socks(args) => socks(args, &config, &state_dir).await,
        Command::Run(args) => run::run(args, &config, &state_dir).await,
        Command::Vpn(cmd) => vpn::run(cmd, &config, &state_dir).await,
        // Answered above, before the state directory is resolved.
        Command::Completions(_) | Command::Man(_) => Ok(()),
    }
}

/// A builder for an endpoint that connects to `vaddr` (`connect`,
/// `forward`): it attaches to the hub the address names when none is
/// configured.
fn connector(
    config: &Config,
    state_dir: &Path,
    common: &CommonArgs,
    vaddr: &VirtualAddr,
) -> anyhow::Result<EndpointBuilder> {
    let (mut b, mut has_hub) = builder(config, state_dir, common)?;
    if let (false, Some(hint)) = (has_hub, &vaddr.hub) {
        // The address names the target's home hub: attach there to find it.
        b = b.hub(hint.into());
        has_hub = true;
    }
    // A connecting node needs no fixed listening port. Without a hub nobody
    // connects to it, so loopback will do; with one, the target may be asked
    // to connect back (Reverse), so listen on every interface.
    if !has_hub {
        b = b.bind_ip(IpAddr::from([127, 0, 0, 1]));
    }
    Ok(b)
}

/// An endpoint builder with the identity, plaintext choice, hub, network
/// secret and modules from flags and config. Returns whether a hub is set.
fn builder(
    config: &Config,
    state_dir: &Path,
    common: &CommonArgs,
) -> anyhow::Result<(EndpointBuilder, bool)> {
    let mut b = Endpoint::builder()
        .state_dir(state_dir)
        .plaintext(common.plaintext || config.plaintext.unwrap_or(false))
        .gateway_query(!common.no_gateway_query && config.gateway_query.unwrap_or(true));
    let hub = hub_target(common.hub.hub.first().map(String::as_str), config)?;
    let has_hub = hub.is_some();
    if let Some(hub) = hub {
        b = b.hub(hub);
    }
    for text in common.hub.hub.iter().skip(1) {
        b = b.fallback_hub(text.parse::<HubTarget>().context("--hub")?);
    }
    if let Some(secret) = network_secret(common.hub.network_secret_file.as_deref(), config)? {
        b = b.network_secret(secret);
    }
    let modules = if common.hub.modules.is_empty() {
        config
            .modules
            .iter()
            .flatten()
            .map(|m| m.parse::<SetupModule>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("bad config key modules: {e}"))?
    } else {
        common.hub.modules.clone()
    };
    if !modules.is_empty() {
        b = b.modules(modules);
    }
    if let Some(secs) = common.hub.upgrade_after.or(config.upgrade_after) {
        let after = Duration::try_from_secs_f64(secs)
            .context("--upgrade-after must be zero or a positive number of seconds")?;
        b = b.upgrade_after(after);
    }
    Ok((b, has_hub))
}

/// The hub from `--hub`, else from the config file.
fn hub_target(flag: Option<&str>, config: &Config) -> anyhow::Result<Option<HubTarget>> {
    match (flag, &config.hub) {
        (Some(text), _) => Ok(Some(text.parse::<HubTarget>()?)),
        (None, Some(text)) => Ok(Some(
            text.parse()
                .map_err(|e| anyhow::anyhow!("bad config key hub: {e}"))?,
        )),
        (None, None) => Ok(None),
    }
}

/// The network secret from `--network-secret-file`, else from the config file.
/// Surrounding whitespace (a trailing newline) is not part of the secret.
fn network_secret(flag: Option<&Path>, config: &Config) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(path) = flag.or(config.network_secret_file.as_deref()) else {
        return Ok(None);
    };
    read_secret(path, "network secret").map(Some)
}

/// A secret from its file (`what` names it in errors): surrounding
/// whitespace is not part of it, and it must be at least 16 bytes.
fn read_secret(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    let secret = bytes.trim_ascii();
    if secret.len() < 16 {
        anyhow::bail!(
            "the {what} in {} is too short ({} bytes): use at least 16 random bytes, e.g. `head -c 32 /dev/urandom | base64 > {}`",
            path.display(),
            secret.len(),
            path.display()
        );
    }
    Ok(secret.to_vec())
}

/// How long `listen` waits for its hub before giving up.
const HUB_WAIT: Duration = Duration::from_secs(10);

/// Who may open streams to the serving command `what`, from its flags and
/// the config file. `listen` is open without any rule, like netcat (and
/// says so); other servers refuse to start without one.
fn access_policy(
    args: &PolicyArgs,
    config: &Config,
    members: bool,
    what: Serving,
) -> anyhow::Result<reach::AccessPolicy> {
    let mut allow = args.allow.clone();
    if allow.is_empty() {
        for text in config.allow.iter().flatten() {
            allow
                .push(text.parse().map_err(|e| {
                    anyhow::anyhow!("bad NodeId {text:?} in config key allow: {e}")
                })?);
        }
    }
    let file = args.allow_file.as_ref().or(config.allow_file.as_ref());
    if args.open {
        return Ok(reach::AccessPolicy::open());
    }
    let mut policy = reach::AccessPolicy::nobody().allow_members(members);
    for id in allow {
        policy = policy.allow(id);
    }
    if let Some(path) = file {
        policy = policy.allow_file(path)?;
    }
    if policy.admits_anyone() {
        return Ok(policy);
    }
    match what {
        Serving::Listen => {
            eprintln!(
                "reach: any node may connect (give --allow, --allow-file or --network-secret-file to restrict)"
            );
            Ok(reach::AccessPolicy::open())
        }
        Serving::Service => anyhow::bail!(
            "say who may use the service: --allow NODEID, --allow-file PATH, --network-secret-file PATH (members of the network), or --open (every node)"
        ),
        Serving::Optional => Ok(policy),
    }
}

/// Which kind of server a serving endpoint is, for its default policy.
#[derive(Clone, Copy, Debug)]
enum Serving {
    /// `reach listen`: open by default, like netcat.
    Listen,
    /// A legacy service (`expose`): a policy is required.
    Service,
    /// `reach run`: nobody by default (the program's ports are then not
    /// served).
    Optional,
}

/// Re-reads the allow file on every SIGHUP, for the life of the process.
/// Only with an allow file: otherwise SIGHUP keeps its default (a `listen`
/// in a closed terminal ends).
fn reload_on_hangup(policy: reach::AccessPolicy, file: Option<&Path>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    if file.is_none() {
        return Ok(());
    }
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: re-reading the allow file");
            policy.reload();
        }
    });
    Ok(())
}

/// Binds a serving endpoint as `args` say, attaches it to its hub, prints
/// its virtual address (and writes it to the address file).
async fn serve_endpoint(
    args: &ServeArgs,
    config: &Config,
    state_dir: &Path,
    what: Serving,
) -> anyhow::Result<Endpoint> {
    let (b, has_hub) = builder(config, state_dir, &args.common)?;
    let members = network_secret(args.common.hub.network_secret_file.as_deref(), config)?.is_some();
    let policy = access_policy(&args.policy, config, members, what)?;
    let mut b = b.accept_ports(vec![args.port]).policy(policy.clone());
    let range = match (&args.port_range, &config.port_range) {
        (Some(r), _) => Some(*r),
        (None, Some(text)) => Some(parse_port_range(text).map_err(anyhow::Error::msg)?),
        (None, None) => None,
    };
    b = match (args.tcp_port, range) {
        (Some(p), _) => b.listen_ports(ListenPorts::Fixed(p)),
        (None, Some((lo, hi))) => b.listen_ports(ListenPorts::Range(lo, hi)),
        (None, None) => b,
    };
    if let Some(ip) = args.bind.or(config.bind) {
        b = b.bind_ip(ip);
    }
    let advertise = if args.advertise.is_empty() {
        config.advertise.clone().unwrap_or_default()
    } else {
        args.advertise.clone()
    };
    let loopback = args.bind.or(config.bind).is_some_and(|ip| ip.is_loopback());
    let mapping = !args.no_port_mapping
        && config.port_mapping.unwrap_or(true)
        && advertise.is_empty()
        && !loopback;
    if !advertise.is_empty() {
        b = b.advertise(advertise);
    }
    let endpoint = b.port_mapping(mapping).bind().await?;
    let allow_file = args.policy.allow_file.as_deref();
    reload_on_hangup(policy, allow_file.or(config.allow_file.as_deref()))?;
    if has_hub {
        // Peers that need the hub (Reverse, Routed) can reach this node only
        // once it is registered: say so now rather than fail them later.
        let status = endpoint
            .wait_hub(HUB_WAIT)
            .await
            .context("cannot attach to the hub")?;
        tracing::info!(hub = %status.hub, observed = %status.observed, "attached to hub");
    }
    let vaddr = endpoint.virtual_addr(args.port);
    if let Some(path) = &args.addr_file {
        write_atomically(path, &format!("{vaddr}\n"))?;
    }
    eprintln!("listening on {vaddr}");
    Ok(endpoint)
}

async fn listen(args: ListenArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let endpoint = serve_endpoint(&args.serve, config, state_dir, Serving::Listen).await?;
    let mut stdin = pipe::stdin();
    loop {
        let stream = endpoint.accept().await?;
        let info = stream.info().clone();
        tracing::info!(peer = %info.peer, from = %info.remote_addr, mode = ?info.mode, "stream accepted");
        let result = pipe::run(stream, &mut stdin).await;
        if !args.keep {
            result?.log();
            endpoint.close(CLOSE_TIMEOUT).await;
            return Ok(());
        }
        match result {
            Ok(done) => done.log(),
            Err(e) => tracing::warn!("stream from {} failed: {e:#}", info.peer),
        }
    }
}

async fn expose(args: ExposeArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let idle = args.udp.idle()?;
    let endpoint =
        Arc::new(serve_endpoint(&args.serve, config, state_dir, Serving::Service).await?);
    let kind = if args.udp.udp { "UDP" } else { "TCP" };
    eprintln!("exposing {kind} {} at that address", args.service);
    if endpoint.hub_status().is_some() && !args.virtual_only && !args.udp.udp {
        // Unmodified TCP clients get the hub's proxy port.
        match endpoint
            .expose_on_hub(args.serve.port, args.allow_from.clone())
            .await
        {
            Ok(public) => {
                eprintln!("exposed at {public} (the hub's proxy port, for any TCP client)")
            }
            // Nothing wrong: the virtual address still serves reach clients.
            Err(reach::ExposeError::NoProxyPorts) => {
                eprintln!("the hub offers no proxy ports: reach clients only")
            }
            Err(e) => return Err(anyhow::Error::new(e).context("cannot publish on the hub")),
        }
    }
    let stats = Arc::new(reach_legacy::proxy::ProxyStats::default());
    let vport = args.serve.port;
    let report = control::ProxyReport::new(
        args.udp.kind("expose"),
        args.service.to_string(),
        Some(endpoint.virtual_addr(vport).to_string()),
        args.name.clone(),
    );
    let (on_hub, counted) = (endpoint.clone(), stats.clone());
    let control = control::Control::start_live(state_dir, move || {
        control::ProxyReport {
            public: on_hub.hub_exposure(vport).map(|e| match e {
                reach::HubExposure::Published(a) => a.to_string(),
                reach::HubExposure::Pending => "pending".into(),
                reach::HubExposure::Refused(e) => format!("refused: {e}"),
            }),
            port_mapping: control::port_mapping_text(&on_hub),
            counters: counted.snapshot(),
            ..report.clone()
        }
        .with_streams(&on_hub)
    });
    let limits = reach_legacy::limits::ConnLimits::new(args.max_connections, args.max_per_peer);
    let serve = async {
        if args.udp.udp {
            reach_legacy::udp_proxy::expose_udp(endpoint.clone(), args.service, idle, limits, stats)
                .await
        } else {
            reach_legacy::proxy::expose(endpoint.clone(), args.service, limits, stats).await
        }
    };
    until_signal(&endpoint, &control, serve).await
}

/// Runs a proxy until it fails, SIGINT/SIGTERM comes or `reach stop` asks,
/// then closes the endpoint's hub link gracefully.
async fn until_signal<E>(
    endpoint: &Endpoint,
    control: &control::Control,
    run: impl std::future::Future<Output = Result<(), E>>,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::select! {
        r = run => r?,
        r = hub::shutdown_signal() => r?,
        () = control.stopped() => eprintln!("stopped by reach stop"),
    }
    endpoint.close(CLOSE_TIMEOUT).await;
    Ok(())
}

async fn forward(args: ForwardArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let vaddr: VirtualAddr = args
        .vaddr
        .parse()
        .with_context(|| format!("bad virtual address {:?}", args.vaddr))?;
    let b = connector(config, state_dir, &args.common, &vaddr)?;
    let idle = args.udp.idle()?;
    let stats = Arc::new(reach_legacy::proxy::ProxyStats::default());
    let cannot = || format!("cannot listen on {}", args.listen);
    enum Local {
        Udp(tokio::net::UdpSocket),
        Tcp(tokio::net::TcpListener),
    }
    // Bound before anything else, so a port in use fails at once.
    let local = if args.udp.udp {
        Local::Udp(
            tokio::net::UdpSocket::bind(args.listen)
                .await
                .with_context(cannot)?,
        )
    } else {
        Local::Tcp(
            tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(cannot)?,
        )
    };
    // Connect-only: a listener with the same identity keeps its directory entry.
    let endpoint = Arc::new(b.accept_ports(Vec::new()).bind().await?);
    let (kind, bound) = match &local {
        Local::Udp(s) => ("UDP ", s.local_addr()),
        Local::Tcp(l) => ("", l.local_addr()),
    };
    let bound = bound.unwrap_or(args.listen);
    eprintln!("forwarding {kind}{bound} to {vaddr}");
    let report = control::ProxyReport::new(
        args.udp.kind("forward"),
        bound.to_string(),
        Some(vaddr.to_string()),
        None,
    );
    let control = control::Control::start(state_dir, report, stats.clone(), Some(endpoint.clone()));
    let run = async {
        match local {
            Local::Udp(s) => {
                let max = args.max_mappings;
                reach_legacy::udp_proxy::forward_udp(s, endpoint.clone(), vaddr, idle, max, stats)
                    .await
            }
            Local::Tcp(l) => reach_legacy::proxy::forward(l, endpoint.clone(), vaddr, stats).await,
        }
    };
    until_signal(&endpoint, &control, run).await
}

async fn socks(args: SocksArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let (b, _) = builder(config, state_dir, &args.common)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let endpoint = Arc::new(b.accept_ports(Vec::new()).bind().await?);
    let rules = reach_legacy::proxy::SocksRules {
        aliases: args.alias.into_iter().collect(),
        pass_through: args.pass_through,
    };
    let bound = listener.local_addr().unwrap_or(args.listen);
    eprintln!("SOCKS5 proxy on {bound}");
    let stats = Arc::new(reach_legacy::proxy::ProxyStats::default());
    let report = control::ProxyReport::new("socks".into(), bound.to_string(), None, None);
    let control = control::Control::start(state_dir, report, stats.clone(), Some(endpoint.clone()));
    let run = reach_legacy::proxy::socks(listener, endpoint.clone(), Arc::new(rules), stats);
    until_signal(&endpoint, &control, run).await
}

async fn nat(args: NatArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let (b, has_hub) = builder(config, state_dir, &args.common)?;
    if !has_hub {
        anyhow::bail!("no hub: give --hub (or set hub in the config file); NAT behaviour is learned from a hub's address echoes");
    }
    let endpoint = b.accept_ports(Vec::new()).bind().await?;
    let report = endpoint.probe_nat().await.context("cannot probe the NAT")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let p = &report.profile;
        println!("{p}");
        if let Some(ext) = p.external {
            println!(
                "external address: {ext} (for local port {})",
                report.local_port
            );
        }
        if report.candidates.is_empty() {
            println!("splice: skipped (ports cannot be predicted)");
        } else {
            let c: Vec<String> = report.candidates.iter().map(|a| a.to_string()).collect();
            println!("splice: peers aim at {}", c.join(", "));
        }
    }
    endpoint.close(CLOSE_TIMEOUT).await;
    Ok(())
}

/// How long `connect` and `listen` wait at exit for the hub link to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

async fn connect(args: ConnectArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let vaddr: VirtualAddr = args
        .vaddr
        .parse()
        .with_context(|| format!("bad virtual address {:?}", args.vaddr))?;
    let secs = args.timeout.or(config.connect_timeout).unwrap_or(10.0);
    let timeout = Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--timeout must be a positive number of seconds")?;
    let b = connector(config, state_dir, &args.common, &vaddr)?;
    // Connect-only: a listener with the same identity keeps its directory entry.
    let endpoint = b.accept_ports(Vec::new()).bind().await?;
    // Read before connecting: the background move below teaches the cache
    // while this process looks.
    let cached = endpoint.cached_module(&vaddr.node);
    let stream = endpoint.connect_timeout(&vaddr, timeout).await?;
    let info = stream.info().clone();
    tracing::info!(
        peer = %info.peer,
        to = %info.remote_addr,
        module = %info.module,
        failed_before = %failed_before(&info.failed_before),
        mode = ?info.mode,
        setup_ms = format_args!("{:.3}", info.setup_time.as_secs_f64() * 1e3),
        "connected"
    );
    let done = pipe::run(stream, &mut pipe::stdin()).await?;
    done.log();
    // A connection that started routed while a better path is tried in the
    // background (none cached yet, or a cached Reverse or Splice, which
    // Routed beats to the first byte) may still be moving: wait a little,
    // so the module cache, shared with the next process, learns where it
    // settles (the runtime's shutdown does not wait for it).
    let settled = if info.module == SetupModule::Routed && cached != Some(SetupModule::Routed) {
        tokio::time::timeout(SETTLE_AT_EXIT, done.stream.upgrade_learned())
            .await
            .ok()
    } else {
        Some(done.stream.upgraded())
    };
    let settled_module = match settled {
        Some(Some(u)) => u.module.to_string(),
        Some(None) => info.module.to_string(),
        None => "unsettled".to_string(),
    };
    tracing::info!(%settled_module, "settled");
    // Routed data may still sit in this host's socket buffers: let it reach
    // the hub before exiting.
    endpoint.close(CLOSE_TIMEOUT).await;
    Ok(())
}

/// How long `connect` waits at exit for a background move of its stream to
/// end (Direct's, Reverse's and Splice's budgets, about).
const SETTLE_AT_EXIT: Duration = Duration::from_secs(6);

/// Modules as a comma-separated list, "-" for none.
fn failed_before(modules: &[SetupModule]) -> String {
    if modules.is_empty() {
        return "-".into();
    }
    modules
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    reach::files::write_atomically(path, text.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", path.display()))
}
