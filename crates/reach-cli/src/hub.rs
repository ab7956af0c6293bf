//! `reach hub`: the hub daemon, configured by flags and the `[hub_server]`
//! table of the config file (flags win).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use reach::{Endpoint, ListenPorts, NodeId};
use reach_hub::{Hub, HubConfig, Peer, Policy, DEFAULT_GOSSIP_INTERVAL};

use crate::config::{Config, HubServer};
use crate::write_atomically;

/// The TCP port a hub listens on unless told otherwise.
pub const DEFAULT_HUB_PORT: u16 = 7700;

/// Flags of `reach hub`.
#[derive(Args, Debug)]
pub struct HubArgs {
    /// TCP port to listen on [default: 7700].
    #[arg(long, value_name = "P")]
    tcp_port: Option<u16>,
    /// IP address to listen on (default: all, IPv6 and IPv4).
    #[arg(long, value_name = "IP")]
    bind: Option<IpAddr>,
    /// Address nodes and hubs reach this hub at (repeatable; default: the
    /// interface addresses), e.g. a port forwarded by a NAT.
    #[arg(long, value_name = "IP:PORT")]
    advertise: Vec<SocketAddr>,
    /// A peer hub to link to, [NODEID@]HOST:PORT (repeatable). A hub behind a
    /// firewall lists hubs it can reach; the link then carries both directions.
    /// For a hub that only ssh reaches, add the ssh server:
    /// NODEID@HOST:PORT,ssh=[USER@]SSHHOST[:SSHPORT] (HOST:PORT as seen from
    /// the ssh server, e.g. 127.0.0.1:7700): the hub keeps an `ssh -N -L`
    /// tunnel up and links through it.
    #[arg(long, value_name = "HUB", verbatim_doc_comment)]
    peer: Vec<String>,
    /// An argument for `ssh` when tunnelling to peers (repeatable), e.g.
    /// --ssh-arg=-i --ssh-arg=/etc/reach/ssh_key.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    ssh_arg: Vec<String>,
    /// Admit the node with this NodeId (repeatable).
    #[arg(long, value_name = "NODEID")]
    allow: Vec<String>,
    /// Accept links from the hub with this NodeId (repeatable; peers given
    /// with --peer NODEID@... are accepted too).
    #[arg(long, value_name = "NODEID")]
    allow_hub: Vec<String>,
    /// Admit every node, even with --allow or a network secret.
    #[arg(long)]
    open: bool,
    /// File holding the network secret: nodes proving it are admitted.
    #[arg(long, value_name = "PATH")]
    network_secret_file: Option<PathBuf>,
    /// File holding the hub secret (distinct from the network secret): hubs
    /// proving it may link with this hub, both ways, including hubs learned
    /// from gossip or heard on the LAN; this hub proves it to them.
    #[arg(long, value_name = "PATH")]
    hub_secret_file: Option<PathBuf>,
    /// Link with every hub (without --allow-hub or a hub secret, only
    /// configured --peer hubs link; an open hub admits nodes, not hubs).
    #[arg(long)]
    open_hubs: bool,
    /// Serve the dashboard (/: the overlay of hubs and links, routes, proxy
    /// ports and counters, live), Prometheus metrics (/metrics) and the JSON
    /// status (/status) over HTTP on this address, e.g. 127.0.0.1:9107.
    /// Anyone who reaches it sees the federation's layout: bind it to
    /// loopback or a management network.
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<SocketAddr>,
    /// Seconds between routing gossip messages to peer hubs [default: 2].
    #[arg(long, value_name = "SECS")]
    gossip_interval: Option<f64>,
    /// Find hubs on the local network: announce this hub by UDP multicast
    /// (TTL 1) and link to hubs heard (they must admit this hub: same network
    /// secret, --allow-hub, or an open hub).
    #[arg(long)]
    lan_discovery: bool,
    /// Multicast group and port for --lan-discovery [default: 239.255.77.77:7799].
    #[arg(long, value_name = "GROUP:PORT")]
    lan_group: Option<std::net::SocketAddrV4>,
    /// Do not dial hubs learned from gossip; link only to --peer hubs (by
    /// default a hub links directly to every hub it learns about and can reach).
    #[arg(long)]
    no_learned_links: bool,
    /// TCP port of an address echo, which tells a connecting node the address
    /// it came from; nodes connect to two from one port to learn how their
    /// NAT maps it, for splicing. Give it twice for two echoes; 0 is any
    /// free port [default: two echoes on free ports].
    #[arg(long, value_name = "PORT", conflicts_with = "no_echo")]
    echo_port: Vec<u16>,
    /// Ports nodes may publish services on for unmodified TCP clients
    /// (`reach expose`), e.g. 40000-40100 [default: none].
    #[arg(long, value_name = "A-B", value_parser = crate::config::parse_port_range)]
    proxy_ports: Option<(u16, u16)>,
    /// A node that may publish services on proxy ports (repeatable; default:
    /// every admitted node).
    #[arg(long, value_name = "NODEID")]
    allow_expose: Vec<String>,
    /// Services one node may publish at once [default: 8].
    #[arg(long, value_name = "N")]
    max_exposures: Option<usize>,
    /// Seconds a proxy-port connection may move nothing before the hub cuts
    /// it [default: 7440, RFC 5382's NAT timeout for established TCP].
    #[arg(long, value_name = "SECS")]
    proxy_idle: Option<f64>,
    /// Seconds a proxy-port connection may take to move its first byte
    /// once connected to the node [default: 10].
    #[arg(long, value_name = "SECS")]
    proxy_first_byte: Option<f64>,
    /// Proxy-port client connections at once [default: 4096].
    #[arg(long, value_name = "N")]
    max_proxy_clients: Option<usize>,
    /// Proxy-port client connections at once from one IPv4 address or IPv6
    /// /64 [default: 64].
    #[arg(long, value_name = "N")]
    max_proxy_clients_per_source: Option<usize>,
    /// Seconds a proxy port stays held for its node after the node leaves,
    /// and after a restart of the hub (kept in STATE_DIR/proxy-ports)
    /// [default: 600].
    #[arg(long, value_name = "SECS")]
    proxy_port_hold: Option<f64>,
    /// Offer no relay circuits: routed streams then stay on hub links, each
    /// byte opened and sealed again on every link. A circuit is two
    /// connections from the nodes to the hub that the hub pairs and moves
    /// bytes between in the kernel, still encrypted end to end.
    #[arg(long)]
    no_circuits: bool,
    /// Relay circuits at once [default: 4096; each holds two connections
    /// and two pipes].
    #[arg(long, value_name = "N")]
    max_circuits: Option<usize>,
    /// Relay circuits one node may hold at once, waiting or relaying
    /// [default: 256].
    #[arg(long, value_name = "N")]
    max_circuits_per_node: Option<usize>,
    /// Run no address echo (nodes of this hub then do not splice).
    #[arg(long)]
    no_echo: bool,
    /// A second address of this host that dial-backs for `reach doctor`
    /// come from: a node then learns whether its NAT or firewall lets in
    /// connections from addresses it never contacted (endpoint-independent
    /// filtering). Without it, dial-backs come only from the hub's own
    /// address, from a fresh port.
    #[arg(long, value_name = "IP")]
    dial_back_from: Option<std::net::IpAddr>,
    /// Also write the hub's address, NODEID@IP:PORT, to this file (atomically).
    #[arg(long, value_name = "PATH")]
    addr_file: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Bounds on what outsiders and peers can make the hub hold. Each refusal
/// is counted (see `reach status`, /metrics) and logged naming the limit.
#[derive(Args, Debug)]
pub struct LimitArgs {
    /// Handshakes in progress at once [default: 256]; over it the oldest
    /// unfinished one is cut.
    #[arg(long, value_name = "N")]
    max_handshakes: Option<usize>,
    /// Handshakes in progress from one IPv4 address or IPv6 /64 [default: 16].
    #[arg(long, value_name = "N")]
    max_handshakes_per_source: Option<usize>,
    /// Links authenticated but not yet registered, at once [default: 1024].
    #[arg(long, value_name = "N")]
    max_unregistered: Option<usize>,
    /// Unregistered links from one IPv4 address or IPv6 /64 [default: 16].
    #[arg(long, value_name = "N")]
    max_unregistered_per_source: Option<usize>,
    /// Seconds a link may take to register [default: 5].
    #[arg(long, value_name = "SECS")]
    register_within: Option<f64>,
    /// Routed streams through one node's link at once [default: 4096].
    #[arg(long, value_name = "N")]
    max_streams_per_node: Option<usize>,
    /// Routed streams over one link to another hub at once [default: 65536].
    #[arg(long, value_name = "N")]
    max_streams_per_hub_link: Option<usize>,
}

impl LimitArgs {
    /// The hub's limits from flags, else the config file, else defaults; and
    /// the handshake limits (total, per source).
    fn resolve(
        &self,
        file: Option<&HubServer>,
    ) -> anyhow::Result<(reach_hub::Limits, (usize, usize))> {
        let d = reach_hub::Limits::default();
        let pick = |flag: Option<usize>, key: fn(&HubServer) -> Option<usize>, default: usize| {
            flag.or(file.and_then(key)).unwrap_or(default)
        };
        let register_within = seconds(
            self.register_within
                .or(file.and_then(|h| h.register_within)),
            "--register-within",
            d.register_within,
        )?;
        let limits = reach_hub::Limits {
            streams_per_node: pick(
                self.max_streams_per_node,
                |h| h.max_streams_per_node,
                d.streams_per_node,
            ),
            streams_per_hub_link: pick(
                self.max_streams_per_hub_link,
                |h| h.max_streams_per_hub_link,
                d.streams_per_hub_link,
            ),
            unregistered_links: pick(
                self.max_unregistered,
                |h| h.max_unregistered,
                d.unregistered_links,
            ),
            unregistered_per_source: pick(
                self.max_unregistered_per_source,
                |h| h.max_unregistered_per_source,
                d.unregistered_per_source,
            ),
            register_within,
        };
        let handshakes = (
            pick(
                self.max_handshakes,
                |h| h.max_handshakes,
                reach::DEFAULT_MAX_HANDSHAKES,
            ),
            pick(
                self.max_handshakes_per_source,
                |h| h.max_handshakes_per_source,
                reach::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            ),
        );
        Ok((limits, handshakes))
    }
}

/// A positive number of seconds from a flag or key, or `default`.
fn seconds(value: Option<f64>, flag: &str, default: Duration) -> anyhow::Result<Duration> {
    match value {
        None => Ok(default),
        Some(s) => Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| format!("{flag} must be a positive number of seconds")),
    }
}

/// Runs the hub until SIGINT or SIGTERM.
pub async fn run(args: HubArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let file = config.hub_server.as_ref();
    let get =
        |f: fn(&HubServer) -> Option<&Vec<String>>| file.and_then(f).cloned().unwrap_or_default();
    let or_file = |flag: Vec<String>, f| if flag.is_empty() { get(f) } else { flag };

    let peers = or_file(args.peer, |h| h.peers.as_ref())
        .iter()
        .map(|p| p.parse::<Peer>().map_err(anyhow::Error::from))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let allowed = node_ids(&or_file(args.allow, |h| h.allow.as_ref()), "--allow")?;
    let expose_allowed = node_ids(
        &or_file(args.allow_expose, |h| h.allow_expose.as_ref()),
        "--allow-expose",
    )?;
    let proxy_ports = match (
        args.proxy_ports,
        file.and_then(|h| h.proxy_ports.as_deref()),
    ) {
        (Some(r), _) => Some(r),
        (None, Some(text)) => {
            Some(crate::config::parse_port_range(text).map_err(anyhow::Error::msg)?)
        }
        (None, None) => None,
    };
    let mut peer_hubs = node_ids(
        &or_file(args.allow_hub, |h| h.allow_hubs.as_ref()),
        "--allow-hub",
    )?;
    peer_hubs.extend(peers.iter().filter_map(|p| p.target.id));
    let ssh_args = or_file(args.ssh_arg, |h| h.ssh_args.as_ref());
    let network_secret = crate::network_secret(args.network_secret_file.as_deref(), config)?;
    let open = args.open || file.and_then(|h| h.open).unwrap_or(false);
    let open = if !open && allowed.is_empty() && network_secret.is_none() {
        tracing::warn!("no --allow and no --network-secret-file: the hub admits every node");
        true
    } else {
        open
    };
    let hub_secret = hub_secret(
        args.hub_secret_file
            .as_deref()
            .or(file.and_then(|h| h.hub_secret_file.as_deref())),
        network_secret.as_deref(),
    )?;
    let open_hubs = args.open_hubs || file.and_then(|h| h.open_hubs).unwrap_or(false);
    let gossip_interval = seconds(
        args.gossip_interval
            .or(file.and_then(|h| h.gossip_interval)),
        "--gossip-interval",
        DEFAULT_GOSSIP_INTERVAL,
    )?;
    let advertise = if args.advertise.is_empty() {
        file.and_then(|h| h.advertise.clone())
    } else {
        Some(args.advertise)
    };

    let port = args
        .tcp_port
        .or(file.and_then(|h| h.tcp_port))
        .unwrap_or(DEFAULT_HUB_PORT);
    let (limits, handshakes) = args.limits.resolve(file)?;
    let mut builder = Endpoint::builder()
        .state_dir(state_dir)
        .listen_ports(ListenPorts::Fixed(port))
        .max_handshakes(handshakes.0, handshakes.1);
    if let Some(ip) = args.bind.or(file.and_then(|h| h.bind)) {
        builder = builder.bind_ip(ip);
    }
    if let Some(a) = &advertise {
        builder = builder.advertise(a.clone());
    }
    let config = HubConfig {
        peers,
        ssh_args,
        policy: Policy {
            allowed,
            network_secret,
            open,
            peer_hubs,
            hub_secret,
            open_hubs,
        },
        advertise,
        gossip_interval,
        link_learned: !args.no_learned_links && file.and_then(|h| h.learned_links).unwrap_or(true),
        lan_discovery: (args.lan_discovery || file.and_then(|h| h.lan_discovery).unwrap_or(false))
            .then(|| {
                args.lan_group
                    .or(file.and_then(|h| h.lan_group))
                    .unwrap_or(reach_hub::lan::DEFAULT_GROUP)
            }),
        proxy_ports,
        expose_allowed,
        max_exposures: args
            .max_exposures
            .or(file.and_then(|h| h.max_exposures))
            .unwrap_or(reach_hub::DEFAULT_MAX_EXPOSURES),
        proxy_idle: seconds(
            args.proxy_idle.or(file.and_then(|h| h.proxy_idle)),
            "--proxy-idle",
            reach_hub::DEFAULT_PROXY_IDLE,
        )?,
        proxy_first_byte: seconds(
            args.proxy_first_byte
                .or(file.and_then(|h| h.proxy_first_byte)),
            "--proxy-first-byte",
            reach_hub::DEFAULT_PROXY_FIRST_BYTE,
        )?,
        proxy_clients: (
            args.max_proxy_clients
                .or(file.and_then(|h| h.max_proxy_clients))
                .unwrap_or(reach_hub::DEFAULT_PROXY_CLIENTS.0),
            args.max_proxy_clients_per_source
                .or(file.and_then(|h| h.max_proxy_clients_per_source))
                .unwrap_or(reach_hub::DEFAULT_PROXY_CLIENTS.1),
        ),
        proxy_port_hold: match args
            .proxy_port_hold
            .or(file.and_then(|h| h.proxy_port_hold))
        {
            Some(s) => Duration::try_from_secs_f64(s)
                .ok()
                .context("--proxy-port-hold must be a number of seconds, 0 or more")?,
            None => reach_hub::DEFAULT_PORT_HOLD,
        },
        state_dir: Some(state_dir.to_path_buf()),
        limits,
        circuits: (!args.no_circuits && file.and_then(|h| h.circuits).unwrap_or(true)).then(|| {
            let d = reach_hub::CircuitLimits::default();
            reach_hub::CircuitLimits {
                active: args
                    .max_circuits
                    .or(file.and_then(|h| h.max_circuits))
                    .unwrap_or(d.active),
                per_node: args
                    .max_circuits_per_node
                    .or(file.and_then(|h| h.max_circuits_per_node))
                    .unwrap_or(d.per_node),
                ..d
            }
        }),
        echo_ports: if args.no_echo {
            Vec::new()
        } else if !args.echo_port.is_empty() {
            args.echo_port.clone()
        } else {
            file.and_then(|h| h.echo_ports.clone())
                .unwrap_or_else(|| HubConfig::default().echo_ports)
        },
        dial_back_from: args.dial_back_from.or(file.and_then(|h| h.dial_back_from)),
    };
    let mut hub = Hub::start(builder, config)
        .await
        .with_context(|| format!("cannot start the hub on TCP port {port}"))?;
    if let Some(addr) = args.metrics.or(file.and_then(|h| h.metrics)) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let bound = listener.local_addr().unwrap_or(addr);
        hub.serve_metrics(listener);
        eprintln!("dashboard http://{bound}/ (and /metrics, /status)");
    }

    announce(&hub, args.addr_file.as_deref(), "hub")?;
    shutdown_signal().await?;
    tracing::info!("shutting down");
    drop(hub);
    Ok(())
}

/// A hub that a vpn member serves (`reach vpn up --serve-hub`).
pub(crate) struct MemberHub<'a> {
    /// Its TCP port (0: any free one).
    pub port: u16,
    /// The IP address to listen on (default: all).
    pub bind: Option<IpAddr>,
    /// The hubs the member was given (`--hub`), to link to.
    pub link_to: &'a [String],
    /// Members proving it are admitted.
    pub network_secret: Option<Vec<u8>>,
    /// Members admitted by key.
    pub allowed: Vec<NodeId>,
    /// Hubs proving the secret in this file may link.
    pub hub_secret_file: Option<&'a Path>,
    /// Where to write the hub's address.
    pub addr_file: Option<&'a Path>,
}

/// Starts a member's hub (its identity in `state_dir`) and returns it with
/// the target the member and others attach to.
pub(crate) async fn start_member_hub(
    m: &MemberHub<'_>,
    state_dir: &Path,
) -> anyhow::Result<(Hub, reach::HubTarget)> {
    let peers = m
        .link_to
        .iter()
        .map(|t| t.parse::<Peer>().map_err(anyhow::Error::from))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("--hub")?;
    let hub_secret = hub_secret(m.hub_secret_file, m.network_secret.as_deref())?;
    let open = m.network_secret.is_none() && m.allowed.is_empty();
    if open {
        tracing::warn!(
            "no --network-secret-file and no --allow: the member's hub admits every node"
        );
    }
    let mut builder = Endpoint::builder()
        .state_dir(state_dir)
        .listen_ports(ListenPorts::Fixed(m.port));
    if let Some(ip) = m.bind {
        builder = builder.bind_ip(ip);
    }
    let hub_config = HubConfig {
        policy: Policy {
            allowed: m.allowed.clone(),
            network_secret: m.network_secret.clone(),
            open,
            peer_hubs: peers.iter().filter_map(|p| p.target.id).collect(),
            hub_secret,
            open_hubs: false,
        },
        peers,
        state_dir: Some(state_dir.to_path_buf()),
        ..HubConfig::default()
    };
    let hub = Hub::start(builder, hub_config)
        .await
        .with_context(|| format!("cannot serve a hub on TCP port {} (--serve-hub)", m.port))?;
    let target = announce(&hub, m.addr_file, "member hub")?;
    Ok((hub, target))
}

/// The hub secret in `path`, which must differ from the network secret.
fn hub_secret(
    path: Option<&Path>,
    network_secret: Option<&[u8]>,
) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(path) = path else { return Ok(None) };
    let secret = crate::read_secret(path, "hub secret")?;
    if Some(&secret[..]) == network_secret {
        anyhow::bail!(
            "the hub secret must differ from the network secret: a node holding the network secret could otherwise link as a hub"
        );
    }
    Ok(Some(secret))
}

/// The address nodes attach to `hub` at (its first listening address),
/// printed after `label` and written to `addr_file`.
fn announce(hub: &Hub, addr_file: Option<&Path>, label: &str) -> anyhow::Result<reach::HubTarget> {
    let shown = hub
        .status()
        .listen
        .first()
        .copied()
        .unwrap_or_else(|| hub.local_addr());
    let target = hub.target(shown);
    if let Some(path) = addr_file {
        write_atomically(path, &format!("{target}\n"))?;
    }
    eprintln!("{label} {target}");
    Ok(target)
}

fn node_ids(texts: &[String], what: &str) -> anyhow::Result<Vec<NodeId>> {
    texts
        .iter()
        .map(|t| {
            t.parse::<NodeId>()
                .map_err(|e| anyhow::anyhow!("bad NodeId {t:?} for {what}: {e}"))
        })
        .collect()
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
