//! The hub's status report: what `reach status`, `/status` and `/metrics`
//! show. The core's snapshot ([`crate::core::HubCore::status`]) plus the
//! proxy ports the driver holds, with their live counters; this module
//! renders it as JSON and in the Prometheus text format.

use std::net::SocketAddr;

use reach_legacy::proxy::ProxyCounters;
use reach_proto::circuit::{CircuitCounters, PullCounters};

pub use crate::core::{HubLinkStatus, NodeStatus, RouteStatus};
use crate::core::{ProxyPort, Snapshot};

/// Attached nodes listed in a status report at most (the count is always there),
/// so the report fits in one frame.
pub const STATUS_MAX_NODES: usize = 100;

/// A proxy port in a status report.
#[derive(Clone, Debug)]
pub struct ExposureStatus {
    /// The port and what it serves.
    pub proxy: ProxyPort,
    /// Its client connections so far: `bytes_to_reach` came from clients,
    /// `bytes_from_reach` went to them.
    pub counters: ProxyCounters,
}

/// The hub's relay circuits now (`reach_proto::circuit`).
#[derive(Clone, Copy, Debug, Default)]
pub struct CircuitStatus {
    /// Halves waiting for their other half.
    pub waiting: usize,
    /// Circuits paired and relaying.
    pub active: usize,
    /// Paired, refused and expired so far.
    pub counters: CircuitCounters,
    /// Legs this hub asked the next hub to dial back with, and what came.
    pub pulls: PullCounters,
    /// Legs this hub dials back now for hubs that asked it to.
    pub dial_backs: usize,
    /// Dial-backs refused (too many under way).
    pub dial_backs_refused: u64,
}

/// A hub's state for `reach status`: the core's [`Snapshot`] (its fields
/// read through this, e.g. `status.nodes`) and the proxy ports the driver
/// holds.
#[derive(Clone, Debug)]
pub struct Status {
    /// What the core reports.
    pub core: Snapshot,
    /// Services published on this hub's proxy ports.
    pub exposures: Vec<ExposureStatus>,
    /// Relay circuits.
    pub circuits: CircuitStatus,
}

impl std::ops::Deref for Status {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.core
    }
}

impl Status {
    /// The core's snapshot with the proxy ports and circuits the driver
    /// holds.
    pub fn new(core: Snapshot, exposures: Vec<ExposureStatus>, circuits: CircuitStatus) -> Self {
        Self {
            core,
            exposures,
            circuits,
        }
    }

    /// The report as JSON, listing at most `max_nodes` attached nodes.
    pub fn to_json(&self, max_nodes: usize) -> serde_json::Value {
        use serde_json::json;
        let addrs = |a: &[SocketAddr]| a.iter().map(ToString::to_string).collect::<Vec<_>>();
        json!({
            "hub": self.hub.to_string(),
            "listen": addrs(&self.listen),
            "nodes_attached": self.nodes.len(),
            "nodes": self.nodes.iter().take(max_nodes).map(|n| json!({
                "node": n.node.to_string(),
                "observed": n.observed.to_string(),
                "addrs": addrs(&n.addrs),
                "streams": n.streams,
            })).collect::<Vec<_>>(),
            "hub_links": self.hubs.iter().map(|h| json!({
                "hub": h.hub.to_string(),
                "addr": h.addr.map(|a| a.to_string()),
                "dialled": h.dialled,
                "rtt_us": h.rtt.map(|r| r.as_micros() as u64),
            })).collect::<Vec<_>>(),
            // The overlay map (this hub first), for the dashboard: at most
            // `max_nodes` hubs, like the node list.
            "overlay": self.overlay.iter().take(max_nodes).map(|c| json!({
                "hub": c.hub.to_string(),
                "nodes": c.nodes,
                "reachable": c.reachable,
                "unlisted_links": c.unlisted,
                "links": c.links.iter().map(|l| json!({
                    "hub": l.hub.to_string(),
                    "dialled": l.dialled,
                    "rtt_us": (l.rtt_us > 0).then_some(l.rtt_us),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "routes": self.routes.iter().map(|r| json!({
                "hub": r.hub.to_string(),
                "next_hop": r.next_hop.to_string(),
                "hops": r.hops,
            })).collect::<Vec<_>>(),
            "remote_nodes": self.remote_nodes,
            "vpn_members": self.vpn_members.0,
            "remote_vpn_members": self.vpn_members.1,
            "streams": self.streams,
            "exposures": self.exposures.iter().map(|e| json!({
                "port": e.proxy.port,
                "node": e.proxy.node.to_string(),
                "vport": e.proxy.vport,
                "allow_from": e.proxy.allow_from.iter().map(|(ip, len)| format!("{ip}/{len}")).collect::<Vec<_>>(),
                "connections": e.counters.connections,
                "active": e.counters.active,
                "failed": e.counters.failed,
                "refused": e.counters.refused,
                "bytes_in": e.counters.bytes_to_reach,
                "bytes_out": e.counters.bytes_from_reach,
            })).collect::<Vec<_>>(),
            "circuits": {
                "waiting": self.circuits.waiting,
                "active": self.circuits.active,
                "paired": self.circuits.counters.paired,
                "refused": self.circuits.counters.refused,
                "expired": self.circuits.counters.expired,
                "extended": self.circuits.counters.extended,
                "pulls_asked": self.circuits.pulls.asked,
                "pulled": self.circuits.pulls.pulled,
                "pulls_refused": self.circuits.pulls.refused,
                "pulls_expired": self.circuits.pulls.expired,
                "dial_backs": self.circuits.dial_backs,
                "dial_backs_refused": self.circuits.dial_backs_refused,
            },
            "counters": {
                "streams_opened": self.counters.streams_opened,
                "streams_no_route": self.counters.streams_no_route,
                "bytes_relayed": self.counters.bytes_relayed,
                "refused": self.counters.refused,
                "connect_backs": self.counters.connect_backs,
                "relayed_messages": self.counters.relayed_messages,
                "locates_dropped": self.counters.locates_dropped,
                "directories_unindexed": self.counters.directories_unindexed,
                "streams_over_limit": self.counters.streams_over_limit,
                "directories_refused": self.counters.directories_refused,
                "links_unregistered_cut": self.counters.links_unregistered_cut,
                "gossip_forged": self.counters.gossip_forged,
                "vpn_lists_refused": self.counters.vpn_lists_refused,
                "vip_lookups": self.counters.vip_lookups,
                "cards_refused": self.counters.cards_refused,
                "filter_probes": self.counters.filter_probes,
                "filter_probes_declined": self.counters.filter_probes_declined,
            },
        })
    }

    /// The report in the Prometheus text exposition format.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!(
                "# HELP reach_hub_{name} {help}\n# TYPE reach_hub_{name} {kind}\nreach_hub_{name} {value}\n"
            ));
        };
        metric(
            "nodes_attached",
            "gauge",
            "Nodes with a session to this hub.",
            self.nodes.len().to_string(),
        );
        metric(
            "hub_links",
            "gauge",
            "Links to neighbour hubs.",
            self.hubs.len().to_string(),
        );
        metric(
            "routes",
            "gauge",
            "Hubs this hub has a route to.",
            self.routes.len().to_string(),
        );
        metric(
            "remote_nodes",
            "gauge",
            "Nodes known attached to other hubs.",
            self.remote_nodes.to_string(),
        );
        metric(
            "vpn_members",
            "gauge",
            "Vpn members attached to this hub.",
            self.vpn_members.0.to_string(),
        );
        metric(
            "remote_vpn_members",
            "gauge",
            "Vpn members listed by other hubs.",
            self.vpn_members.1.to_string(),
        );
        metric(
            "vpn_lists_refused_total",
            "counter",
            "Vpn member lists refused for holding more members than a list may.",
            self.counters.vpn_lists_refused.to_string(),
        );
        metric(
            "vip_lookups_total",
            "counter",
            "Vpn address lookups answered.",
            self.counters.vip_lookups.to_string(),
        );
        metric(
            "streams",
            "gauge",
            "Routed streams relayed now.",
            self.streams.to_string(),
        );
        metric(
            "streams_opened_total",
            "counter",
            "Routed streams opened through this hub.",
            self.counters.streams_opened.to_string(),
        );
        metric(
            "streams_no_route_total",
            "counter",
            "Routed stream opens refused for want of a route.",
            self.counters.streams_no_route.to_string(),
        );
        metric(
            "relayed_bytes_total",
            "counter",
            "Payload bytes relayed.",
            self.counters.bytes_relayed.to_string(),
        );
        metric(
            "refused_total",
            "counter",
            "Registrations and links refused by policy.",
            self.counters.refused.to_string(),
        );
        metric(
            "connect_backs_total",
            "counter",
            "Connect-back requests passed on.",
            self.counters.connect_backs.to_string(),
        );
        metric(
            "circuits",
            "gauge",
            "Relay circuits paired and relaying now.",
            self.circuits.active.to_string(),
        );
        metric(
            "circuits_waiting",
            "gauge",
            "Circuit halves waiting for their other half.",
            self.circuits.waiting.to_string(),
        );
        metric(
            "circuits_paired_total",
            "counter",
            "Relay circuits paired.",
            self.circuits.counters.paired.to_string(),
        );
        metric(
            "circuits_refused_total",
            "counter",
            "Circuit halves refused (limits, tickets in use, circuits this hub does not serve).",
            self.circuits.counters.refused.to_string(),
        );
        metric(
            "circuits_expired_total",
            "counter",
            "Circuit halves whose other half did not come in time.",
            self.circuits.counters.expired.to_string(),
        );
        metric(
            "circuits_extended_total",
            "counter",
            "Relay circuits carried on to the next hub towards the other node's hub.",
            self.circuits.counters.extended.to_string(),
        );
        metric(
            "circuit_pulls_total",
            "counter",
            "Circuit legs this hub asked a hub that dialled it to dial back with.",
            self.circuits.pulls.asked.to_string(),
        );
        metric(
            "circuit_pulls_refused_total",
            "counter",
            "Circuit pulls refused: the pull table full, or a pulled leg nobody asked for.",
            self.circuits.pulls.refused.to_string(),
        );
        metric(
            "circuit_pulls_expired_total",
            "counter",
            "Circuit legs asked for that did not come back in time.",
            self.circuits.pulls.expired.to_string(),
        );
        metric(
            "circuit_dial_backs_refused_total",
            "counter",
            "Circuit pulls from other hubs refused: too many dial-backs under way.",
            self.circuits.dial_backs_refused.to_string(),
        );
        metric(
            "exposures",
            "gauge",
            "Services published on proxy ports.",
            self.exposures.len().to_string(),
        );
        let sum = |f: fn(&ProxyCounters) -> u64| -> String {
            self.exposures
                .iter()
                .map(|e| f(&e.counters))
                .sum::<u64>()
                .to_string()
        };
        metric(
            "proxy_connections_total",
            "counter",
            "Client connections accepted on proxy ports now held.",
            sum(|c| c.connections),
        );
        metric(
            "proxy_bytes_total",
            "counter",
            "Bytes moved both ways on proxy ports now held.",
            sum(|c| c.bytes_to_reach + c.bytes_from_reach),
        );
        metric(
            "locates_dropped_total",
            "counter",
            "Lookups answered unknown because too many waited for home hubs.",
            self.counters.locates_dropped.to_string(),
        );
        metric(
            "directories_unindexed_total",
            "counter",
            "Hub directories not indexed because too many hubs are known.",
            self.counters.directories_unindexed.to_string(),
        );
        metric(
            "streams_over_limit_total",
            "counter",
            "Routed streams refused because a link had its limit of streams.",
            self.counters.streams_over_limit.to_string(),
        );
        metric(
            "directories_refused_total",
            "counter",
            "Directory parts refused for breaking the directory bounds.",
            self.counters.directories_refused.to_string(),
        );
        metric(
            "links_unregistered_cut_total",
            "counter",
            "Links refused or cut before registering (too many, or too slow).",
            self.counters.links_unregistered_cut.to_string(),
        );
        metric(
            "gossip_forged_total",
            "counter",
            "Hub links cut for gossip that failed its origin's proof (forged route state, anchors, directories or vpn member lists).",
            self.counters.gossip_forged.to_string(),
        );
        metric(
            "cards_refused_total",
            "counter",
            "Overlay map cards refused (more links than a card lists, or the map full).",
            self.counters.cards_refused.to_string(),
        );
        metric(
            "filter_probes_total",
            "counter",
            "Dial-backs to nodes testing their inbound filtering (reach doctor).",
            self.counters.filter_probes.to_string(),
        );
        metric(
            "filter_probes_declined_total",
            "counter",
            "Dial-backs declined: over their bounds, or no second address to dial from.",
            self.counters.filter_probes_declined.to_string(),
        );
        metric(
            "relayed_messages_total",
            "counter",
            "Node-to-node messages (splice rendezvous) passed on.",
            self.counters.relayed_messages.to_string(),
        );
        out.push_str(
            "# HELP reach_hub_link_rtt_seconds Smoothed round trip of each hub link (pinged every gossip interval).\n# TYPE reach_hub_link_rtt_seconds gauge\n",
        );
        for h in &self.hubs {
            if let Some(rtt) = h.rtt {
                out.push_str(&format!(
                    "reach_hub_link_rtt_seconds{{peer=\"{}\"}} {}\n",
                    h.hub,
                    rtt.as_secs_f64()
                ));
            }
        }
        out
    }
}
