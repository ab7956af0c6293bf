//! What the core reports about itself for `reach status` and metrics: the
//! data only. The driver adds what it holds (proxy ports) and renders it.

use std::net::SocketAddr;

use reach_proto::NodeId;

use crate::{Counters, HubCard};

/// A hub's state as its core sees it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The hub's id.
    pub hub: NodeId,
    /// Where it listens.
    pub listen: Vec<SocketAddr>,
    /// Attached nodes.
    pub nodes: Vec<NodeStatus>,
    /// Links to neighbour hubs.
    pub hubs: Vec<HubLinkStatus>,
    /// Routes to other hubs.
    pub routes: Vec<RouteStatus>,
    /// Nodes known attached to other hubs.
    pub remote_nodes: usize,
    /// Vpn members attached here, and listed by other hubs.
    pub vpn_members: (usize, usize),
    /// Routed streams relayed now.
    pub streams: usize,
    /// Counters since start.
    pub counters: Counters,
    /// The overlay map: this hub's card first, then the other hubs'.
    pub overlay: Vec<HubCard>,
}

/// One attached node.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    /// Its id.
    pub node: NodeId,
    /// Where its session comes from.
    pub observed: SocketAddr,
    /// What it advertises.
    pub addrs: Vec<SocketAddr>,
    /// Routed streams on its link.
    pub streams: usize,
}

/// One hub link.
#[derive(Clone, Debug)]
pub struct HubLinkStatus {
    /// The neighbour.
    pub hub: NodeId,
    /// Its address.
    pub addr: Option<SocketAddr>,
    /// Whether this hub dialled it.
    pub dialled: bool,
    /// The link's smoothed round trip, once measured.
    pub rtt: Option<std::time::Duration>,
}

/// One route.
#[derive(Clone, Debug)]
pub struct RouteStatus {
    /// Destination hub.
    pub hub: NodeId,
    /// Via.
    pub next_hop: NodeId,
    /// Hops.
    pub hops: u8,
}
