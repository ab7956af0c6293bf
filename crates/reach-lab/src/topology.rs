//! Lab topologies as written in TOML, and their validation.
//!
//! ```toml
//! name = "zoo"
//!
//! [[site]]
//! name = "home"
//! gateway = "nat"                 # open | firewall | nat
//! mapping = "endpoint-independent" # nat: endpoint-independent | address-and-port-dependent
//! lan = "10.1.0.0/24"              # nat: private LAN (default 10.<n>.0.0/24)
//! udp_timeout_s = 30               # nat: an idle UDP mapping goes after 30 s
//! tcp_timeout_s = 60               # nat: an idle TCP mapping goes after 60 s
//! behind = "carrier"               # nat: the gateway sits on that NAT site's LAN
//! delay_ms = 20                    # one-way delay on the site's internet links
//! loss_percent = 1.0               # frames lost on them, each way
//! jitter_ms = 5                    # extra delay of 0..5 ms per frame, order kept
//!
//! [[site.host]]
//! name = "laptop"
//! multi_homed = false              # also has a public address on the internet
//! routed = true                    # false: no route out of the LAN (non-routed node)
//! ```
//! A firewall site takes `inbound = "drop" | "reject"`, `allow_in = [22]` (TCP
//! ports new inbound connections may reach) and `allow_out = [22]` (if present,
//! the only TCP ports new outbound connections may go to). Firewall and NAT
//! sites take `udp_out = [53]` (if present, the only UDP ports datagrams may go
//! out to; `[]` blocks UDP).
//!
//! Validation names the site or host and the field that is wrong. Behaviours
//! that the kernel NAT cannot produce (endpoint-independent filtering, sequential
//! port allocation, hairpinning) need a userspace NAT hop that is not built yet:
//! asking for them is an error that says so, never a silent approximation.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::Deserialize;

/// A whole lab topology.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// A short name, shown by `reach-lab status`.
    pub name: String,
    /// The hosts `reach-lab matrix` pairs up (default: every host). The
    /// SmartSockets table pairs one compute node per site.
    pub matrix: Option<Vec<String>>,
    /// The sites attached to the internet.
    #[serde(rename = "site", default)]
    pub sites: Vec<Site>,
    /// Where `reach-lab matrix --mode reach` runs hubs and how they link.
    pub hubs: Option<Hubs>,
}

/// The hubs of a reach-mode matrix: SmartSockets runs one per site front-end.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hubs {
    /// Hosts that run a hub.
    pub hosts: Vec<String>,
    /// Hub links, each dialled by `from`.
    #[serde(default)]
    pub links: Vec<HubLink>,
    /// The hub of each matrix host in a site without one (the rest attach to
    /// their own site's hub).
    #[serde(default)]
    pub attach: std::collections::BTreeMap<String, String>,
    /// The TCP port every hub listens on (default 7700; 443 lets hosts of
    /// sites that allow only HTTPS out reach them).
    pub port: Option<u16>,
}

/// One hub link of the lab.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HubLink {
    /// The hub that dials.
    pub from: String,
    /// The hub it links to.
    pub to: String,
    /// Through an ssh tunnel to `to`'s site entry (for sites only ssh enters).
    #[serde(default)]
    pub ssh: bool,
}

/// What a site's gateway does to traffic.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GatewayKind {
    /// A plain router: hosts have public addresses, nothing is filtered.
    Open,
    /// A stateful firewall in front of hosts with public addresses.
    Firewall,
    /// A NAT in front of hosts with private addresses.
    Nat,
}

/// What a firewall does to unwanted new connections.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Inbound {
    /// Silently drop: the connector waits for its timeout.
    #[default]
    Drop,
    /// Answer with a TCP reset or ICMP admin-prohibited: fails in a round trip.
    Reject,
}

/// RFC 4787 section 4.1 mapping behaviour.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// One external port per internal endpoint, whatever the destination
    /// (kernel `masquerade`, port preserved while it is free).
    #[default]
    EndpointIndependent,
    /// A new external port per destination address and port (kernel
    /// `masquerade fully-random`: random ports).
    AddressAndPortDependent,
    /// A new external port per destination address: needs the userspace NAT.
    AddressDependent,
}

/// RFC 4787 section 5 filtering behaviour.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Only the exact remote endpoint may send back (what conntrack does).
    #[default]
    AddressAndPortDependent,
    /// Any port of a contacted address: needs the userspace NAT.
    AddressDependent,
    /// Anyone ("full cone"): needs the userspace NAT.
    EndpointIndependent,
}

/// How a NAT picks external ports.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Allocation {
    /// Keep the internal port when free (kernel default).
    #[default]
    Preserve,
    /// Random ports (kernel `fully-random`).
    Random,
    /// Consecutive ports: needs the userspace NAT.
    Sequential,
}

/// One site: a gateway and the hosts behind it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Site name, unique in the topology.
    pub name: String,
    /// What the gateway does.
    pub gateway: GatewayKind,
    /// Firewall: drop or reject unwanted new connections.
    #[serde(default)]
    pub inbound: Inbound,
    /// Firewall: TCP ports that new inbound connections may reach.
    #[serde(default)]
    pub allow_in: Vec<u16>,
    /// Firewall: if set, the only TCP ports new outbound connections may use.
    pub allow_out: Option<Vec<u16>>,
    /// Firewall or NAT: if set, the only UDP ports datagrams may go out to
    /// (`[]` blocks UDP, `[53]` lets only DNS-like traffic out), as many
    /// institutional firewalls do; unsolicited UDP from outside is dropped
    /// anyway. Default: UDP goes out freely (unless `allow_out` is set,
    /// which lets nothing but its TCP ports out).
    pub udp_out: Option<Vec<u16>>,
    /// NAT: mapping behaviour.
    #[serde(default)]
    pub mapping: Mapping,
    /// NAT: filtering behaviour.
    #[serde(default)]
    pub filtering: Filtering,
    /// NAT: port allocation.
    pub allocation: Option<Allocation>,
    /// NAT: whether inside hosts can reach each other through the external address.
    #[serde(default)]
    pub hairpin: bool,
    /// NAT: inbound TCP ports forwarded to a host of the site.
    #[serde(default)]
    pub forward: Vec<Forward>,
    /// NAT: the gateway lets through connections that a port-mapping
    /// daemon on it (`reach gateway`) forwards: its forward chain accepts
    /// DNATed connections (`ct status dnat accept`), as an administrator
    /// who runs such a daemon sets it up. The daemon itself is started by
    /// whoever uses the lab, in the gateway's namespace (`gw-SITE`, LAN
    /// interface `br0`, WAN interface `wan`).
    #[serde(default)]
    pub port_mapping: bool,
    /// NAT: seconds a UDP mapping lives without traffic (default: the
    /// kernel's 30 s for one-way flows and 120 s once answered; the
    /// userspace NAT keeps mappings for the lab's life). RFC 4787 asks at
    /// least 120; home routers often use 30 to 60.
    pub udp_timeout_s: Option<u32>,
    /// NAT: seconds an established TCP mapping lives without traffic
    /// (default: the kernel's five days; the userspace NAT keeps mappings for
    /// the lab's life). RFC 5382 asks at least 7440; home routers use far
    /// less. Once set, a packet of a forgotten connection is not picked up
    /// again: the connection is gone, as on a router that forgot it.
    pub tcp_timeout_s: Option<u32>,
    /// NAT: the site's gateway sits on the LAN of this other NAT site (named
    /// earlier in the file) instead of on the internet: a home NAT behind a
    /// carrier-grade NAT, whose LAN is then usually in 100.64.0.0/10
    /// (RFC 6598). Traffic to the internet is translated twice.
    pub behind: Option<String>,
    /// The site's LAN. Must be private; two sites may share one, as real sites
    /// do. Default: 10.N.0.0/24 behind a NAT, a public /28 for open and
    /// firewalled sites. A private LAN at an open or firewalled site is not
    /// routed from the internet: its hosts go out through their own public
    /// interface (`multi_homed`) or not at all.
    pub lan: Option<Lan>,
    /// One-way delay in milliseconds added to each of the site's links to the
    /// internet (the gateway's and multi-homed hosts' public links), both ways.
    /// A round trip between sites A and B gains 2 x (delay A + delay B).
    pub delay_ms: Option<u32>,
    /// Bandwidth limit in Mbit/s on each of the site's links to the internet,
    /// both directions (`tbf` at both ends: it shapes egress only).
    pub rate_mbit: Option<u32>,
    /// Percent of frames lost on each of the site's links to the internet,
    /// each direction, independently per frame (0 to 50; seeded from the
    /// site's name, so a run loses the same frames of the same traffic).
    pub loss_percent: Option<f64>,
    /// Extra delay of up to this many milliseconds on each frame of the
    /// site's links to the internet (uniform, frames kept in order), on top
    /// of `delay_ms`.
    pub jitter_ms: Option<u32>,
    /// The site has IPv6 too: its LAN gets `2001:db8:N::/64` (the
    /// documentation prefix stands for the IPv6 internet), routed from the
    /// internet to the gateway. There is no IPv6 NAT: a NAT site's gateway
    /// filters IPv6 as a stateful firewall (unsolicited inbound dropped), as
    /// home routers do; a firewall site applies its rules to both families;
    /// an open site lets IPv6 through.
    #[serde(default)]
    pub ipv6: bool,
    /// The hosts of the site.
    #[serde(rename = "host", default)]
    pub hosts: Vec<Host>,
}

/// A host of a site.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// Host name, unique in the topology.
    pub name: String,
    /// Also attached to the internet with a public address (a front-end).
    #[serde(default)]
    pub multi_homed: bool,
    /// Has a route out of its LAN. `false` makes a non-routed node.
    #[serde(default = "yes")]
    pub routed: bool,
    /// Has an IPv4 address. `false` makes an IPv6-only host (at a site with
    /// `ipv6 = true`).
    #[serde(default = "yes")]
    pub ipv4: bool,
    /// Runs a real OpenSSH server on port 22 (key-only login as root with the
    /// lab's key).
    #[serde(default)]
    pub sshd: bool,
}

/// A NAT port forward: `port` on the gateway's external address to `to`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// External TCP port.
    pub port: u16,
    /// The host it goes to (in the same site).
    pub to: String,
    /// Port on that host (default: the same).
    pub to_port: Option<u16>,
}

/// `true`, for serde defaults.
pub(crate) fn yes() -> bool {
    true
}

/// An IPv4 network written as "A.B.C.D/N".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lan {
    /// Network address.
    pub net: Ipv4Addr,
    /// Prefix length.
    pub len: u8,
}

impl Lan {
    /// The n-th address of the network (1 is the gateway).
    pub fn addr(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) + n)
    }

    /// Whether the network lies in an RFC 1918 private range.
    pub fn is_private(&self) -> bool {
        let private: [(Ipv4Addr, u8); 4] = [
            (Ipv4Addr::new(10, 0, 0, 0), 8),
            (Ipv4Addr::new(172, 16, 0, 0), 12),
            (Ipv4Addr::new(192, 168, 0, 0), 16),
            // Shared address space behind carrier-grade NATs (RFC 6598).
            (Ipv4Addr::new(100, 64, 0, 0), 10),
        ];
        private.iter().any(|(n, l)| {
            let mask = u32::MAX << (32 - l);
            self.len >= *l && u32::from(self.net) & mask == u32::from(*n)
        })
    }

    /// How many host addresses fit.
    pub fn capacity(&self) -> u32 {
        (1u32 << (32 - u32::from(self.len))).saturating_sub(2)
    }
}

impl std::fmt::Display for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

impl std::str::FromStr for Lan {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 network like 10.1.0.0/24");
        let (ip, len) = s.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&len) {
            return Err(format!("{s:?}: prefix length must be 8 to 30"));
        }
        let mask = u32::MAX << (32 - u32::from(len));
        if u32::from(ip) & !mask != 0 {
            return Err(format!(
                "{s:?} has host bits set; did you mean {}/{len}?",
                Ipv4Addr::from(u32::from(ip) & mask)
            ));
        }
        Ok(Self { net: ip, len })
    }
}

impl<'de> Deserialize<'de> for Lan {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a topology is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// The TOML does not parse or has unknown fields.
    #[error("{0}")]
    Syntax(String),
    /// A name is empty, too long or has characters other than a-z, 0-9 and '-'.
    #[error("bad name {0:?}: use 1 to 24 characters a-z, 0-9 and '-'")]
    BadName(String),
    /// A host name the lab uses itself.
    #[error("host name {0:?} is reserved for the lab's observers")]
    ReservedName(String),
    /// Two sites or two hosts share a name.
    #[error("name {0:?} is used twice")]
    DuplicateName(String),
    /// A site without hosts.
    #[error("site {0:?} has no hosts")]
    NoHosts(String),
    /// A field that does not apply to the site's gateway kind.
    #[error("site {site:?}: {field} does not apply to a {kind} gateway")]
    Misplaced {
        /// The site.
        site: String,
        /// The field.
        field: &'static str,
        /// Its gateway kind.
        kind: &'static str,
    },
    /// A name that does not refer to a host where one is needed.
    #[error("{context}: no host {name:?}")]
    UnknownHost {
        /// Where the name appears.
        context: String,
        /// The name.
        name: String,
    },
    /// A rate out of range.
    #[error("site {0:?}: rate_mbit must be 1 to 100000")]
    BadRate(String),
    /// A delay out of range.
    #[error("site {0:?}: delay_ms must be 1 to 10000")]
    BadDelay(String),
    /// An IPv6-only host where it cannot be one.
    #[error("host {0:?}: ipv4 = false needs a site with ipv6 = true, and no public interface (multi_homed)")]
    Ipv6Only(String),
    /// A `behind` that cannot be built.
    #[error("site {site:?}: behind {why}")]
    BadBehind {
        /// The site.
        site: String,
        /// Why not.
        why: &'static str,
    },
    /// A NAT timeout out of range.
    #[error("site {0:?}: udp_timeout_s and tcp_timeout_s must be 1 to 432000")]
    BadTimeout(String),
    /// A loss out of range.
    #[error("site {0:?}: loss_percent must be above 0 and at most 50")]
    BadLoss(String),
    /// A jitter out of range.
    #[error("site {0:?}: jitter_ms must be 1 to 1000")]
    BadJitter(String),
    /// A LAN outside the private ranges.
    #[error("site {site:?}: LAN {lan} is not in a private range (10/8, 172.16/12, 192.168/16, 100.64/10)")]
    LanNotPrivate {
        /// The site.
        site: String,
        /// The LAN.
        lan: Lan,
    },
    /// More hosts than the LAN holds.
    #[error("site {0:?}: too many hosts for its LAN")]
    LanTooSmall(String),
    /// Too many sites or hosts for the public address plan.
    #[error("too many {0} for the lab's public address plan")]
    TooMany(&'static str),
    /// A behaviour the kernel NAT cannot produce; needs the userspace NAT hop.
    #[error("site {site:?}: {what} needs the userspace NAT hop, which is not built yet")]
    NeedsUserspaceNat {
        /// The site.
        site: String,
        /// The behaviour asked for.
        what: &'static str,
    },
}

/// Host names the lab gives its own observers on the internet.
pub const RESERVED_HOSTS: [&str; 2] = ["obs1", "obs2"];

fn valid_name(n: &str) -> bool {
    (1..=24).contains(&n.len())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !n.starts_with('-')
}

impl Topology {
    /// Parses and validates a topology.
    pub fn from_toml(text: &str) -> Result<Self, TopologyError> {
        let t: Topology = toml::from_str(text).map_err(|e| {
            TopologyError::Syntax(
                e.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        })?;
        t.validate()?;
        Ok(t)
    }

    /// Every host with its site, in file order.
    pub fn hosts(&self) -> impl Iterator<Item = (&Site, &Host)> {
        self.sites
            .iter()
            .flat_map(|s| s.hosts.iter().map(move |h| (s, h)))
    }

    /// Checks names, fields and ranges.
    pub fn validate(&self) -> Result<(), TopologyError> {
        if !valid_name(&self.name) {
            return Err(TopologyError::BadName(self.name.clone()));
        }
        let mut sites = BTreeSet::new();
        let mut hosts = BTreeSet::new();
        for site in &self.sites {
            if !valid_name(&site.name) {
                return Err(TopologyError::BadName(site.name.clone()));
            }
            if !sites.insert(&site.name) {
                return Err(TopologyError::DuplicateName(site.name.clone()));
            }
            if site.hosts.is_empty() {
                return Err(TopologyError::NoHosts(site.name.clone()));
            }
            for h in &site.hosts {
                if !valid_name(&h.name) {
                    return Err(TopologyError::BadName(h.name.clone()));
                }
                if RESERVED_HOSTS.contains(&h.name.as_str()) {
                    return Err(TopologyError::ReservedName(h.name.clone()));
                }
                if !hosts.insert(&h.name) {
                    return Err(TopologyError::DuplicateName(h.name.clone()));
                }
            }
            site.validate_fields()?;
            for h in site.hosts.iter().filter(|h| !h.ipv4) {
                if !site.ipv6 || h.multi_homed {
                    return Err(TopologyError::Ipv6Only(h.name.clone()));
                }
            }
            if site.ipv6 && site.behind.is_some() {
                return Err(TopologyError::BadBehind {
                    site: site.name.clone(),
                    why: "cannot go with ipv6 (not built)",
                });
            }
            if let Some(parent) = &site.behind {
                let outer = self
                    .sites
                    .iter()
                    .take_while(|s| s.name != site.name)
                    .find(|s| &s.name == parent);
                let why = match outer {
                    None => Some("names no NAT site before it"),
                    Some(o) if o.gateway != GatewayKind::Nat => Some("names a site that is not a NAT"),
                    Some(o) if o.behind.is_some() => Some("names a site that is itself behind another (one level only)"),
                    // A kernel NAT outside: verify knows what the two make
                    // together (`verify::seen_from_outside`).
                    Some(o) if o.userspace_nat() => {
                        Some("needs an outer NAT the kernel runs (a userspace one outside another is not built)")
                    }
                    Some(_) if site.gateway != GatewayKind::Nat => Some("applies to NAT sites only"),
                    Some(_) if !site.forward.is_empty() => Some("cannot go with port forwards (not built)"),
                    Some(_) => None,
                };
                if let Some(why) = why {
                    return Err(TopologyError::BadBehind {
                        site: site.name.clone(),
                        why,
                    });
                }
            }
        }
        for name in self.matrix.iter().flatten() {
            if !hosts.contains(name) {
                return Err(TopologyError::UnknownHost {
                    context: "matrix".into(),
                    name: name.clone(),
                });
            }
        }
        if let Some(hubs) = &self.hubs {
            self.validate_hubs(hubs, &hosts)?;
        }
        Ok(())
    }

    fn validate_hubs(&self, hubs: &Hubs, hosts: &BTreeSet<&String>) -> Result<(), TopologyError> {
        let unknown = |context: String, name: &String| TopologyError::UnknownHost {
            context,
            name: name.clone(),
        };
        for h in &hubs.hosts {
            if !hosts.contains(h) {
                return Err(unknown("hubs.hosts".into(), h));
            }
        }
        let is_hub = |h: &String| hubs.hosts.contains(h);
        for l in &hubs.links {
            for end in [&l.from, &l.to] {
                if !is_hub(end) {
                    return Err(unknown(
                        format!("hub link {} -> {}: hub", l.from, l.to),
                        end,
                    ));
                }
            }
        }
        for (node, hub) in &hubs.attach {
            if !hosts.contains(node) {
                return Err(unknown("hubs.attach".into(), node));
            }
            if !is_hub(hub) {
                return Err(unknown(format!("hubs.attach of {node}: hub"), hub));
            }
        }
        Ok(())
    }

    /// The site a host belongs to.
    pub fn site_of(&self, host: &str) -> Option<&Site> {
        self.sites
            .iter()
            .find(|s| s.hosts.iter().any(|h| h.name == host))
    }
}

impl Site {
    fn kind_name(&self) -> &'static str {
        match self.gateway {
            GatewayKind::Open => "open",
            GatewayKind::Firewall => "firewall",
            GatewayKind::Nat => "nat",
        }
    }

    fn validate_fields(&self) -> Result<(), TopologyError> {
        let misplaced = |field| TopologyError::Misplaced {
            site: self.name.clone(),
            field,
            kind: self.kind_name(),
        };
        let is_nat = self.gateway == GatewayKind::Nat;
        let is_fw = self.gateway == GatewayKind::Firewall;
        if !is_fw && (self.inbound != Inbound::Drop || !self.allow_in.is_empty()) {
            return Err(misplaced("inbound/allow_in"));
        }
        if self.gateway == GatewayKind::Open && (self.allow_out.is_some() || self.udp_out.is_some())
        {
            return Err(misplaced("allow_out/udp_out"));
        }
        let nat_only = self.mapping != Mapping::default()
            || self.filtering != Filtering::default()
            || self.allocation.is_some()
            || self.hairpin
            || !self.forward.is_empty()
            || self.port_mapping
            || self.udp_timeout_s.is_some()
            || self.tcp_timeout_s.is_some();
        if !is_nat && nat_only {
            return Err(misplaced(
                "mapping/filtering/allocation/hairpin/forward/port_mapping/udp_timeout_s/tcp_timeout_s",
            ));
        }
        for t in [self.udp_timeout_s, self.tcp_timeout_s]
            .into_iter()
            .flatten()
        {
            if !(1..=432_000).contains(&t) {
                return Err(TopologyError::BadTimeout(self.name.clone()));
            }
        }
        for f in &self.forward {
            if !self.hosts.iter().any(|h| h.name == f.to) {
                return Err(TopologyError::UnknownHost {
                    context: format!("site {:?} forward of port {}", self.name, f.port),
                    name: f.to.clone(),
                });
            }
        }
        if is_nat {
            self.validate_nat()?;
        }
        if self.rate_mbit.is_some_and(|r| !(1..=100_000).contains(&r)) {
            return Err(TopologyError::BadRate(self.name.clone()));
        }
        if let Some(d) = self.delay_ms {
            if !(1..=10_000).contains(&d) {
                return Err(TopologyError::BadDelay(self.name.clone()));
            }
        }
        if self.loss_percent.is_some_and(|l| !(l > 0.0 && l <= 50.0)) {
            return Err(TopologyError::BadLoss(self.name.clone()));
        }
        if self.jitter_ms.is_some_and(|j| !(1..=1000).contains(&j)) {
            return Err(TopologyError::BadJitter(self.name.clone()));
        }
        if let Some(lan) = self.lan {
            if !lan.is_private() {
                return Err(TopologyError::LanNotPrivate {
                    site: self.name.clone(),
                    lan,
                });
            }
            if lan.capacity() < self.hosts.len() as u32 + 1 {
                return Err(TopologyError::LanTooSmall(self.name.clone()));
            }
        }
        Ok(())
    }

    /// Refuses NAT behaviours the kernel cannot produce.
    fn validate_nat(&self) -> Result<(), TopologyError> {
        let unbuilt = |what| TopologyError::NeedsUserspaceNat {
            site: self.name.clone(),
            what,
        };
        if self.userspace_nat() && !self.forward.is_empty() {
            return Err(unbuilt(
                "a port forward together with a userspace NAT behaviour",
            ));
        }
        if self.userspace_nat() && self.port_mapping {
            return Err(unbuilt(
                "port mapping together with a userspace NAT behaviour",
            ));
        }
        Ok(())
    }

    /// The port allocation in effect: preserved ports, unless the mapping
    /// depends on the destination's port, where the kernel picks random ones.
    pub fn allocation(&self) -> Allocation {
        self.allocation.unwrap_or(match self.mapping {
            Mapping::AddressAndPortDependent => Allocation::Random,
            _ => Allocation::Preserve,
        })
    }

    /// Whether this NAT site needs the lab's userspace NAT: every behaviour
    /// except the two the kernel produces (endpoint-independent mapping with
    /// preserved ports, or address-and-port-dependent mapping with random ports,
    /// both with address-and-port-dependent filtering).
    pub fn userspace_nat(&self) -> bool {
        let kernel = matches!(
            (self.mapping, self.allocation()),
            (Mapping::EndpointIndependent, Allocation::Preserve)
                | (Mapping::AddressAndPortDependent, Allocation::Random)
        );
        let kernel =
            kernel && self.filtering == Filtering::AddressAndPortDependent && !self.hairpin;
        self.gateway == GatewayKind::Nat && !kernel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        name = "t"
        [[site]]
        name = "home"
        gateway = "nat"
        lan = "10.9.0.0/24"
        [[site.host]]
        name = "laptop"
        [[site]]
        name = "uni"
        gateway = "firewall"
        inbound = "reject"
        allow_in = [22]
        [[site.host]]
        name = "fe"
        multi_homed = true
        [[site.host]]
        name = "node"
        routed = false
    "#;

    #[test]
    fn a_good_topology_parses_with_defaults() {
        let t = Topology::from_toml(GOOD).expect("valid");
        assert_eq!(t.sites.len(), 2);
        assert_eq!(t.sites[0].mapping, Mapping::EndpointIndependent);
        assert!(t.sites[0].hosts[0].routed);
        assert!(!t.sites[1].hosts[1].routed);
        assert_eq!(t.hosts().count(), 3);
    }

    #[test]
    fn kernel_and_userspace_nat_behaviours_are_told_apart() {
        let site = |extra: &str| {
            let t =
                Topology::from_toml(&GOOD.replace("lan = \"10.9.0.0/24\"", extra)).expect(extra);
            t.sites[0].userspace_nat()
        };
        assert!(!site(""), "EIM with preserved ports: kernel");
        assert!(
            !site("mapping = \"address-and-port-dependent\""),
            "APDM, random: kernel"
        );
        assert!(site("mapping = \"address-dependent\""));
        assert!(site("allocation = \"sequential\""));
        assert!(site("filtering = \"endpoint-independent\""));
        assert!(site(
            "mapping = \"address-and-port-dependent\"\nallocation = \"preserve\""
        ));
    }

    #[test]
    fn errors_name_the_site_and_the_problem() {
        let cases = [
            (GOOD.replace("\"laptop\"", "\"fe\""), "used twice"),
            (
                GOOD.replace("10.9.0.0/24", "203.0.113.0/24"),
                "not in a private range",
            ),
            (GOOD.replace("10.9.0.0/24", "10.9.0.1/24"), "host bits set"),
            (
                GOOD.replace("inbound = \"reject\"", "hairpin = true"),
                "does not apply to a firewall",
            ),
            (
                GOOD.replace(
                    "lan = \"10.9.0.0/24\"",
                    "filtering = \"endpoint-independent\"\nforward = [{ port = 22, to = \"laptop\" }]",
                ),
                "port forward together with a userspace NAT",
            ),
            (
                GOOD.replace("gateway = \"nat\"", "gateway = \"cgnat\""),
                "unknown variant",
            ),
            (GOOD.replace("\"laptop\"", "\"Laptop!\""), "bad name"),
            (GOOD.replace("multi_homed", "multihomed"), "unknown field"),
            (GOOD.replace("\"laptop\"", "\"obs1\""), "reserved"),
            (
                GOOD.replace("name = \"t\"", "name = \"t\"\nmatrix = [\"nobody\"]"),
                "no host \"nobody\"",
            ),
            (
                GOOD.replace(
                    "lan = \"10.9.0.0/24\"",
                    "forward = [{ port = 22, to = \"fe\" }]",
                ),
                "no host \"fe\"",
            ),
            (
                GOOD.replace(
                    "inbound = \"reject\"",
                    "forward = [{ port = 22, to = \"fe\" }]",
                ),
                "does not apply to a firewall",
            ),
        ];
        for (text, want) in cases {
            let err = Topology::from_toml(&text).expect_err(want).to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(s in "\\PC{0,300}") {
            let _ = Topology::from_toml(&s);
        }

        #[test]
        fn lan_parsing_never_panics(s in "[0-9./]{0,20}") {
            let _ = s.parse::<Lan>();
        }
    }
}
