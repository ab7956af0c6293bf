//! The TOML configuration file and how it merges with command-line flags.
//!
//! Looked up at `--config PATH`, else `$XDG_CONFIG_HOME/reach/config.toml`, else
//! `~/.config/reach/config.toml`; a missing default file is fine, a missing file
//! named with `--config` is an error. Flags override the file. Every key is
//! documented in `docs/config.md`; unknown keys are errors, so typos surface.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// The configuration file's keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the identity key lives.
    pub state_dir: Option<PathBuf>,
    /// Opt in to plaintext streams (peers still authenticated).
    pub plaintext: Option<bool>,
    /// Seconds `connect` may take.
    pub connect_timeout: Option<f64>,
    /// IP address listeners bind to.
    pub bind: Option<IpAddr>,
    /// TCP port range listeners use, "A-B".
    pub port_range: Option<String>,
    /// Addresses to advertise instead of the discovered ones.
    pub advertise: Option<Vec<SocketAddr>>,
    /// Whether serving nodes ask their gateway to forward the listening
    /// port (default true).
    pub port_mapping: Option<bool>,
    /// Whether nodes ask their gateway which internal endpoint a peer's
    /// public address there stands for (default true).
    pub gateway_query: Option<bool>,
    /// Log filter (tracing `EnvFilter` syntax), e.g. "info" or "reach=debug".
    pub log: Option<String>,
    /// The hub this node attaches to, `[NODEID@]HOST:PORT`.
    pub hub: Option<String>,
    /// Setup modules in the order the driver tries them.
    pub modules: Option<Vec<String>>,
    /// Seconds a routed stream lives before it tries to move.
    pub upgrade_after: Option<f64>,
    /// File holding the network secret that admits this node (and hub) to
    /// hubs; serving nodes also admit members proving it.
    pub network_secret_file: Option<PathBuf>,
    /// Nodes a serving node (`listen`, `expose`) admits, by NodeId.
    pub allow: Option<Vec<String>>,
    /// File of NodeIds a serving node admits, one a line.
    pub allow_file: Option<PathBuf>,
    /// Settings of `reach hub`.
    pub hub_server: Option<HubServer>,
}

/// The `[hub_server]` table: how `reach hub` runs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubServer {
    /// TCP port the hub listens on.
    pub tcp_port: Option<u16>,
    /// IP address the hub listens on.
    pub bind: Option<IpAddr>,
    /// Addresses other hubs and nodes reach this hub at.
    pub advertise: Option<Vec<SocketAddr>>,
    /// Peer hubs this hub links to, `[NODEID@]HOST:PORT[,ssh=[USER@]HOST[:PORT]]`.
    pub peers: Option<Vec<String>>,
    /// Extra arguments for `ssh` tunnels to peers.
    pub ssh_args: Option<Vec<String>>,
    /// Nodes admitted by NodeId.
    pub allow: Option<Vec<String>>,
    /// Hubs admitted as peers by NodeId (configured peers always are).
    pub allow_hubs: Option<Vec<String>>,
    /// Admit every node, even with `allow` or a network secret configured.
    pub open: Option<bool>,
    /// Where to serve Prometheus metrics and the JSON status over HTTP.
    pub metrics: Option<SocketAddr>,
    /// Seconds between routing gossip messages.
    pub gossip_interval: Option<f64>,
    /// Dial hubs learned from gossip (default true).
    pub learned_links: Option<bool>,
    /// Find hubs on the LAN by multicast (default false).
    pub lan_discovery: Option<bool>,
    /// Multicast group and port for LAN discovery.
    pub lan_group: Option<std::net::SocketAddrV4>,
    /// Ports of the address echoes (empty: none; default two free ports).
    pub echo_ports: Option<Vec<u16>>,
    /// A second address dial-backs for `reach doctor` come from.
    pub dial_back_from: Option<std::net::IpAddr>,
    /// Proxy ports for published services, "A-B".
    pub proxy_ports: Option<String>,
    /// Nodes that may publish services (default: every admitted node).
    pub allow_expose: Option<Vec<String>>,
    /// Services one node may publish at once.
    pub max_exposures: Option<usize>,
    /// Seconds a proxy-port connection may stay idle.
    pub proxy_idle: Option<f64>,
    /// Seconds a proxy-port connection may take to move its first byte.
    pub proxy_first_byte: Option<f64>,
    /// Proxy-port client connections at once.
    pub max_proxy_clients: Option<usize>,
    /// Proxy-port client connections at once from one source.
    pub max_proxy_clients_per_source: Option<usize>,
    /// Seconds a proxy port stays held for its node after it leaves.
    pub proxy_port_hold: Option<f64>,
    /// Offer relay circuits (default true).
    pub circuits: Option<bool>,
    /// Relay circuits at once.
    pub max_circuits: Option<usize>,
    /// Relay circuits one node may hold at once.
    pub max_circuits_per_node: Option<usize>,
    /// File holding the hub secret hubs link with.
    pub hub_secret_file: Option<PathBuf>,
    /// Link with every hub.
    pub open_hubs: Option<bool>,
    /// Handshakes in progress at once.
    pub max_handshakes: Option<usize>,
    /// Handshakes in progress from one source.
    pub max_handshakes_per_source: Option<usize>,
    /// Links not yet registered, at once.
    pub max_unregistered: Option<usize>,
    /// Links not yet registered from one source.
    pub max_unregistered_per_source: Option<usize>,
    /// Seconds a link may take to register.
    pub register_within: Option<f64>,
    /// Routed streams through one node's link.
    pub max_streams_per_node: Option<usize>,
    /// Routed streams over one hub link.
    pub max_streams_per_hub_link: Option<usize>,
}

impl Config {
    /// Loads the file named by `--config`, or the default file if it exists.
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<Self> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => match default_path() {
                Some(p) if p.exists() => p,
                _ => return Ok(Self::default()),
            },
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "bad config file {}: {}",
                path.display(),
                one_line(&e.to_string())
            )
        })?;
        let positive = |key: &str, v: Option<f64>| match v {
            Some(t) if !(t.is_finite() && t > 0.0) => bail!(
                "bad config file {}: {key} must be a positive number of seconds",
                path.display()
            ),
            _ => Ok(()),
        };
        positive("connect_timeout", config.connect_timeout)?;
        positive(
            "hub_server.gossip_interval",
            config.hub_server.as_ref().and_then(|h| h.gossip_interval),
        )?;
        Ok(config)
    }
}

fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("reach/config.toml"))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses "A-B" into an inclusive port range.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("bad port range {s:?}: expected FIRST-LAST, e.g. 40000-40100"))?;
    let p = |x: &str| {
        x.trim()
            .parse::<u16>()
            .map_err(|_| format!("bad port range {s:?}: {x:?} is not a port number"))
    };
    let (a, b) = (p(a)?, p(b)?);
    if a > b {
        return Err(format!(
            "bad port range {s:?}: the first port exceeds the last"
        ));
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_key_parses() {
        let text = r#"
            state_dir = "/tmp/x"
            plaintext = true
            connect_timeout = 2.5
            bind = "0.0.0.0"
            port_range = "40000-40010"
            advertise = ["198.51.100.7:40000"]
            log = "info"
            hub = "hub.example:7700"
            modules = ["direct", "routed"]
            upgrade_after = 1.5
            network_secret_file = "/etc/reach/secret"

            [hub_server]
            tcp_port = 7700
            bind = "0.0.0.0"
            advertise = ["198.51.100.7:7700"]
            peers = ["203.0.113.9:7700"]
            ssh_args = ["-i", "/etc/reach/ssh_key"]
            allow = []
            allow_hubs = []
            open = false
            metrics = "127.0.0.1:9107"
            gossip_interval = 2
            learned_links = true
            lan_discovery = true
            lan_group = "239.255.77.77:7799"
        "#;
        let c: Config = toml::from_str(text).expect("parse");
        assert_eq!(c.plaintext, Some(true));
        assert_eq!(c.advertise.map(|a| a.len()), Some(1));
        assert_eq!(c.upgrade_after, Some(1.5));
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("plaintxt = true").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_port_ranges_never_panics(s in "\\PC{0,30}") {
            if let Ok((a, b)) = parse_port_range(&s) {
                proptest::prop_assert!(a <= b);
            }
        }

        #[test]
        fn parsing_arbitrary_config_files_never_panics(s in "\\PC{0,200}") {
            let _ = toml::from_str::<Config>(&s);
        }
    }

    #[test]
    fn port_ranges_parse_or_say_why_not() {
        assert_eq!(parse_port_range("1-2"), Ok((1, 2)));
        assert!(parse_port_range("5").unwrap_err().contains("FIRST-LAST"));
        assert!(parse_port_range("9-2").unwrap_err().contains("exceeds"));
        assert!(parse_port_range("a-2").unwrap_err().contains("not a port"));
    }
}
