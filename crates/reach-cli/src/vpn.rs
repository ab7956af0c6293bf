//! `reach vpn up` and `reach vpn down`: a member of a virtual IP network.
//!
//! `up` attaches to the hub, takes a virtual IPv4 address (given, or
//! derived from the NodeId and checked free through the hubs), makes the
//! TUN device with it and the member's ULA, and carries packets until
//! `vpn down`, `reach stop`, SIGINT or SIGTERM. The device lives only as
//! long as the process: however it ends, the kernel removes the device and
//! its routes.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use reach::proto::vpn::{check_prefix, network_of, ula, ula_prefix, NetworkTag};
use reach_vpn::address::Choice;
use reach_vpn::device::DeviceConfig;

use crate::config::Config;
use crate::{control, serve_endpoint, ServeArgs, Serving};

/// `reach vpn`.
#[derive(Subcommand, Debug)]
pub enum VpnCommand {
    /// Join a virtual IP network: make a TUN device with this member's
    /// virtual IPv4 address and IPv6 ULA, and carry packets to the other
    /// members across NATs and firewalls over reach streams.
    ///
    /// Needs root (or CAP_NET_ADMIN) and a hub, which keeps the member
    /// directory. Who may send packets to this member is the policy's
    /// choice: --network-secret-file admits the network's members,
    /// --allow/--allow-file name them, --open admits every node. Runs
    /// until `reach vpn down`, SIGINT or SIGTERM; the device goes with the
    /// process, however it ends.
    Up(Box<UpArgs>),
    /// Leave: stop the `vpn up` running here (all of them, or the one on
    /// --dev), and wait until its device is gone.
    Down(DownArgs),
    /// Move the running vpn's UDP paths to a fresh socket and punch to
    /// every peer afresh: after the host moved to another network (new
    /// addresses, a new NAT), or to measure hole punching (`reach-lab
    /// punch`). Streams and the connections above them carry on;
    /// packets take the streams until the new UDP paths are up.
    Rebind(DownArgs),
}

/// `reach vpn up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// The network's name: members of one name see each other, other
    /// names never (a-z, 0-9, '-', '_', '.').
    #[arg(long, default_value = "default", value_name = "NAME")]
    network: String,
    /// This member's IPv4 address, ADDR or ADDR/LEN (LEN sets --prefix).
    /// Default: derived from the NodeId within --prefix, the next one if a
    /// member holds it.
    #[arg(long, value_name = "ADDR[/LEN]", value_parser = parse_ip)]
    ip: Option<(Ipv4Addr, Option<u8>)>,
    /// The network's IPv4 prefix (routed through the device).
    #[arg(long, default_value = "10.77.0.0/16", value_name = "NET/LEN", value_parser = parse_prefix)]
    prefix: (Ipv4Addr, u8),
    /// The TUN device's name.
    #[arg(long, default_value = "reach0", value_name = "IFNAME")]
    dev: String,
    /// The device's MTU.
    #[arg(long, default_value_t = reach_vpn::DEFAULT_MTU, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(1280..=65_000))]
    mtu: u16,
    /// IPv4 only: no ULA on the device.
    #[arg(long)]
    no_ipv6: bool,
    /// The UDP port for direct and hole-punched paths (default: any free
    /// port).
    #[arg(long, default_value_t = 0, value_name = "PORT")]
    udp_port: u16,
    /// No UDP paths: packets always go over reach streams (as at sites
    /// that block UDP).
    #[arg(long, conflicts_with = "udp_port")]
    no_udp: bool,
    /// Send packets over a peer's UDP path whenever one is up. By default
    /// a UDP path carries packets only while the peer's stream is relayed
    /// through hubs: a direct stream measured faster on clean links, but
    /// TCP carried inside TCP stalls where links lose packets.
    #[arg(long, conflicts_with = "no_udp")]
    udp_first: bool,
    /// Seconds between renewals of the keys each peer seals UDP datagrams
    /// to this member with (the previous keys open until the next
    /// renewal).
    #[arg(long, default_value = "120", value_name = "SECS")]
    rekey_every: std::num::NonZeroU64,
    /// Also serve the network as a hub on this TCP port (0: any free
    /// port), for networks without a dedicated hub (IPOP's overlay of
    /// members): a member with a public address runs one and the others
    /// attach to it with --hub NODEID@IP:PORT, as it prints. The member
    /// attaches to its own hub; with --hub, that hub links to the one
    /// given, so members of both reach each other. The hub admits the
    /// network's members (--network-secret-file, else --allow) and keeps
    /// its own identity in STATE_DIR/hub.
    #[arg(long, value_name = "PORT")]
    serve_hub: Option<u16>,
    /// File holding the hub secret (not the network secret): hubs proving
    /// it may link with this member's hub, and it proves it to the hub of
    /// --hub.
    #[arg(long, value_name = "PATH", requires = "serve_hub")]
    hub_secret_file: Option<std::path::PathBuf>,
    /// Also write this member's hub address, NODEID@IP:PORT, to this file
    /// (atomically).
    #[arg(long, value_name = "PATH", requires = "serve_hub")]
    hub_addr_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// `reach vpn down` and `reach vpn rebind`.
#[derive(Args, Debug)]
pub struct DownArgs {
    /// Only the vpn on this device (default: every vpn running here).
    #[arg(long, value_name = "IFNAME")]
    dev: Option<String>,
}

fn parse_ip(s: &str) -> Result<(Ipv4Addr, Option<u8>), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip = ip
        .parse()
        .map_err(|_| format!("bad IPv4 address in {s:?}"))?;
    let len = len
        .map(|l| l.parse::<u8>().ok().filter(|l| *l <= 32))
        .map(|l| l.ok_or_else(|| format!("bad prefix length in {s:?} (0 to 32)")))
        .transpose()?;
    Ok((ip, len))
}

fn parse_prefix(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = parse_ip(s)?;
    let len = len.ok_or_else(|| format!("{s:?} needs a prefix length, e.g. 10.77.0.0/16"))?;
    check_prefix(ip, len).map_err(|e| e.to_string())?;
    Ok((ip, len))
}

/// The kind `reach status` shows for a vpn.
const KIND: &str = "vpn";
/// How long `vpn down` waits for a stopped vpn's process to end.
const DOWN_WAIT: Duration = Duration::from_secs(10);

/// Runs `reach vpn`.
pub async fn run(cmd: VpnCommand, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    match cmd {
        VpnCommand::Up(args) => up(*args, config, state_dir).await,
        VpnCommand::Down(args) => down(args, state_dir).await,
        VpnCommand::Rebind(args) => rebind(args, state_dir).await,
    }
}

async fn up(mut args: UpArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let network = NetworkTag::of(&args.network).context("--network")?;
    let (mut net, mut len) = args.prefix;
    let choice = match args.ip {
        Some((ip, Some(l))) => {
            len = l;
            net = network_of(ip, l);
            Choice::Given(ip)
        }
        Some((ip, None)) => Choice::Given(ip),
        None => Choice::Derived,
    };
    check_prefix(net, len).context("--ip")?;
    if !reach_vpn::device::valid_name(&args.dev) {
        anyhow::bail!(
            "--dev {:?}: use 1 to {} characters of a-z, A-Z, 0-9, '-', '_' and '.'",
            args.dev,
            reach_vpn::device::MAX_NAME
        );
    }
    if args.serve.port != 0 {
        anyhow::bail!(
            "--port does not apply to reach vpn: its streams use virtual port {}",
            reach_vpn::VPORT
        );
    }
    args.serve.port = reach_vpn::VPORT;
    let member_hub = match args.serve_hub {
        Some(port) => {
            let h = crate::hub::start_member_hub(
                &crate::hub::MemberHub {
                    port,
                    bind: args.serve.bind.or(config.bind),
                    link_to: &args.serve.common.hub.hub,
                    network_secret: crate::network_secret(
                        args.serve.common.hub.network_secret_file.as_deref(),
                        config,
                    )?,
                    allowed: args.serve.policy.allow.clone(),
                    hub_secret_file: args.hub_secret_file.as_deref(),
                    addr_file: args.hub_addr_file.as_deref(),
                },
                &state_dir.join("hub"),
            )
            .await?;
            // The member attaches to its own hub, and to the hubs it
            // was given when its own cannot take it.
            args.serve.common.hub.hub.insert(0, h.1.to_string());
            Some(h.0)
        }
        None => None,
    };
    let endpoint =
        Arc::new(serve_endpoint(&args.serve, config, state_dir, Serving::Service).await?);
    if endpoint.hub_status().is_none() {
        anyhow::bail!("reach vpn needs a hub, which keeps the member directory: give --hub (or hub in the config file)");
    }
    let ip = reach_vpn::address::claim(&endpoint, network, net, len, choice).await?;
    let me = endpoint.node_id();
    let member_ula = (!args.no_ipv6).then(|| ula(&network, &me));
    let dev = reach_vpn::device::create(&DeviceConfig {
        name: args.dev.clone(),
        ipv4: ip,
        prefix: len,
        ula: member_ula,
        mtu: args.mtu,
    })?;
    let six = member_ula.map_or(String::new(), |u| format!(" and {u}/64"));
    eprintln!(
        "vpn {} up on {}: {ip}/{len}{six} (network {net}/{len}{})",
        args.network,
        args.dev,
        member_ula.map_or(String::new(), |_| format!(", {}/64", ula_prefix(&network)))
    );
    let udp = if args.no_udp {
        None
    } else {
        Some(reach_vpn::udp_io::bind(args.udp_port).with_context(|| {
            format!(
                "cannot bind UDP port {} (--udp-port, or --no-udp)",
                args.udp_port
            )
        })?)
    };
    let vpn = reach_vpn::Vpn::new(
        endpoint.clone(),
        dev,
        reach_vpn::Membership {
            network,
            ipv4: ip,
            ula: ula(&network, &me),
            mtu: args.mtu,
            udp_first: args.udp_first,
            rekey_every: Duration::from_secs(args.rekey_every.get()),
        },
        udp,
    );
    if let Some(port) = vpn.udp_port() {
        tracing::info!(port, "vpn UDP paths on");
    }
    let template = control::ProxyReport::new(
        KIND.into(),
        format!("{} {ip}/{len}{six}", args.dev),
        Some(endpoint.virtual_addr(reach_vpn::VPORT).to_string()),
        Some(args.dev.clone()),
    );
    let seen = vpn.clone();
    let moving = vpn.clone();
    let mapped = endpoint.clone();
    let udp_port = args.udp_port;
    let control = control::Control::start_rebinding(
        state_dir,
        move || {
            control::ProxyReport {
                port_mapping: control::port_mapping_text(&mapped),
                ..report(&seen, &template)
            }
            .with_streams(&mapped)
        },
        move || {
            moving
                .rebind_udp(udp_port)
                .map(|port| format!("UDP port {port}"))
                .map_err(|e| format!("cannot rebind: {e}"))
        },
    );
    let watch = reach_vpn::address::watch(&endpoint, network, ip);
    let run = async {
        tokio::select! {
            r = vpn.run() => r.context("the vpn stopped"),
            () = watch => Ok(()),
        }
    };
    tokio::select! {
        r = run => r?,
        r = crate::hub::shutdown_signal() => r?,
        () = control.stopped() => eprintln!("stopped by reach vpn down"),
    }
    endpoint.close(crate::CLOSE_TIMEOUT).await;
    drop(member_hub);
    Ok(())
}

/// What `reach status` shows of the running vpn.
fn report(vpn: &reach_vpn::Vpn, template: &control::ProxyReport) -> control::ProxyReport {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let s = &vpn.stats;
    let mut peers: Vec<control::VpnPeerReport> = vpn
        .peers()
        .iter()
        .map(|p| control::VpnPeerReport {
            ip: p.ipv4.to_string(),
            ula: p.ula.to_string(),
            node: p.node.to_string(),
            path: vpn.path(p),
            udp_path: p.udp_path().map(|a| a.to_string()),
            udp_kind: vpn.udp_crossing(p).map(|c| c.to_string()),
            udp_rtt_us: p.udp_rtt().map(|d| d.as_micros() as u64),
            udp_setup_us: p.udp_setup().map(|d| d.as_micros() as u64),
            via: vpn.via(p).iter().map(ToString::to_string).collect(),
            stream_rtt_us: p.stream_rtt().map(|d| d.as_micros() as u64),
            packets_out: get(&p.packets_out),
            packets_in: get(&p.packets_in),
            bytes_out: get(&p.bytes_out),
            bytes_in: get(&p.bytes_in),
        })
        .collect();
    peers.sort_by(|a, b| a.ip.cmp(&b.ip));
    let udp = vpn
        .udp_stats()
        .zip(vpn.udp_port())
        .map(|(u, port)| control::VpnUdpReport {
            port,
            sent: get(&u.sent),
            received: get(&u.received),
            dropped: get(&u.dropped),
            paths_up: get(&u.paths_up),
            paths_down: get(&u.paths_down),
            rebinds: get(&u.rebinds),
            rekeys: get(&u.rekeys),
            birthdays: get(&u.birthdays),
            birthday_hits: get(&u.birthday_hits),
        });
    control::ProxyReport {
        public: Some(format!(
            "{} peers{}; dropped {} unreachable, {} queue full, {} spoofed, {} bad",
            peers.len(),
            udp.map_or(String::new(), |u| format!(
                "; UDP port {}, {} datagrams out, {} in, {} dropped, {} paths up, {} down",
                u.port, u.sent, u.received, u.dropped, u.paths_up, u.paths_down
            )),
            get(&s.dropped_unreachable),
            get(&s.dropped_full),
            get(&s.dropped_spoofed),
            get(&s.dropped_bad),
        )),
        counters: reach_legacy::proxy::ProxyCounters {
            connections: get(&s.streams_up),
            active: peers.len() as u64,
            failed: get(&s.streams_failed),
            refused: 0,
            bytes_to_reach: get(&s.bytes_out),
            bytes_from_reach: get(&s.bytes_in),
        },
        peers,
        udp,
        ..template.clone()
    }
}

/// The vpn's processes here that `args` picks.
fn chosen(args: &DownArgs) -> impl Fn(&control::ProxyReport) -> bool + '_ {
    |r| r.kind == KIND && args.dev.as_ref().is_none_or(|d| r.name.as_ref() == Some(d))
}

/// No vpn matched: say which was looked for.
fn none_runs(args: &DownArgs) -> anyhow::Error {
    match &args.dev {
        Some(d) => anyhow::anyhow!("no reach vpn runs on {d} here (reach status lists them)"),
        None => anyhow::anyhow!("no reach vpn runs here (reach status lists them)"),
    }
}

async fn rebind(args: DownArgs, state_dir: &Path) -> anyhow::Result<()> {
    let answers = control::ask_where(state_dir, chosen(&args), control::Request::Rebind).await;
    if answers.is_empty() {
        return Err(none_runs(&args));
    }
    let mut failed = false;
    for (pid, reply) in answers {
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap_or_default();
        match (v.get("rebound").and_then(|r| r.as_str()), v.get("error")) {
            (Some(done), _) => println!("vpn {pid}: {done}"),
            (None, Some(e)) => {
                eprintln!("vpn {pid}: {}", e.as_str().unwrap_or("failed"));
                failed = true;
            }
            (None, None) => {
                eprintln!("vpn {pid}: an answer that makes no sense: {reply}");
                failed = true;
            }
        }
    }
    if failed {
        anyhow::bail!("not every vpn rebound");
    }
    Ok(())
}

async fn down(args: DownArgs, state_dir: &Path) -> anyhow::Result<()> {
    let stopped = control::stop_where(state_dir, chosen(&args)).await;
    if stopped.is_empty() {
        return Err(none_runs(&args));
    }
    // Stopped means gone: the device goes with the process.
    let deadline = Instant::now() + DOWN_WAIT;
    for pid in stopped {
        while alive(pid) {
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the vpn (process {pid}) was asked to stop but still runs after {DOWN_WAIT:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("stopped {pid}");
    }
    Ok(())
}

/// Whether process `pid` still runs (a zombie does not: its device is
/// gone with its file descriptors).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}
