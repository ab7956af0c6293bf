//! Hub links: the frames that node–hub and hub–hub sessions carry.
//!
//! A link is an authenticated, encrypted session (the ordinary reach handshake
//! to the hub's NodeId on virtual port [`HUB_VPORT`]), over which frames
//! multiplex control messages and routed streams:
//!
//! ```text
//! frame = kind:u8 | stream:u32 | len:u16 | payload[len]
//! kind  0 Control  stream 0, payload a postcard-encoded `Control`
//!       1 Open     payload dst NodeId (32) | src NodeId (32)
//!       2 Data     payload stream bytes (at most MAX_DATA_CHUNK)
//!       3 Credit   payload u32: more bytes the receiver may send
//!       4 Fin      the sender's direction ends (half close)
//!       5 Reset    payload code:u8 | UTF-8 reason: the stream is gone
//! ```
//!
//! Stream ids are chosen by the side that opens a stream on that link: the node
//! (or the hub that dialled the link) uses odd ids, the other side even ids, so
//! both can open without coordination. Every hub on a path maps ids hop by hop.
//!
//! Flow control is end to end: each direction of a stream starts with
//! [`STREAM_WINDOW`] bytes of credit and the reader grants more with Credit
//! frames as the application consumes data. Hubs pass Credit frames along and
//! check that no sender exceeds its window ([`Window`]), so a hub holds at most one
//! window per stream and direction however slow a reader is, and a slow stream
//! never blocks the link for others.
//!
//! Routed payload is the end-to-end handshake and records of the two nodes:
//! hubs forward ciphertext they cannot read.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::identity::{NodeId, NODE_ID_LEN};
use crate::routes::Advert;

/// The virtual port a node or hub asks for when it opens a hub session.
pub const HUB_VPORT: u16 = 0;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 7;
/// Largest frame payload.
pub const MAX_FRAME_PAYLOAD: usize = u16::MAX as usize;
/// Largest Data payload: one stream's frame delays other streams on a link by
/// at most this much.
pub const MAX_DATA_CHUNK: usize = 32 * 1024;
/// Initial credit of each direction of a routed stream.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// The largest window a receiver grows a stream to (see [`Grant`]), and the
/// largest a hub relays: 32 MiB keeps ~3 Gbit/s going over a 90 ms path.
/// A window grows only while its reader keeps up, so it ends near the
/// path's bandwidth-delay product (at most twice it, as it doubles); what
/// all grown windows may hold is bounded per process (`reach`'s 256 MiB
/// growth budget) and per hub link (`LINK_WINDOW_GROWTH`, 64 MiB).
pub const MAX_STREAM_WINDOW: u32 = 32 * 1024 * 1024;
/// Most addresses a hub keeps per registered node.
pub const MAX_NODE_ADDRS: usize = 8;
/// Node ids per Directory message: 32 bytes each, so a part (with its
/// origin's listen addresses) stays well inside a frame.
pub const DIRECTORY_PART: usize = 1024;
/// Route adverts per Adverts message: an advert takes at most 59 bytes
/// (id, state as a varint, hops, chain proof), so a part stays inside a
/// frame; a hub that knows more hubs sends several (each stands alone).
pub const ADVERTS_PART: usize = 1024;
/// Route anchors per Anchors message: at most 122 bytes each (id, base as a
/// varint, chain top, signature).
pub const ANCHORS_PART: usize = 256;
/// Longest reset reason kept; longer ones are cut.
pub const MAX_REASON_LEN: usize = 200;

const KIND_CONTROL: u8 = 0;
const KIND_OPEN: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_CREDIT: u8 = 3;
const KIND_FIN: u8 = 4;
const KIND_RESET: u8 = 5;

/// Why a routed stream was reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetCode {
    /// No hub knows a path to the target node.
    NoRoute,
    /// A hub's policy refused the stream.
    Refused,
    /// A link on the path went down.
    LinkLost,
    /// A sender exceeded its credit.
    FlowViolation,
    /// An endpoint abandoned the stream.
    Cancelled,
    /// A peer broke the link protocol.
    Protocol,
    /// A code this version does not know.
    Other(u8),
}

impl ResetCode {
    fn code(self) -> u8 {
        match self {
            ResetCode::NoRoute => 1,
            ResetCode::Refused => 2,
            ResetCode::LinkLost => 3,
            ResetCode::FlowViolation => 4,
            ResetCode::Cancelled => 5,
            ResetCode::Protocol => 6,
            ResetCode::Other(c) => c,
        }
    }

    fn from_code(c: u8) -> Self {
        match c {
            1 => ResetCode::NoRoute,
            2 => ResetCode::Refused,
            3 => ResetCode::LinkLost,
            4 => ResetCode::FlowViolation,
            5 => ResetCode::Cancelled,
            6 => ResetCode::Protocol,
            c => ResetCode::Other(c),
        }
    }
}

impl std::fmt::Display for ResetCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResetCode::NoRoute => f.write_str("no route to the node"),
            ResetCode::Refused => f.write_str("refused by hub policy"),
            ResetCode::LinkLost => f.write_str("a hub link on the path went down"),
            ResetCode::FlowViolation => f.write_str("flow-control violation"),
            ResetCode::Cancelled => f.write_str("cancelled by the peer"),
            ResetCode::Protocol => f.write_str("link protocol error"),
            ResetCode::Other(c) => write!(f, "reset code {c}"),
        }
    }
}

/// Where a node can be found: its home hub and the addresses it advertises.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// The node.
    pub node: NodeId,
    /// The hub it is attached to.
    pub hub: NodeId,
    /// Direct addresses it advertised when it registered.
    pub addrs: Vec<SocketAddr>,
    /// The address its hub saw its session come from.
    pub observed: SocketAddr,
    /// The node's own word that it registered with `hub`, if it gave one:
    /// what decides between two hubs that both list the node.
    pub claim: Option<Box<HomeClaim>>,
}

const HOME_LABEL: &[u8] = b"reach home v1";

/// A node's signed statement that it registered with a hub at `stamp`
/// (its wall clock, in microseconds): no hub can make one for a node that
/// did not, and of two hubs listing a node, the later claim wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeClaim {
    /// When the node registered, by its clock.
    pub stamp: u64,
    /// The node's signature over (node, hub, stamp).
    pub sig: crate::identity::Signature,
}

impl HomeClaim {
    fn message(node: &NodeId, hub: &NodeId, stamp: u64) -> Vec<u8> {
        [
            HOME_LABEL,
            node.as_bytes(),
            hub.as_bytes(),
            &stamp.to_be_bytes(),
        ]
        .concat()
    }

    /// `key`'s claim to be registered with `hub` at `stamp`.
    pub fn new(key: &crate::identity::SecretKey, hub: &NodeId, stamp: u64) -> Self {
        let sig = key.sign(&Self::message(&key.node_id(), hub, stamp));
        Self { stamp, sig }
    }

    /// Whether `node` made this claim for `hub`.
    pub fn is_valid(&self, node: &NodeId, hub: &NodeId) -> bool {
        node.verify(&Self::message(node, hub, self.stamp), &self.sig)
    }
}

/// A request, carried through hubs, that the target connect back to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectBack {
    /// Who asks (filled in by the first hub from the authenticated session).
    pub from: NodeId,
    /// Who should connect.
    pub target: NodeId,
    /// Matches the incoming connection to the request.
    pub token: u16,
    /// The virtual port the asker wants on the target.
    pub vport: u16,
    /// Where the asker listens.
    pub addrs: Vec<SocketAddr>,
    /// The connection is to carry the routed stream between the two with
    /// this upgrade id: the target hands it to that stream, not to `accept`.
    pub upgrade: Option<u16>,
}

/// A message between two nodes that hubs carry without reading: the
/// rendezvous of the Splice module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Rendezvous {
    /// Asker to target: let us splice a connection to `vport`; aim your
    /// SYNs at `candidates` (my predicted external endpoints).
    SpliceOffer {
        /// Matches the answer to the offer.
        token: u32,
        /// The virtual port the asker wants on the target.
        vport: u16,
        /// Where the asker's SYNs will come from, most likely first.
        candidates: Vec<SocketAddr>,
        /// The connection is to carry an existing routed stream; `vport` is
        /// then its upgrade id.
        upgrade: bool,
    },
    /// Target to asker: agreed; my SYNs come from `candidates`, and I am
    /// sending them now.
    SpliceAnswer {
        /// The offer's token.
        token: u32,
        /// The target's predicted external endpoints.
        candidates: Vec<SocketAddr>,
    },
    /// Target to asker: no splice (no such port, unpredictable NAT, busy),
    /// or a circuit offer it cannot join (token: the ticket's first four
    /// bytes, little-endian).
    SpliceDeclined {
        /// The offer's token.
        token: u32,
        /// Why, for the operator.
        reason: String,
    },
    /// Asker to target: move the routed stream with upgrade id `upgrade`
    /// onto a relay circuit at `hub`; join it there with `ticket`
    /// (`crate::circuit`). The pairing is the answer; a target that cannot
    /// join says so with `SpliceDeclined`.
    CircuitOffer {
        /// The circuit's ticket.
        ticket: crate::circuit::Ticket,
        /// The routed stream's upgrade id.
        upgrade: u16,
        /// The hub that pairs the circuit.
        hub: NodeId,
        /// Where the asker reached that hub.
        addrs: Vec<SocketAddr>,
    },
}

impl Rendezvous {
    /// The token the message belongs to.
    pub fn token(&self) -> u32 {
        match self {
            Rendezvous::SpliceOffer { token, .. }
            | Rendezvous::SpliceAnswer { token, .. }
            | Rendezvous::SpliceDeclined { token, .. } => *token,
            Rendezvous::CircuitOffer { ticket, .. } => crate::circuit::ticket_token(ticket),
        }
    }
}

/// Most holders a `VipFound` names.
pub const MAX_VIP_HOLDERS: usize = 8;

/// Control messages on a hub link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Control {
    /// Node to hub, first message: attach with these advertised addresses.
    /// `proof` shows the node knows the network secret, if the hub uses one.
    Register {
        /// Direct addresses the node listens on.
        addrs: Vec<SocketAddr>,
        /// HMAC of the node's and the hub's ids under the network secret.
        proof: Option<[u8; 32]>,
        /// Whether this session accepts streams. A connect-only process
        /// (`reach connect`) shares its NodeId with the node's listener, so it
        /// must not take the listener's place in the directory.
        accepts: bool,
        /// The node's [`HomeClaim`] for this hub, passed on in lookups.
        home: Option<Box<HomeClaim>>,
        /// The virtual IP address this node holds in a vpn network, which
        /// the hub lists in its member list ([`Control::VpnMembers`]).
        vpn: Option<crate::vpn::VpnClaim>,
    },
    /// Hub to node: attached; the hub saw the session come from `observed`.
    Registered {
        /// The node's address as the hub sees it (its NAT mapping, if any).
        observed: SocketAddr,
        /// Ports of the hub's address echoes (on the hub's address), for NAT
        /// behaviour detection; empty when the hub runs none.
        echo: Vec<u16>,
    },
    /// Hub to node or hub: not admitted; the hub closes the link after this.
    Refused {
        /// Why, for the operator.
        reason: String,
    },
    /// Node to hub: where is `node`?
    Lookup {
        /// Echoed in the reply.
        req: u32,
        /// The node sought.
        node: NodeId,
    },
    /// Hub to node: the answer to a lookup.
    Found {
        /// The request this answers.
        req: u32,
        /// The node sought.
        node: NodeId,
        /// Where it is, if any hub knows.
        entry: Option<DirEntry>,
    },
    /// Node to hub, registered: this node now holds `claim` (None: no vpn
    /// address), as a `Register` would have said.
    VpnClaim {
        /// The claim.
        claim: Option<crate::vpn::VpnClaim>,
    },
    /// Node to hub: which nodes hold virtual address `ip` (an IPv4 claim
    /// or a ULA) in `network`? Answered with `VipFound`.
    VipLookup {
        /// Echoed in the reply.
        req: u32,
        /// The vpn network.
        network: crate::vpn::NetworkTag,
        /// The virtual address.
        ip: std::net::IpAddr,
    },
    /// Hub to node: the answer to `VipLookup`: the nodes any hub of the
    /// federation lists with that address (more than one is a conflict,
    /// which the members settle), at most [`MAX_VIP_HOLDERS`].
    VipFound {
        /// The request this answers.
        req: u32,
        /// The holders, earliest listed first.
        holders: Vec<NodeId>,
    },
    /// Hub to hub, flooded: the vpn members attached to `origin`, signed by
    /// it ([`crate::vpn::members_signed_bytes`]); newer `state` replaces
    /// older.
    VpnMembers {
        /// The hub whose members these are.
        #[serde(with = "crate::identity::relayed_id")]
        origin: NodeId,
        /// Newer replaces older.
        state: u64,
        /// The members, at most [`crate::vpn::MEMBERS_PART`].
        members: Vec<crate::vpn::VpnMember>,
        /// `origin`'s signature.
        sig: crate::identity::Signature,
    },
    /// Node to hub (and on, hub to hub and to the target's session): please
    /// connect back.
    ConnectBack(ConnectBack),
    /// A connect-back failed: the hubs could not deliver it, or the target
    /// could not connect. Travels back along the request's path to the
    /// requester, so its Reverse module gives up at once.
    ConnectBackFailed {
        /// Who asked.
        requester: NodeId,
        /// Who was to connect back.
        target: NodeId,
        /// The request's token.
        token: u16,
        /// Why.
        reason: String,
    },
    /// A node-to-node message, routed by hubs like a stream's Open. The
    /// first hub sets `from` to the authenticated sender.
    Relay {
        /// Sender.
        from: NodeId,
        /// Recipient.
        to: NodeId,
        /// The message.
        msg: Rendezvous,
    },
    /// A relayed message could not be delivered: hub to hub and on to its
    /// sender, routed towards `from`.
    Undeliverable {
        /// Who sent it.
        from: NodeId,
        /// Where it was going.
        to: NodeId,
        /// The message.
        msg: Rendezvous,
        /// Why.
        reason: String,
    },
    /// Node to hub: publish the service at virtual port `vport` of this node
    /// on a public proxy port of the hub, for unmodified TCP clients. The
    /// hub answers with `Exposed` or `ExposeRefused`; each client connection
    /// then reaches the node as a connect-back request for `vport`.
    Expose {
        /// The node's virtual port serving it.
        vport: u16,
        /// The proxy port the node had before (a hub restart), if any: given
        /// back when free.
        want_port: Option<u16>,
        /// Client source ranges admitted, as (address, prefix length); empty
        /// admits every client.
        allow_from: Vec<(std::net::IpAddr, u8)>,
    },
    /// Hub to node: `vport` is published on the hub's proxy port `port`.
    Exposed {
        /// The virtual port.
        vport: u16,
        /// The hub's proxy port.
        port: u16,
        /// The hub's own node, which opens routed streams to the service for
        /// proxy-port clients when the node cannot connect back. The node
        /// admits it, and the hub, on `vport` whatever its access policy:
        /// publishing on a hub's proxy port is letting that hub's clients in.
        proxy: NodeId,
    },
    /// Hub to node: `vport` cannot be published, and why.
    ExposeRefused {
        /// The virtual port.
        vport: u16,
        /// False when the hub offers no proxy ports at all (nothing is
        /// wrong with the request).
        offered: bool,
        /// Why, for the operator.
        reason: String,
    },
    /// Node to hub, first message instead of `Register`: report your state
    /// (for `reach status`); admitted like a registration.
    StatusQuery {
        /// As in `Register`.
        proof: Option<[u8; 32]>,
    },
    /// Hub to node: the hub's state as JSON; the hub closes the link after it.
    StatusReport {
        /// The report.
        json: String,
    },
    /// Keepalive probe; answered with `Pong`.
    Ping {
        /// Echoed.
        nonce: u64,
    },
    /// Keepalive answer.
    Pong {
        /// The probe's nonce.
        nonce: u64,
    },
    /// Hub to hub, first message on a link, both ways.
    HubHello {
        /// Where the sending hub listens, for others to learn.
        addrs: Vec<SocketAddr>,
        /// The sender's [`hub_link_proof`] to the receiver, if it has a hub
        /// secret (both directions).
        proof: Option<[u8; 32]>,
    },
    /// Hub to hub: signed chain tops that route adverts are checked
    /// against ([`crate::route_chain`]); sent when a link comes up, and
    /// flooded when a hub signs a new one.
    Anchors {
        /// The anchors.
        anchors: Vec<crate::route_chain::Anchor>,
    },
    /// Hub to hub: send me `origin`'s anchor (its adverts came without
    /// one this hub holds).
    AnchorRequest {
        /// The hub whose anchor is wanted.
        #[serde(with = "crate::identity::relayed_id")]
        origin: NodeId,
    },
    /// Hub to hub: routing gossip.
    Adverts {
        /// Reachability of hubs, as the sender sees it.
        adverts: Vec<Advert>,
    },
    /// Hub to hub: the nodes attached to `origin` (its directory index),
    /// flooded with its state number. Only ids travel: a hub routes by a
    /// node's home hub and asks that hub for the node's addresses
    /// ([`Control::Locate`]), so gossip stays 32 bytes per node. A large
    /// index comes in several parts of one state; the receiver replaces what
    /// it knows once it has them all.
    Directory {
        /// The hub whose nodes these are.
        #[serde(with = "crate::identity::relayed_id")]
        origin: NodeId,
        /// Newer replaces older.
        state: u64,
        /// This part's index, from 0.
        part: u16,
        /// How many parts make the directory.
        parts: u16,
        /// Some of the nodes attached to `origin` (ids decoded without the
        /// point check: see [`crate::identity::relayed_id`]).
        #[serde(with = "crate::identity::relayed_id::list")]
        nodes: Vec<NodeId>,
        /// Where `origin` listens.
        listen: Vec<SocketAddr>,
        /// `origin`'s signature over the part ([`directory_signed_bytes`]):
        /// no other hub can forge, alter or freeze it.
        sig: crate::identity::Signature,
    },
    /// Hub to hub, routed towards `node`'s home hub: a node attached to
    /// hub `asker` looks `node` up. The home hub answers with `Located`.
    Locate {
        /// The asking hub, where the answer goes.
        asker: NodeId,
        /// The asking hub's request id.
        req: u32,
        /// The node's home hub, as the asking hub's index has it.
        home: NodeId,
        /// The node sought.
        node: NodeId,
    },
    /// Hub to hub, routed towards `asker`: the home hub's answer to
    /// `Locate`, with the node's current entry (None: not attached there).
    Located {
        /// The hub that asked.
        asker: NodeId,
        /// Its request id.
        req: u32,
        /// The node sought.
        node: NodeId,
        /// Where it is.
        entry: Option<DirEntry>,
    },
    /// Hub to hub, towards `origin`: send me `origin`'s directory. A hub
    /// that routes to `origin` but has not had its directory for a while
    /// (it forgot it during a partition that outlasted the grace time, and
    /// directories travel only when they change) asks its next hop; the
    /// first hub on the way that has it answers with its parts, which then
    /// flood on to whoever else lacks them.
    DirectoryRequest {
        /// The hub whose directory is wanted.
        #[serde(with = "crate::identity::relayed_id")]
        origin: NodeId,
    },
    /// Hub to hub, to a hub that dialled the sender: carry this relay
    /// circuit's leg from your side. The sender does not dial hubs that
    /// dialled it (they may sit behind a NAT or firewall); the receiver
    /// dials the sender's circuit port at the address its link uses,
    /// presents the leg marked [`CircuitHello::pulled`], and then serves it
    /// as a leg that arrived from the sender (pairs it, or carries it on).
    ///
    /// [`CircuitHello::pulled`]: crate::circuit::CircuitHello::pulled
    CircuitPull {
        /// The leg's hello, as it goes on the wire (not marked pulled).
        hello: Vec<u8>,
    },
    /// Node to hub, registered: the node's direct addresses are these now
    /// (a port mapping its gateway gave it came or went), as a `Register`
    /// would have said.
    NodeAddrs {
        /// Direct addresses the node listens on.
        addrs: Vec<SocketAddr>,
    },
    /// Hub to hub, flooded: `origin`'s links and attached node count, its
    /// card of the overlay map ([`crate::overlay`]), signed by it
    /// ([`crate::overlay::card_signed_bytes`]); newer `state` replaces
    /// older.
    HubLinks {
        /// The hub whose links these are.
        #[serde(with = "crate::identity::relayed_id")]
        origin: NodeId,
        /// Newer replaces older.
        state: u64,
        /// Nodes attached to `origin`.
        nodes: u32,
        /// Links beyond [`crate::overlay::MAX_CARD_LINKS`], not listed.
        unlisted: u32,
        /// Its links, at most [`crate::overlay::MAX_CARD_LINKS`].
        links: Vec<crate::overlay::LinkCard>,
        /// `origin`'s signature.
        sig: crate::identity::Signature,
    },
    /// Node to hub, registered: connect to this node's observed address
    /// (the session's source address, never another) at `port`, from
    /// `from`, and write [`dial_back_greeting`] of `token`; the answer is
    /// `DialedBack`. It shows how inbound connections are filtered on the
    /// way to the node (`reach doctor`).
    DialBack {
        /// Echoed in the answer.
        req: u32,
        /// The port on the node's observed address.
        port: u16,
        /// Which source the hub connects from.
        from: DialBackFrom,
        /// Sent on the connection, so the node knows it is the hub's.
        token: u64,
    },
    /// Hub to node: what a `DialBack` met.
    DialedBack {
        /// The request this answers.
        req: u32,
        /// What happened.
        outcome: DialBackOutcome,
    },
}

/// The source a hub dials back from ([`Control::DialBack`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DialBackFrom {
    /// The hub's own address, from a port the node has not contacted:
    /// passes only filtering that does not depend on the port.
    OtherPort,
    /// Another address of the hub's: passes only endpoint-independent
    /// filtering.
    OtherAddress,
}

/// What a hub's dial-back met ([`Control::DialedBack`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DialBackOutcome {
    /// The connection opened and the token was sent.
    Connected {
        /// The hub's source address.
        from: SocketAddr,
    },
    /// The node's address answered with a reset.
    Refused {
        /// The hub's source address.
        from: SocketAddr,
    },
    /// No answer within the hub's deadline.
    TimedOut {
        /// The hub's source address.
        from: SocketAddr,
        /// The deadline, in milliseconds.
        after_ms: u32,
    },
    /// Another error (no route, say).
    Failed {
        /// The hub's source address, if it got one.
        from: Option<SocketAddr>,
        /// The error.
        error: String,
    },
    /// The hub did not try: it has no other address, or too many
    /// dial-backs are running.
    Declined {
        /// Why.
        reason: String,
    },
}

/// Length of [`dial_back_greeting`].
pub const DIAL_BACK_GREETING_LEN: usize = 24;

/// What a hub writes on a dial-back connection: a fixed prefix and the
/// request's token, so the node tells the hub's connection from any other.
pub fn dial_back_greeting(token: u64) -> [u8; DIAL_BACK_GREETING_LEN] {
    let mut g = [0u8; DIAL_BACK_GREETING_LEN];
    g[..16].copy_from_slice(b"reach dial-back ");
    g[16..].copy_from_slice(&token.to_be_bytes());
    g
}

/// The token of a dial-back greeting; None for other bytes.
pub fn parse_dial_back_greeting(g: &[u8; DIAL_BACK_GREETING_LEN]) -> Option<u64> {
    let (prefix, token) = g.split_at(16);
    if prefix != b"reach dial-back " {
        return None;
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(token);
    Some(u64::from_be_bytes(t))
}

/// A decoded frame; Data borrows its payload from the input buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A control message.
    Control(Control),
    /// Open a routed stream from `src` to `dst`.
    Open {
        /// Link-local stream id.
        stream: u32,
        /// Target node.
        dst: NodeId,
        /// Originating node.
        src: NodeId,
    },
    /// Stream bytes.
    Data {
        /// Link-local stream id.
        stream: u32,
        /// The bytes.
        data: &'a [u8],
    },
    /// More credit for the stream's other direction.
    Credit {
        /// Link-local stream id.
        stream: u32,
        /// Bytes granted.
        bytes: u32,
    },
    /// The sender's direction is finished.
    Fin {
        /// Link-local stream id.
        stream: u32,
    },
    /// The stream is gone.
    Reset {
        /// Link-local stream id.
        stream: u32,
        /// Why, as a code.
        code: ResetCode,
        /// Why, for people.
        reason: String,
    },
}

/// Why bytes on a link are not a valid frame. The link is then unusable: the
/// peer is broken or hostile, and resynchronising is impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// An unknown frame kind.
    #[error("unknown link frame kind {0}")]
    UnknownKind(u8),
    /// A frame whose payload has the wrong size for its kind.
    #[error("bad {kind} frame: payload of {len} bytes")]
    BadLength {
        /// Frame kind name.
        kind: &'static str,
        /// Payload length seen.
        len: usize,
    },
    /// A control message that does not decode.
    #[error("bad control message: {0}")]
    BadControl(String),
    /// A node id that is not a public key.
    #[error("bad node id in an open frame")]
    BadNodeId,
    /// A control frame on a stream id other than 0, or a stream frame on 0.
    #[error("frame kind {kind} on stream {stream} is not allowed")]
    BadStream {
        /// Frame kind code.
        kind: u8,
        /// Stream id.
        stream: u32,
    },
    /// A message too large to fit in one frame.
    #[error("control message of {0} bytes is too large for one frame")]
    TooLarge(usize),
}

fn header(kind: u8, stream: u32, len: usize, out: &mut Vec<u8>) {
    out.push(kind);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(&(len as u16).to_be_bytes());
}

/// Appends a control frame.
pub fn encode_control(msg: &Control, out: &mut Vec<u8>) -> Result<(), LinkError> {
    let body = postcard::to_stdvec(msg).map_err(|e| LinkError::BadControl(e.to_string()))?;
    if body.len() > MAX_FRAME_PAYLOAD {
        return Err(LinkError::TooLarge(body.len()));
    }
    header(KIND_CONTROL, 0, body.len(), out);
    out.extend_from_slice(&body);
    Ok(())
}

/// Appends an Open frame.
pub fn encode_open(stream: u32, dst: &NodeId, src: &NodeId, out: &mut Vec<u8>) {
    header(KIND_OPEN, stream, 2 * NODE_ID_LEN, out);
    out.extend_from_slice(dst.as_bytes());
    out.extend_from_slice(src.as_bytes());
}

/// Appends a Data frame. `data` must be at most [`MAX_DATA_CHUNK`] bytes.
pub fn encode_data(stream: u32, data: &[u8], out: &mut Vec<u8>) {
    debug_assert!(data.len() <= MAX_DATA_CHUNK);
    header(KIND_DATA, stream, data.len(), out);
    out.extend_from_slice(data);
}

/// Writes a Data frame header for `len` payload bytes into `out[..FRAME_HEADER_LEN]`,
/// for callers that place the payload themselves (no copy).
pub fn data_header(stream: u32, len: usize) -> [u8; FRAME_HEADER_LEN] {
    debug_assert!(len <= MAX_DATA_CHUNK);
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0] = KIND_DATA;
    h[1..5].copy_from_slice(&stream.to_be_bytes());
    h[5..7].copy_from_slice(&(len as u16).to_be_bytes());
    h
}

/// Appends a Credit frame.
pub fn encode_credit(stream: u32, bytes: u32, out: &mut Vec<u8>) {
    header(KIND_CREDIT, stream, 4, out);
    out.extend_from_slice(&bytes.to_be_bytes());
}

/// Appends a Fin frame.
pub fn encode_fin(stream: u32, out: &mut Vec<u8>) {
    header(KIND_FIN, stream, 0, out);
}

/// Appends a Reset frame; the reason is cut to [`MAX_REASON_LEN`] bytes.
pub fn encode_reset(stream: u32, code: ResetCode, reason: &str, out: &mut Vec<u8>) {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason[..end];
    header(KIND_RESET, stream, 1 + reason.len(), out);
    out.push(code.code());
    out.extend_from_slice(reason.as_bytes());
}

/// The total length of the frame at the start of `buf`, once its header is in.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let h = buf.get(..FRAME_HEADER_LEN)?;
    Some(FRAME_HEADER_LEN + usize::from(u16::from_be_bytes([h[5], h[6]])))
}

/// Proof that a node knows the network secret, bound to the node and the hub
/// it registers with (so a hub cannot replay it elsewhere under another name):
/// HMAC-SHA256 over a label and both ids.
pub fn admission_proof(network_secret: &[u8], node: &NodeId, hub: &NodeId) -> [u8; 32] {
    proof_of(network_secret, b"reach admission v1", node, hub)
}

/// HMAC-SHA256 under `secret` of `label` and two ids: every proof of a
/// shared secret, each with a label of its own so one never passes for
/// another.
fn proof_of(secret: &[u8], label: &[u8], a: &NodeId, b: &NodeId) -> [u8; 32] {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(label);
    ctx.update(a.as_bytes());
    ctx.update(b.as_bytes());
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// What a hub proves to another hub it links to: an HMAC of both ids under
/// the federation's hub secret, with a label of its own, so neither a
/// node's admission proof nor one made with the network secret for nodes
/// can pass for it.
pub fn hub_link_proof(hub_secret: &[u8], from: &NodeId, to: &NodeId) -> [u8; 32] {
    proof_of(hub_secret, b"reach hub link v1", from, to)
}

/// Checks a proof from [`hub_link_proof`] in constant time.
pub fn verify_hub_link_proof(
    hub_secret: &[u8],
    from: &NodeId,
    to: &NodeId,
    proof: &[u8; 32],
) -> bool {
    let want = hub_link_proof(hub_secret, from, to);
    aws_lc_rs::constant_time::verify_slices_are_equal(&want, proof).is_ok()
}

/// Checks a proof from [`admission_proof`] in constant time.
pub fn verify_admission_proof(
    network_secret: &[u8],
    node: &NodeId,
    hub: &NodeId,
    proof: &[u8; 32],
) -> bool {
    let want = admission_proof(network_secret, node, hub);
    aws_lc_rs::constant_time::verify_slices_are_equal(&want, proof).is_ok()
}

/// Decodes the frame at the start of `buf`. `Ok(None)` means more bytes are
/// needed; otherwise returns the frame and the bytes it used.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, LinkError> {
    let Some(h) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let kind = h[0];
    let stream = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    let len = usize::from(u16::from_be_bytes([h[5], h[6]]));
    if kind > KIND_RESET {
        return Err(LinkError::UnknownKind(kind));
    }
    if (kind == KIND_CONTROL) != (stream == 0) {
        return Err(LinkError::BadStream { kind, stream });
    }
    let Some(p) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
        return Ok(None);
    };
    let bad = |kind| LinkError::BadLength { kind, len };
    let frame = match kind {
        KIND_CONTROL => Frame::Control(
            postcard::from_bytes(p).map_err(|e| LinkError::BadControl(e.to_string()))?,
        ),
        KIND_OPEN => {
            if len != 2 * NODE_ID_LEN {
                return Err(bad("open"));
            }
            let id = |b: &[u8]| {
                let bytes: [u8; NODE_ID_LEN] = b.try_into().map_err(|_| LinkError::BadNodeId)?;
                NodeId::from_bytes(bytes).map_err(|_| LinkError::BadNodeId)
            };
            Frame::Open {
                stream,
                dst: id(&p[..NODE_ID_LEN])?,
                src: id(&p[NODE_ID_LEN..])?,
            }
        }
        KIND_DATA => {
            if len > MAX_DATA_CHUNK {
                return Err(bad("data"));
            }
            Frame::Data { stream, data: p }
        }
        KIND_CREDIT => {
            let b: [u8; 4] = p.try_into().map_err(|_| bad("credit"))?;
            Frame::Credit {
                stream,
                bytes: u32::from_be_bytes(b),
            }
        }
        KIND_FIN => {
            if len != 0 {
                return Err(bad("fin"));
            }
            Frame::Fin { stream }
        }
        _ => {
            let (&code, reason) = p.split_first().ok_or(bad("reset"))?;
            Frame::Reset {
                stream,
                code: ResetCode::from_code(code),
                reason: String::from_utf8_lossy(&reason[..reason.len().min(MAX_REASON_LEN)])
                    .into_owned(),
            }
        }
    };
    Ok(Some((frame, FRAME_HEADER_LEN + len)))
}

/// Credit accounting for one direction of one stream, at a receiver or at a
/// hub in between: data counts against the window, credit returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Bytes sent (or seen) and not yet covered by returned credit.
    outstanding: u64,
    limit: u64,
}

/// A sender went past its credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer sent {outstanding} bytes against a window of {limit}")]
pub struct FlowViolation {
    /// Bytes outstanding after the offending frame.
    pub outstanding: u64,
    /// The window.
    pub limit: u64,
}

impl Default for Window {
    fn default() -> Self {
        Self::new()
    }
}

impl Window {
    /// A window of [`STREAM_WINDOW`] bytes.
    pub fn new() -> Self {
        Self {
            outstanding: 0,
            limit: u64::from(STREAM_WINDOW),
        }
    }

    /// Accounts `n` bytes of data; an error if they exceed the credit.
    pub fn on_data(&mut self, n: usize) -> Result<(), FlowViolation> {
        self.outstanding += n as u64;
        if self.outstanding > self.limit {
            return Err(FlowViolation {
                outstanding: self.outstanding,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Accounts credit returned by the reader. Credit beyond what is
    /// outstanding raises the window (a reader may grant a larger one).
    pub fn on_credit(&mut self, n: u32) {
        let n = u64::from(n);
        let back = n.min(self.outstanding);
        self.outstanding -= back;
        self.limit += n - back;
    }

    /// Like [`Window::on_credit`], but grows the window to at most `cap`;
    /// returns the credit accounted, which is what a relay passes on.
    pub fn on_credit_capped(&mut self, n: u32, cap: u32) -> u32 {
        let n = u64::from(n);
        let back = n.min(self.outstanding);
        let grow = (n - back).min(u64::from(cap).saturating_sub(self.limit));
        self.outstanding -= back;
        self.limit += grow;
        // back <= outstanding and grow <= n - back, so the sum fits in n's u32.
        u32::try_from(back + grow).unwrap_or(u32::MAX)
    }

    /// Bytes outstanding.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// The current window.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// The sender's view: how many bytes it may still send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credit(u64);

impl Default for Credit {
    fn default() -> Self {
        Self(u64::from(STREAM_WINDOW))
    }
}

impl Credit {
    /// Bytes that may be sent now.
    pub fn available(&self) -> u64 {
        self.0
    }

    /// Takes up to `want` bytes of credit; returns how many were granted.
    pub fn take(&mut self, want: usize) -> usize {
        let n = (want as u64).min(self.0);
        self.0 -= n;
        n as usize
    }

    /// Adds credit from a Credit frame.
    pub fn add(&mut self, n: u32) {
        self.0 = self.0.saturating_add(u64::from(n));
    }
}

/// The reader's view: when to grant credit back, and how large a window to
/// offer.
///
/// The window starts at [`STREAM_WINDOW`] and doubles, up to
/// [`MAX_STREAM_WINDOW`], each time credit is granted while the reader keeps
/// up (nothing left buffered): then the window, not the reader, limits the
/// stream, as it does over a long path. A reader that falls behind stops the
/// growth, so memory grows only for streams that use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    consumed: u32,
    window: u32,
}

impl Default for Grant {
    fn default() -> Self {
        Self {
            consumed: 0,
            window: STREAM_WINDOW,
        }
    }
}

impl Grant {
    /// Records that the application consumed `n` bytes; returns the credit to
    /// send, if enough has accumulated (a quarter window: few frames, and the
    /// sender never runs dry while the reader keeps up). `keeping_up` says
    /// nothing is left buffered; `may_grow(extra)` asks whether memory allows
    /// growing the window by `extra` bytes.
    pub fn on_consumed(
        &mut self,
        n: usize,
        keeping_up: bool,
        may_grow: impl FnOnce(u32) -> bool,
    ) -> Option<u32> {
        self.consumed = self
            .consumed
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        if self.consumed < self.window / 4 {
            return None;
        }
        let mut credit = std::mem::take(&mut self.consumed);
        let extra = self
            .window
            .min(MAX_STREAM_WINDOW.saturating_sub(self.window));
        if keeping_up && extra > 0 && may_grow(extra) {
            self.window += extra;
            credit = credit.saturating_add(extra);
        }
        Some(credit)
    }

    /// The window offered now.
    pub fn window(&self) -> u32 {
        self.window
    }
}

const DIRECTORY_LABEL: &[u8] = b"reach directory part v1";

impl Control {
    /// Part `part` of `parts` of the directory of `key`'s hub at `state`,
    /// signed with `key` ([`directory_signed_bytes`]).
    pub fn signed_directory(
        key: &crate::identity::SecretKey,
        state: u64,
        part: u16,
        parts: u16,
        nodes: Vec<NodeId>,
        listen: Vec<SocketAddr>,
    ) -> Self {
        let origin = key.node_id();
        let sig = key.sign(&directory_signed_bytes(
            &origin, state, part, parts, &nodes, &listen,
        ));
        Control::Directory {
            origin,
            state,
            part,
            parts,
            nodes,
            listen,
            sig,
        }
    }
}

/// What a hub signs for one part of its directory: everything in the
/// [`Control::Directory`] message. A part's nodes are sorted, so that a hub
/// passing on a directory it learned rebuilds each part (and so its
/// signature's message) from its index.
pub fn directory_signed_bytes(
    origin: &NodeId,
    state: u64,
    part: u16,
    parts: u16,
    nodes: &[NodeId],
    listen: &[SocketAddr],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(DIRECTORY_LABEL.len() + 48 + 32 * nodes.len());
    m.extend_from_slice(DIRECTORY_LABEL);
    m.extend_from_slice(origin.as_bytes());
    m.extend_from_slice(&state.to_be_bytes());
    m.extend_from_slice(&part.to_be_bytes());
    m.extend_from_slice(&parts.to_be_bytes());
    m.extend_from_slice(&(nodes.len() as u32).to_be_bytes());
    for n in nodes {
        m.extend_from_slice(n.as_bytes());
    }
    for a in listen {
        m.extend_from_slice(a.to_string().as_bytes());
        m.push(b',');
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;
    use proptest::prelude::*;

    fn id(n: u8) -> NodeId {
        SecretKey::from_seed([n; 32]).node_id()
    }

    fn roundtrip(bytes: &[u8]) -> Frame<'_> {
        let (f, used) = decode_frame(bytes).expect("valid").expect("whole");
        assert_eq!(used, bytes.len());
        f
    }

    #[test]
    fn every_frame_kind_round_trips() {
        let mut b = Vec::new();
        encode_open(7, &id(1), &id(2), &mut b);
        assert_eq!(
            roundtrip(&b),
            Frame::Open {
                stream: 7,
                dst: id(1),
                src: id(2)
            }
        );
        b.clear();
        encode_data(9, b"abc", &mut b);
        assert_eq!(
            roundtrip(&b),
            Frame::Data {
                stream: 9,
                data: b"abc"
            }
        );
        let mut h = data_header(9, 3).to_vec();
        h.extend_from_slice(b"abc");
        assert_eq!(h, b);
        b.clear();
        encode_credit(3, 4096, &mut b);
        assert_eq!(
            roundtrip(&b),
            Frame::Credit {
                stream: 3,
                bytes: 4096
            }
        );
        b.clear();
        encode_fin(5, &mut b);
        assert_eq!(roundtrip(&b), Frame::Fin { stream: 5 });
        b.clear();
        encode_reset(5, ResetCode::NoRoute, "no hub knows it", &mut b);
        assert_eq!(
            roundtrip(&b),
            Frame::Reset {
                stream: 5,
                code: ResetCode::NoRoute,
                reason: "no hub knows it".into()
            }
        );
        b.clear();
        let msg = Control::Directory {
            origin: id(3),
            state: 42,
            part: 0,
            parts: 1,
            nodes: vec![id(4), id(5)],
            listen: vec!["[2001:db8::1]:9".parse().expect("addr")],
            sig: crate::identity::Signature([9; 64]),
        };
        encode_control(&msg, &mut b).expect("encode");
        assert_eq!(roundtrip(&b), Frame::Control(msg));
        b.clear();
        let msg = Control::Located {
            asker: id(1),
            req: 7,
            node: id(4),
            entry: Some(DirEntry {
                node: id(4),
                hub: id(3),
                addrs: vec!["10.0.0.1:7000".parse().expect("addr")],
                observed: "203.0.113.5:4000".parse().expect("addr"),
                claim: None,
            }),
        };
        encode_control(&msg, &mut b).expect("encode");
        assert_eq!(roundtrip(&b), Frame::Control(msg));
        for msg in [
            Control::DialBack {
                req: 3,
                port: 40000,
                from: DialBackFrom::OtherAddress,
                token: u64::MAX,
            },
            Control::DialedBack {
                req: 3,
                outcome: DialBackOutcome::TimedOut {
                    from: "203.0.113.7:5000".parse().expect("addr"),
                    after_ms: 3000,
                },
            },
            Control::DialedBack {
                req: 4,
                outcome: DialBackOutcome::Declined {
                    reason: "busy".into(),
                },
            },
        ] {
            b.clear();
            encode_control(&msg, &mut b).expect("encode");
            assert_eq!(roundtrip(&b), Frame::Control(msg));
        }
    }

    #[test]
    fn a_dial_back_greeting_carries_its_token() {
        let g = dial_back_greeting(0x0102_0304_0506_0708);
        assert!(g.starts_with(b"reach dial-back "));
        assert_eq!(g[16..], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_ne!(g, dial_back_greeting(0x0102_0304_0506_0709));
        assert_eq!(parse_dial_back_greeting(&g), Some(0x0102_0304_0506_0708));
        let mut other = g;
        other[0] = b'R';
        assert_eq!(parse_dial_back_greeting(&other), None);
    }

    #[test]
    fn admission_proofs_bind_secret_node_and_hub() {
        let p = admission_proof(b"s3cret", &id(1), &id(2));
        assert!(verify_admission_proof(b"s3cret", &id(1), &id(2), &p));
        assert!(!verify_admission_proof(b"other", &id(1), &id(2), &p));
        assert!(!verify_admission_proof(b"s3cret", &id(3), &id(2), &p));
        assert!(!verify_admission_proof(b"s3cret", &id(1), &id(3), &p));
    }

    #[test]
    fn a_partial_frame_needs_more_bytes() {
        let mut b = Vec::new();
        encode_data(1, &[0; 100], &mut b);
        for cut in 0..b.len() {
            assert_eq!(decode_frame(&b[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn malformed_frames_are_specific_errors() {
        assert_eq!(
            decode_frame(&[9, 0, 0, 0, 1, 0, 0]),
            Err(LinkError::UnknownKind(9))
        );
        assert_eq!(
            decode_frame(&[KIND_DATA, 0, 0, 0, 0, 0, 0]),
            Err(LinkError::BadStream {
                kind: KIND_DATA,
                stream: 0
            })
        );
        assert_eq!(
            decode_frame(&[KIND_CONTROL, 0, 0, 0, 1, 0, 0]),
            Err(LinkError::BadStream {
                kind: KIND_CONTROL,
                stream: 1
            })
        );
        assert_eq!(
            decode_frame(&[KIND_CREDIT, 0, 0, 0, 1, 0, 1, 5]),
            Err(LinkError::BadLength {
                kind: "credit",
                len: 1
            })
        );
        let not_a_key = (0..=255u8)
            .map(|b| [b; NODE_ID_LEN])
            .find(|b| NodeId::from_bytes(*b).is_err())
            .expect("some byte pattern is not a point");
        let mut open = vec![KIND_OPEN, 0, 0, 0, 1, 0, 64];
        open.extend_from_slice(&not_a_key);
        open.extend_from_slice(&not_a_key);
        assert_eq!(decode_frame(&open), Err(LinkError::BadNodeId));
    }

    #[test]
    fn reset_reasons_are_cut_at_a_char_boundary() {
        let mut b = Vec::new();
        encode_reset(1, ResetCode::Cancelled, &"é".repeat(150), &mut b);
        let Frame::Reset { reason, .. } = roundtrip(&b) else {
            panic!("not a reset");
        };
        assert!(reason.len() <= MAX_REASON_LEN && reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn windows_bound_a_sender_and_credit_restores_it() {
        let mut w = Window::new();
        w.on_data(STREAM_WINDOW as usize).expect("within window");
        assert!(w.on_data(1).is_err());
        let mut w = Window::new();
        w.on_data(1000).expect("ok");
        w.on_credit(1000);
        assert_eq!(w.outstanding(), 0);
        w.on_data(STREAM_WINDOW as usize)
            .expect("credit restored the window");
        let mut c = Credit::default();
        assert_eq!(c.take(usize::MAX), STREAM_WINDOW as usize);
        assert_eq!(c.take(1), 0);
        c.add(10);
        assert_eq!(c.take(100), 10);
        let mut g = Grant::default();
        assert_eq!(g.on_consumed(1, false, |_| true), None);
        assert_eq!(
            g.on_consumed(STREAM_WINDOW as usize / 4, false, |_| true),
            Some(STREAM_WINDOW / 4 + 1)
        );
    }

    #[test]
    fn a_reader_that_keeps_up_grows_the_window_to_the_cap_and_a_relay_caps_it() {
        let mut g = Grant::default();
        let (mut reader, mut relay) = (Window::new(), Window::new());
        let mut last = g.window();
        for _ in 0..64 {
            let n = g.window() as usize / 4;
            reader.on_data(n).expect("within the window");
            relay.on_data(n).expect("within the window");
            let credit = g
                .on_consumed(n, true, |_| true)
                .expect("a quarter consumed");
            reader.on_credit(credit);
            let passed = relay.on_credit_capped(credit, MAX_STREAM_WINDOW);
            assert_eq!(passed, credit, "an honest reader stays under the cap");
            assert!(g.window() >= last && g.window() <= MAX_STREAM_WINDOW);
            last = g.window();
        }
        assert_eq!(g.window(), MAX_STREAM_WINDOW);
        assert_eq!(reader.limit(), u64::from(MAX_STREAM_WINDOW));
        // A reader that falls behind, or has no memory to spare, stops growth.
        let mut g = Grant::default();
        g.on_consumed(STREAM_WINDOW as usize, false, |_| true);
        g.on_consumed(STREAM_WINDOW as usize, true, |_| false);
        assert_eq!(g.window(), STREAM_WINDOW);
        // A relay passes on no more than the cap allows.
        let mut w = Window::new();
        let passed = w.on_credit_capped(u32::MAX, MAX_STREAM_WINDOW);
        assert_eq!(
            u64::from(passed) + u64::from(STREAM_WINDOW),
            u64::from(MAX_STREAM_WINDOW)
        );
        assert_eq!(w.limit(), u64::from(MAX_STREAM_WINDOW));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, used))) = decode_frame(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn arbitrary_control_payloads_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..300)
        ) {
            let mut b = vec![KIND_CONTROL, 0, 0, 0, 0];
            b.extend_from_slice(&(body.len() as u16).to_be_bytes());
            b.extend_from_slice(&body);
            let _ = decode_frame(&b);
        }

        #[test]
        fn data_frames_round_trip(stream in 1u32.., data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut b = Vec::new();
            encode_data(stream, &data, &mut b);
            prop_assert_eq!(roundtrip(&b), Frame::Data { stream, data: &data });
        }
    }
}
