//! Asking the gateway in front of this host to forward the listening
//! port (DPF's client side): PCP first, then NAT-PMP (crate `crab_nat`),
//! then UPnP IGD (crate `igd-next`); renewed at half the lease, deleted
//! when the endpoint closes. The mapped address is advertised beside the
//! node's own addresses (to its hub, in its virtual addresses), so peers
//! connect Direct where they would have gone through the hub.
//!
//! When to ask and renew is [`reach_proto::port_lease`]'s (sans-IO); this
//! module does the asking.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach_proto::port_lease::{Action, Event, Lease, LEASE};

/// How a mapping was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MappingProtocol {
    /// PCP (RFC 6887).
    Pcp,
    /// NAT-PMP (RFC 6886).
    NatPmp,
    /// UPnP IGD.
    Upnp,
}

impl std::fmt::Display for MappingProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MappingProtocol::Pcp => "pcp",
            MappingProtocol::NatPmp => "nat-pmp",
            MappingProtocol::Upnp => "upnp",
        })
    }
}

/// The port mapping a node holds at its gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMapping {
    /// The public address peers reach the listener at.
    pub external: SocketAddr,
    /// The gateway that forwards it.
    pub gateway: IpAddr,
    /// Which protocol it was asked by.
    pub protocol: MappingProtocol,
    /// When its lease ends unless renewed (renewal comes at half of it).
    pub expires: Instant,
}

/// A mapping held, in the form its protocol needs to renew or delete it.
enum Held {
    Nat(crab_nat::PortMapping),
    Upnp {
        gateway: igd_next::aio::Gateway<igd_next::aio::tokio::Tokio>,
        external_port: u16,
        local: SocketAddr,
    },
}

/// What the endpoint shares with the mapping task.
#[derive(Default)]
pub(crate) struct Mapper {
    held: tokio::sync::Mutex<Option<Held>>,
    status: Mutex<Option<PortMapping>>,
    /// Until when the gateway is not asked same-network queries again
    /// (it did not answer one).
    query_quiet_until: Mutex<Option<Instant>>,
}

/// How long a same-network query waits for the gateway's answer (it is
/// one hop away on the LAN).
const QUERY_WAIT: Duration = Duration::from_millis(300);
/// How often the query is sent within that wait.
const QUERY_SENDS: u32 = 3;
/// How long a gateway that did not answer a query is left alone.
const QUERY_QUIET: Duration = Duration::from_secs(600);

/// How long one attempt at a protocol may take.
const ATTEMPT: Duration = Duration::from_secs(2);

impl Mapper {
    /// The mapping held now.
    pub(crate) fn status(&self) -> Option<PortMapping> {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the listening `port` mapped (forever); `advertise` is told
    /// every change of the external address (None: none held).
    pub(crate) async fn run(
        self: Arc<Self>,
        port: u16,
        advertise: impl Fn(Option<SocketAddr>) + Send,
    ) {
        let Some(port) = NonZeroU16::new(port) else {
            return;
        };
        let mut lease = Lease::new(Instant::now());
        loop {
            let now = Instant::now();
            let action = lease.poll_action(now);
            // A lease that ran out is reported before the mapping asked for
            // in its place is held.
            self.publish(&mut lease, &advertise).await;
            let Some(action) = action else {
                let at = lease
                    .poll_timeout()
                    .unwrap_or(now + Duration::from_secs(60));
                tokio::time::sleep_until(at.into()).await;
                continue;
            };
            let outcome = match action {
                Action::Ask => self.ask(port).await,
                Action::Renew => self.renew().await,
            };
            let now = Instant::now();
            match outcome {
                Ok(m) => {
                    lease.mapped(now, m.external, m.expires.saturating_duration_since(now));
                    *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(m);
                }
                Err(why) => {
                    match action {
                        Action::Ask => tracing::debug!("no port mapping from the gateway: {why}"),
                        Action::Renew => tracing::warn!("port mapping not renewed: {why}"),
                    }
                    lease.failed(now);
                }
            }
            self.publish(&mut lease, &advertise).await;
        }
    }

    /// Acts on what the lease says changed: advertises a new external
    /// address, or forgets a mapping whose lease ran out.
    async fn publish(&self, lease: &mut Lease, advertise: &impl Fn(Option<SocketAddr>)) {
        while let Some(ev) = lease.poll_event() {
            match ev {
                Event::Mapped(a) => {
                    let protocol = self.status().map_or("?".into(), |m| m.protocol.to_string());
                    tracing::info!(external = %a, %protocol, "port mapped by the gateway: advertised");
                    advertise(Some(a));
                }
                Event::Lost(a) => {
                    tracing::warn!(external = %a, "port mapping lost: no longer advertised");
                    *self.status.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    *self.held.lock().await = None;
                    advertise(None);
                }
            }
        }
    }

    async fn ask(&self, port: NonZeroU16) -> Result<PortMapping, String> {
        let gateway = default_gateway().ok_or("no default IPv4 gateway")?;
        let client = local_toward(gateway).ok_or("no local address toward the gateway")?;
        let nat = match tokio::time::timeout(ATTEMPT * 2, ask_nat(gateway, client, port)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "PCP and NAT-PMP: no answer within {:?}",
                ATTEMPT * 2
            )),
        };
        let (held, m) = match nat {
            Ok(x) => x,
            Err(nat_why) => match tokio::time::timeout(ATTEMPT * 2, ask_upnp(client, port)).await {
                Ok(Ok(x)) => x,
                Ok(Err(upnp_why)) => return Err(format!("{nat_why}; UPnP: {upnp_why}")),
                Err(_) => {
                    return Err(format!(
                        "{nat_why}; UPnP: no answer within {:?}",
                        ATTEMPT * 2
                    ))
                }
            },
        };
        *self.held.lock().await = Some(held);
        Ok(m)
    }

    async fn renew(&self) -> Result<PortMapping, String> {
        let mut held = self.held.lock().await;
        let old = self.status().ok_or("no mapping held")?;
        let lease = match held.as_mut().ok_or("no mapping held")? {
            Held::Nat(m) => {
                m.renew().await.map_err(|e| format!("{e:?}"))?;
                Duration::from_secs(u64::from(m.lifetime()))
            }
            Held::Upnp {
                gateway,
                external_port,
                local,
            } => {
                gateway
                    .add_port(
                        igd_next::PortMappingProtocol::TCP,
                        *external_port,
                        *local,
                        secs(LEASE),
                        "reach",
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                LEASE
            }
        };
        Ok(PortMapping {
            expires: Instant::now() + lease,
            ..old
        })
    }

    /// DPF's same-network query: asks the gateway in front of this host
    /// which internal endpoint the public TCP endpoint `external` (one of
    /// its own, a peer behind the same NAT) forwards to. None when it is
    /// not a mapping there, or the gateway does not answer within
    /// [`QUERY_WAIT`] (then it is not asked again for [`QUERY_QUIET`], so a
    /// gateway that does not speak the query costs one wait, not one per
    /// connection).
    pub(crate) async fn same_network(&self, external: SocketAddr) -> Option<SocketAddr> {
        let now = Instant::now();
        let quiet = &self.query_quiet_until;
        if quiet
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| now < until)
        {
            return None;
        }
        let gateway = match self.status().map(|m| m.gateway) {
            Some(IpAddr::V4(g)) => g,
            _ => default_gateway()?,
        };
        let client = local_toward(gateway)?;
        match query_gateway(gateway, client, external).await {
            Ok(internal) => {
                tracing::debug!(%external, ?internal, "same-network query answered by the gateway");
                internal
            }
            Err(why) => {
                tracing::debug!(%external, "same-network query: {why}; the gateway is not asked again for {QUERY_QUIET:?}");
                *quiet.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + QUERY_QUIET);
                None
            }
        }
    }

    /// Deletes the mapping held, if any, within `timeout`.
    /// Asks the gateway once for a mapping of `port` and deletes it again
    /// (within `timeout`): whether port mapping works here, and by which
    /// protocol.
    pub(crate) async fn probe(port: NonZeroU16, timeout: Duration) -> Result<PortMapping, String> {
        let m = Mapper::default();
        let got = m.ask(port).await;
        m.delete(timeout).await;
        got
    }

    pub(crate) async fn delete(&self, timeout: Duration) {
        let Some(held) = self.held.lock().await.take() else {
            return;
        };
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let done = tokio::time::timeout(timeout, async {
            match held {
                Held::Nat(m) => m.try_drop().await.map_err(|(e, _)| format!("{e:?}")),
                Held::Upnp {
                    gateway,
                    external_port,
                    ..
                } => gateway
                    .remove_port(igd_next::PortMappingProtocol::TCP, external_port)
                    .await
                    .map_err(|e| e.to_string()),
            }
        })
        .await;
        match done {
            Ok(Ok(())) => tracing::info!("port mapping deleted at the gateway"),
            Ok(Err(e)) => tracing::warn!("port mapping not deleted (its lease ends it): {e}"),
            Err(_) => {
                tracing::warn!("port mapping not deleted within {timeout:?} (its lease ends it)")
            }
        }
    }
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// PCP, then NAT-PMP.
async fn ask_nat(
    gateway: Ipv4Addr,
    client: Ipv4Addr,
    port: NonZeroU16,
) -> Result<(Held, PortMapping), String> {
    let gw = crab_nat::GatewayAddress::IpV4(gateway);
    let timeouts = crab_nat::TimeoutConfig {
        initial_timeout: Duration::from_millis(250),
        max_retries: 2,
        max_retry_timeout: Some(Duration::from_secs(1)),
    };
    let options = crab_nat::PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(secs(LEASE)),
        timeout_config: Some(timeouts),
    };
    let m = crab_nat::PortMapping::new(
        gw,
        IpAddr::V4(client),
        crab_nat::InternetProtocol::Tcp,
        port,
        options,
    )
    .await
    .map_err(|e| format!("PCP and NAT-PMP: {e:?}"))?;
    let (protocol, ip) = match m.mapping_type() {
        crab_nat::PortMappingType::Pcp { external_ip, .. } => (MappingProtocol::Pcp, external_ip),
        crab_nat::PortMappingType::NatPmp => {
            let ip = crab_nat::natpmp::external_address(gw, Some(timeouts))
                .await
                .map_err(|e| format!("NAT-PMP external address: {e:?}"))?;
            (MappingProtocol::NatPmp, IpAddr::V4(ip))
        }
    };
    let status = PortMapping {
        external: SocketAddr::new(ip.to_canonical(), m.external_port().get()),
        gateway: IpAddr::V4(gateway),
        protocol,
        expires: m.expiration(),
    };
    Ok((Held::Nat(m), status))
}

/// UPnP IGD: the same external port as the internal one, else any.
async fn ask_upnp(client: Ipv4Addr, port: NonZeroU16) -> Result<(Held, PortMapping), String> {
    let mut options = igd_next::SearchOptions::default();
    options.bind_addr = SocketAddr::from((client, 0));
    options.timeout = Some(ATTEMPT);
    options.single_search_timeout = Some(ATTEMPT);
    let gateway = igd_next::aio::tokio::search_gateway(options)
        .await
        .map_err(|e| e.to_string())?;
    let ip = gateway.get_external_ip().await.map_err(|e| e.to_string())?;
    let local = SocketAddr::V4(SocketAddrV4::new(client, port.get()));
    let tcp = igd_next::PortMappingProtocol::TCP;
    let external_port = match gateway
        .add_port(tcp, port.get(), local, secs(LEASE), "reach")
        .await
    {
        Ok(()) => port.get(),
        Err(_) => gateway
            .add_any_port(tcp, local, secs(LEASE), "reach")
            .await
            .map_err(|e| e.to_string())?,
    };
    let status = PortMapping {
        external: SocketAddr::new(ip.to_canonical(), external_port),
        gateway: gateway.addr.ip(),
        protocol: MappingProtocol::Upnp,
        expires: Instant::now() + LEASE,
    };
    Ok((
        Held::Upnp {
            gateway,
            external_port,
            local,
        },
        status,
    ))
}

/// Sends the same-network query for TCP endpoint `external` from
/// `client` to `gateway`'s PCP port: `Ok(None)` when the gateway says it
/// is not one of its mappings, `Err` when it gives no usable answer.
async fn query_gateway(
    gateway: Ipv4Addr,
    client: Ipv4Addr,
    external: SocketAddr,
) -> Result<Option<SocketAddr>, String> {
    use reach_proto::gateway_query::{Answer, Query, RESPONSE_LEN, SUCCESS};
    let socket = tokio::net::UdpSocket::bind((client, 0))
        .await
        .map_err(|e| format!("bind: {e}"))?;
    socket
        .connect((gateway, crab_nat::GATEWAY_PORT))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let query = Query {
        client: IpAddr::V4(client),
        protocol: 6,
        external,
    };
    let request = query.encode();
    let mut buf = [0u8; RESPONSE_LEN + 4];
    let deadline = tokio::time::Instant::now() + QUERY_WAIT;
    for _ in 0..QUERY_SENDS {
        socket
            .send(&request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let resend = (tokio::time::Instant::now() + QUERY_WAIT / QUERY_SENDS).min(deadline);
        loop {
            let n = match tokio::time::timeout_at(resend, socket.recv(&mut buf)).await {
                Err(_) => break,
                // Port unreachable: nothing serves PCP there.
                Ok(Err(e)) => return Err(format!("no PCP server: {e}")),
                Ok(Ok(n)) => n,
            };
            let msg = &buf[..n];
            let Ok(answer) = Answer::decode(msg, query.client) else {
                // A PCP error answer to the opcode (UNSUPP_OPCODE, say) is
                // shorter than an answer: no.
                if let [_, op, _, result, ..] = msg {
                    if *op == 0x80 | reach_proto::gateway_query::OPCODE {
                        return Err(format!("the gateway refused the query (result {result})"));
                    }
                }
                continue;
            };
            if answer.result != SUCCESS {
                return Err(format!(
                    "the gateway refused the query (result {})",
                    answer.result
                ));
            }
            if answer.query.external == external {
                return Ok(answer.internal_for(&query));
            }
        }
    }
    Err(format!("no answer within {QUERY_WAIT:?}"))
}

/// The default IPv4 gateway, from the kernel's routing table.
pub(crate) fn default_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_default_gateway(&table)
}

/// The gateway of the first default route in `/proc/net/route`'s text.
fn parse_default_gateway(table: &str) -> Option<Ipv4Addr> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, gateway, flags) = (f.get(1)?, f.get(2)?, f.get(3)?);
        // RTF_UP | RTF_GATEWAY.
        let flags = u16::from_str_radix(flags, 16).ok()?;
        if *dest != "00000000" || flags & 0x3 != 0x3 {
            return None;
        }
        let g = u32::from_str_radix(gateway, 16).ok()?;
        // The kernel prints the address's bytes read as a host-order u32.
        Some(Ipv4Addr::from(g.to_ne_bytes()))
    })
}

/// This host's address on the way to `gateway`.
fn local_toward(gateway: Ipv4Addr) -> Option<Ipv4Addr> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((gateway, crab_nat::GATEWAY_PORT)).ok()?;
    match s.local_addr().ok()?.ip() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_is_read_from_the_routing_table() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
lan\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
lan\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(
            parse_default_gateway(table),
            Some(Ipv4Addr::new(10, 1, 0, 1))
        );
        assert_eq!(parse_default_gateway("Iface\n"), None);
        assert_eq!(parse_default_gateway("h\nlan\t00000000\tzz\t0003\n"), None);
    }
}
