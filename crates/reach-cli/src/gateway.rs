//! `reach gateway`: port forwarding on demand at a Linux NAT gateway,
//! spoken as NAT-PMP and PCP (crate `reach-gateway`, docs/gateway.md).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use reach_gateway::table::Policy;

/// Flags of `reach gateway`.
#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// The LAN interface: NAT-PMP and PCP are served on its IPv4 address,
    /// UDP port 5351 (clients ask their default gateway there).
    #[arg(long, value_name = "IFACE")]
    lan: String,
    /// The WAN interface: its IPv4 address is the external one, and
    /// forwards apply to packets arriving on it.
    #[arg(long, value_name = "IFACE")]
    wan: String,
    /// Internal addresses mappings may forward to, as CIDR (repeatable;
    /// default: the LAN interface's own subnet). Requests from elsewhere
    /// are dropped; requests for elsewhere refused.
    #[arg(long, value_name = "CIDR")]
    allow_internal: Vec<String>,
    /// External ports the gateway gives out, A-B.
    #[arg(long, value_name = "A-B", default_value = "20000-60999")]
    ports: String,
    /// Mappings one client may hold.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_per_client: usize,
    /// Longest lease in seconds (longer requests get this).
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    lease_max: u32,
    /// Mappings in all, every client together.
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    max_mappings: usize,
    /// Where the mapping journal lives [default: STATE_DIR/gateway].
    #[arg(long = "gateway-state-dir", value_name = "DIR")]
    gateway_state_dir: Option<PathBuf>,
    /// The nftables table (ip family) the gateway owns; nothing outside it
    /// is touched.
    #[arg(long, value_name = "NAME", default_value = reach_gateway::nft::TABLE)]
    nft_table: String,
    /// The UDP port to serve on (5351 is where clients ask).
    #[arg(long, value_name = "P", default_value_t = reach_gateway::PORT)]
    port: u16,
    /// Do not serve UPnP IGD (SSDP discovery on UDP 1900 and its HTTP
    /// control server).
    #[arg(long)]
    no_upnp: bool,
    /// The TCP port of UPnP's HTTP server on the LAN address (0: any free
    /// one; discovery tells clients where).
    #[arg(long, value_name = "P", default_value_t = 0)]
    upnp_port: u16,
    /// Seconds between rounds of DPF's probe: a TCP connection to each TCP
    /// mapping's internal endpoint, so that the mappings of a program or
    /// host that is gone end before their lease (0: no probing; UDP
    /// mappings always end by their lease).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    probe_interval: u64,
    /// Rounds in a row a mapping's endpoint may refuse or not answer the
    /// probe before the mapping is deleted.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    probe_misses: u32,
}

/// `net/len` as a prefix.
fn parse_cidr(s: &str) -> anyhow::Result<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: Ipv4Addr = ip
        .parse()
        .with_context(|| format!("--allow-internal {s:?}: not an IPv4 address"))?;
    let len: u8 =
        len.parse().ok().filter(|l| *l <= 32).with_context(|| {
            format!("--allow-internal {s:?}: the prefix length must be 0 to 32")
        })?;
    Ok((ip, len))
}

/// `A-B` as a port range.
fn parse_ports(s: &str) -> anyhow::Result<std::ops::RangeInclusive<u16>> {
    let bad = || format!("--ports {s:?}: expected A-B with 1 <= A <= B <= 65535");
    let (a, b) = s.split_once('-').with_context(bad)?;
    let (a, b): (u16, u16) = (a.parse().with_context(bad)?, b.parse().with_context(bad)?);
    if a == 0 || a > b {
        anyhow::bail!(bad());
    }
    Ok(a..=b)
}

/// Runs the gateway until SIGINT or SIGTERM.
pub async fn run(args: GatewayArgs, state_dir: &Path) -> anyhow::Result<()> {
    let policy = Policy {
        internal: args
            .allow_internal
            .iter()
            .map(|c| parse_cidr(c))
            .collect::<anyhow::Result<_>>()?,
        ports: parse_ports(&args.ports)?,
        max_per_client: args.max_per_client,
        lease_max: args.lease_max,
        max_total: args.max_mappings,
    };
    let config = reach_gateway::Config {
        lan: args.lan,
        wan: args.wan,
        policy,
        state_dir: args
            .gateway_state_dir
            .unwrap_or_else(|| state_dir.join("gateway")),
        table: args.nft_table,
        port: args.port,
        upnp: !args.no_upnp,
        upnp_port: args.upnp_port,
        probe: reach_gateway::probe::Settings {
            interval: args.probe_interval,
            misses: args.probe_misses,
        },
    };
    let gateway = reach_gateway::Gateway::start(config).await?;
    match gateway.upnp_addr() {
        Some(upnp) => eprintln!(
            "gateway serving NAT-PMP and PCP on {}, UPnP IGD on http://{upnp}",
            gateway.local_addr()?
        ),
        None => eprintln!(
            "gateway serving NAT-PMP and PCP on {}",
            gateway.local_addr()?
        ),
    }
    gateway
        .run(async {
            if let Err(e) = crate::hub::shutdown_signal().await {
                tracing::error!("{e}");
                std::future::pending::<()>().await;
            }
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_cidr("10.1.0.0/16").unwrap(),
            (Ipv4Addr::new(10, 1, 0, 0), 16)
        );
        assert_eq!(parse_cidr("10.1.0.9").unwrap().1, 32);
        assert!(parse_cidr("10.1.0.0/33").is_err());
        assert!(parse_cidr("fd00::/8").is_err());
        assert_eq!(parse_ports("40000-40099").unwrap(), 40000..=40099);
        for bad in ["0-10", "10-9", "10", "a-b", "1-70000"] {
            let e = parse_ports(bad).unwrap_err().to_string();
            assert!(e.contains("--ports"), "{bad}: {e}");
        }
    }
}
