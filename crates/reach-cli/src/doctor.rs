//! `reach doctor`: checks what this host's network lets reach do and
//! prints it in plain words (`diagnosis`): interfaces, each hub's
//! reachability and round trip, the NAT's mapping through the hub's
//! address echoes, whether inbound connections get in (the hub's
//! dial-backs, `inbound`), whether UDP gets out, whether the gateway forwards
//! ports, and for a target which setup modules reach it and why not.
//!
//! The checks run with this node's identity (so a target's access policy
//! answers as it would for this node) but touch nothing of its state: the
//! endpoints here keep their module cache in memory and never take the
//! node's place in the hubs' directory (they accept no streams).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use reach::{Endpoint, EndpointBuilder, HubTarget, SetupModule, VirtualAddr};
use tokio::net::{TcpStream, UdpSocket};

use crate::config::Config;
use crate::diagnosis::{
    self, HubCheck, Interface, NatCheck, PortMapCheck, Report, TargetCheck, UdpAnswer, UdpCheck,
};

/// Flags of `reach doctor`.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// A virtual address to check (NODEID:PORT[/hints]): which setup
    /// modules reach it from here, and why the others cannot.
    #[arg(value_name = "VADDR")]
    target: Option<String>,
    /// Print the findings as JSON.
    #[arg(long)]
    json: bool,
    /// Do not ask the gateway for a port mapping (which takes up to 8 s
    /// when no gateway answers).
    #[arg(long)]
    no_port_mapping: bool,
    /// Seconds each setup module may take on the target.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    module_timeout: f64,
    #[command(flatten)]
    common: crate::CommonArgs,
}

/// How long attaching to a hub may take.
const ATTACH_WAIT: Duration = Duration::from_secs(5);
/// How long one TCP connect to an echo (a round-trip sample) may take.
const SAMPLE_WAIT: Duration = Duration::from_secs(2);
/// How long the UDP echoes are given to answer, and how often asked.
const UDP_WAIT: Duration = Duration::from_secs(2);
const UDP_RESEND: Duration = Duration::from_millis(400);
/// How long closing a check's hub session may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Runs every check and prints the report. Fails only on bad input; what
/// does not work is reported, not returned as an error.
pub async fn run(args: DoctorArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let target: Option<VirtualAddr> = match &args.target {
        Some(t) => Some(
            t.parse()
                .with_context(|| format!("bad virtual address {t:?}"))?,
        ),
        None => None,
    };
    let timeout = Duration::try_from_secs_f64(args.module_timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--module-timeout must be a positive number of seconds")?;
    let key = reach::keystore::load_or_create(state_dir)?;
    let secret = crate::network_secret(args.common.hub.network_secret_file.as_deref(), config)?;
    let mut hubs: Vec<HubTarget> = Vec::new();
    for text in &args.common.hub.hub {
        hubs.push(
            text.parse()
                .with_context(|| format!("bad --hub {text:?}"))?,
        );
    }
    if hubs.is_empty() {
        hubs.extend(crate::hub_target(None, config)?);
    }
    let base = |hub: Option<&HubTarget>| {
        let mut b = Endpoint::builder()
            .secret_key(key.clone())
            .accept_ports(Vec::new())
            .plaintext(args.common.plaintext)
            .gateway_query(!args.common.no_gateway_query);
        if let Some(h) = hub {
            b = b.hub(h.clone());
        }
        if let Some(s) = &secret {
            b = b.network_secret(s.clone());
        }
        b
    };

    let modules = if args.common.hub.modules.is_empty() {
        SetupModule::ALL.to_vec()
    } else {
        args.common.hub.modules.clone()
    };
    // Hubs, the NAT, inbound, UDP, port mapping, the mapping across
    // addresses, and each module on the target.
    let steps = hubs.len() + 5 + target.as_ref().map_or(0, |_| modules.len());
    let progress = reach_progress::Progress::new(steps as u64, "reach doctor");
    let p = &progress;
    let mut checks = Vec::new();
    let mut first_up: Option<Endpoint> = None;
    for hub in &hubs {
        let at = hub.to_string();
        progress.doing(format!(
            "attaching to the hub at {}",
            at.rsplit('@').next().unwrap_or(&at)
        ));
        let (check, endpoint) = counted(p, check_hub(base(Some(hub)), hub)).await;
        checks.push(check);
        match (endpoint, &first_up) {
            (Some(e), None) => first_up = Some(e),
            (Some(e), Some(_)) => e.close(CLOSE_WAIT).await,
            (None, _) => {}
        }
    }
    // The port mapping needs no hub: an endpoint of its own when none is up.
    let skip_mapping = args.no_port_mapping;
    let (nat, filtering, udp, port_mapping) = match &first_up {
        Some(e) => {
            // The NAT probe first and alone: other new mappings meanwhile
            // (the UDP check's) would move a sequential allocator under it.
            p.doing("probing the NAT");
            let nat = counted(p, check_nat(e)).await;
            p.doing("inbound (the hub dials back), UDP, port mapping");
            let (filtering, udp, pm) = tokio::join!(
                counted(
                    p,
                    crate::inbound::check(e, hub_echoes(e).first().copied(), nat.behind_nat)
                ),
                counted(p, check_udp(e)),
                counted(p, check_port_mapping(e, skip_mapping))
            );
            let mut nat = nat;
            if let Some(second) = crate::inbound::second_address(&filtering) {
                p.doing("the mapping towards the hub's second address");
                check_mapping_across(e, &mut nat, second).await;
            }
            p.step();
            (Some(nat), Some(filtering), Some(udp), pm)
        }
        None if skip_mapping => (None, None, None, None),
        None => {
            p.doing("port mapping");
            let e = base(None).bind().await?;
            (
                None,
                None,
                None,
                counted(p, check_port_mapping(&e, false)).await,
            )
        }
    };
    if let Some(e) = first_up {
        e.close(CLOSE_WAIT).await;
    }
    let target = match (&target, args.target) {
        (Some(t), Some(text)) => {
            let hub = hubs.first();
            let mut verdicts = Vec::new();
            for m in modules {
                p.doing(format!("the target by {m}"));
                let check = check_module(base(hub).modules(vec![m]), m, t, timeout);
                verdicts.push(counted(p, check).await);
            }
            Some(TargetCheck {
                vaddr: text,
                modules: verdicts,
            })
        }
        _ => None,
    };
    let report = Report {
        node: key.node_id().to_string(),
        interfaces: interfaces(),
        hubs: checks,
        nat,
        filtering,
        udp,
        port_mapping,
        target,
    };
    // The bar leaves the screen before the report is printed.
    drop(progress);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

/// Awaits `check` and counts it done on the bar.
async fn counted<T>(
    progress: &reach_progress::Progress,
    check: impl std::future::Future<Output = T>,
) -> T {
    let r = check.await;
    progress.step();
    r
}

/// The host's interface addresses.
fn interfaces() -> Vec<Interface> {
    use reach::proto::candidates::{classify, AddrClass};
    let Ok(list) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    list.into_iter()
        .map(|i| {
            let (ip, len) = match &i.addr {
                if_addrs::IfAddr::V4(a) => (IpAddr::V4(a.ip), a.prefixlen),
                if_addrs::IfAddr::V6(a) => (IpAddr::V6(a.ip), a.prefixlen),
            };
            let scope = match classify(ip) {
                AddrClass::Loopback => "loopback",
                AddrClass::LinkLocal => "link-local",
                AddrClass::Private => "private",
                AddrClass::Shared => "shared (carrier-grade NAT)",
                AddrClass::Global => "global",
                _ => "unusable",
            };
            Interface {
                name: i.name,
                addr: format!("{ip}/{len}"),
                scope: scope.into(),
            }
        })
        .collect()
}

/// Attaches to `hub`; the endpoint stays up for the other checks.
async fn check_hub(b: EndpointBuilder, hub: &HubTarget) -> (HubCheck, Option<Endpoint>) {
    let mut check = HubCheck {
        hub: hub.to_string(),
        ..HubCheck::default()
    };
    let started = Instant::now();
    let endpoint = match b.bind().await {
        Ok(e) => e,
        Err(e) => {
            check.error = Some(format!("cannot open an endpoint: {e}"));
            return (check, None);
        }
    };
    let status = match endpoint.wait_hub(ATTACH_WAIT).await {
        Ok(s) => s,
        Err(e) => {
            check.error = Some(e.to_string());
            endpoint.close(CLOSE_WAIT).await;
            return (check, None);
        }
    };
    check.attach_ms = Some(started.elapsed().as_secs_f64() * 1e3);
    check.reachable = true;
    check.node = Some(status.hub.to_string());
    check.address = Some(status.remote.to_string());
    check.observed = Some(status.observed.to_string());
    check.echoes = status.echo.len();
    let sampled = match status.echo.first() {
        Some(echo) => tcp_rtt(*echo).await,
        None => None,
    };
    check.rtt_ms = sampled
        .or_else(|| endpoint.hub_rtt())
        .map(|d| d.as_secs_f64() * 1e3);
    (check, Some(endpoint))
}

/// The fastest of three TCP connects to `echo`: one round trip each.
async fn tcp_rtt(echo: SocketAddr) -> Option<Duration> {
    let mut best: Option<Duration> = None;
    for _ in 0..3 {
        let t = Instant::now();
        if let Ok(Ok(_)) = tokio::time::timeout(SAMPLE_WAIT, TcpStream::connect(echo)).await {
            let d = t.elapsed();
            best = Some(best.map_or(d, |b| b.min(d)));
        }
    }
    best
}

/// The NAT in front of this host, through the hub's TCP echoes.
async fn check_nat(endpoint: &Endpoint) -> NatCheck {
    match endpoint.probe_nat().await {
        Ok(r) => {
            let p = r.profile;
            use reach::proto::nat::Mapping;
            let behind_nat = match p.mapping {
                Mapping::NoNat => Some(false),
                Mapping::Unknown => None,
                _ => Some(true),
            };
            let summary = match behind_nat {
                Some(false) => format!(
                    "no NAT: the hub sees this host at its own address ({})",
                    p.external.map_or("-".into(), |e| e.ip().to_string())
                ),
                Some(true) => format!(
                    "behind a NAT: {p}; the external address is {}",
                    p.external.map_or("-".into(), |e| e.ip().to_string())
                ),
                None => format!("the echoes did not tell: {p}"),
            };
            let splice = if r.candidates.is_empty() {
                "cannot aim: the NAT's external ports cannot be predicted".to_string()
            } else {
                let c: Vec<String> = r.candidates.iter().map(ToString::to_string).collect();
                format!("peers would aim at {}", c.join(", "))
            };
            NatCheck {
                behind_nat,
                mapping: Some(p.mapping),
                allocation: Some(p.allocation),
                across_addresses: p.across_addresses,
                mapping_behaviour: match p.mapping {
                    // Two ports of one echo address gave two mappings.
                    Mapping::Dependent => Some("address-and-port-dependent"),
                    Mapping::EndpointIndependent if p.across_addresses => {
                        Some("endpoint-independent")
                    }
                    _ => None,
                },
                external: p.external,
                summary,
                splice,
                error: None,
            }
        }
        Err(e) => NatCheck {
            behind_nat: None,
            mapping: None,
            allocation: None,
            across_addresses: false,
            mapping_behaviour: None,
            external: None,
            summary: format!("cannot probe the NAT: {e}"),
            splice: "unknown".into(),
            error: Some(e.to_string()),
        },
    }
}

/// An endpoint-independent mapping seen through one hub address may still
/// depend on the address: asks the echo on the hub's `second` address
/// (learned from its dial-back) from a port just mapped towards the first,
/// and compares. Both connections stay open until both answered.
async fn check_mapping_across(endpoint: &Endpoint, nat: &mut NatCheck, second: IpAddr) {
    use reach::proto::nat::Mapping;
    if nat.mapping != Some(Mapping::EndpointIndependent) || nat.across_addresses {
        return;
    }
    let Some(&echo) = hub_echoes(endpoint).first() else {
        return;
    };
    if echo.ip() == second {
        return;
    }
    let there = SocketAddr::new(second, echo.port());
    let observed = async {
        let (_port, local) =
            reach::echo::fresh_port(echo.is_ipv4()).map_err(reach::EchoError::Bind)?;
        let (_first, a) = reach::echo::ask(local, echo, SAMPLE_WAIT).await?;
        let (_second, b) = reach::echo::ask(local, there, SAMPLE_WAIT).await?;
        Ok::<_, reach::EchoError>((a, b))
    };
    match observed.await {
        Ok((a, b)) if a == b => {
            nat.across_addresses = true;
            nat.mapping_behaviour = Some("endpoint-independent");
            nat.summary = format!(
                "behind a NAT: endpoint-independent mapping (the same {a} towards both of the hub's addresses), {}; the external address is {}",
                allocation_words(nat.allocation),
                a.ip()
            );
        }
        Ok((a, b)) => {
            nat.across_addresses = true;
            nat.mapping = Some(Mapping::Dependent);
            nat.mapping_behaviour = Some("address-dependent");
            nat.summary = format!(
                "behind a NAT: address-dependent mapping: one external port per destination address ({a} towards the hub, {b} towards its second address), the same for every port of one address; the external address is {}",
                a.ip()
            );
        }
        Err(e) => {
            tracing::debug!(%there, "no mapping check across the hub's addresses: {e}");
        }
    }
}

/// A port allocation in words, as the NAT summary says it.
fn allocation_words(a: Option<reach::proto::nat::Allocation>) -> String {
    use reach::proto::nat::Allocation;
    match a {
        Some(Allocation::Preserved) => "ports preserved".into(),
        Some(Allocation::Sequential { step }) => format!("sequential ports (step {step})"),
        Some(Allocation::Random) => "random ports".into(),
        Some(Allocation::Unknown) | None => "port allocation unknown".into(),
    }
}

/// The hub's address echoes, as plain IPv4 where they are.
fn hub_echoes(endpoint: &Endpoint) -> Vec<SocketAddr> {
    endpoint
        .hub_status()
        .map(|s| s.echo)
        .unwrap_or_default()
        .into_iter()
        .map(|e| SocketAddr::new(e.ip().to_canonical(), e.port()))
        .collect()
}

/// Whether UDP gets out: asks the hub's UDP echoes from one socket.
async fn check_udp(endpoint: &Endpoint) -> UdpCheck {
    let echoes = hub_echoes(endpoint);
    if echoes.is_empty() {
        return UdpCheck {
            gets_out: false,
            answers: Vec::new(),
            summary: "unknown: the hub runs no address echo".into(),
        };
    }
    let answers = match udp_answers(&echoes).await {
        Ok(a) => a,
        Err(e) => {
            return UdpCheck {
                gets_out: false,
                answers: Vec::new(),
                summary: format!("cannot send UDP: {e}"),
            }
        }
    };
    let summary = match answers.as_slice() {
        [] => format!(
            "UDP does NOT get out: no echo answered within {UDP_WAIT:?} (a firewall drops outbound UDP, or its answers); the vpn falls back to streams"
        ),
        [one] => format!("UDP gets out (the echo saw {})", one.external),
        [first, rest @ ..] if rest.iter().all(|a| a.external == first.external) => format!(
            "UDP gets out, with one external address for every destination ({}): UDP paths can be punched",
            first.external
        ),
        _ => "UDP gets out, with a different external port per destination: punching needs many-port tries".into(),
    };
    UdpCheck {
        gets_out: !answers.is_empty(),
        answers,
        summary,
    }
}

/// Sends UDP echo requests to `echoes` until each answered or the wait
/// is over; the answers, in the order of `echoes`.
async fn udp_answers(echoes: &[SocketAddr]) -> std::io::Result<Vec<UdpAnswer>> {
    let any: IpAddr = if echoes[0].is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let bind = SocketAddr::new(any, 0);
    let socket = UdpSocket::bind(bind).await?;
    let request = reach::proto::nat::udp_echo_request();
    let mut seen: Vec<Option<SocketAddr>> = vec![None; echoes.len()];
    let deadline = tokio::time::Instant::now() + UDP_WAIT;
    let mut buf = [0u8; 256];
    'rounds: while tokio::time::Instant::now() < deadline {
        for (echo, got) in echoes.iter().zip(&seen) {
            if got.is_none() {
                socket.send_to(&request, echo).await?;
            }
        }
        let round_end = (tokio::time::Instant::now() + UDP_RESEND).min(deadline);
        loop {
            let recv = tokio::time::timeout_at(round_end, socket.recv_from(&mut buf)).await;
            let Ok(Ok((n, from))) = recv else {
                break;
            };
            let from = SocketAddr::new(from.ip().to_canonical(), from.port());
            let Some(i) = echoes.iter().position(|e| *e == from) else {
                continue;
            };
            if let Ok(external) = reach::proto::nat::decode_echo(&buf[..n]) {
                seen[i] = Some(external);
            }
            if seen.iter().all(Option::is_some) {
                break 'rounds;
            }
        }
    }
    Ok(echoes
        .iter()
        .zip(seen)
        .filter_map(|(echo, ext)| {
            ext.map(|external| UdpAnswer {
                echo: *echo,
                external,
            })
        })
        .collect())
}

/// Whether the gateway forwards a port on request (None: `skip`).
async fn check_port_mapping(endpoint: &Endpoint, skip: bool) -> Option<PortMapCheck> {
    if skip {
        return None;
    }
    Some(match endpoint.probe_port_mapping().await {
        Ok(m) => PortMapCheck {
            available: true,
            protocol: Some(m.protocol.to_string()),
            gateway: Some(m.gateway.to_string()),
            external: Some(m.external.to_string()),
            why_not: None,
        },
        Err(why) => PortMapCheck {
            available: false,
            protocol: None,
            gateway: None,
            external: None,
            why_not: Some(why),
        },
    })
}

/// Connects to `target` with `module` alone.
async fn check_module(
    b: EndpointBuilder,
    module: SetupModule,
    target: &VirtualAddr,
    timeout: Duration,
) -> diagnosis::ModuleVerdict {
    let endpoint = match b.bind().await {
        Ok(e) => e,
        Err(e) => {
            return diagnosis::ModuleVerdict {
                module: module.to_string(),
                works: false,
                setup_ms: None,
                why: format!("cannot open an endpoint: {e}"),
                error: Some(e.to_string()),
            }
        }
    };
    // A hub session first, so the module does not spend its time on it.
    let _ = endpoint.wait_hub(ATTACH_WAIT).await;
    let v = match endpoint.connect_timeout(target, timeout).await {
        Ok(s) => {
            let took = s.info().setup_time;
            drop(s);
            diagnosis::verdict(module, Ok(took))
        }
        Err(e) => diagnosis::verdict(module, Err(&e)),
    };
    endpoint.close(CLOSE_WAIT).await;
    v
}
