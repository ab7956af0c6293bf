//! Turning a topology into a plan: namespaces, links, addresses, routes and
//! nftables rulesets. Pure computation, so the whole address plan and every
//! ruleset are unit-tested without root; `apply` carries a plan out.
//!
//! ```text
//!            inet (router, bridge br0 = 203.0.113.1/24, the "internet")
//!        p0 /        p1 |                     p2 \
//!   gw-<site> wan   gw-<site> wan          h-<front-end> pub (multi-homed)
//!   bridge br0 = LAN .1                   ...
//!     l0 |   l1 \
//!   h-<host> lan  h-<host> lan
//! ```
//! Public addresses come only from documentation ranges: gateways at
//! 203.0.113.10+, multi-homed hosts at 203.0.113.100+, and the LANs of open and
//! firewalled sites are /28s of 198.51.100.0/24. NAT sites use private LANs,
//! possibly the same one at two sites.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::topology::{
    Allocation, Filtering, GatewayKind, Host, Inbound, Lan, Mapping, Site, Topology, TopologyError,
};

/// The internet router's address; every public interface routes through it.
pub const INTERNET_ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const INTERNET_LEN: u8 = 24;
/// The internet router's IPv6 address (the documentation prefix stands for
/// the IPv6 internet: `2001:db8::/64` is its backbone, `2001:db8:N::/64` the
/// LAN of site N).
pub const INTERNET6_ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// Address `host` of IPv6 network `net` (0: the backbone, N: site N's LAN).
fn v6(net: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, host)
}
const FIRST_GATEWAY: u32 = 10;
const FIRST_PUBLIC_HOST: u32 = 100;

/// A route: `dest` (None for default) via a next hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Destination network, or `None` for the default route.
    pub dest: Option<Lan>,
    /// Next hop.
    pub via: Ipv4Addr,
}

/// One network namespace to create.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// Name without the lab prefix: "inet", "gw-SITE" or "h-HOST".
    pub name: String,
    /// Whether it forwards packets (a router).
    pub forward: bool,
    /// Bridges to create, by interface name.
    pub bridges: Vec<String>,
    /// Addresses: interface, address, prefix length.
    pub addrs: Vec<(String, Ipv4Addr, u8)>,
    /// Routes.
    pub routes: Vec<Route>,
    /// An nftables ruleset to load, if any.
    pub nft: Option<String>,
    /// Extra sysctls (`key=value`).
    pub sysctls: Vec<String>,
    /// Connection-tracking sysctls (`key=value`), set once the ruleset is
    /// loaded (their keys exist once conntrack runs in the namespace).
    pub conntrack: Vec<String>,
    /// Extra `ip -batch` lines, run after addresses and routes.
    pub ip_extra: Vec<String>,
    /// IPv6 addresses: interface, address, prefix length (IPv6 is on in
    /// a namespace with any, off everywhere else).
    pub addrs6: Vec<(String, Ipv6Addr, u8)>,
    /// IPv6 routes: destination (None: default) and next hop.
    pub routes6: Vec<(Option<(Ipv6Addr, u8)>, Ipv6Addr)>,
}

/// One end of a veth link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    /// Namespace name (without prefix).
    pub ns: String,
    /// Interface name inside it.
    pub ifname: String,
    /// Bridge to enslave the interface to, if any.
    pub bridge: Option<String>,
}

/// A veth pair between two namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// One end.
    pub a: End,
    /// The other end.
    pub b: End,
    /// Bandwidth limit in Mbit/s, applied at both ends outside a delay hop.
    pub rate_mbit: Option<u32>,
}

/// Where a host is and how to reach it; kept in the lab's registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAddrs {
    /// Host name.
    pub name: String,
    /// Its site.
    pub site: String,
    /// Its namespace (without prefix).
    pub ns: String,
    /// Its LAN address.
    pub lan: Ipv4Addr,
    /// Its public address, for multi-homed hosts.
    pub public: Option<Ipv4Addr>,
    /// The site gateway's public address (a NAT's external address); for a
    /// site behind another NAT, the outer NAT's, which the internet sees.
    pub gateway: Ipv4Addr,
    /// For a site behind another NAT: its own gateway's address on the
    /// outer site's LAN (the first translation).
    #[serde(default)]
    pub inner_gateway: Option<Ipv4Addr>,
    /// Whether it has a route out of its LAN.
    pub routed: bool,
    /// Whether it runs an OpenSSH server.
    #[serde(default)]
    pub sshd: bool,
    /// Whether it has its IPv4 address (`lan`); false: IPv6 only.
    #[serde(default = "crate::topology::yes")]
    pub ipv4: bool,
    /// Its IPv6 address, at a site with IPv6.
    #[serde(default)]
    pub lan6: Option<Ipv6Addr>,
}

impl HostAddrs {
    /// Every address of the host, public first.
    pub fn addrs(&self) -> Vec<Ipv4Addr> {
        self.public.into_iter().chain([self.lan]).collect()
    }
}

/// Everything `apply` needs to build a lab.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Namespaces, routers first.
    pub namespaces: Vec<Namespace>,
    /// veth links.
    pub links: Vec<Link>,
    /// The hosts, in topology order.
    pub hosts: Vec<HostAddrs>,
    /// Observers: hosts on the internet itself, outside every site, that
    /// `verify` uses to see mappings and filtering from outside.
    pub observers: Vec<HostAddrs>,
    /// Link-delay hops to start (see `hop`).
    pub hops: Vec<HopPlan>,
}

/// A userspace delay hop in its own namespace, relaying between TAP devices
/// `t0` (bridged with `x0` in `b0`) and `t1` (bridged with `x1` in `b1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopPlan {
    /// Namespace name (without prefix).
    pub ns: String,
    /// One-way delay in milliseconds, each direction.
    pub delay_ms: u32,
    /// Frames lost per million, each direction.
    pub loss_ppm: u32,
    /// Largest extra delay per frame, in milliseconds.
    pub jitter_ms: u32,
    /// Seeds the loss and jitter draws (from the site's name and the link).
    pub seed: u64,
    /// The userspace NAT the hop runs, for a NAT site whose behaviour the
    /// kernel cannot produce. Frames from the `t1` side (the gateway) are
    /// outbound.
    pub nat: Option<HopNat>,
}

/// The userspace NAT of a hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HopNat {
    /// The NAT's external address (the gateway's WAN address).
    pub external: Ipv4Addr,
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Port allocation.
    pub allocation: Allocation,
    /// Whether inside hosts reach each other through their mappings.
    pub hairpin: bool,
    /// Seconds an idle UDP mapping lives (None: the lab's life).
    pub udp_timeout_s: Option<u32>,
    /// Seconds an idle TCP mapping lives (None: the lab's life).
    pub tcp_timeout_s: Option<u32>,
}

/// Adds a link between the internet end and `end`, through a hop when the site
/// has a delay or `nat` is given: the link is split by a namespace whose hop
/// process relays frames between two bridges (delaying and translating them).
fn internet_link(
    out: &mut Plan,
    extra: &mut Vec<Namespace>,
    inet: End,
    end: End,
    site: &Site,
    nat: Option<HopNat>,
) {
    let rate_mbit = site.rate_mbit;
    let impaired =
        site.delay_ms.is_some() || site.loss_percent.is_some() || site.jitter_ms.is_some();
    if !impaired && nat.is_none() {
        out.links.push(Link {
            a: inet,
            b: end,
            rate_mbit,
        });
        return;
    }
    let name = format!("d{}", out.hops.len());
    let mut d = ns_with(name.clone(), false);
    d.bridges = vec!["b0".into(), "b1".into()];
    let side = |ifname: &str, bridge: &str| End {
        ns: name.clone(),
        ifname: ifname.into(),
        bridge: Some(bridge.into()),
    };
    out.links.push(Link {
        a: inet,
        b: side("x0", "b0"),
        rate_mbit,
    });
    out.links.push(Link {
        a: side("x1", "b1"),
        b: end,
        rate_mbit,
    });
    // FNV-1a of the site's name, then the link: the same lab draws the same.
    let seed = site.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) ^ out.hops.len() as u64;
    out.hops.push(HopPlan {
        ns: name,
        delay_ms: site.delay_ms.unwrap_or(0),
        loss_ppm: site
            .loss_percent
            .map_or(0, |l| (l * 10_000.0).round() as u32),
        jitter_ms: site.jitter_ms.unwrap_or(0),
        seed,
        nat,
    });
    extra.push(d);
}

/// A NAT site that other sites may sit behind (`behind`).
struct Outer {
    lan: Lan,
    hosts: u32,
    /// Inner sites placed on its LAN so far.
    inner: u32,
    gw_ns: String,
    /// The address the internet sees its traffic from.
    seen_as: Ipv4Addr,
}

/// Addresses of the observers on the internet.
pub const OBSERVERS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 250),
    Ipv4Addr::new(203, 0, 113, 251),
];

fn ns_with(name: String, forward: bool) -> Namespace {
    Namespace {
        name,
        forward,
        ..Namespace::default()
    }
}

/// Plans a validated topology.
pub fn plan(t: &Topology) -> Result<Plan, TopologyError> {
    t.validate()?;
    let mut inet = ns_with("inet".into(), true);
    inet.bridges.push("br0".into());
    inet.addrs
        .push(("br0".into(), INTERNET_ROUTER, INTERNET_LEN));
    let mut out = Plan::default();
    let mut inet_ports = 0u32;
    let mut public_hosts = 0u32;
    let mut public_lans = 0u32;
    let inet_end = |ports: &mut u32| {
        let e = End {
            ns: "inet".into(),
            ifname: format!("p{ports}"),
            bridge: Some("br0".into()),
        };
        *ports += 1;
        e
    };
    let mut site_namespaces = Vec::new();
    // NAT sites other sites sit behind, by name.
    let mut outer_sites: std::collections::HashMap<&str, Outer> = Default::default();
    for (i, site) in t.sites.iter().enumerate() {
        let mut wan = public_addr(FIRST_GATEWAY + i as u32, FIRST_PUBLIC_HOST, "sites")?;
        let (mut wan_len, mut upstream, mut seen_as) = (INTERNET_LEN, INTERNET_ROUTER, wan);
        let mut wan_side = None;
        if let Some((p, o)) = site
            .behind
            .as_deref()
            .and_then(|p| Some((p, outer_sites.get_mut(p)?)))
        {
            // On the outer site's LAN, after its hosts and earlier inner
            // sites; the internet sees the outer gateway's address.
            let k = o.hosts + o.inner;
            if o.lan.capacity() < k + 2 {
                return Err(TopologyError::LanTooSmall(p.to_string()));
            }
            wan = o.lan.addr(2 + k);
            (wan_len, upstream, seen_as) = (o.lan.len, o.lan.addr(1), o.seen_as);
            wan_side = Some(End {
                ns: o.gw_ns.clone(),
                ifname: format!("n{}", o.inner),
                bridge: Some("br0".into()),
            });
            o.inner += 1;
        }
        let lan = match (site.gateway, site.lan) {
            // A given LAN is private (validated); the internet has no route to it.
            (_, Some(lan)) => lan,
            (GatewayKind::Nat, None) => Lan {
                net: Ipv4Addr::new(10, (i + 1).min(255) as u8, 0, 0),
                len: 24,
            },
            (GatewayKind::Open | GatewayKind::Firewall, None) => {
                public_lans += 1;
                if public_lans > 15 {
                    return Err(TopologyError::TooMany("open or firewalled sites"));
                }
                let lan = Lan {
                    net: Ipv4Addr::new(198, 51, 100, (16 * public_lans) as u8),
                    len: 28,
                };
                inet.routes.push(Route {
                    dest: Some(lan),
                    via: wan,
                });
                lan
            }
        };
        if lan.capacity() < site.hosts.len() as u32 + 1 {
            return Err(TopologyError::LanTooSmall(site.name.clone()));
        }
        let mut gw = ns_with(format!("gw-{}", site.name), true);
        gw.bridges.push("br0".into());
        gw.addrs.push(("wan".into(), wan, wan_len));
        gw.addrs.push(("br0".into(), lan.addr(1), lan.len));
        gw.routes.push(Route {
            dest: None,
            via: upstream,
        });
        let site_net = i as u16 + 1;
        if site.ipv6 {
            let wan6 = v6(0, 0x10 + i as u16);
            gw.addrs6.push(("wan".into(), wan6, 64));
            gw.addrs6.push(("br0".into(), v6(site_net, 1), 64));
            gw.routes6.push((None, INTERNET6_ROUTER));
            inet.routes6.push((Some((v6(site_net, 0), 64)), wan6));
        }
        if site.gateway == GatewayKind::Nat {
            outer_sites.insert(
                &site.name,
                Outer {
                    lan,
                    hosts: site.hosts.len() as u32,
                    inner: 0,
                    gw_ns: gw.name.clone(),
                    seen_as,
                },
            );
        }
        let wan_end = End {
            ns: gw.name.clone(),
            ifname: "wan".into(),
            bridge: None,
        };
        let inet_side = match wan_side {
            Some(end) => end,
            None => inet_end(&mut inet_ports),
        };
        internet_link(
            &mut out,
            &mut site_namespaces,
            inet_side,
            wan_end,
            site,
            site.userspace_nat().then_some(HopNat {
                external: wan,
                mapping: site.mapping,
                filtering: site.filtering,
                allocation: site.allocation(),
                hairpin: site.hairpin,
                udp_timeout_s: site.udp_timeout_s,
                tcp_timeout_s: site.tcp_timeout_s,
            }),
        );
        let mut non_routed = Vec::new();
        let mut hosts = Vec::new();
        for (j, host) in site.hosts.iter().enumerate() {
            let lan_ip = lan.addr(2 + j as u32);
            let mut h = ns_with(format!("h-{}", host.name), false);
            if host.ipv4 {
                h.addrs.push(("lan".into(), lan_ip, lan.len));
            }
            let lan6 = site.ipv6.then(|| v6(site_net, 2 + j as u16));
            if let Some(a) = lan6 {
                h.addrs6.push(("lan".into(), a, 64));
                if host.routed {
                    h.routes6.push((None, v6(site_net, 1)));
                }
            }
            out.links.push(Link {
                a: End {
                    ns: gw.name.clone(),
                    ifname: format!("l{j}"),
                    bridge: Some("br0".into()),
                },
                b: End {
                    ns: h.name.clone(),
                    ifname: "lan".into(),
                    bridge: None,
                },
                rate_mbit: None,
            });
            let public = if host.multi_homed {
                let ip = public_addr(FIRST_PUBLIC_HOST + public_hosts, 255, "multi-homed hosts")?;
                public_hosts += 1;
                h.addrs.push(("pub".into(), ip, INTERNET_LEN));
                let pub_end = End {
                    ns: h.name.clone(),
                    ifname: "pub".into(),
                    bridge: None,
                };
                let inet_side = inet_end(&mut inet_ports);
                internet_link(
                    &mut out,
                    &mut site_namespaces,
                    inet_side,
                    pub_end,
                    site,
                    None,
                );
                h.routes.push(Route {
                    dest: None,
                    via: INTERNET_ROUTER,
                });
                Some(ip)
            } else {
                if host.routed && host.ipv4 {
                    h.routes.push(Route {
                        dest: None,
                        via: lan.addr(1),
                    });
                }
                None
            };
            if !host.routed {
                non_routed.push(lan_ip);
            }
            h.nft = host_rules(site, host);
            out.hosts.push(HostAddrs {
                name: host.name.clone(),
                site: site.name.clone(),
                ns: h.name.clone(),
                lan: lan_ip,
                public,
                gateway: seen_as,
                inner_gateway: site.behind.is_some().then_some(wan),
                routed: host.routed,
                sshd: host.sshd,
                ipv4: host.ipv4,
                lan6,
            });
            hosts.push(h);
        }
        let forwards: Vec<(u16, Ipv4Addr, u16)> = site
            .forward
            .iter()
            .filter_map(|f| {
                let j = site.hosts.iter().position(|h| h.name == f.to)?;
                Some((f.port, lan.addr(2 + j as u32), f.to_port.unwrap_or(f.port)))
            })
            .collect();
        gw.nft = gateway_rules(site, &non_routed, &forwards);
        if !site.userspace_nat() {
            gw.conntrack = conntrack_timeouts(site);
        }
        if site.hairpin {
            // Hairpinning: traffic from the LAN to the external address must
            // reach the hop instead of this gateway's own stack. A policy rule
            // ahead of the local table sends it out of the WAN link (the local
            // table moves behind it), and accept_local admits the hairpinned
            // packets that return with the external address as their source.
            gw.sysctls.push("net.ipv4.conf.all.accept_local=1".into());
            gw.sysctls
                .push("net.ipv4.conf.default.accept_local=1".into());
            gw.ip_extra.extend([
                format!("route add {wan}/32 via {INTERNET_ROUTER} dev wan table 100"),
                format!("rule add pref 10 iif br0 to {wan}/32 lookup 100"),
                "rule add pref 20 lookup local".to_string(),
                "rule del pref 0 lookup local".to_string(),
            ]);
        }
        site_namespaces.push(gw);
        site_namespaces.extend(hosts);
    }
    for (i, ip) in OBSERVERS.iter().enumerate() {
        let name = format!("obs{}", i + 1);
        let mut o = ns_with(format!("o-{name}"), false);
        o.addrs.push(("pub".into(), *ip, INTERNET_LEN));
        // Observers have IPv6 when any site does.
        let obs6 = t
            .sites
            .iter()
            .any(|s| s.ipv6)
            .then(|| v6(0, 0xfa + i as u16));
        if let Some(a) = obs6 {
            o.addrs6.push(("pub".into(), a, 64));
            o.routes6.push((None, INTERNET6_ROUTER));
        }
        o.routes.push(Route {
            dest: None,
            via: INTERNET_ROUTER,
        });
        out.links.push(Link {
            a: inet_end(&mut inet_ports),
            b: End {
                ns: o.name.clone(),
                ifname: "pub".into(),
                bridge: None,
            },
            rate_mbit: None,
        });
        out.observers.push(HostAddrs {
            name,
            site: "internet".into(),
            ns: o.name.clone(),
            lan: *ip,
            public: Some(*ip),
            gateway: *ip,
            inner_gateway: None,
            routed: true,
            sshd: false,
            ipv4: true,
            lan6: obs6,
        });
        site_namespaces.push(o);
    }
    if t.sites.iter().any(|s| s.ipv6) {
        inet.addrs6.push(("br0".into(), INTERNET6_ROUTER, 64));
    }
    out.namespaces.push(inet);
    out.namespaces.extend(site_namespaces);
    Ok(out)
}

fn public_addr(n: u32, limit: u32, what: &'static str) -> Result<Ipv4Addr, TopologyError> {
    if n >= limit {
        return Err(TopologyError::TooMany(what));
    }
    Ok(Ipv4Addr::new(203, 0, 113, n as u8))
}

fn port_set(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("{{ {} }}", list.join(", "))
}

/// Rules that refuse what `matcher` selects, by dropping or rejecting.
fn deny(matcher: &str, how: Inbound) -> String {
    match how {
        Inbound::Drop => format!("        {matcher} drop\n"),
        Inbound::Reject => format!(
            "        {matcher} meta l4proto tcp reject with tcp reset\n        {matcher} reject with icmpx type admin-prohibited\n"
        ),
    }
}

/// The filter lines of a stateful firewall between `inside` and `outside`
/// interface matchers.
fn firewall_lines(site: &Site, from_out: &str, to_out: &str) -> String {
    let mut r = String::from("        ct state established,related accept\n");
    r += &udp_out_lines(site, to_out);
    if !site.allow_in.is_empty() {
        r += &format!(
            "        {from_out} tcp dport {} accept\n",
            port_set(&site.allow_in)
        );
    }
    r += &deny(from_out, site.inbound);
    if let Some(out_ports) = &site.allow_out {
        if !out_ports.is_empty() {
            r += &format!(
                "        {to_out} tcp dport {} accept\n",
                port_set(out_ports)
            );
        }
        r += &deny(to_out, site.inbound);
    }
    r
}

/// Outbound UDP limits (`udp_out`): datagrams only to the listed ports;
/// the rest is dropped silently, as blocking firewalls do.
fn udp_out_lines(site: &Site, to_out: &str) -> String {
    match &site.udp_out {
        None => String::new(),
        Some(ports) if ports.is_empty() => format!("        {to_out} meta l4proto udp drop\n"),
        Some(ports) => format!(
            "        {to_out} udp dport {} accept\n        {to_out} meta l4proto udp drop\n",
            port_set(ports)
        ),
    }
}

/// Outbound limits at a NAT: only `udp_out` ports for UDP, and only
/// `allow_out` ports may open new connections.
fn nat_outbound_lines(site: &Site) -> String {
    udp_out_lines(site, "oifname \"wan\"") + &nat_tcp_outbound_lines(site)
}

fn nat_tcp_outbound_lines(site: &Site) -> String {
    match &site.allow_out {
        None => String::new(),
        Some(ports) if ports.is_empty() => "        oifname \"wan\" drop\n".into(),
        Some(ports) => format!(
            "        oifname \"wan\" tcp dport {} accept\n        oifname \"wan\" drop\n",
            port_set(ports)
        ),
    }
}

fn gateway_rules(
    site: &Site,
    non_routed: &[Ipv4Addr],
    forwards: &[(u16, Ipv4Addr, u16)],
) -> Option<String> {
    let block_non_routed = if non_routed.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = non_routed.iter().map(Ipv4Addr::to_string).collect();
        format!(
            "        oifname \"wan\" ip saddr {{ {} }} drop\n",
            list.join(", ")
        )
    };
    // LAN-to-LAN traffic is bridged, not routed, but where br_netfilter is
    // loaded (Docker loads it) it still passes this hook: let it through first.
    let head = "table inet lab {\n    chain forward {\n        type filter hook forward priority 0; policy accept;\n        iifname != \"wan\" oifname != \"wan\" accept\n";
    match site.gateway {
        GatewayKind::Open => {
            (!non_routed.is_empty()).then(|| format!("{head}{block_non_routed}    }}\n}}\n"))
        }
        GatewayKind::Firewall => Some(format!(
            "{head}{block_non_routed}{}    }}\n}}\n",
            firewall_lines(site, "iifname \"wan\"", "oifname \"wan\"")
        )),
        // The hop on the WAN link translates and filters IPv4; the gateway
        // only routes, keeps non-routed hosts in, applies outbound limits
        // and filters IPv6 (which no NAT translates) as a stateful firewall.
        GatewayKind::Nat if site.userspace_nat() => Some(format!(
            "{head}        ct state established,related accept\n{block_non_routed}{}{}    }}\n    chain input {{\n        type filter hook input priority 0; policy accept;\n        iifname \"wan\" ct state new drop\n    }}\n}}\n",
            nat_outbound_lines(site),
            if site.ipv6 {
                "        iifname \"wan\" meta nfproto ipv6 drop\n"
            } else {
                ""
            }
        )),
        GatewayKind::Nat => {
            let how = match site.mapping {
                Mapping::AddressAndPortDependent => " fully-random",
                _ => "",
            };
            let (accept_forwarded, dnat) = if forwards.is_empty() {
                // A port-mapping daemon's DNATs (its own table) get through.
                let accept = if site.port_mapping {
                    "        iifname \"wan\" ct status dnat accept\n".to_string()
                } else {
                    String::new()
                };
                (accept, String::new())
            } else {
                let rules: String = forwards
                    .iter()
                    .map(|(port, ip, to)| {
                        format!("        iifname \"wan\" tcp dport {port} dnat to {ip}:{to}\n")
                    })
                    .collect();
                (
                    "        iifname \"wan\" ct status dnat accept\n".to_string(),
                    format!("    chain prerouting {{\n        type nat hook prerouting priority -100; policy accept;\n{rules}    }}\n"),
                )
            };
            // A packet of a connection the NAT forgot (its timeout) is
            // invalid once conntrack no longer picks connections up.
            let forgotten = if site.tcp_timeout_s.is_some() {
                "        ct state invalid drop\n"
            } else {
                ""
            };
            Some(format!(
                "{head}{forgotten}        ct state established,related accept\n{block_non_routed}{accept_forwarded}{}        iifname \"wan\" drop\n    }}\n    chain input {{\n        type filter hook input priority 0; policy accept;\n        iifname \"wan\" ct state new drop\n    }}\n}}\ntable ip labnat {{\n{dnat}    chain postrouting {{\n        type nat hook postrouting priority 100; policy accept;\n        oifname \"wan\" masquerade{how}\n    }}\n}}\n",
                nat_outbound_lines(site)
            ))
        }
    }
}

/// The kernel NAT's timeouts a site declares. A TCP timeout also stops
/// conntrack from picking up a connection it forgot from its next packet
/// (`nf_conntrack_tcp_loose`, on by default), and the gateway drops such
/// packets (`ct state invalid`): a router that forgot a mapping does not
/// bring the connection back.
fn conntrack_timeouts(site: &Site) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = site.udp_timeout_s {
        out.push(format!("net.netfilter.nf_conntrack_udp_timeout={t}"));
        out.push(format!("net.netfilter.nf_conntrack_udp_timeout_stream={t}"));
    }
    if let Some(t) = site.tcp_timeout_s {
        out.push(format!(
            "net.netfilter.nf_conntrack_tcp_timeout_established={t}"
        ));
        out.push("net.netfilter.nf_conntrack_tcp_loose=0".into());
    }
    out
}

/// A multi-homed host of a firewalled site filters its own public interface.
fn host_rules(site: &Site, host: &Host) -> Option<String> {
    if !(host.multi_homed && site.gateway == GatewayKind::Firewall) {
        return None;
    }
    let lines = firewall_lines(site, "iifname \"pub\"", "oifname \"pub\"");
    let (inbound, outbound) = match lines.find("oifname") {
        Some(at) => {
            let start = lines[..at].rfind('\n').map_or(0, |n| n + 1);
            (lines[..start].to_string(), lines[start..].to_string())
        }
        None => (lines, String::new()),
    };
    let mut r = format!(
        "table inet lab {{\n    chain input {{\n        type filter hook input priority 0; policy accept;\n{inbound}    }}\n"
    );
    if !outbound.is_empty() {
        r += &format!(
            "    chain output {{\n        type filter hook output priority 0; policy accept;\n        ct state established,related accept\n{outbound}    }}\n"
        );
    }
    r += "}\n";
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(text: &str) -> Topology {
        Topology::from_toml(text).expect("valid topology")
    }

    const MIXED: &str = r#"
        name = "t"
        [[site]]
        name = "pub"
        gateway = "open"
        [[site.host]]
        name = "web"
        [[site]]
        name = "uni"
        gateway = "firewall"
        inbound = "reject"
        allow_in = [22]
        allow_out = [22, 443]
        [[site.host]]
        name = "fe"
        multi_homed = true
        [[site.host]]
        name = "node"
        routed = false
        [[site]]
        name = "home"
        gateway = "nat"
        mapping = "address-and-port-dependent"
        [[site.host]]
        name = "laptop"
    "#;

    #[test]
    fn addresses_come_from_documentation_and_private_ranges() {
        let p = plan(&topo(MIXED)).expect("plan");
        let by = |n: &str| p.hosts.iter().find(|h| h.name == n).expect("host").clone();
        assert_eq!(by("web").lan, Ipv4Addr::new(198, 51, 100, 18));
        assert_eq!(by("fe").public, Some(Ipv4Addr::new(203, 0, 113, 100)));
        assert_eq!(by("fe").lan, Ipv4Addr::new(198, 51, 100, 34));
        assert_eq!(by("laptop").lan, Ipv4Addr::new(10, 3, 0, 2));
        assert_eq!(by("laptop").gateway, Ipv4Addr::new(203, 0, 113, 12));
        assert!(!by("node").routed);
        for ns in &p.namespaces {
            for (_, ip, _) in &ns.addrs {
                let o = ip.octets();
                let doc = matches!(
                    (o[0], o[1], o[2]),
                    (192, 0, 2) | (198, 51, 100) | (203, 0, 113)
                );
                assert!(doc || ip.is_private(), "{ip} in {}", ns.name);
            }
        }
    }

    #[test]
    fn routes_make_public_lans_reachable_and_non_routed_hosts_stay_inside() {
        let p = plan(&topo(MIXED)).expect("plan");
        let ns = |n: &str| {
            p.namespaces
                .iter()
                .find(|x| x.name == n)
                .expect("ns")
                .clone()
        };
        assert_eq!(ns("inet").routes.len(), 2, "one route per public LAN");
        assert!(ns("h-node").routes.is_empty(), "non-routed: no route out");
        assert_eq!(
            ns("h-fe").routes[0].via,
            INTERNET_ROUTER,
            "front-ends route publicly"
        );
        assert_eq!(ns("h-laptop").routes[0].via, Ipv4Addr::new(10, 3, 0, 1));
        let gw = ns("gw-uni").nft.unwrap_or_default();
        assert!(gw.contains("oifname \"wan\" ip saddr { 198.51.100.35 } drop"));
        assert!(
            gw.contains("iifname != \"wan\" oifname != \"wan\" accept"),
            "LAN traffic passes"
        );
    }

    #[test]
    fn rulesets_match_the_declared_behaviour() {
        let p = plan(&topo(MIXED)).expect("plan");
        let nft = |n: &str| {
            p.namespaces
                .iter()
                .find(|x| x.name == n)
                .and_then(|x| x.nft.clone())
        };
        assert_eq!(nft("gw-pub"), None);
        let uni = nft("gw-uni").expect("firewall rules");
        assert!(uni.contains("iifname \"wan\" tcp dport { 22 } accept"));
        assert!(uni.contains("iifname \"wan\" meta l4proto tcp reject with tcp reset"));
        assert!(uni.contains("oifname \"wan\" tcp dport { 22, 443 } accept"));
        let fe = nft("h-fe").expect("host firewall");
        assert!(fe.contains("chain input") && fe.contains("chain output"));
        assert!(fe.contains("iifname \"pub\" tcp dport { 22 } accept"));
        assert!(nft("gw-home")
            .expect("nat")
            .contains("masquerade fully-random"));
    }

    #[test]
    fn nat_port_forwards_and_outbound_limits() {
        let text = r#"
            name = "h"
            [[site]]
            name = "hiroshi"
            gateway = "nat"
            allow_out = []
            forward = [{ port = 22, to = "fe" }]
            [[site.host]]
            name = "fe"
            sshd = true
        "#;
        let p = plan(&topo(text)).expect("plan");
        let gw = p
            .namespaces
            .iter()
            .find(|n| n.name == "gw-hiroshi")
            .and_then(|n| n.nft.clone())
            .expect("rules");
        assert!(
            gw.contains("iifname \"wan\" tcp dport 22 dnat to 10.1.0.2:22"),
            "{gw}"
        );
        assert!(gw.contains("iifname \"wan\" ct status dnat accept"));
        assert!(gw.contains("oifname \"wan\" drop"), "no outbound at all");
        assert!(p.hosts[0].sshd);
    }

    #[test]
    fn private_lans_at_open_sites_are_not_routed_from_the_internet() {
        let text = r#"
            name = "d"
            [[site]]
            name = "das3"
            gateway = "open"
            lan = "10.0.0.0/24"
            [[site.host]]
            name = "fe"
            multi_homed = true
        "#;
        let p = plan(&topo(text)).expect("plan");
        assert!(
            p.namespaces[0].routes.is_empty(),
            "no internet route to a private LAN"
        );
        assert_eq!(p.hosts[0].lan, Ipv4Addr::new(10, 0, 0, 2));
    }

    #[test]
    fn delayed_sites_get_a_hop_on_each_internet_link() {
        let text = r#"
            name = "d"
            [[site]]
            name = "far"
            gateway = "nat"
            delay_ms = 40
            [[site.host]]
            name = "h"
            [[site]]
            name = "near"
            gateway = "open"
            [[site.host]]
            name = "fe"
            multi_homed = true
        "#;
        let p = plan(&topo(text)).expect("plan");
        assert_eq!(p.hops.len(), 1);
        assert_eq!(
            p.hops[0],
            HopPlan {
                ns: "d0".into(),
                delay_ms: 40,
                loss_ppm: 0,
                jitter_ms: 0,
                seed: p.hops[0].seed,
                nat: None,
            }
        );
        let d0: Vec<&Link> = p
            .links
            .iter()
            .filter(|l| l.a.ns == "d0" || l.b.ns == "d0")
            .collect();
        assert_eq!(d0.len(), 2, "the gateway's WAN link is split by the hop");
        assert!(d0.iter().any(|l| l.a.ns == "inet" && l.b.ifname == "x0"));
        assert!(d0
            .iter()
            .any(|l| l.a.ifname == "x1" && l.b.ns == "gw-far" && l.b.ifname == "wan"));
        assert!(p
            .namespaces
            .iter()
            .any(|n| n.name == "d0" && n.bridges.len() == 2));
    }

    #[test]
    fn a_lossy_site_gets_a_hop_with_its_loss_and_jitter_on_each_internet_link() {
        let text = r#"
            name = "l"
            [[site]]
            name = "lossy"
            gateway = "open"
            loss_percent = 1.5
            jitter_ms = 3
            [[site.host]]
            name = "fe"
            multi_homed = true
            [[site]]
            name = "other"
            gateway = "open"
            loss_percent = 1.5
            [[site.host]]
            name = "o"
        "#;
        let p = plan(&topo(text)).expect("plan");
        // The gateway's link and the front-end's own public link; then the
        // other site's gateway link.
        assert_eq!(p.hops.len(), 3, "{:?}", p.hops);
        for h in &p.hops[..2] {
            assert_eq!((h.delay_ms, h.loss_ppm, h.jitter_ms), (0, 15_000, 3));
        }
        assert_eq!(p.hops[2].jitter_ms, 0);
        let seeds: std::collections::HashSet<u64> = p.hops.iter().map(|h| h.seed).collect();
        assert_eq!(seeds.len(), 3, "each link draws its own losses");
        assert_eq!(
            plan(&topo(text)).expect("plan").hops,
            p.hops,
            "and the same each time"
        );
        for (bad, field) in [
            ("loss_percent = 0.0", "loss_percent"),
            ("loss_percent = 60.0", "loss_percent"),
            ("loss_percent = nan", "loss_percent"),
            ("jitter_ms = 0", "jitter_ms"),
        ] {
            let text = format!(
                "name = \"x\"\n[[site]]\nname = \"s\"\ngateway = \"open\"\n{bad}\n[[site.host]]\nname = \"h\"\n"
            );
            let err = Topology::from_toml(&text).expect_err(bad).to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn a_site_behind_a_carrier_nat_sits_on_its_lan_and_is_seen_as_it() {
        let text = r#"
            name = "cgn"
            [[site]]
            name = "carrier"
            gateway = "nat"
            lan = "100.64.0.0/24"
            [[site.host]]
            name = "box"
            [[site]]
            name = "home"
            gateway = "nat"
            behind = "carrier"
            [[site.host]]
            name = "tablet"
        "#;
        let p = plan(&topo(text)).expect("plan");
        let by = |n: &str| p.hosts.iter().find(|h| h.name == n).expect("host");
        let (outer, inner) = (by("box"), by("tablet"));
        // The home gateway takes the carrier LAN's next address after its host.
        let wan = Ipv4Addr::new(100, 64, 0, 3);
        assert_eq!(inner.inner_gateway, Some(wan));
        assert_eq!(
            inner.gateway, outer.gateway,
            "the internet sees the carrier"
        );
        let gw = p
            .namespaces
            .iter()
            .find(|n| n.name == "gw-home")
            .expect("home gateway");
        assert!(
            gw.addrs.contains(&("wan".into(), wan, 24)),
            "{:?}",
            gw.addrs
        );
        assert_eq!(gw.routes[0].via, Ipv4Addr::new(100, 64, 0, 1));
        assert!(p.links.iter().any(|l| l.a.ns == "gw-carrier"
            && l.a.bridge.as_deref() == Some("br0")
            && l.b.ns == "gw-home"
            && l.b.ifname == "wan"));
        // Only behind an earlier NAT that the kernel runs, one level.
        for (outer_fields, behind, inner_gateway) in [
            ("", "nowhere", "nat"),
            ("", "carrier", "firewall"),
            ("filtering = \"endpoint-independent\"", "carrier", "nat"),
        ] {
            let text = format!(
                "name = \"x\"\n[[site]]\nname = \"carrier\"\ngateway = \"nat\"\n{outer_fields}\n[[site.host]]\nname = \"a\"\n[[site]]\nname = \"home\"\ngateway = \"{inner_gateway}\"\nbehind = \"{behind}\"\n[[site.host]]\nname = \"b\"\n"
            );
            let err = Topology::from_toml(&text).expect_err(&text).to_string();
            assert!(err.contains("behind"), "{err}");
        }
    }

    #[test]
    fn ipv6_sites_get_documentation_prefixes_routed_from_the_internet() {
        let text = r#"
            name = "six"
            [[site]]
            name = "v4"
            gateway = "nat"
            [[site.host]]
            name = "old"
            [[site]]
            name = "home"
            gateway = "nat"
            ipv6 = true
            [[site.host]]
            name = "dual"
            [[site.host]]
            name = "only"
            ipv4 = false
        "#;
        let p = plan(&topo(text)).expect("plan");
        let ns = |n: &str| p.namespaces.iter().find(|x| x.name == n).expect(n);
        let host = |n: &str| p.hosts.iter().find(|h| h.name == n).expect(n);
        // Site 2's LAN is 2001:db8:2::/64 behind its gateway's 2001:db8::11.
        assert_eq!(host("dual").lan6, Some(v6(2, 2)));
        assert_eq!(host("only").lan6, Some(v6(2, 3)));
        assert!(!host("only").ipv4 && host("dual").ipv4);
        assert_eq!(host("old").lan6, None);
        let on = |n: &str| !ns(n).addrs6.is_empty();
        assert!(on("inet") && on("gw-home") && !on("gw-v4") && !on("h-old"));
        assert!(ns("inet")
            .routes6
            .contains(&(Some((v6(2, 0), 64)), v6(0, 0x11))));
        assert_eq!(ns("gw-home").routes6, vec![(None, INTERNET6_ROUTER)]);
        assert!(
            ns("h-only").addrs.is_empty() && ns("h-only").routes.is_empty(),
            "no IPv4"
        );
        assert_eq!(ns("h-only").routes6, vec![(None, v6(2, 1))]);
        // Observers answer on IPv6 too.
        assert!(p.observers.iter().all(|o| o.lan6.is_some()));
        // IPv6 only needs an IPv6 site.
        let bad = "name = \"x\"\n[[site]]\nname = \"s\"\ngateway = \"open\"\n[[site.host]]\nname = \"h\"\nipv4 = false\n";
        let err = Topology::from_toml(bad)
            .expect_err("v6-only at a v4 site")
            .to_string();
        assert!(err.contains("ipv4 = false"), "{err}");
    }

    #[test]
    fn udp_out_limits_datagrams_at_firewalls_and_nats() {
        let text = r#"
            name = "u"
            [[site]]
            name = "campus"
            gateway = "firewall"
            udp_out = [53]
            [[site.host]]
            name = "pc"
            [[site]]
            name = "cafe"
            gateway = "nat"
            allow_out = [443]
            udp_out = []
            [[site.host]]
            name = "guest"
        "#;
        let p = plan(&topo(text)).expect("plan");
        let rules = |ns: &str| {
            p.namespaces
                .iter()
                .find(|n| n.name == ns)
                .and_then(|n| n.nft.clone())
                .expect("rules")
        };
        let campus = rules("gw-campus");
        assert!(
            campus.contains("oifname \"wan\" udp dport { 53 } accept"),
            "{campus}"
        );
        assert!(
            campus.contains("oifname \"wan\" meta l4proto udp drop"),
            "{campus}"
        );
        let cafe = rules("gw-cafe");
        assert!(!cafe.contains("udp dport"), "{cafe}");
        assert!(
            cafe.contains("oifname \"wan\" meta l4proto udp drop"),
            "{cafe}"
        );
        assert!(cafe.contains("tcp dport { 443 } accept"), "{cafe}");
        let open = "name = \"o\"\n[[site]]\nname = \"s\"\ngateway = \"open\"\nudp_out = []\n[[site.host]]\nname = \"h\"\n";
        assert!(
            Topology::from_toml(open).is_err(),
            "an open site filters nothing"
        );
    }

    #[test]
    fn a_userspace_nat_site_gets_a_translating_hop_and_no_kernel_nat() {
        let text = r#"
            name = "u"
            [[site]]
            name = "cone"
            gateway = "nat"
            filtering = "endpoint-independent"
            [[site.host]]
            name = "h"
        "#;
        let p = plan(&topo(text)).expect("plan");
        let nat = p.hops[0].nat.expect("a NAT hop");
        assert_eq!(nat.external, p.hosts[0].gateway);
        assert_eq!(nat.filtering, Filtering::EndpointIndependent);
        assert_eq!(p.hops[0].delay_ms, 0);
        let gw = p
            .namespaces
            .iter()
            .find(|n| n.name == "gw-cone")
            .and_then(|n| n.nft.clone())
            .expect("rules");
        assert!(
            !gw.contains("masquerade") && !gw.contains("iifname \"wan\" drop"),
            "{gw}"
        );
    }

    #[test]
    fn overlapping_private_lans_are_allowed() {
        let text = r#"
            name = "o"
            [[site]]
            name = "a"
            gateway = "nat"
            lan = "10.0.0.0/24"
            [[site.host]]
            name = "a1"
            [[site]]
            name = "b"
            gateway = "nat"
            lan = "10.0.0.0/24"
            [[site.host]]
            name = "b1"
        "#;
        let p = plan(&topo(text)).expect("plan");
        assert_eq!(p.hosts[0].lan, p.hosts[1].lan);
        assert_ne!(p.hosts[0].gateway, p.hosts[1].gateway);
    }
}
