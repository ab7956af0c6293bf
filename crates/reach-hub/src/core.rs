//! The hub's logic, sans-IO: links, the directory, routing and the relay of
//! routed streams. The driver feeds it link events and decoded frames with the
//! current time; it answers by queueing encoded frames per link in its outbox.
//!
//! ```text
//! node A --link 1--> [hub] --link 2--> node B          (one hub)
//! node A --link 1--> [hub 1] --link 7--> [hub 2] --link 3--> node B
//! ```
//! A routed stream is a pair of relay entries, one per direction: frames for
//! stream `a` on link 1 go out as stream `b` on link 2 and back. The hub checks
//! each direction's credit ([`Window`]), so it never holds more than one window
//! per stream and direction; it never reads the payload, which is the two
//! nodes' end-to-end ciphertext.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reach::proxy::{ProxyCounters, ProxyStats};

use reach_proto::link::{
    encode_control, encode_credit, encode_data, encode_fin, encode_open, encode_reset,
    verify_admission_proof, ConnectBack, Control, DirEntry, Frame, Rendezvous, ResetCode, Window,
    DIRECTORY_PART, MAX_NODE_ADDRS, MAX_STREAM_WINDOW, STREAM_WINDOW,
};
use reach_proto::routes::RouteTable;
use reach_proto::NodeId;

/// A link's id, unique for the hub's lifetime.
pub type LinkId = u64;

/// Who may attach to the hub.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Nodes admitted by key.
    pub allowed: Vec<NodeId>,
    /// Nodes proving knowledge of this secret are admitted too.
    pub network_secret: Option<Vec<u8>>,
    /// Admit every node (when neither of the above is configured, the hub is open).
    pub open: bool,
    /// Hubs admitted as peers by key (besides configured peers, which are).
    pub peer_hubs: Vec<NodeId>,
}

impl Policy {
    fn admits_node(&self, node: &NodeId, hub: &NodeId, proof: Option<&[u8; 32]>) -> bool {
        if self.open || self.allowed.contains(node) {
            return true;
        }
        match (&self.network_secret, proof) {
            (Some(secret), Some(p)) => verify_admission_proof(secret, node, hub, p),
            _ => false,
        }
    }

    fn admits_hub(&self, hub: &NodeId, proof: Option<&[u8; 32]>, me: &NodeId) -> bool {
        if self.peer_hubs.contains(hub) {
            return true;
        }
        match (&self.network_secret, proof) {
            (Some(secret), Some(p)) => verify_admission_proof(secret, hub, me, p),
            _ => self.open,
        }
    }
}

/// What a link connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// Not yet registered: the first control message decides.
    Pending,
    /// An attached node.
    Node,
    /// A neighbour hub.
    Hub,
}

/// One link's state.
#[derive(Debug)]
pub struct LinkInfo {
    /// The authenticated peer.
    pub peer: NodeId,
    /// Node or hub.
    pub kind: LinkKind,
    /// Where the link comes from, as this hub sees it.
    pub observed: SocketAddr,
    /// Whether this hub dialled the link (it then opens odd stream ids).
    pub dialled: bool,
    next_stream: u32,
    /// Streams relayed over this link now.
    pub streams: usize,
    /// Payload bytes received on this link's streams.
    pub bytes_in: u64,
}

struct Relay {
    to_link: LinkId,
    to_stream: u32,
    /// Data flowing in from this side, against its credit.
    window: Window,
    fin: bool,
}

struct Remote {
    state: u64,
    nodes: Vec<DirEntry>,
    listen: Vec<SocketAddr>,
    /// Since when no route leads to this hub. A directory outlives a route
    /// that flaps (a hub on the path died, a longer path is being learned):
    /// it is not sent again, so forgetting it at once would lose it.
    unroutable_since: Option<Instant>,
}

/// A directory arriving in parts.
struct Partial {
    state: u64,
    got: Vec<bool>,
    nodes: Vec<DirEntry>,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Routed streams opened through this hub.
    pub streams_opened: u64,
    /// Opens refused for want of a route.
    pub streams_no_route: u64,
    /// Payload bytes relayed.
    pub bytes_relayed: u64,
    /// Registrations refused by policy.
    pub refused: u64,
    /// Connect-back requests passed on.
    pub connect_backs: u64,
    /// Node-to-node messages (splice rendezvous) passed on.
    pub relayed_messages: u64,
}

/// Work for the driver, which does the I/O (binding proxy ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A node asks to publish one of its virtual ports on a proxy port.
    Expose(ExposeRequest),
    /// A link ended: whatever was published over it goes.
    LinkGone {
        /// The link.
        link: LinkId,
    },
}

/// A node's request to publish its virtual port `vport` on a proxy port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExposeRequest {
    /// The node's link (replies and connect-backs go there).
    pub link: LinkId,
    /// The node.
    pub node: NodeId,
    /// Its virtual port.
    pub vport: u16,
    /// The proxy port it had before, if any.
    pub want_port: Option<u16>,
    /// Admitted client ranges (empty: all).
    pub allow_from: Vec<(std::net::IpAddr, u8)>,
}

/// What the driver should do after a frame besides sending the outbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep serving the link.
    Continue,
    /// Close the link (after sending what is queued): refused or broken.
    Close(String),
}

/// The hub's whole state.
pub struct HubCore {
    me: NodeId,
    /// Ports of this hub's address echoes, told to registering nodes.
    echo_ports: Vec<u16>,
    policy: Policy,
    listen: Vec<SocketAddr>,
    links: HashMap<LinkId, LinkInfo>,
    nodes: BTreeMap<NodeId, (LinkId, DirEntry)>,
    hubs: BTreeMap<NodeId, LinkId>,
    routes: RouteTable,
    remote: BTreeMap<NodeId, Remote>,
    partial: HashMap<NodeId, Partial>,
    /// Node to home hub, for nodes of other hubs.
    index: HashMap<NodeId, NodeId>,
    relay: HashMap<(LinkId, u32), Relay>,
    /// How long a directory survives without a route to its hub.
    directory_grace: Duration,
    /// Connect-back requests passed on, by (requester, token): the link each
    /// came from, so a failure report can retrace the path. Expire after
    /// [`CONNECT_BACK_MEMORY`].
    connect_backs: HashMap<(NodeId, u16), (LinkId, Instant)>,
    /// Relayed messages passed on, by (sender, recipient, token): the link
    /// each came from. An answer (same token, other way) retraces it, so it
    /// reaches the very process that asked: a connect-only node is not in
    /// the directory, and it may share its NodeId with a listener that is.
    /// Expire like connect-backs.
    relay_paths: HashMap<(NodeId, NodeId, u32), (LinkId, Instant)>,
    dir_state: u64,
    next_link: LinkId,
    outbox: Vec<(LinkId, Vec<u8>)>,
    /// What the driver must act on (bind a proxy port, drop a node's).
    events: Vec<Event>,
    /// The proxy ports the driver holds, for status reports (it keeps this
    /// up to date; the counters move as clients do).
    exposures: Vec<(ProxyPort, Arc<ProxyStats>)>,
    /// Counters since start.
    pub counters: Counters,
}

/// `origin`'s directory as Directory messages of at most [`DIRECTORY_PART`]
/// entries each.
fn directory_parts(
    origin: NodeId,
    state: u64,
    nodes: &[DirEntry],
    listen: &[SocketAddr],
) -> Vec<Vec<u8>> {
    let chunks: Vec<&[DirEntry]> = if nodes.is_empty() {
        vec![&[]]
    } else {
        nodes.chunks(DIRECTORY_PART).collect()
    };
    let parts = u16::try_from(chunks.len()).unwrap_or(u16::MAX);
    chunks
        .into_iter()
        .take(usize::from(parts))
        .enumerate()
        .map(|(i, chunk)| {
            control(&Control::Directory {
                origin,
                state,
                part: i as u16,
                parts,
                nodes: chunk.to_vec(),
                listen: listen.to_vec(),
            })
        })
        .collect()
}

fn control(msg: &Control) -> Vec<u8> {
    let mut f = Vec::new();
    if let Err(e) = encode_control(msg, &mut f) {
        // Only directories of tens of thousands of nodes get this large.
        tracing::warn!("control message not sent: {e}");
        f.clear();
    }
    f
}

/// Most growth beyond [`STREAM_WINDOW`] of all windows of streams flowing
/// towards one link, which bounds what the hub may queue for it.
pub const LINK_WINDOW_GROWTH: u64 = 64 * 1024 * 1024;

/// How long a hub remembers where a connect-back request came from.
const CONNECT_BACK_MEMORY: Duration = Duration::from_secs(10);
/// Connect-back requests remembered at most (a flood only loses fast failure
/// reports, never a connect-back itself).
const MAX_CONNECT_BACKS: usize = 16_384;

impl HubCore {
    /// A hub with identity `me`, admitting by `policy`, listening on `listen`.
    pub fn new(
        me: NodeId,
        policy: Policy,
        listen: Vec<SocketAddr>,
        route_expiry: Duration,
    ) -> Self {
        Self {
            me,
            echo_ports: Vec::new(),
            policy,
            listen,
            links: HashMap::new(),
            nodes: BTreeMap::new(),
            hubs: BTreeMap::new(),
            routes: RouteTable::new(me, route_expiry),
            directory_grace: route_expiry,
            remote: BTreeMap::new(),
            partial: HashMap::new(),
            index: HashMap::new(),
            relay: HashMap::new(),
            connect_backs: HashMap::new(),
            relay_paths: HashMap::new(),
            dir_state: 1,
            next_link: 1,
            outbox: Vec::new(),
            events: Vec::new(),
            exposures: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// The proxy ports now held, as status reports list them.
    pub fn set_exposures(&mut self, exposures: Vec<(ProxyPort, Arc<ProxyStats>)>) {
        self.exposures = exposures;
    }

    /// This hub's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// Work for the driver since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Queues a control message on `link` (the driver's replies).
    pub fn send_control(&mut self, link: LinkId, msg: &Control) {
        self.send(link, control(msg));
    }

    /// Tells registering nodes where this hub's address echoes listen.
    pub fn set_echo_ports(&mut self, ports: Vec<u16>) {
        self.echo_ports = ports;
    }

    /// Frames to send, by link; the driver drains this after every call.
    pub fn take_outbox(&mut self) -> Vec<(LinkId, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    fn send(&mut self, link: LinkId, frame: Vec<u8>) {
        if !frame.is_empty() {
            self.outbox.push((link, frame));
        }
    }

    /// The largest window the stream whose data enters at `from` (and flows
    /// towards `link`) may grow to on a credit of `bytes`: no reader makes
    /// this hub hold more than [`MAX_STREAM_WINDOW`] for one stream, nor more
    /// than [`LINK_WINDOW_GROWTH`] of grown windows towards one link (a reader
    /// that stops reading its link could otherwise park gigabytes here).
    fn window_cap(&self, link: LinkId, from: (LinkId, u32), bytes: u32) -> u32 {
        let Some(r) = self.relay.get(&from) else {
            return MAX_STREAM_WINDOW;
        };
        if u64::from(bytes) <= r.window.outstanding() {
            return MAX_STREAM_WINDOW; // only returns credit: nothing grows
        }
        let base = u64::from(STREAM_WINDOW);
        let grown: u64 = self
            .relay
            .values()
            .filter(|x| x.to_link == link)
            .map(|x| x.window.limit().saturating_sub(base))
            .sum();
        let room = LINK_WINDOW_GROWTH.saturating_sub(grown);
        let cap = (r.window.limit() + room).min(u64::from(MAX_STREAM_WINDOW));
        u32::try_from(cap).unwrap_or(MAX_STREAM_WINDOW)
    }

    /// Whether a hub link to `hub` is up.
    pub fn has_hub_link(&self, hub: &NodeId) -> bool {
        self.hubs.contains_key(hub)
    }

    /// Hubs this hub routes to through others and knows listen addresses of:
    /// candidates for a direct link (SmartSockets hubs connect to hubs they
    /// learn about when they can, and route through others when they cannot).
    pub fn unlinked_hubs(&self) -> Vec<(NodeId, Vec<SocketAddr>)> {
        self.remote
            .iter()
            .filter(|(hub, r)| {
                **hub != self.me
                    && !self.hubs.contains_key(*hub)
                    && !r.listen.is_empty()
                    && self.routes.next_hop(hub).is_some()
            })
            .map(|(hub, r)| (*hub, r.listen.clone()))
            .collect()
    }

    /// A new authenticated link from (or to) `peer`. A dialled link is to a
    /// configured peer hub: this hub greets it at once.
    pub fn link_up(
        &mut self,
        peer: NodeId,
        observed: SocketAddr,
        dialled: bool,
        hub_proof: Option<[u8; 32]>,
    ) -> LinkId {
        let id = self.next_link;
        self.next_link += 1;
        self.links.insert(
            id,
            LinkInfo {
                peer,
                kind: LinkKind::Pending,
                observed,
                dialled,
                next_stream: if dialled { 1 } else { 2 },
                streams: 0,
                bytes_in: 0,
            },
        );
        if dialled {
            let hello = Control::HubHello {
                addrs: self.listen.clone(),
                proof: hub_proof,
            };
            self.send(id, control(&hello));
        }
        id
    }

    /// A link is gone: its streams are reset on their other side, its node
    /// leaves the directory, its hub's routes go.
    pub fn link_down(&mut self, link: LinkId) {
        let Some(info) = self.links.remove(&link) else {
            return;
        };
        self.events.push(Event::LinkGone { link });
        let gone: Vec<(LinkId, u32)> = self.relay.keys().filter(|k| k.0 == link).copied().collect();
        for key in gone {
            if let Some(r) = self.relay.remove(&key) {
                self.relay.remove(&(r.to_link, r.to_stream));
                self.stream_closed(r.to_link);
                let mut f = Vec::new();
                encode_reset(
                    r.to_stream,
                    ResetCode::LinkLost,
                    "a hub link on the path went down",
                    &mut f,
                );
                self.send(r.to_link, f);
            }
        }
        match info.kind {
            LinkKind::Node => {
                if self.nodes.get(&info.peer).is_some_and(|(l, _)| *l == link) {
                    self.nodes.remove(&info.peer);
                    self.directory_changed();
                }
            }
            LinkKind::Hub => {
                // Two hubs that both dial each other may hold two links; when
                // one ends, the other carries on.
                let spare = self
                    .links
                    .iter()
                    .find(|(_, l)| l.peer == info.peer && l.kind == LinkKind::Hub)
                    .map(|(id, _)| *id);
                if let (Some(spare), Some(current)) = (spare, self.hubs.get_mut(&info.peer)) {
                    if *current == link {
                        *current = spare;
                    }
                } else if self.hubs.get(&info.peer) == Some(&link) {
                    self.hubs.remove(&info.peer);
                    self.routes.handle_link_down(info.peer);
                    self.gossip();
                }
            }
            LinkKind::Pending => {}
        }
    }

    fn stream_closed(&mut self, link: LinkId) {
        if let Some(l) = self.links.get_mut(&link) {
            l.streams = l.streams.saturating_sub(1);
        }
    }

    /// Handles one frame from `link`.
    pub fn handle_frame(&mut self, link: LinkId, frame: Frame<'_>, now: Instant) -> Verdict {
        let Some(info) = self.links.get(&link) else {
            return Verdict::Close("unknown link".into());
        };
        let (kind, peer) = (info.kind, info.peer);
        match frame {
            Frame::Control(msg) => return self.handle_control(link, kind, peer, msg, now),
            _ if kind == LinkKind::Pending => {
                return Verdict::Close("stream frame before registration".into())
            }
            Frame::Open { stream, dst, src } => {
                // A node speaks only for itself; hubs vouch for their nodes.
                let src = if kind == LinkKind::Node { peer } else { src };
                self.open(link, stream, dst, src);
            }
            Frame::Data { stream, data } => {
                let Some(r) = self.relay.get_mut(&(link, stream)) else {
                    return Verdict::Continue; // late data after a reset
                };
                if let Err(e) = r.window.on_data(data.len()) {
                    self.reset_both(link, stream, ResetCode::FlowViolation, &e.to_string());
                    return Verdict::Continue;
                }
                let (to_link, to_stream) = (r.to_link, r.to_stream);
                let mut f = Vec::with_capacity(data.len() + 8);
                encode_data(to_stream, data, &mut f);
                self.counters.bytes_relayed += data.len() as u64;
                if let Some(l) = self.links.get_mut(&link) {
                    l.bytes_in += data.len() as u64;
                }
                self.send(to_link, f);
            }
            Frame::Credit { stream, bytes } => {
                let Some(r) = self.relay.get(&(link, stream)) else {
                    return Verdict::Continue;
                };
                let (to_link, to_stream) = (r.to_link, r.to_stream);
                let cap = self.window_cap(link, (to_link, to_stream), bytes);
                // Credit from this side is for the data flowing towards it.
                let Some(back) = self.relay.get_mut(&(to_link, to_stream)) else {
                    return Verdict::Continue;
                };
                let bytes = back.window.on_credit_capped(bytes, cap);
                if bytes == 0 {
                    return Verdict::Continue;
                }
                let mut f = Vec::with_capacity(12);
                encode_credit(to_stream, bytes, &mut f);
                self.send(to_link, f);
            }
            Frame::Fin { stream } => {
                let Some(r) = self.relay.get_mut(&(link, stream)) else {
                    return Verdict::Continue;
                };
                r.fin = true;
                let (to_link, to_stream) = (r.to_link, r.to_stream);
                let mut f = Vec::with_capacity(8);
                encode_fin(to_stream, &mut f);
                self.send(to_link, f);
                if self.relay.get(&(to_link, to_stream)).is_some_and(|b| b.fin) {
                    self.relay.remove(&(link, stream));
                    self.relay.remove(&(to_link, to_stream));
                    self.stream_closed(link);
                    self.stream_closed(to_link);
                }
            }
            Frame::Reset {
                stream,
                code,
                reason,
            } => {
                if let Some(r) = self.relay.remove(&(link, stream)) {
                    self.relay.remove(&(r.to_link, r.to_stream));
                    self.stream_closed(link);
                    self.stream_closed(r.to_link);
                    let mut f = Vec::new();
                    encode_reset(r.to_stream, code, &reason, &mut f);
                    self.send(r.to_link, f);
                }
            }
        }
        Verdict::Continue
    }

    fn reset_both(&mut self, link: LinkId, stream: u32, code: ResetCode, reason: &str) {
        if let Some(r) = self.relay.remove(&(link, stream)) {
            self.relay.remove(&(r.to_link, r.to_stream));
            self.stream_closed(link);
            self.stream_closed(r.to_link);
            let mut f = Vec::new();
            encode_reset(r.to_stream, code, reason, &mut f);
            self.send(r.to_link, f);
        }
        let mut f = Vec::new();
        encode_reset(stream, code, reason, &mut f);
        self.send(link, f);
    }

    /// Which hub `node` is attached to, if known.
    fn home_of(&self, node: &NodeId) -> Option<&DirEntry> {
        if let Some((_, e)) = self.nodes.get(node) {
            return Some(e);
        }
        let home = self.index.get(node)?;
        self.remote
            .get(home)?
            .nodes
            .iter()
            .find(|e| e.node == *node)
    }

    /// The link towards `node`: its own session, or the next hub on the path
    /// to its home hub.
    fn link_towards(&self, node: &NodeId) -> Option<LinkId> {
        if let Some((l, _)) = self.nodes.get(node) {
            return Some(*l);
        }
        let home = self.home_of(node)?.hub;
        let next = if self.hubs.contains_key(&home) {
            home
        } else {
            self.routes.next_hop(&home)?
        };
        self.hubs.get(&next).copied()
    }

    fn open(&mut self, link: LinkId, stream: u32, dst: NodeId, src: NodeId) {
        if self.relay.contains_key(&(link, stream)) {
            self.reset_both(
                link,
                stream,
                ResetCode::Protocol,
                "stream id already in use",
            );
            return;
        }
        let Some(out) = self.link_towards(&dst).filter(|l| *l != link) else {
            self.counters.streams_no_route += 1;
            let mut f = Vec::new();
            let why = format!("no hub knows a path to node {dst}");
            encode_reset(stream, ResetCode::NoRoute, &why, &mut f);
            self.send(link, f);
            return;
        };
        let Some(out_info) = self.links.get_mut(&out) else {
            return;
        };
        let out_stream = out_info.next_stream;
        out_info.next_stream = out_info.next_stream.wrapping_add(2).max(1);
        out_info.streams += 1;
        if let Some(l) = self.links.get_mut(&link) {
            l.streams += 1;
        }
        self.relay.insert(
            (link, stream),
            Relay {
                to_link: out,
                to_stream: out_stream,
                window: Window::new(),
                fin: false,
            },
        );
        self.relay.insert(
            (out, out_stream),
            Relay {
                to_link: link,
                to_stream: stream,
                window: Window::new(),
                fin: false,
            },
        );
        self.counters.streams_opened += 1;
        let mut f = Vec::with_capacity(80);
        encode_open(out_stream, &dst, &src, &mut f);
        self.send(out, f);
    }

    fn handle_control(
        &mut self,
        link: LinkId,
        kind: LinkKind,
        peer: NodeId,
        msg: Control,
        now: Instant,
    ) -> Verdict {
        match (kind, msg) {
            (
                LinkKind::Pending,
                Control::Register {
                    addrs,
                    proof,
                    accepts,
                },
            ) => {
                if !self.policy.admits_node(&peer, &self.me, proof.as_ref()) {
                    self.counters.refused += 1;
                    let reason = if proof.is_some() {
                        "wrong network secret"
                    } else {
                        "node is not on the hub's allow list and gave no network secret"
                    };
                    self.send(
                        link,
                        control(&Control::Refused {
                            reason: reason.into(),
                        }),
                    );
                    return Verdict::Close(format!("refused node {peer}: {reason}"));
                }
                let observed = self.links.get(&link).map(|l| l.observed);
                let Some(observed) = observed else {
                    return Verdict::Close("unknown link".into());
                };
                if let Some(l) = self.links.get_mut(&link) {
                    l.kind = LinkKind::Node;
                }
                let echo = self.echo_ports.clone();
                self.send(link, control(&Control::Registered { observed, echo }));
                if accepts {
                    let entry = DirEntry {
                        node: peer,
                        hub: self.me,
                        addrs: addrs.into_iter().take(MAX_NODE_ADDRS).collect(),
                        observed,
                    };
                    self.nodes.insert(peer, (link, entry));
                    self.directory_changed();
                }
            }
            (LinkKind::Pending, Control::HubHello { addrs, proof }) => {
                let dialled = self.links.get(&link).is_some_and(|l| l.dialled);
                if !dialled && !self.policy.admits_hub(&peer, proof.as_ref(), &self.me) {
                    self.counters.refused += 1;
                    let reason = "hub is not a configured peer and gave no network secret";
                    self.send(
                        link,
                        control(&Control::Refused {
                            reason: reason.into(),
                        }),
                    );
                    return Verdict::Close(format!("refused hub {peer}: {reason}"));
                }
                if let Some(l) = self.links.get_mut(&link) {
                    l.kind = LinkKind::Hub;
                }
                if !dialled {
                    let hello = Control::HubHello {
                        addrs: self.listen.clone(),
                        proof: None,
                    };
                    self.send(link, control(&hello));
                }
                tracing::info!(%peer, ?addrs, "hub link up");
                self.hubs.insert(peer, link);
                self.routes.handle_link_up(peer);
                self.routes.bump();
                self.gossip_to(link);
                let mut sync = self.directory_messages();
                for (origin, r) in &self.remote {
                    sync.extend(directory_parts(*origin, r.state, &r.nodes, &r.listen));
                }
                for f in sync {
                    self.send(link, f);
                }
            }
            (LinkKind::Pending, Control::StatusQuery { proof }) => {
                if !self.policy.admits_node(&peer, &self.me, proof.as_ref()) {
                    self.counters.refused += 1;
                    let reason = "node is not admitted by the hub's policy".to_string();
                    self.send(link, control(&Control::Refused { reason }));
                    return Verdict::Close(format!("refused status query from {peer}"));
                }
                let json = self.status().to_json(STATUS_MAX_NODES).to_string();
                self.send(link, control(&Control::StatusReport { json }));
                return Verdict::Close("status served".into());
            }
            (LinkKind::Pending, other) => {
                return Verdict::Close(format!(
                    "expected Register or HubHello first, got {other:?}"
                ))
            }
            (_, Control::Ping { nonce }) => self.send(link, control(&Control::Pong { nonce })),
            (_, Control::Pong { .. }) => {}
            (LinkKind::Node, Control::Lookup { req, node }) => {
                let entry = self.home_of(&node).cloned();
                self.send(link, control(&Control::Found { req, node, entry }));
            }
            (kind, Control::ConnectBack(mut cb)) => {
                if kind == LinkKind::Node {
                    cb.from = peer;
                }
                cb.addrs.truncate(MAX_NODE_ADDRS);
                self.connect_back(link, kind, cb, now);
            }
            (kind, Control::Relay { mut from, to, msg }) => {
                if kind == LinkKind::Node {
                    from = peer;
                }
                self.relay_message(link, from, to, msg, now);
            }
            (
                LinkKind::Hub,
                Control::Undeliverable {
                    from,
                    to,
                    msg,
                    reason,
                },
            ) => {
                // Routed back towards the sender like any message to it.
                let back = self
                    .relay_paths
                    .get(&(from, to, msg.token()))
                    .map(|(l, _)| *l)
                    .or_else(|| self.link_towards(&from));
                if let Some(back) = back.filter(|l| *l != link) {
                    let m = Control::Undeliverable {
                        from,
                        to,
                        msg,
                        reason,
                    };
                    self.send(back, control(&m));
                }
            }
            (
                kind,
                Control::ConnectBackFailed {
                    requester,
                    target,
                    token,
                    reason,
                },
            ) => {
                // A node reports only its own failures.
                if kind == LinkKind::Hub || target == peer {
                    self.connect_back_failed(requester, target, token, reason);
                }
            }
            (
                LinkKind::Node,
                Control::Expose {
                    vport,
                    want_port,
                    allow_from,
                },
            ) => self.events.push(Event::Expose(ExposeRequest {
                link,
                node: peer,
                vport,
                want_port,
                allow_from,
            })),
            (LinkKind::Hub, Control::Adverts { adverts }) => {
                if self.routes.handle_adverts(now, peer, &adverts) {
                    self.gossip();
                }
            }
            (
                LinkKind::Hub,
                Control::Directory {
                    origin,
                    state,
                    part,
                    parts,
                    nodes,
                    listen,
                },
            ) => {
                if origin == self.me || self.remote.get(&origin).is_some_and(|r| r.state >= state) {
                    return Verdict::Continue;
                }
                // Pass each part on at once; hubs further away assemble it too.
                let msg = control(&Control::Directory {
                    origin,
                    state,
                    part,
                    parts,
                    nodes: nodes.clone(),
                    listen: listen.clone(),
                });
                let others: Vec<LinkId> =
                    self.hubs.values().copied().filter(|l| *l != link).collect();
                for l in others {
                    self.send(l, msg.clone());
                }
                if let Some(nodes) = self.assemble(origin, state, part, parts, nodes) {
                    self.commit_remote(origin, state, nodes, listen);
                }
            }
            (kind, other) => {
                tracing::debug!(?kind, "ignoring control message {other:?}");
            }
        }
        Verdict::Continue
    }

    fn connect_back(&mut self, link: LinkId, kind: LinkKind, cb: ConnectBack, now: Instant) {
        let (target, requester, token) = (cb.target, cb.from, cb.token);
        match self.link_towards(&target).filter(|l| *l != link) {
            Some(out) => {
                self.counters.connect_backs += 1;
                if self.connect_backs.len() < MAX_CONNECT_BACKS {
                    self.connect_backs.insert((requester, token), (link, now));
                }
                self.send(out, control(&Control::ConnectBack(cb)));
            }
            None => {
                let reason = format!("no hub knows node {target}");
                let failed = Control::ConnectBackFailed {
                    requester,
                    target,
                    token,
                    reason,
                };
                tracing::debug!(%target, ?kind, "connect-back has no path");
                self.send(link, control(&failed));
            }
        }
    }

    /// Passes a node-to-node message one hop on towards `to`, or tells the
    /// sender it cannot be delivered.
    fn relay_message(
        &mut self,
        link: LinkId,
        from: NodeId,
        to: NodeId,
        msg: Rendezvous,
        now: Instant,
    ) {
        let token = msg.token();
        let out = self
            .relay_paths
            .get(&(to, from, token))
            .map(|(l, _)| *l)
            .or_else(|| self.link_towards(&to))
            .filter(|l| *l != link);
        match out {
            Some(out) => {
                self.counters.relayed_messages += 1;
                if self.relay_paths.len() < MAX_CONNECT_BACKS {
                    self.relay_paths.insert((from, to, token), (link, now));
                }
                self.send(out, control(&Control::Relay { from, to, msg }));
            }
            None => {
                let reason = format!("no hub knows node {to}");
                let m = Control::Undeliverable {
                    from,
                    to,
                    msg,
                    reason,
                };
                self.send(link, control(&m));
            }
        }
    }

    /// Passes a connect-back failure one hop back towards its requester.
    fn connect_back_failed(
        &mut self,
        requester: NodeId,
        target: NodeId,
        token: u16,
        reason: String,
    ) {
        let Some((back, _)) = self.connect_backs.remove(&(requester, token)) else {
            tracing::debug!(%requester, token, "connect-back failure for no known request");
            return;
        };
        let failed = Control::ConnectBackFailed {
            requester,
            target,
            token,
            reason,
        };
        self.send(back, control(&failed));
    }

    /// Adds a part of `origin`'s directory; returns the whole once complete.
    fn assemble(
        &mut self,
        origin: NodeId,
        state: u64,
        part: u16,
        parts: u16,
        nodes: Vec<DirEntry>,
    ) -> Option<Vec<DirEntry>> {
        if parts <= 1 {
            self.partial.remove(&origin);
            return Some(nodes);
        }
        let p = self.partial.entry(origin).or_insert_with(|| Partial {
            state,
            got: vec![false; usize::from(parts)],
            nodes: Vec::new(),
        });
        if p.state != state || p.got.len() != usize::from(parts) {
            if p.state > state {
                return None;
            }
            *p = Partial {
                state,
                got: vec![false; usize::from(parts)],
                nodes: Vec::new(),
            };
        }
        let slot = p.got.get_mut(usize::from(part))?;
        if !*slot {
            *slot = true;
            p.nodes.extend(nodes);
        }
        if p.got.iter().all(|g| *g) {
            return self.partial.remove(&origin).map(|p| p.nodes);
        }
        None
    }

    fn commit_remote(
        &mut self,
        origin: NodeId,
        state: u64,
        nodes: Vec<DirEntry>,
        listen: Vec<SocketAddr>,
    ) {
        self.unindex(&origin);
        for e in &nodes {
            // A node attached here is reached here, whatever others say.
            if !self.nodes.contains_key(&e.node) {
                self.index.insert(e.node, origin);
            }
        }
        self.remote.insert(
            origin,
            Remote {
                state,
                nodes,
                listen,
                unroutable_since: None,
            },
        );
    }

    fn unindex(&mut self, origin: &NodeId) {
        if let Some(old) = self.remote.get(origin) {
            for e in &old.nodes {
                if self.index.get(&e.node) == Some(origin) {
                    self.index.remove(&e.node);
                }
            }
        }
    }

    fn directory_messages(&self) -> Vec<Vec<u8>> {
        let nodes: Vec<DirEntry> = self.nodes.values().map(|(_, e)| e.clone()).collect();
        directory_parts(self.me, self.dir_state, &nodes, &self.listen)
    }

    fn directory_changed(&mut self) {
        self.dir_state += 1;
        let msgs = self.directory_messages();
        let hubs: Vec<LinkId> = self.hubs.values().copied().collect();
        for l in hubs {
            for m in &msgs {
                self.send(l, m.clone());
            }
        }
    }

    /// Drops directories of hubs no longer reachable.
    /// Forgets the directories of hubs that have had no route for a whole
    /// route expiry time.
    fn forget_unroutable(&mut self, now: Instant) {
        let grace = self.directory_grace;
        let mut gone = Vec::new();
        for (origin, r) in &mut self.remote {
            if self.hubs.contains_key(origin) || self.routes.route(origin).is_some() {
                r.unroutable_since = None;
                continue;
            }
            let since = *r.unroutable_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= grace {
                gone.push(*origin);
            }
        }
        for origin in gone {
            self.unindex(&origin);
            self.remote.remove(&origin);
            self.partial.remove(&origin);
        }
    }

    fn gossip_to(&mut self, link: LinkId) {
        let Some(peer) = self.links.get(&link).map(|l| l.peer) else {
            return;
        };
        let adverts = self.routes.adverts_for(peer);
        self.send(link, control(&Control::Adverts { adverts }));
    }

    fn gossip(&mut self) {
        let hubs: Vec<LinkId> = self.hubs.values().copied().collect();
        for l in hubs {
            self.gossip_to(l);
        }
    }

    /// Periodic work: refresh this hub's state, expire stale routes, gossip.
    /// Directories travel only when they change and when a hub link comes up:
    /// links are reliable, so nothing is missed in between.
    pub fn tick(&mut self, now: Instant) {
        self.connect_backs
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < CONNECT_BACK_MEMORY);
        self.relay_paths
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < CONNECT_BACK_MEMORY);
        self.routes.bump();
        self.routes.handle_timeout(now);
        self.forget_unroutable(now);
        self.gossip();
    }

    /// A snapshot for `reach status` and metrics.
    pub fn status(&self) -> Status {
        Status {
            hub: self.me,
            listen: self.listen.clone(),
            nodes: self
                .nodes
                .values()
                .map(|(l, e)| NodeStatus {
                    node: e.node,
                    observed: e.observed,
                    addrs: e.addrs.clone(),
                    streams: self.links.get(l).map_or(0, |i| i.streams),
                })
                .collect(),
            hubs: self
                .hubs
                .iter()
                .map(|(peer, l)| HubLinkStatus {
                    hub: *peer,
                    addr: self.links.get(l).map(|i| i.observed),
                    dialled: self.links.get(l).is_some_and(|i| i.dialled),
                })
                .collect(),
            routes: self
                .routes
                .routes()
                .map(|(dest, r)| RouteStatus {
                    hub: *dest,
                    next_hop: r.next_hop,
                    hops: r.hops,
                })
                .collect(),
            remote_nodes: self.remote.values().map(|r| r.nodes.len()).sum(),
            streams: self.relay.len() / 2,
            counters: self.counters,
            exposures: self
                .exposures
                .iter()
                .map(|(proxy, stats)| ExposureStatus {
                    proxy: proxy.clone(),
                    counters: stats.snapshot(),
                })
                .collect(),
        }
    }
}

/// A published service's proxy port.
#[derive(Clone, Debug)]
pub struct ProxyPort {
    /// The hub's public port.
    pub port: u16,
    /// The node whose service it is.
    pub node: NodeId,
    /// The service's virtual port on that node.
    pub vport: u16,
    /// Client source ranges admitted (empty: any).
    pub allow_from: Vec<(IpAddr, u8)>,
}

/// A proxy port in a status report.
#[derive(Clone, Debug)]
pub struct ExposureStatus {
    /// The port and what it serves.
    pub proxy: ProxyPort,
    /// Its client connections so far: `bytes_to_reach` came from clients,
    /// `bytes_from_reach` went to them.
    pub counters: ProxyCounters,
}

/// Attached nodes listed in a status report at most (the count is always there),
/// so the report fits in one frame.
const STATUS_MAX_NODES: usize = 100;

/// A hub's state for `reach status`.
#[derive(Clone, Debug)]
pub struct Status {
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
    /// Routed streams relayed now.
    pub streams: usize,
    /// Counters since start.
    pub counters: Counters,
    /// Services published on this hub's proxy ports.
    pub exposures: Vec<ExposureStatus>,
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

impl Status {
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
            })).collect::<Vec<_>>(),
            "routes": self.routes.iter().map(|r| json!({
                "hub": r.hub.to_string(),
                "next_hop": r.next_hop.to_string(),
                "hops": r.hops,
            })).collect::<Vec<_>>(),
            "remote_nodes": self.remote_nodes,
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
            "counters": {
                "streams_opened": self.counters.streams_opened,
                "streams_no_route": self.counters.streams_no_route,
                "bytes_relayed": self.counters.bytes_relayed,
                "refused": self.counters.refused,
                "connect_backs": self.counters.connect_backs,
                "relayed_messages": self.counters.relayed_messages,
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
            "relayed_messages_total",
            "counter",
            "Node-to-node messages (splice rendezvous) passed on.",
            self.counters.relayed_messages.to_string(),
        );
        out
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
