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
//!
//! This crate is the hub without I/O: no async runtime, no sockets, no
//! clock. `reach-hub` drives it with tokio; `reach-sim` runs a thousand of
//! them in one process in virtual time.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use reach_proto::circuit::{CircuitHello, HELLO_LEN};
use reach_proto::link::{
    directory_signed_bytes, encode_control, encode_credit, encode_data, encode_fin, encode_open,
    encode_reset, hub_link_proof, verify_admission_proof, verify_hub_link_proof, ConnectBack,
    Control, DirEntry, Frame, Rendezvous, ResetCode, Window, ADVERTS_PART, ANCHORS_PART,
    DIRECTORY_PART, MAX_NODE_ADDRS, MAX_STREAM_WINDOW, STREAM_WINDOW,
};
use reach_proto::route_chain::Anchor;
use reach_proto::routes::{AnchorNews, RouteTable};
use reach_proto::{NodeId, SecretKey, Signature};

mod dial_back;
mod overlay;
mod snapshot;
mod vpn;

pub use dial_back::{MAX_PER_SECOND as DIAL_BACKS_PER_SECOND, MAX_RUNNING as MAX_DIAL_BACKS};
pub use overlay::HubCard;

pub use snapshot::{HubLinkStatus, NodeStatus, RouteStatus, Snapshot};

/// How often hubs gossip routes and directories, unless configured.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_secs(2);

/// A link's id, unique for the hub's lifetime.
pub type LinkId = u64;

/// Who may attach to the hub, and which hubs it links with.
///
/// Hubs are admitted by their own credential, never by the nodes' one: a
/// hub listed by NodeId (`peer_hubs`: `--allow-hub`, and configured peers
/// once dialled), or one proving the hub secret, which is distinct from
/// the network secret nodes prove. The check runs on every hub link, both
/// ways: links this hub accepts, and links it dials to hubs learned from
/// gossip or heard on the LAN. An open hub admits every node but no hub,
/// unless `open_hubs` says so.
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
    /// Hubs proving knowledge of this secret are admitted, and this hub
    /// proves it to the hubs it links with.
    pub hub_secret: Option<Vec<u8>>,
    /// Admit every hub (for closed test federations; off by default).
    pub open_hubs: bool,
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
        if self.open_hubs || self.peer_hubs.contains(hub) {
            return true;
        }
        match (&self.hub_secret, proof) {
            (Some(secret), Some(p)) => verify_hub_link_proof(secret, hub, me, p),
            _ => false,
        }
    }

    /// This hub's proof to `to`, if it has a hub secret.
    fn hub_proof(&self, me: &NodeId, to: &NodeId) -> Option<[u8; 32]> {
        self.hub_secret
            .as_deref()
            .map(|s| hub_link_proof(s, me, to))
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
    /// Its slot in [`HubCore::slots`], which index entries name.
    slot: u32,
    /// Nodes in its index (the entries of [`HubCore::index`] stamped with
    /// this origin's slot and current state).
    count: usize,
    listen: Vec<SocketAddr>,
    /// The origin's signature of each part, for passing the directory on
    /// (rebuilt from the index) to hubs that link later.
    sigs: Vec<Signature>,
    /// Since when no route leads to this hub. A directory outlives a route
    /// that flaps (a hub on the path died, a longer path is being learned):
    /// it is not sent again, so forgetting it at once would lose it.
    unroutable_since: Option<Instant>,
}

/// A directory arriving in parts.
struct Partial {
    state: u64,
    sigs: Vec<Option<Signature>>,
    nodes: Vec<(NodeId, u16)>,
}

/// Where the directory index says a node is: its home hub's slot and the
/// state of that hub's directory that listed it. An entry whose state is
/// not the origin's current one is stale (the node left that hub) and
/// counts as absent; stale entries are swept out in bulk.
#[derive(Clone, Copy)]
struct IndexEntry {
    slot: u32,
    state: u64,
    /// The part of that directory that listed it.
    part: u16,
}

/// A node's lookup of a node attached elsewhere, waiting for the home hub.
struct PendingLocate {
    link: LinkId,
    req: u32,
    node: NodeId,
    at: Instant,
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
    /// Lookups answered "unknown" because too many waited for home hubs.
    pub locates_dropped: u64,
    /// Directories not indexed because the hub knows too many hubs.
    pub directories_unindexed: u64,
    /// Streams refused because a link had its limit of streams.
    pub streams_over_limit: u64,
    /// Directory parts refused for breaking the directory bounds.
    pub directories_refused: u64,
    /// Links cut or refused before registering (too many unregistered, or
    /// no registration in time).
    pub links_unregistered_cut: u64,
    /// Hub links cut for sending gossip that failed its origin's proof
    /// (route adverts, anchors or vpn member lists).
    pub gossip_forged: u64,
    /// Vpn member lists refused for holding more members than a list may.
    pub vpn_lists_refused: u64,
    /// Vpn address lookups answered.
    pub vip_lookups: u64,
    /// Address updates from registered nodes (a port mapping came or went).
    pub addr_updates: u64,
    /// Overlay map cards refused: more links than a card may list, or the
    /// map full (forged ones cut the link, as `gossip_forged` counts).
    pub cards_refused: u64,
    /// Dial-backs to nodes testing their inbound filtering, started.
    pub filter_probes: u64,
    /// Dial-backs declined: over the gate's bounds (or port 0).
    pub filter_probes_declined: u64,
}

/// Work for the driver, which does the I/O (binding proxy ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A node asks to publish one of its virtual ports on a proxy port.
    Expose(ExposeRequest),
    /// An admitted node asks for the hub's status report: the driver
    /// sends it ([`Control::StatusReport`]) on `link`, which then closes.
    StatusQuery {
        /// The asking link.
        link: LinkId,
    },
    /// A link ended: whatever was published over it goes.
    LinkGone {
        /// The link.
        link: LinkId,
    },
    /// A node asks to be dialled back ([`Control::DialBack`]), admitted
    /// by the gate: the driver connects to `to` from the source `from`
    /// names, writes the greeting, answers with [`Control::DialedBack`] on
    /// `link` and then calls [`HubCore::dial_back_done`], whatever the end.
    DialBack(DialBackRequest),
    /// Linked hub `hub` asks this hub to carry a relay circuit's leg from
    /// this side ([`Control::CircuitPull`]): the driver dials `hub`'s
    /// circuit port at `addr` (where this hub's link to it goes), presents
    /// `leg` marked pulled, and serves it as a leg that came from `hub`.
    CircuitPull {
        /// The asking hub.
        hub: NodeId,
        /// Its address on the link.
        addr: SocketAddr,
        /// The leg.
        leg: CircuitHello,
    },
}

/// A node's dial-back request, admitted ([`Event::DialBack`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialBackRequest {
    /// The node's link.
    pub link: LinkId,
    /// The request id, for the answer.
    pub req: u32,
    /// The node's observed address with the port it asked for.
    pub to: SocketAddr,
    /// Which of the hub's sources to connect from.
    pub from: reach_proto::link::DialBackFrom,
    /// What to write.
    pub token: u64,
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

/// Bounds on what one link can make the hub hold. Each has a default, a
/// flag of `reach hub`, a counter and a log line naming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Routed streams through one node's link at once (opened by it or to
    /// it).
    pub streams_per_node: usize,
    /// Routed streams over one link to another hub at once.
    pub streams_per_hub_link: usize,
    /// Links that have not registered yet, in all and per source address
    /// (the driver holds them to it).
    pub unregistered_links: usize,
    /// Unregistered links from one IPv4 address or IPv6 /64.
    pub unregistered_per_source: usize,
    /// How long a link may take to register (the driver cuts it then).
    pub register_within: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            streams_per_node: 4096,
            streams_per_hub_link: 65_536,
            unregistered_links: 1024,
            unregistered_per_source: 16,
            register_within: Duration::from_secs(5),
        }
    }
}

/// The hub's whole state.
pub struct HubCore {
    me: NodeId,
    limits: Limits,
    /// Ports of this hub's address echoes, told to registering nodes.
    echo_ports: Vec<u16>,
    /// Bounds on dial-backs for nodes.
    dial_backs: dial_back::Gate,
    policy: Policy,
    listen: Vec<SocketAddr>,
    links: HashMap<LinkId, LinkInfo>,
    nodes: BTreeMap<NodeId, (LinkId, DirEntry)>,
    hubs: BTreeMap<NodeId, LinkId>,
    routes: RouteTable,
    remote: BTreeMap<NodeId, Remote>,
    partial: HashMap<NodeId, Partial>,
    /// Node to home hub, for nodes of other hubs: ids only. A lookup asks
    /// the home hub for the node's addresses ([`Control::Locate`]), so each
    /// hub holds 48 bytes per node of the federation, not a full entry.
    index: HashMap<NodeId, IndexEntry, ahash::RandomState>,
    /// Claims of current directories that another directory's claim on the
    /// same node displaced from [`HubCore::index`], by (node, slot): few
    /// (nodes that just moved), kept so that each directory can be passed
    /// on exactly as its origin signed it.
    displaced: HashMap<(NodeId, u32), IndexEntry>,
    /// For nodes two current directories list: the slot whose hub showed
    /// the newest claim signed by the node, and its stamp.
    proven: HashMap<NodeId, (u32, u64)>,
    /// Claim checks waiting for a hub's answer, by Locate request id:
    /// (node, slot asked, when).
    checks: HashMap<u32, (NodeId, u32, Instant)>,
    /// The same checks by (node, slot): one at a time each, found without
    /// a scan (a rogue's directory can dispute a thousand nodes at once).
    checking: HashSet<(NodeId, u32)>,
    /// The sum of [`Remote::count`]: index entries that are current (kept
    /// up to date, so no commit walks every remote directory).
    indexed: usize,
    /// Hubs by slot, for index entries (a slot is a quarter of an id).
    slots: Vec<NodeId>,
    /// The current directory state of each slot's hub (0: none), so a
    /// lookup checks an index entry without a search of `remote`.
    slot_state: Vec<u64>,
    slot_of: HashMap<NodeId, u32>,
    /// Lookups passed on to home hubs, by this hub's request id.
    locates: HashMap<u32, PendingLocate>,
    next_locate: u32,
    /// When this hub last flooded its own directory, and whether it changed
    /// since: changes within [`DIRECTORY_HOLD`] of a flood wait for it.
    dir_flooded_at: Option<Instant>,
    dir_dirty: bool,
    /// Hubs routed to without a directory, since when (or since the last
    /// request for it): see [`Control::DirectoryRequest`].
    missing: HashMap<NodeId, Instant>,
    relay: HashMap<(LinkId, u32), Relay>,
    /// The streams of [`HubCore::relay`] entering at each link, so that a
    /// link going down finds its streams without a scan of all.
    relayed_at: HashMap<LinkId, HashSet<u32>>,
    /// Registered node links per node (usually one), so that
    /// [`HubCore::has_node`] costs no scan of the links.
    node_links: HashMap<NodeId, u32>,
    /// For each link, how far the windows of the streams flowing towards
    /// it have grown past [`STREAM_WINDOW`] (the sum over those relays),
    /// kept up to date so that a credit costs no scan of all streams.
    grown_toward: HashMap<LinkId, u64>,
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
    /// This hub's signed directory messages and the state they are of.
    own_directory: Option<(u64, Vec<Vec<u8>>)>,
    /// This hub's key: it signs the directory.
    key: SecretKey,
    /// Vpn members of every hub, by address.
    vpn: vpn::VpnDirectory,
    /// Every hub's links, for the dashboard; this hub's link round trips.
    overlay: overlay::OverlayMap,
    next_link: LinkId,
    outbox: Vec<(LinkId, Vec<u8>)>,
    /// What the driver must act on (bind a proxy port, drop a node's).
    events: Vec<Event>,
    /// Counters since start.
    pub counters: Counters,
}

/// `origin`'s directory as Directory messages, one per part with its
/// signature.
fn directory_parts(
    origin: NodeId,
    state: u64,
    parts: &[Vec<NodeId>],
    listen: &[SocketAddr],
    sigs: &[Signature],
) -> Vec<Vec<u8>> {
    let n = u16::try_from(parts.len()).unwrap_or(u16::MAX);
    parts
        .iter()
        .zip(sigs)
        .take(usize::from(n))
        .enumerate()
        .map(|(i, (nodes, sig))| {
            control(&Control::Directory {
                origin,
                state,
                part: i as u16,
                parts: n,
                nodes: nodes.clone(),
                listen: listen.to_vec(),
                sig: *sig,
            })
        })
        .collect()
}

/// A remote directory's messages, rebuilt from `members` (taken out of it).
fn remote_parts(
    origin: NodeId,
    r: &Remote,
    members: &mut HashMap<(u32, u16), Vec<NodeId>>,
) -> Vec<Vec<u8>> {
    let parts: Vec<Vec<NodeId>> = (0..r.sigs.len())
        .map(|p| members.remove(&(r.slot, p as u16)).unwrap_or_default())
        .collect();
    directory_parts(origin, r.state, &parts, &r.listen, &r.sigs)
}

/// `msg` as a frame; empty (and logged) if it does not fit one, which
/// `send` then drops. Every message the core makes is bounded to fit.
pub(crate) fn control(msg: &Control) -> Vec<u8> {
    let mut f = Vec::new();
    if let Err(e) = encode_control(msg, &mut f) {
        tracing::warn!("control message not sent: {e}");
        f.clear();
    }
    f
}

/// Most growth beyond [`STREAM_WINDOW`] of all windows of streams flowing
/// towards one link, which bounds what the hub may queue for it.
pub const LINK_WINDOW_GROWTH: u64 = 64 * 1024 * 1024;

/// After flooding its directory, a hub waits this long before flooding it
/// again: a lone change (a node attaches) goes out at once, a burst (a
/// hundred nodes reattach after a restart) goes out as two floods, not a
/// hundred. Between OSPF's 5 s MinLSInterval and none.
pub const DIRECTORY_HOLD: Duration = Duration::from_millis(500);
/// Lookups waiting for a home hub's answer at most (a flood of lookups gets
/// "unknown" answers beyond it, never unbounded memory).
const MAX_LOCATES: usize = 16_384;
/// Distinct hubs a hub keeps index slots for; a directory from a hub beyond
/// it is not indexed (and logged).
const MAX_HUB_SLOTS: usize = 1 << 20;
/// Parts one hub's directory may have: 1024 parts of [`DIRECTORY_PART`]
/// nodes, a million nodes on one hub. A neighbour announcing more is lying.
pub const MAX_DIRECTORY_PARTS: u16 = 1024;
/// Multi-part directories being assembled at once; parts of further ones
/// are dropped (and asked for again once a route to their hub shows).
pub const MAX_PARTIAL_DIRECTORIES: usize = 4096;

/// How long a hub remembers where a connect-back request came from.
const CONNECT_BACK_MEMORY: Duration = Duration::from_secs(10);
/// Connect-back requests remembered at most (a flood only loses fast failure
/// reports, never a connect-back itself).
const MAX_CONNECT_BACKS: usize = 16_384;

impl HubCore {
    /// A hub with identity `key`, admitting by `policy`, listening on
    /// `listen`; it signs what it gossips about itself with `key`.
    /// `epoch` must exceed every state number an earlier run of this hub
    /// advertised (routes and directory): the driver passes the wall-clock
    /// time in microseconds since the Unix epoch, so a restarted hub's
    /// information supersedes its previous run's at once instead of being
    /// ignored as older until that run's expires.
    pub fn new(
        key: &SecretKey,
        policy: Policy,
        listen: Vec<SocketAddr>,
        route_expiry: Duration,
        epoch: u64,
    ) -> Self {
        let me = key.node_id();
        Self {
            me,
            limits: Limits::default(),
            echo_ports: Vec::new(),
            dial_backs: dial_back::Gate::default(),
            policy,
            listen,
            links: HashMap::new(),
            nodes: BTreeMap::new(),
            hubs: BTreeMap::new(),
            routes: RouteTable::new(key, route_expiry, epoch),
            directory_grace: route_expiry,
            remote: BTreeMap::new(),
            partial: HashMap::new(),
            index: HashMap::default(),
            displaced: HashMap::new(),
            proven: HashMap::new(),
            checks: HashMap::new(),
            checking: HashSet::new(),
            indexed: 0,
            slots: Vec::new(),
            slot_state: Vec::new(),
            slot_of: HashMap::new(),
            locates: HashMap::new(),
            next_locate: 1,
            dir_flooded_at: None,
            dir_dirty: false,
            missing: HashMap::new(),
            relay: HashMap::new(),
            relayed_at: HashMap::new(),
            node_links: HashMap::new(),
            grown_toward: HashMap::new(),
            connect_backs: HashMap::new(),
            relay_paths: HashMap::new(),
            dir_state: epoch.max(1),
            own_directory: None,
            key: key.clone(),
            vpn: vpn::VpnDirectory::new(epoch),
            overlay: overlay::OverlayMap::new(epoch),
            next_link: 1,
            outbox: Vec::new(),
            events: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// This hub's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// A node's dial-back request: to its own observed address only,
    /// within the gate's bounds; declined at once otherwise.
    fn dial_back(
        &mut self,
        link: LinkId,
        req: u32,
        port: u16,
        from: reach_proto::link::DialBackFrom,
        token: u64,
        now: Instant,
    ) {
        let Some(observed) = self.links.get(&link).map(|l| l.observed) else {
            return;
        };
        let admitted = if port == 0 {
            Err("port 0 cannot be dialled")
        } else {
            self.dial_backs.admit(link, now)
        };
        match admitted {
            Ok(()) => {
                self.counters.filter_probes += 1;
                self.events.push(Event::DialBack(DialBackRequest {
                    link,
                    req,
                    to: SocketAddr::new(observed.ip(), port),
                    from,
                    token,
                }));
            }
            Err(reason) => {
                self.counters.filter_probes_declined += 1;
                tracing::debug!(%observed, port, "dial-back declined: {reason}");
                let outcome = reach_proto::link::DialBackOutcome::Declined {
                    reason: reason.into(),
                };
                self.send(link, control(&Control::DialedBack { req, outcome }));
            }
        }
    }

    /// A dial-back the driver ran for `link` ended (answered or not).
    pub fn dial_back_done(&mut self, link: LinkId) {
        self.dial_backs.done(link);
    }

    /// Dial-backs running now.
    pub fn dial_backs_running(&self) -> usize {
        self.dial_backs.running()
    }

    /// Work for the driver since the last call.
    pub fn poll_events(&mut self) -> Vec<Event> {
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
    pub fn poll_transmits(&mut self) -> Vec<(LinkId, Vec<u8>)> {
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
        let grown = self.grown_toward.get(&link).copied().unwrap_or(0);
        let room = LINK_WINDOW_GROWTH.saturating_sub(grown);
        let cap = (r.window.limit() + room).min(u64::from(MAX_STREAM_WINDOW));
        u32::try_from(cap).unwrap_or(MAX_STREAM_WINDOW)
    }

    /// Whether this hub has a route (or a link) to `hub`.
    pub fn routes_to(&self, hub: &NodeId) -> bool {
        *hub == self.me || self.hubs.contains_key(hub) || self.routes.route(hub).is_some()
    }

    /// How much routing and directory state this hub holds, counted in
    /// entries and estimated in bytes from the entries' in-memory sizes
    /// (container overhead not included): what grows with the network.
    pub fn footprint(&self) -> Footprint {
        use std::mem::size_of;
        let routes = self.routes.len();
        let entry = |e: &DirEntry| size_of::<DirEntry>() + e.addrs.len() * size_of::<SocketAddr>();
        let local: usize = self.nodes.values().map(|(_, e)| entry(e)).sum();
        let remote = self.indexed;
        Footprint {
            routes,
            route_bytes: routes * size_of::<(NodeId, reach_proto::routes::Route)>(),
            directory_entries: self.nodes.len() + remote,
            directory_bytes: local
                + self.index.len() * size_of::<(NodeId, IndexEntry)>()
                + self.displaced.len() * size_of::<((NodeId, u32), IndexEntry)>()
                + self
                    .remote
                    .values()
                    .map(|r| r.sigs.len() * size_of::<Signature>())
                    .sum::<usize>(),
        }
    }

    /// Whether a hub link to `hub` is up.
    pub fn has_hub_link(&self, hub: &NodeId) -> bool {
        self.hubs.contains_key(hub)
    }

    /// Whether this hub dialled its link to `hub` (None: no link). Circuit
    /// legs go the way the link was dialled: the dialling side knows it can
    /// reach the other; the other may be behind a NAT or firewall.
    pub fn dialled_hub(&self, hub: &NodeId) -> Option<bool> {
        let link = self.hubs.get(hub)?;
        self.links.get(link).map(|l| l.dialled)
    }

    /// Asks the linked hub `hub`, which dialled this one, to carry `leg`
    /// from its side ([`Control::CircuitPull`]); false without a link.
    pub fn pull_circuit(&mut self, hub: &NodeId, leg: &CircuitHello) -> bool {
        let Some(link) = self.hubs.get(hub).copied() else {
            return false;
        };
        let hello = leg.encode().to_vec();
        self.send(link, control(&Control::CircuitPull { hello }));
        true
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
    pub fn handle_link_up(
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
    pub fn handle_link_down(&mut self, link: LinkId, now: Instant) {
        let Some(info) = self.links.remove(&link) else {
            return;
        };
        self.events.push(Event::LinkGone { link });
        let gone = self.relayed_at.remove(&link).unwrap_or_default();
        for stream in gone {
            if let Some(r) = self.forget_relay((link, stream)) {
                self.forget_relay((r.to_link, r.to_stream));
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
                if let Some(n) = self.node_links.get_mut(&info.peer) {
                    *n -= 1;
                    if *n == 0 {
                        self.node_links.remove(&info.peer);
                    }
                }
                if self.nodes.get(&info.peer).is_some_and(|(l, _)| *l == link) {
                    self.nodes.remove(&info.peer);
                    self.vpn.set_own(self.me, info.peer, None);
                    self.directory_changed(now);
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
                    self.overlay.link_gone(&info.peer);
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

    /// Admits `hub` as a peer from now on: the driver calls it for a
    /// configured peer once dialling it has told its NodeId.
    pub fn allow_hub(&mut self, hub: NodeId) {
        if !self.policy.peer_hubs.contains(&hub) {
            self.policy.peer_hubs.push(hub);
        }
    }

    /// This hub's proof for a `HubHello` to `to` (see [`Policy`]).
    pub fn hub_proof(&self, to: &NodeId) -> Option<[u8; 32]> {
        self.policy.hub_proof(&self.me, to)
    }

    /// Sets the limits (default: [`Limits::default`]).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether `node` has a registered node link here (accepting streams
    /// or connect-only).
    pub fn has_node(&self, node: &NodeId) -> bool {
        self.node_links.contains_key(node)
    }

    /// Whether `link` has registered (as a node or a hub).
    pub fn is_registered(&self, link: LinkId) -> bool {
        self.links
            .get(&link)
            .is_some_and(|l| l.kind != LinkKind::Pending)
    }

    /// Counts a link the driver cut or refused before it registered.
    pub fn count_unregistered_cut(&mut self) {
        self.counters.links_unregistered_cut += 1;
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
                let before = back.window.limit();
                let bytes = back.window.on_credit_capped(bytes, cap);
                let grew = back.window.limit() - before;
                if grew > 0 {
                    *self.grown_toward.entry(link).or_default() += grew;
                }
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
                    self.forget_relay((link, stream));
                    self.forget_relay((to_link, to_stream));
                    self.stream_closed(link);
                    self.stream_closed(to_link);
                }
            }
            Frame::Reset {
                stream,
                code,
                reason,
            } => {
                if let Some(r) = self.forget_relay((link, stream)) {
                    self.forget_relay((r.to_link, r.to_stream));
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

    /// Removes a relay entry, keeping [`HubCore::relayed_at`] and
    /// [`HubCore::grown_toward`] in step.
    fn forget_relay(&mut self, key: (LinkId, u32)) -> Option<Relay> {
        let r = self.relay.remove(&key)?;
        if let Some(set) = self.relayed_at.get_mut(&key.0) {
            set.remove(&key.1);
            if set.is_empty() {
                self.relayed_at.remove(&key.0);
            }
        }
        let grown = r.window.limit().saturating_sub(u64::from(STREAM_WINDOW));
        if grown > 0 {
            if let Some(g) = self.grown_toward.get_mut(&r.to_link) {
                *g = g.saturating_sub(grown);
                if *g == 0 {
                    self.grown_toward.remove(&r.to_link);
                }
            }
        }
        Some(r)
    }

    /// Adds a relay entry for data entering at `key`.
    fn remember_relay(&mut self, key: (LinkId, u32), relay: Relay) {
        self.relayed_at.entry(key.0).or_default().insert(key.1);
        self.relay.insert(key, relay);
    }

    fn reset_both(&mut self, link: LinkId, stream: u32, code: ResetCode, reason: &str) {
        if let Some(r) = self.forget_relay((link, stream)) {
            self.forget_relay((r.to_link, r.to_stream));
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

    /// Which hub `node` is attached to, if known: this one for its own
    /// nodes, else what the index says.
    pub fn home_of(&self, node: &NodeId) -> Option<NodeId> {
        if self.nodes.contains_key(node) {
            return Some(self.me);
        }
        let e = self.index.get(node)?;
        let current = self.slot_state.get(e.slot as usize) == Some(&e.state);
        current
            .then(|| self.slots.get(e.slot as usize).copied())
            .flatten()
    }

    /// The next hub on the path to hub `hub`, and the addresses it listens
    /// on (what it gossips): where a relay circuit to a node at `hub` is
    /// carried on. `None` for this hub itself, or one no route leads to.
    pub fn next_hub_towards(&self, hub: &NodeId) -> Option<(NodeId, Vec<SocketAddr>)> {
        let next = if self.hubs.contains_key(hub) {
            *hub
        } else {
            self.routes.next_hop(hub)?
        };
        self.hubs.contains_key(&next).then(|| {
            let listen = self.remote.get(&next).map(|r| r.listen.clone());
            (next, listen.unwrap_or_default())
        })
    }

    /// The link towards hub `hub`: a direct link, or the next hop's.
    fn link_to_hub(&self, hub: &NodeId) -> Option<LinkId> {
        if let Some(l) = self.hubs.get(hub) {
            return Some(*l);
        }
        let next = self.routes.next_hop(hub)?;
        self.hubs.get(&next).copied()
    }

    /// The link towards `node`: its own session, or the next hub on the path
    /// to its home hub.
    fn link_towards(&self, node: &NodeId) -> Option<LinkId> {
        if let Some((l, _)) = self.nodes.get(node) {
            return Some(*l);
        }
        self.link_to_hub(&self.home_of(node)?)
    }

    /// A node looks `node` up: answered here for nodes attached here, else
    /// asked of the node's home hub, whose answer ([`Control::Located`])
    /// completes it.
    fn lookup(&mut self, link: LinkId, req: u32, node: NodeId, now: Instant) {
        if let Some((_, e)) = self.nodes.get(&node) {
            let entry = Some(e.clone());
            self.send_found(link, req, node, entry);
            return;
        }
        let home = self.home_of(&node);
        let out = home.and_then(|h| self.link_to_hub(&h));
        let (Some(home), Some(out)) = (home, out) else {
            self.send_found(link, req, node, None);
            return;
        };
        if self.locates.len() >= MAX_LOCATES {
            self.counters.locates_dropped += 1;
            tracing::warn!(%node, "lookup answered as unknown: {MAX_LOCATES} lookups already wait for home hubs");
            self.send_found(link, req, node, None);
            return;
        }
        let id = self.next_locate;
        self.next_locate = self.next_locate.wrapping_add(1);
        let pending = PendingLocate {
            link,
            req,
            node,
            at: now,
        };
        self.locates.insert(id, pending);
        let msg = Control::Locate {
            asker: self.me,
            req: id,
            home,
            node,
        };
        self.send(out, control(&msg));
    }

    /// Answers a node's lookup.
    fn send_found(&mut self, link: LinkId, req: u32, node: NodeId, entry: Option<DirEntry>) {
        self.send(link, control(&Control::Found { req, node, entry }));
    }

    /// A Locate on its way to `home`: answered there, passed on elsewhere,
    /// answered "unknown" where the path ends.
    fn forward_locate(
        &mut self,
        from: LinkId,
        asker: NodeId,
        req: u32,
        home: NodeId,
        node: NodeId,
    ) {
        if home == self.me {
            let entry = self.nodes.get(&node).map(|(_, e)| e.clone());
            self.send_located(asker, req, node, entry);
            return;
        }
        match self.link_to_hub(&home).filter(|l| *l != from) {
            Some(out) => {
                let msg = Control::Locate {
                    asker,
                    req,
                    home,
                    node,
                };
                self.send(out, control(&msg));
            }
            None => self.send_located(asker, req, node, None),
        }
    }

    /// Sends a Located answer one hop on towards the hub that asked.
    fn send_located(&mut self, asker: NodeId, req: u32, node: NodeId, entry: Option<DirEntry>) {
        if let Some(out) = self.link_to_hub(&asker) {
            let msg = Control::Located {
                asker,
                req,
                node,
                entry,
            };
            self.send(out, control(&msg));
        }
    }

    /// A home hub's answer on its way to `asker`.
    fn located(&mut self, asker: NodeId, req: u32, node: NodeId, entry: Option<DirEntry>) {
        if asker != self.me {
            self.send_located(asker, req, node, entry);
            return;
        }
        if let Some((n, slot, _)) = self.checks.remove(&req) {
            self.checking.remove(&(n, slot));
            if n == node {
                self.settle_claim(node, slot, entry);
            }
            return;
        }
        let Some(p) = self.locates.remove(&req) else {
            return;
        };
        // Only an answer about the node asked for, to a node still here.
        if p.node == node && self.links.contains_key(&p.link) {
            let entry = entry.filter(|e| e.node == node);
            self.send_found(p.link, p.req, node, entry);
        }
    }

    /// The stream limit `link` has reached, if it has.
    fn stream_limit_reached(&self, link: LinkId) -> Option<(usize, &'static str)> {
        let l = self.links.get(&link)?;
        let (limit, what) = match l.kind {
            LinkKind::Hub => (self.limits.streams_per_hub_link, "hub link"),
            _ => (self.limits.streams_per_node, "node"),
        };
        (l.streams >= limit).then_some((limit, what))
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
        let full = self
            .stream_limit_reached(link)
            .or_else(|| self.stream_limit_reached(out));
        if let Some((limit, what)) = full {
            self.counters.streams_over_limit += 1;
            let n = self.counters.streams_over_limit;
            let why = format!("the hub's stream limit ({limit} per {what}) is reached");
            if n.is_power_of_two() {
                tracing::warn!(%src, %dst, "stream refused: {why} ({n} so far)");
            }
            let mut f = Vec::new();
            encode_reset(stream, ResetCode::Refused, &why, &mut f);
            self.send(link, f);
            return;
        }
        let Some(out_info) = self.links.get_mut(&out) else {
            return;
        };
        let out_stream = out_info.next_stream;
        out_info.next_stream = out_info.next_stream.wrapping_add(2).max(1);
        out_info.streams += 1;
        if let Some(l) = self.links.get_mut(&link) {
            l.streams += 1;
        }
        self.remember_relay(
            (link, stream),
            Relay {
                to_link: out,
                to_stream: out_stream,
                window: Window::new(),
                fin: false,
            },
        );
        self.remember_relay(
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
                    home,
                    vpn,
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
                    if l.kind != LinkKind::Node {
                        *self.node_links.entry(l.peer).or_default() += 1;
                    }
                    l.kind = LinkKind::Node;
                }
                let echo = self.echo_ports.clone();
                self.send(link, control(&Control::Registered { observed, echo }));
                if accepts {
                    // Kept only if it is the node's own claim for this hub.
                    let offered = home.is_some();
                    let claim = home.filter(|c| c.is_valid(&peer, &self.me));
                    if offered && claim.is_none() {
                        tracing::debug!(%peer, "registration's home claim does not verify: kept without it");
                    }
                    let entry = DirEntry {
                        node: peer,
                        hub: self.me,
                        addrs: addrs.into_iter().take(MAX_NODE_ADDRS).collect(),
                        observed,
                        claim,
                    };
                    self.nodes.insert(peer, (link, entry));
                    self.vpn.set_own(self.me, peer, vpn);
                    self.directory_changed(now);
                }
            }
            (LinkKind::Pending, Control::HubHello { addrs, proof }) => {
                let dialled = self.links.get(&link).is_some_and(|l| l.dialled);
                if !self.policy.admits_hub(&peer, proof.as_ref(), &self.me) {
                    self.counters.refused += 1;
                    tracing::warn!(%peer, dialled, "refused a hub link: not an allowed hub, and no valid hub secret proof");
                    let reason = "hub is not an allowed peer and gave no valid hub secret proof";
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
                        proof: self.policy.hub_proof(&self.me, &peer),
                    };
                    self.send(link, control(&hello));
                }
                tracing::info!(%peer, ?addrs, "hub link up");
                self.hubs.insert(peer, link);
                self.routes.handle_link_up(peer);
                self.routes.bump();
                // Anchors before the adverts they prove.
                let anchors: Vec<Anchor> = self.routes.anchors().cloned().collect();
                self.send_anchors(link, &anchors);
                self.gossip_to(link);
                for f in self.directory_sync() {
                    self.send(link, f);
                }
                for f in self.vpn.sync(&self.key) {
                    self.send(link, f);
                }
                for f in self.overlay.sync() {
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
                // The driver answers: the report includes what only it
                // holds (proxy ports and their counters).
                self.events.push(Event::StatusQuery { link });
                return Verdict::Close("status served".into());
            }
            (LinkKind::Pending, other) => {
                return Verdict::Close(format!(
                    "expected Register or HubHello first, got {other:?}"
                ))
            }
            (_, Control::Ping { nonce }) => self.send(link, control(&Control::Pong { nonce })),
            (LinkKind::Hub, Control::Pong { nonce }) => {
                self.overlay.pong(peer, nonce, now);
            }
            (_, Control::Pong { .. }) => {}
            (LinkKind::Node, Control::Lookup { req, node }) => self.lookup(link, req, node, now),
            (LinkKind::Node, Control::NodeAddrs { addrs }) => {
                // Only the registered listener's entry changes; the
                // directory floods it with its held flood.
                if let Some((l, entry)) = self.nodes.get_mut(&peer) {
                    if *l == link {
                        entry.addrs = addrs.into_iter().take(MAX_NODE_ADDRS).collect();
                        self.counters.addr_updates += 1;
                        self.directory_changed(now);
                    }
                }
            }
            (
                LinkKind::Node,
                Control::DialBack {
                    req,
                    port,
                    from,
                    token,
                },
            ) => self.dial_back(link, req, port, from, token, now),
            (LinkKind::Node, Control::VpnClaim { claim }) => {
                if self.nodes.get(&peer).is_some_and(|(l, _)| *l == link) {
                    self.vpn.set_own(self.me, peer, claim);
                    self.vpn_changed(now);
                }
            }
            (LinkKind::Node, Control::VipLookup { req, network, ip }) => {
                self.counters.vip_lookups += 1;
                let holders = self.vpn.holders(network, ip);
                self.send(link, control(&Control::VipFound { req, holders }));
            }
            (
                LinkKind::Hub,
                Control::VpnMembers {
                    origin,
                    state,
                    members,
                    sig,
                },
            ) => match self.vpn.receive(self.me, origin, state, members, sig) {
                Ok(Some(msg)) => self.flood(&msg, Some(link)),
                Ok(None) => {}
                Err(vpn::Refusal::Forged) => {
                    return self.cut_forger(peer, "a vpn member list its origin did not sign")
                }
                Err(vpn::Refusal::TooLarge(n)) => {
                    self.counters.vpn_lists_refused += 1;
                    tracing::warn!(neighbour = %peer, %origin, members = n, "vpn member list refused: more members than a list may hold");
                }
            },
            (
                LinkKind::Hub,
                Control::HubLinks {
                    origin,
                    state,
                    nodes,
                    unlisted,
                    links,
                    sig,
                },
            ) => match self
                .overlay
                .receive(self.me, origin, state, nodes, unlisted, links, sig)
            {
                Ok(Some(msg)) => self.flood(&msg, Some(link)),
                Ok(None) => {}
                Err(overlay::Refusal::Forged) => {
                    return self.cut_forger(peer, "an overlay card its origin did not sign")
                }
                Err(refusal) => {
                    self.counters.cards_refused += 1;
                    tracing::warn!(neighbour = %peer, %origin, ?refusal, "overlay card refused");
                }
            },
            (
                LinkKind::Hub,
                Control::Locate {
                    asker,
                    req,
                    home,
                    node,
                },
            ) => self.forward_locate(link, asker, req, home, node),
            (
                LinkKind::Hub,
                Control::Located {
                    asker,
                    req,
                    node,
                    entry,
                },
            ) => self.located(asker, req, node, entry),
            (LinkKind::Hub, Control::DirectoryRequest { origin }) => {
                self.directory_request(link, origin)
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
            (LinkKind::Hub, Control::Anchors { anchors }) => {
                let mut news = Vec::new();
                for anchor in anchors {
                    match self.routes.handle_anchor(anchor.clone()) {
                        AnchorNews::New => news.push(anchor),
                        AnchorNews::Known | AnchorNews::Full => {}
                        AnchorNews::Forged => {
                            return self.cut_forger(peer, "a route anchor its origin did not sign")
                        }
                    }
                }
                // Flooded on at once, ahead of any advert that needs them.
                let others: Vec<LinkId> =
                    self.hubs.values().copied().filter(|l| *l != link).collect();
                for l in others {
                    self.send_anchors(l, &news);
                }
            }
            (LinkKind::Hub, Control::AnchorRequest { origin }) => {
                if let Some(a) = self.routes.anchor_of(&origin).cloned() {
                    self.send_anchors(link, &[a]);
                }
            }
            (LinkKind::Hub, Control::Adverts { adverts }) => {
                let full_before = self.routes.refused_full;
                let forged_before = self.routes.forged;
                let changed = self.routes.handle_adverts(now, peer, &adverts);
                if self.routes.forged > forged_before {
                    return self.cut_forger(peer, "route adverts that fail their origin's chain");
                }
                for (origin, ask) in self.routes.take_wanted() {
                    if let Some(l) = self.hubs.get(&ask).copied() {
                        self.send(l, control(&Control::AnchorRequest { origin }));
                    }
                }
                if changed {
                    self.gossip_changes();
                }
                let full = self.routes.refused_full;
                if full > full_before && (full_before + 1..=full).any(u64::is_power_of_two) {
                    tracing::warn!(
                        neighbour = %peer,
                        "route table full ({} hubs): ignored adverts for new hubs ({full} so far)",
                        reach_proto::routes::MAX_ROUTES
                    );
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
                    sig,
                },
            ) => {
                if origin == self.me
                    || self.remote.get(&origin).is_some_and(|r| r.state >= state)
                    || self.has_part(&origin, state, part)
                {
                    return Verdict::Continue;
                }
                let too_many_parts = parts > MAX_DIRECTORY_PARTS
                    || part >= parts
                    || nodes.len() > DIRECTORY_PART
                    || listen.len() > MAX_NODE_ADDRS;
                let too_many_partial = parts > 1
                    && !self.partial.contains_key(&origin)
                    && self.partial.len() >= MAX_PARTIAL_DIRECTORIES;
                if too_many_parts || too_many_partial {
                    self.counters.directories_refused += 1;
                    let n = self.counters.directories_refused;
                    if n.is_power_of_two() {
                        tracing::warn!(
                            %origin,
                            neighbour = %peer,
                            parts,
                            "directory part refused: over the directory bounds ({MAX_DIRECTORY_PARTS} parts of {DIRECTORY_PART} nodes, {MAX_PARTIAL_DIRECTORIES} assembling at once; {n} so far)"
                        );
                    }
                    return Verdict::Continue;
                }
                let signed = directory_signed_bytes(&origin, state, part, parts, &nodes, &listen);
                if !origin.verify(&signed, &sig) {
                    return self.cut_forger(peer, "a directory part its origin did not sign");
                }
                // Pass each new part on at once; hubs further away assemble
                // it too. A part seen before (it arrives over every link)
                // goes no further.
                let msg = control(&Control::Directory {
                    origin,
                    state,
                    part,
                    parts,
                    nodes: nodes.clone(),
                    listen: listen.clone(),
                    sig,
                });
                let others: Vec<LinkId> =
                    self.hubs.values().copied().filter(|l| *l != link).collect();
                for l in others {
                    self.send(l, msg.clone());
                }
                if let Some((nodes, sigs)) = self.assemble(origin, state, part, parts, nodes, sig) {
                    self.commit_remote(origin, state, nodes, listen, sigs, now);
                }
            }
            (LinkKind::Hub, Control::CircuitPull { hello }) => {
                let leg = <&[u8; HELLO_LEN]>::try_from(hello.as_slice())
                    .map_err(|_| "not a circuit hello's length".to_string())
                    .and_then(|b| CircuitHello::decode(b).map_err(|e| e.to_string()))
                    .and_then(|leg| {
                        (!leg.pulled)
                            .then_some(leg)
                            .ok_or_else(|| "marked pulled already".to_string())
                    });
                match (leg, self.links.get(&link).map(|l| l.observed)) {
                    (Ok(leg), Some(addr)) => self.events.push(Event::CircuitPull {
                        hub: peer,
                        addr,
                        leg,
                    }),
                    (Err(why), _) => {
                        tracing::debug!(neighbour = %peer, "circuit pull ignored: {why}")
                    }
                    (Ok(_), None) => {}
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

    /// Adds a part of `origin`'s directory; returns the whole (each node
    /// with its part, and each part's signature) once complete.
    #[allow(clippy::type_complexity)]
    fn assemble(
        &mut self,
        origin: NodeId,
        state: u64,
        part: u16,
        parts: u16,
        nodes: Vec<NodeId>,
        sig: Signature,
    ) -> Option<(Vec<(NodeId, u16)>, Vec<Signature>)> {
        if parts <= 1 {
            self.partial.remove(&origin);
            return Some((nodes.into_iter().map(|n| (n, 0)).collect(), vec![sig]));
        }
        let fresh = || Partial {
            state,
            sigs: vec![None; usize::from(parts)],
            nodes: Vec::new(),
        };
        let p = self.partial.entry(origin).or_insert_with(fresh);
        if p.state != state || p.sigs.len() != usize::from(parts) {
            if p.state > state {
                return None;
            }
            *p = fresh();
        }
        let slot = p.sigs.get_mut(usize::from(part))?;
        if slot.is_none() {
            *slot = Some(sig);
            p.nodes.extend(nodes.into_iter().map(|n| (n, part)));
        }
        if p.sigs.iter().all(Option::is_some) {
            let p = self.partial.remove(&origin)?;
            return Some((p.nodes, p.sigs.into_iter().flatten().collect()));
        }
        None
    }

    /// Whether part `part` of `origin`'s directory at `state` arrived
    /// before (and is waiting for its other parts).
    fn has_part(&self, origin: &NodeId, state: u64, part: u16) -> bool {
        self.partial.get(origin).is_some_and(|p| {
            p.state == state && p.sigs.get(usize::from(part)).is_some_and(Option::is_some)
        })
    }

    /// The index slot of hub `hub`, made on first use.
    fn slot(&mut self, hub: NodeId) -> Option<u32> {
        if let Some(s) = self.slot_of.get(&hub) {
            return Some(*s);
        }
        if self.slots.len() >= MAX_HUB_SLOTS {
            self.counters.directories_unindexed += 1;
            tracing::warn!(%hub, "directory not indexed: {MAX_HUB_SLOTS} hubs known already");
            return None;
        }
        let s = u32::try_from(self.slots.len()).ok()?;
        self.slots.push(hub);
        self.slot_state.push(0);
        self.slot_of.insert(hub, s);
        Some(s)
    }

    /// Takes in `origin`'s whole directory at `state`: its nodes point there
    /// now, and its earlier entries go stale.
    fn commit_remote(
        &mut self,
        origin: NodeId,
        state: u64,
        nodes: Vec<(NodeId, u16)>,
        listen: Vec<SocketAddr>,
        sigs: Vec<Signature>,
        now: Instant,
    ) {
        let Some(slot) = self.slot(origin) else {
            return;
        };
        if let Some(st) = self.slot_state.get_mut(slot as usize) {
            *st = state;
        }
        let mut disputed = Vec::new();
        for (node, part) in &nodes {
            let new = IndexEntry {
                slot,
                state,
                part: *part,
            };
            match self.index.get(node).copied() {
                // Listed by another current directory too: the node moved
                // and its old hub has not noticed yet, or a hub lies. The
                // claim the node proved last stays in the index (else the
                // newer directory's); the other is kept aside, so that each
                // directory is passed on as its origin signed it, and both
                // hubs are asked for the node's own claim.
                Some(old) if old.slot != slot && self.is_current(&old) => {
                    let proven = self.proven.get(node).map(|(s, _)| *s);
                    if proven == Some(old.slot) {
                        self.displaced.insert((*node, slot), new);
                    } else {
                        self.index.insert(*node, new);
                        self.displaced.insert((*node, old.slot), old);
                    }
                    for s in [old.slot, slot] {
                        if proven != Some(s) {
                            disputed.push((*node, s));
                        }
                    }
                }
                _ => {
                    self.index.insert(*node, new);
                }
            }
        }
        for (node, s) in disputed {
            self.check_claim(node, s, now);
        }
        let old = self.remote.insert(
            origin,
            Remote {
                state,
                slot,
                count: nodes.len(),
                listen,
                sigs,
                unroutable_since: None,
            },
        );
        self.indexed = self.indexed + nodes.len() - old.map_or(0, |r| r.count);
        self.sweep_index();
    }

    /// Asks the hub of `slot` for `node`'s own claim to be there (a Locate
    /// whose answer goes to [`HubCore::settle_claim`]).
    fn check_claim(&mut self, node: NodeId, slot: u32, now: Instant) {
        if self.checking.contains(&(node, slot)) || self.checks.len() >= MAX_LOCATES {
            return;
        }
        let Some(home) = self.slots.get(slot as usize).copied() else {
            return;
        };
        let Some(out) = self.link_to_hub(&home) else {
            return;
        };
        let req = self.next_locate;
        self.next_locate = self.next_locate.wrapping_add(1);
        self.checks.insert(req, (node, slot, now));
        self.checking.insert((node, slot));
        let msg = Control::Locate {
            asker: self.me,
            req,
            home,
            node,
        };
        self.send(out, control(&msg));
    }

    /// A hub's answer to a claim check: if it shows the node's own claim,
    /// newer than any proved before, that hub's listing is the node's
    /// home from now on.
    fn settle_claim(&mut self, node: NodeId, slot: u32, entry: Option<DirEntry>) {
        let Some(hub) = self.slots.get(slot as usize).copied() else {
            return;
        };
        let stamp = entry
            .filter(|e| e.node == node && e.hub == hub)
            .and_then(|e| e.claim)
            .filter(|c| c.is_valid(&node, &hub))
            .map(|c| c.stamp);
        let Some(stamp) = stamp else {
            tracing::debug!(%node, %hub, "a hub listing a node shows no claim from it");
            return;
        };
        if self.proven.get(&node).is_some_and(|(_, s)| *s >= stamp) {
            return;
        }
        self.proven.insert(node, (slot, stamp));
        let Some(cur) = self.index.get(&node).copied() else {
            return;
        };
        if cur.slot == slot {
            return;
        }
        let Some(d) = self.displaced.remove(&(node, slot)) else {
            return;
        };
        if self.is_current(&d) {
            tracing::info!(%node, %hub, "node listed by two hubs: its latest own claim is for this one");
            self.index.insert(node, d);
            if self.is_current(&cur) {
                self.displaced.insert((node, cur.slot), cur);
            }
        }
    }

    /// Whether an index entry is of its origin's current directory.
    fn is_current(&self, e: &IndexEntry) -> bool {
        self.slot_state.get(e.slot as usize) == Some(&e.state)
    }

    /// Drops stale index entries once they could make up half the index
    /// (amortised: each sweep removes at least as many as it keeps).
    fn sweep_index(&mut self) {
        let current = &self.slot_state;
        let is_current = |e: &IndexEntry| current.get(e.slot as usize) == Some(&e.state);
        self.displaced.retain(|_, e| is_current(e));
        let (index, displaced) = (&self.index, &self.displaced);
        self.proven.retain(|node, (slot, _)| {
            index
                .get(node)
                .is_some_and(|e| e.slot == *slot && is_current(e))
                || displaced.get(&(*node, *slot)).is_some_and(is_current)
        });
        if self.index.len() <= 2 * self.indexed + 1024 {
            return;
        }
        let current = &self.slot_state;
        self.index
            .retain(|_, e| current.get(e.slot as usize) == Some(&e.state));
    }

    /// Every directory this hub knows, its own first, for a hub that just
    /// linked: remote ones are rebuilt from the index (the only copy).
    fn directory_sync(&mut self) -> Vec<Vec<u8>> {
        let mut out = self.directory_messages();
        let mut members = self.members(None);
        for (origin, r) in &self.remote {
            out.extend(remote_parts(*origin, r, &mut members));
        }
        out
    }

    /// The current members of other hubs' directories, by slot and part
    /// (only slot `only`, if given), sorted as their origins signed them:
    /// rebuilt from the index, the only copy, in one pass over it.
    fn members(&self, only: Option<u32>) -> HashMap<(u32, u16), Vec<NodeId>> {
        let mut parts: HashMap<(u32, u16), Vec<NodeId>> = HashMap::new();
        let index = self.index.iter();
        let displaced = self.displaced.iter().map(|((node, _), e)| (node, e));
        for (node, e) in index.chain(displaced) {
            if only.is_none_or(|s| s == e.slot) && self.is_current(e) {
                parts.entry((e.slot, e.part)).or_default().push(*node);
            }
        }
        parts.values_mut().for_each(|nodes| nodes.sort());
        parts
    }

    /// This hub's directory as signed messages, made once per state.
    fn directory_messages(&mut self) -> Vec<Vec<u8>> {
        if let Some((state, msgs)) = &self.own_directory {
            if *state == self.dir_state {
                return msgs.clone();
            }
        }
        let nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
        let parts: Vec<Vec<NodeId>> = if nodes.is_empty() {
            vec![Vec::new()]
        } else {
            nodes
                .chunks(DIRECTORY_PART)
                .map(<[NodeId]>::to_vec)
                .collect()
        };
        let n = u16::try_from(parts.len()).unwrap_or(u16::MAX);
        let msgs: Vec<Vec<u8>> = parts
            .into_iter()
            .take(usize::from(n))
            .enumerate()
            .map(|(i, nodes)| {
                let part = i as u16;
                let listen = self.listen.clone();
                control(&Control::signed_directory(
                    &self.key,
                    self.dir_state,
                    part,
                    n,
                    nodes,
                    listen,
                ))
            })
            .collect();
        self.own_directory = Some((self.dir_state, msgs.clone()));
        msgs
    }

    /// This hub's own directory changed: flooded at once, or at the end of
    /// the hold time if it was flooded within it.
    fn directory_changed(&mut self, now: Instant) {
        self.dir_state += 1;
        match self.dir_flooded_at {
            Some(at) if now < at + DIRECTORY_HOLD => self.dir_dirty = true,
            _ => self.flood_directory(now),
        }
    }

    /// An own vpn member's claim changed (its registration did not): the
    /// list floods at once, or with the held directory flood.
    fn vpn_changed(&mut self, now: Instant) {
        match self.dir_flooded_at {
            Some(at) if now < at + DIRECTORY_HOLD => self.dir_dirty = true,
            _ => {
                if let Some(msg) = self.vpn.take_change(&self.key) {
                    self.flood(&msg, None);
                }
            }
        }
    }

    fn flood_directory(&mut self, now: Instant) {
        self.dir_dirty = false;
        self.dir_flooded_at = Some(now);
        let mut msgs = self.directory_messages();
        // Vpn membership changes only with registrations, which change the
        // directory: its list floods with it.
        msgs.extend(self.vpn.take_change(&self.key));
        let hubs: Vec<LinkId> = self.hubs.values().copied().collect();
        for l in hubs {
            for m in &msgs {
                self.send(l, m.clone());
            }
        }
    }

    /// When [`HubCore::handle_timeout`] has work: a held directory flood.
    /// The driver calls it after every input and wakes at the time given.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let at = self.dir_flooded_at?;
        self.dir_dirty.then_some(at + DIRECTORY_HOLD)
    }

    /// Does what is due at `now`: floods a held directory change.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|at| now >= at) {
            self.flood_directory(now);
        }
    }

    /// Answers a directory request from `link` with the parts of
    /// `origin`'s directory, or passes it on towards `origin`.
    fn directory_request(&mut self, link: LinkId, origin: NodeId) {
        let parts = if origin == self.me {
            self.directory_messages()
        } else if let Some(r) = self.remote.get(&origin) {
            remote_parts(origin, r, &mut self.members(Some(r.slot)))
        } else {
            if let Some(out) = self.link_to_hub(&origin).filter(|l| *l != link) {
                self.send(out, control(&Control::DirectoryRequest { origin }));
            }
            return;
        };
        for f in parts {
            self.send(link, f);
        }
    }

    /// Asks for the directories of hubs this hub has routed to for a grace
    /// time without having one (see [`Control::DirectoryRequest`]).
    fn request_missing_directories(&mut self, now: Instant) {
        let wait = self.directory_grace / 4;
        let routed: Vec<NodeId> = self
            .routes
            .routes()
            .map(|(dest, _)| *dest)
            .filter(|d| !self.remote.contains_key(d))
            .collect();
        let (remote, routes) = (&self.remote, &self.routes);
        self.missing
            .retain(|hub, _| !remote.contains_key(hub) && routes.route(hub).is_some());
        for hub in routed {
            let since = *self.missing.entry(hub).or_insert(now);
            if now.saturating_duration_since(since) < wait {
                continue;
            }
            self.missing.insert(hub, now);
            if let Some(out) = self.link_to_hub(&hub) {
                tracing::debug!(%hub, "asking for the directory of a hub routed to without one");
                self.send(out, control(&Control::DirectoryRequest { origin: hub }));
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
            self.forget_remote(&origin);
        }
        self.sweep_index();
    }

    /// Forgets `origin`'s directory: its index entries go stale with it (a
    /// sweep removes them).
    fn forget_remote(&mut self, origin: &NodeId) {
        self.vpn.forget(origin);
        if let Some(r) = self.remote.remove(origin) {
            self.indexed -= r.count;
            if let Some(st) = self.slot_state.get_mut(r.slot as usize) {
                *st = 0;
            }
        }
        self.partial.remove(origin);
    }

    /// A linked hub sent gossip that fails its proof: it is lying (or
    /// broken), so its link goes, with a counter and a log line.
    fn cut_forger(&mut self, peer: NodeId, what: &str) -> Verdict {
        self.counters.gossip_forged += 1;
        tracing::warn!(neighbour = %peer, "hub link cut: it sent {what}");
        Verdict::Close(format!("hub {peer} sent {what}"))
    }

    /// Sends `anchors` on `link` in parts that fit a frame.
    fn send_anchors(&mut self, link: LinkId, anchors: &[Anchor]) {
        for part in anchors.chunks(ANCHORS_PART) {
            let anchors = part.to_vec();
            self.send(link, control(&Control::Anchors { anchors }));
        }
    }

    /// This hub signed a new chain (at the start, or when its states ran
    /// past the last): every neighbour gets its anchor before the adverts.
    fn flush_own_anchor(&mut self) {
        if let Some(a) = self.routes.take_own_anchor() {
            let hubs: Vec<LinkId> = self.hubs.values().copied().collect();
            for l in hubs {
                self.send_anchors(l, std::slice::from_ref(&a));
            }
        }
    }

    fn gossip_to(&mut self, link: LinkId) {
        self.flush_own_anchor();
        let Some(peer) = self.links.get(&link).map(|l| l.peer) else {
            return;
        };
        let adverts = self.routes.adverts_for(peer);
        self.send_adverts(link, &adverts);
    }

    /// Sends `adverts` on `link` in parts that fit a frame; each part stands
    /// alone (a receiver takes in every advert it gets).
    fn send_adverts(&mut self, link: LinkId, adverts: &[reach_proto::routes::Advert]) {
        for part in adverts.chunks(ADVERTS_PART) {
            let adverts = part.to_vec();
            self.send(link, control(&Control::Adverts { adverts }));
        }
    }

    /// Sends `msg` to every linked hub but the one on `except`.
    fn flood(&mut self, msg: &[u8], except: Option<LinkId>) {
        let links: Vec<LinkId> = self.hubs.values().copied().collect();
        for l in links.into_iter().filter(|l| Some(*l) != except) {
            self.send(l, msg.to_vec());
        }
    }

    /// Tells every neighbour the paths that changed (a triggered update).
    fn gossip_changes(&mut self) {
        self.flush_own_anchor();
        let hubs: Vec<(NodeId, LinkId)> = self.hubs.iter().map(|(h, l)| (*h, *l)).collect();
        for (peer, link) in hubs {
            let adverts = self.routes.changed_adverts_for(peer);
            self.send_adverts(link, &adverts);
        }
        self.routes.clear_changes();
    }

    /// Tells every neighbour the whole table (which covers any changes).
    fn gossip(&mut self) {
        self.flush_own_anchor();
        let hubs: Vec<LinkId> = self.hubs.values().copied().collect();
        for l in hubs {
            self.gossip_to(l);
        }
        self.routes.clear_changes();
    }

    /// Periodic work: refresh this hub's state, expire stale routes, gossip.
    /// Directories travel only when they change and when a hub link comes up:
    /// links are reliable, so nothing is missed in between.
    pub fn handle_tick(&mut self, now: Instant) {
        self.connect_backs
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < CONNECT_BACK_MEMORY);
        self.relay_paths
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < CONNECT_BACK_MEMORY);
        self.locates
            .retain(|_, p| now.saturating_duration_since(p.at) < CONNECT_BACK_MEMORY);
        self.checks
            .retain(|_, (_, _, at)| now.saturating_duration_since(*at) < CONNECT_BACK_MEMORY);
        self.checking = self.checks.values().map(|(n, s, _)| (*n, *s)).collect();
        self.handle_timeout(now);
        self.routes.bump();
        self.routes.handle_timeout(now);
        self.forget_unroutable(now);
        self.request_missing_directories(now);
        self.gossip();
        self.tick_overlay(now);
    }

    /// This hub's links as (neighbour, dialled), by neighbour.
    fn hub_links(&self) -> Vec<(NodeId, bool)> {
        self.hubs
            .iter()
            .map(|(hub, l)| (*hub, self.links.get(l).is_some_and(|i| i.dialled)))
            .collect()
    }

    /// The overlay map's tick: floods this hub's card if it changed, pings
    /// every hub link for its round trip, drops cards of hubs gone.
    fn tick_overlay(&mut self, now: Instant) {
        let links = self.hub_links();
        if let Some(msg) = self
            .overlay
            .take_change(&self.key, &links, self.nodes.len())
        {
            self.flood(&msg, None);
        }
        for (hub, l) in self.hubs.iter().map(|(h, l)| (*h, *l)).collect::<Vec<_>>() {
            let nonce = self.overlay.ping(hub, now);
            self.send(l, control(&Control::Ping { nonce }));
        }
        let (hubs, routes, me) = (&self.hubs, &self.routes, self.me);
        self.overlay
            .forget_unroutable(now, self.directory_grace, |o| {
                *o == me || hubs.contains_key(o) || routes.route(o).is_some()
            });
    }

    /// The overlay map: this hub's card (as it is now) first, then every
    /// other hub's it holds.
    pub fn overlay_cards(&self) -> Vec<HubCard> {
        let (links, unlisted) = self.overlay.own_card(&self.hub_links());
        let own = HubCard {
            hub: self.me,
            nodes: u32::try_from(self.nodes.len()).unwrap_or(u32::MAX),
            links,
            unlisted,
            reachable: true,
        };
        let mut cards = vec![own];
        cards.extend(self.overlay.cards(|o| self.routes_to(o)));
        cards
    }

    /// A snapshot for `reach status` and metrics, without the proxy ports
    /// (the driver holds those and adds them).
    pub fn status(&self) -> Snapshot {
        Snapshot {
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
                    rtt: self.overlay.rtt(peer),
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
            remote_nodes: self.indexed,
            vpn_members: self.vpn.len(),
            streams: self.relay.len() / 2,
            counters: self.counters,
            overlay: self.overlay_cards(),
        }
    }
}

/// What a hub holds for the network beyond its own links: see
/// [`HubCore::footprint`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Routes to other hubs.
    pub routes: usize,
    /// Their estimated size in memory.
    pub route_bytes: usize,
    /// Directory entries (attached nodes and other hubs' nodes).
    pub directory_entries: usize,
    /// Their estimated size in memory, with the node-to-hub index.
    pub directory_bytes: usize,
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

#[cfg(test)]
mod tests;
