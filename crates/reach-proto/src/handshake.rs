//! The end-to-end handshake that opens every reach stream.
//!
//! # Why Noise IK (via `snow`) and not TLS 1.3 with raw public keys
//! The connector always knows whom it wants: the NodeId is in the virtual address.
//! Noise's IK pattern is built for exactly that: the initiator encrypts to the
//! responder's known static key in its first message, so the whole mutual
//! authentication takes one round trip (the same round trip SmartSockets spent on
//! its address-based identity check), with no certificates, no X.509 parsing and
//! no session-resumption state. TLS 1.3 would need raw-public-key extensions on
//! both sides, a CA-less verifier and a larger handshake for the same result.
//! WireGuard and Lightning chose Noise for the same reasons.
//!
//! # Wire format (version 4)
//! Initiator to responder, one write:
//! ```text
//! "rch" | version u8 | flags u8 | cipher u8 | target NodeId [32] | vport u16 | len u16 | body
//! ```
//! The first 40 bytes are the Noise prologue, so any tampering fails the
//! handshake. `flags` bit 0 asks for plaintext streams. The body is Noise
//! msg1, whose payload is the initiator's NodeId, then, from a node that
//! holds a network secret, its membership proof ([`crate::member`]).
//! With the resume flag (bit 3) the body is a ticket, then a Noise `NNpsk0`
//! msg1 with an empty payload, and the ticket is part of the prologue; see
//! [`crate::resume`].
//!
//! Responder to initiator: `kind u8 | len u16 | body`, where kind is
//! [`ReplyKind`]. `Accept` carries Noise msg2, whose encrypted payload is
//! `status u8 | mode u8 | extras u8 | [membership proof] | [resumption key | ticket]`,
//! `extras` saying which of the two follow. `ResumeRejected` (empty) says
//! the ticket is not honoured: the initiator then sends a full hello on the
//! same connection.
//!
//! Initiator to responder, once msg2 checked out: `confirmation [16]`, a MAC
//! only the holder of this handshake's keys can compute.
//!
//! # Who learns a responder's identity
//! A hello for another NodeId gets `WrongNode` with the responder's real
//! NodeId in the clear only from a responder that reveals itself
//! ([`ResponderOptions::reveal_identity`]): hubs do, because nodes learn a
//! hub's identity on first contact and a hub's identity is public anyway.
//! Every other node answers such a hello with the generic `Failed`, the same
//! reply as a hello that fails authentication: a port scan learns that a
//! reach node listens there (the magic answers that) but not which one, so
//! it cannot go on to address a handshake to it. A generic refusal rather
//! than silence: a connector with a stale address fails within one round
//! trip instead of at its deadline.
//!
//! # Key confirmation and replay
//! Noise IK's first message can be replayed: its ephemeral and static parts
//! check out again, so a responder that trusted msg1 alone would hand a
//! replayed hello to `accept()` (and, for a plaintext stream, let the
//! replayer read and write as the peer). So the responder hands a stream
//! on only after the initiator's confirmation: it is keyed by the session's
//! key material, which needs the ephemeral secret of the original
//! initiator, so a replayer cannot produce it. The initiator sends it right
//! after msg2, before its first bytes, so its setup time does not change;
//! the responder's `accept()` returns one round trip later.
//!
//! Why no cache of seen ephemerals, or WireGuard's per-peer timestamp: the
//! confirmation already rejects every replay, however old, with no state
//! per peer and no clock. What a cache would add is rejecting the replay
//! before the responder's Diffie-Hellman, but anyone can make fresh valid
//! hellos with a key of their own at the same cost to the responder, so
//! that work is bounded by the listener's handshake limits either way; and
//! a replayed hello from an allowed node gains nothing over a fresh one
//! from a stranger but a wait for a confirmation that never comes, which
//! the handshake deadline ends.
//!
//! # Key schedule
//! Noise's split gives one key per direction; the stream keys, the
//! confirmation key and a plaintext stream's end-mark keys are derived from
//! them with HMAC-SHA256 under distinct labels, so no key serves two
//! purposes.
//!
//! # After the handshake
//! An encrypted stream's bytes travel in records ([`crate::record`]); a
//! plaintext stream's in chunks that end with an authenticated end mark
//! ([`crate::plain_chunks`], new in version 4), so a cut connection is never
//! taken for a clean end.
//!
//! # Using the state machines
//! Initiator: [`Initiator::new`] gives the hello bytes to send; read a
//! [`ReplyHeader`] (3 bytes) and its body, then [`Initiator::handle_reply`],
//! and send the confirmation it returns. Responder: read a [`HelloHeader`]
//! (42 bytes) and the Noise message it announces, then [`respond`], send the
//! reply bytes it returns; for an accepted stream read [`CONFIRM_LEN`] bytes
//! and pass them to [`Unconfirmed::confirm`].

use snow::params::NoiseParams;

use crate::identity::{NodeId, SecretKey, NODE_ID_LEN};
use crate::member::{NetworkKey, PROOF_LEN};
use crate::noise_crypto;
use crate::plain_chunks::{EndKey, EndKeys};
use crate::resume::{Grant, Ticket, TicketError, TicketKey, RESUME_KEY_LEN, TICKET_LEN};

/// Protocol magic at the start of every hello.
pub const MAGIC: [u8; 3] = *b"rch";
/// The handshake version this code speaks.
pub const VERSION: u8 = 4;
/// Length of the fixed hello header.
pub const HELLO_HEADER_LEN: usize = 42;
/// Length of the prologue part of the hello header.
const PROLOGUE_LEN: usize = 40;
/// Length of a reply header.
pub const REPLY_HEADER_LEN: usize = 3;
/// Largest Noise message either side accepts; checked before reading the body.
pub const MAX_NOISE_MSG: usize = 1024;
/// Length of the initiator's key confirmation.
pub const CONFIRM_LEN: usize = 16;

const FLAG_PLAINTEXT: u8 = 1;
/// The initiator connects back at the responder's request (the Reverse
/// module); the port field then carries the request's token.
const FLAG_REVERSE: u8 = 2;
/// The connection is to carry an existing stream between the same two nodes
/// (a routed stream moving to a direct path); the port field then carries
/// the stream's upgrade id ([`Established::upgrade_id`]).
const FLAG_UPGRADE: u8 = 4;
/// The body is a resumption ticket and an `NNpsk0` message
/// ([`crate::resume`]).
const FLAG_RESUME: u8 = 8;
const FLAGS: u8 = FLAG_PLAINTEXT | FLAG_REVERSE | FLAG_UPGRADE | FLAG_RESUME;

/// Extras bit: msg2's payload carries the responder's membership proof.
const EXTRA_PROOF: u8 = 1;
/// Extras bit: msg2's payload carries a resumption key and ticket.
const EXTRA_TICKET: u8 = 2;

/// The AEAD protecting the handshake and the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cipher {
    /// ChaCha20-Poly1305: fast everywhere, constant time without hardware help.
    ChaChaPoly,
    /// AES-256-GCM: faster where the CPU has AES and carry-less multiply.
    AesGcm,
}

impl Cipher {
    fn code(self) -> u8 {
        match self {
            Cipher::ChaChaPoly => 1,
            Cipher::AesGcm => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Cipher::ChaChaPoly),
            2 => Some(Cipher::AesGcm),
            _ => None,
        }
    }

    fn noise_params(self, resume: bool) -> NoiseParams {
        let name = match (self, resume) {
            (Cipher::ChaChaPoly, false) => "Noise_IK_25519_ChaChaPoly_BLAKE2s",
            (Cipher::AesGcm, false) => "Noise_IK_25519_AESGCM_BLAKE2s",
            (Cipher::ChaChaPoly, true) => "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s",
            (Cipher::AesGcm, true) => "Noise_NNpsk0_25519_AESGCM_BLAKE2s",
        };
        name.parse().expect("pattern names are valid constants")
    }

    /// A name for logs and stream info.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::ChaChaPoly => "ChaCha20-Poly1305",
            Cipher::AesGcm => "AES-256-GCM",
        }
    }
}

/// Whether a stream's payload is encrypted after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamMode {
    /// Every byte is sealed with the session's AEAD (the default).
    Encrypted(Cipher),
    /// The peers are authenticated but payload travels in the clear, with
    /// an authenticated end ([`crate::plain_chunks`]). Chosen only when both
    /// sides opted in, for trusted fabrics.
    Plaintext,
}

/// Why a responder refused an authenticated initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Nothing accepts connections on the requested virtual port.
    NoSuchPort,
    /// The responder's policy does not admit this initiator.
    NotAdmitted,
}

/// What a responder decides for an authenticated initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Accept the stream.
    Accept,
    /// Refuse it, telling the initiator why.
    Refuse(Refusal),
}

/// The kind byte of a responder's reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// Noise msg2 follows.
    Accept,
    /// The responder is another node; its NodeId follows.
    WrongNode,
    /// The responder does not speak the hello's version; its version follows.
    UnsupportedVersion,
    /// The hello was malformed or failed authentication.
    Failed,
    /// The hello's resumption ticket is not honoured; a full hello may
    /// follow on the same connection.
    ResumeRejected,
}

/// Errors decoding handshake messages: what the peer sent wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The bytes do not start with the reach magic.
    #[error("not a reach handshake (bad magic bytes)")]
    BadMagic,
    /// The peer speaks a version we don't.
    #[error("unsupported handshake version {0} (this node speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// An unknown cipher code.
    #[error("unknown cipher code {0}")]
    UnknownCipher(u8),
    /// Flag bits we do not know.
    #[error("unknown flag bits {0:#04x}")]
    UnknownFlags(u8),
    /// An invalid NodeId field.
    #[error("invalid node id in handshake")]
    BadNodeId,
    /// A length field over the limit.
    #[error("handshake message of {0} bytes exceeds the {MAX_NOISE_MSG}-byte limit")]
    TooLong(usize),
    /// An unknown reply kind.
    #[error("unknown reply kind {0}")]
    UnknownReply(u8),
}

/// Errors of the handshake as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// A malformed message.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The responder is a different node than the address names.
    #[error("identity mismatch: expected node {expected}, reached node {found}")]
    WrongNode {
        /// The node the address named.
        expected: NodeId,
        /// The node that answered (as it claims, unauthenticated).
        found: NodeId,
    },
    /// The responder refused to finish the handshake.
    #[error(
        "peer rejected the handshake: it is not the node the address names, or it could not authenticate us"
    )]
    PeerFailed,
    /// Noise authentication failed: the peer does not hold the expected key.
    #[error("authentication failed: peer does not hold the key of the node it claims to be")]
    AuthFailed,
    /// The initiator's claimed NodeId does not match the key it proved.
    #[error("initiator claims a node id that does not match its key")]
    ClaimMismatch,
    /// The responder authenticated us but refused the stream.
    #[error("{}", refusal_text(*.0))]
    Refused(Refusal),
    /// The responder's payload is malformed.
    #[error("malformed handshake payload")]
    BadPayload,
    /// The target's NodeId has no X25519 form (not a valid ed25519 point),
    /// so no handshake can be addressed to it.
    #[error("node id has no X25519 form")]
    BadKey,
    /// The Noise library refused a step on this side (a local fault, not
    /// the peer's): its reason.
    #[error("noise handshake state: {0}")]
    Noise(String),
    /// The initiator's key confirmation was wrong: the hello was replayed
    /// by someone without its keys, or the bytes were corrupted.
    #[error("the initiator did not confirm the session keys (a replayed or forged hello)")]
    NotConfirmed,
    /// The responder does not honour this node's resumption ticket (it
    /// restarted, or the ticket expired): a full handshake follows.
    #[error("the peer does not honour the resumption ticket")]
    ResumeRejected,
    /// A resumption hello's ticket is not honoured here: why.
    #[error(transparent)]
    Ticket(#[from] TicketError),
}

fn noise(e: snow::Error) -> HandshakeError {
    HandshakeError::Noise(e.to_string())
}

fn refusal_text(r: Refusal) -> &'static str {
    match r {
        Refusal::NoSuchPort => "peer has no service on that virtual port",
        Refusal::NotAdmitted => "peer's policy does not admit this node",
    }
}

/// The fixed header of an initiator's hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloHeader {
    /// Whether the initiator asks for a plaintext stream.
    pub plaintext_requested: bool,
    /// The AEAD the initiator chose.
    pub cipher: Cipher,
    /// The initiator answers the responder's connect-back request; `port` is
    /// the request's token.
    pub reverse: bool,
    /// The initiator moves an existing stream here; `port` is its upgrade id.
    pub upgrade: bool,
    /// The body is a resumption ticket and an `NNpsk0` message.
    pub resume: bool,
    /// The node the initiator wants.
    pub target: NodeId,
    /// The virtual port it wants.
    pub port: u16,
    /// Length of the Noise message that follows.
    pub noise_len: usize,
}

impl HelloHeader {
    /// The header of a hello with `options` to `target`'s `port` (the body
    /// length is set by [`HelloHeader::with_body`]).
    fn asking(options: &InitiatorOptions, target: NodeId, port: u16, resume: bool) -> Self {
        Self {
            plaintext_requested: options.plaintext,
            cipher: options.cipher,
            reverse: options.reverse,
            upgrade: options.upgrade,
            resume,
            target,
            port,
            noise_len: 0,
        }
    }

    /// The whole hello: this header, with the length of `parts`, then them.
    fn with_body(mut self, parts: &[&[u8]]) -> Vec<u8> {
        self.noise_len = parts.iter().map(|p| p.len()).sum();
        let mut out = Vec::with_capacity(HELLO_HEADER_LEN + self.noise_len);
        out.extend_from_slice(&self.encode());
        for p in parts {
            out.extend_from_slice(p);
        }
        out
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HELLO_HEADER_LEN] {
        let mut b = [0u8; HELLO_HEADER_LEN];
        b[..3].copy_from_slice(&MAGIC);
        b[3] = VERSION;
        b[4] = if self.plaintext_requested {
            FLAG_PLAINTEXT
        } else {
            0
        } | if self.reverse { FLAG_REVERSE } else { 0 }
            | if self.upgrade { FLAG_UPGRADE } else { 0 }
            | if self.resume { FLAG_RESUME } else { 0 };
        b[5] = self.cipher.code();
        b[6..38].copy_from_slice(self.target.as_bytes());
        b[38..40].copy_from_slice(&self.port.to_be_bytes());
        let len =
            u16::try_from(self.noise_len).expect("noise messages are bounded by MAX_NOISE_MSG");
        b[40..42].copy_from_slice(&len.to_be_bytes());
        b
    }

    /// Decodes a header. The version is checked before anything after it, so a
    /// future layout is reported as a version mismatch, not as garbage.
    pub fn decode(b: &[u8; HELLO_HEADER_LEN]) -> Result<Self, WireError> {
        if b[..3] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if b[3] != VERSION {
            return Err(WireError::UnsupportedVersion(b[3]));
        }
        if b[4] & !FLAGS != 0 {
            return Err(WireError::UnknownFlags(b[4]));
        }
        let cipher = Cipher::from_code(b[5]).ok_or(WireError::UnknownCipher(b[5]))?;
        let mut id = [0u8; NODE_ID_LEN];
        id.copy_from_slice(&b[6..38]);
        let target = NodeId::from_bytes(id).map_err(|_| WireError::BadNodeId)?;
        let noise_len = usize::from(u16::from_be_bytes([b[40], b[41]]));
        if noise_len > MAX_NOISE_MSG {
            return Err(WireError::TooLong(noise_len));
        }
        Ok(Self {
            plaintext_requested: b[4] & FLAG_PLAINTEXT != 0,
            cipher,
            reverse: b[4] & FLAG_REVERSE != 0,
            upgrade: b[4] & FLAG_UPGRADE != 0,
            resume: b[4] & FLAG_RESUME != 0,
            target,
            port: u16::from_be_bytes([b[38], b[39]]),
            noise_len,
        })
    }
}

/// The header of a responder's reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHeader {
    /// What the body holds.
    pub kind: ReplyKind,
    /// Length of the body.
    pub len: usize,
}

impl ReplyHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REPLY_HEADER_LEN] {
        let kind = match self.kind {
            ReplyKind::Accept => 0,
            ReplyKind::WrongNode => 1,
            ReplyKind::UnsupportedVersion => 2,
            ReplyKind::Failed => 3,
            ReplyKind::ResumeRejected => 4,
        };
        let len = u16::try_from(self.len).expect("reply bodies are bounded by MAX_NOISE_MSG");
        let l = len.to_be_bytes();
        [kind, l[0], l[1]]
    }

    /// Decodes a header, checking the length limit before the body is read.
    pub fn decode(b: &[u8; REPLY_HEADER_LEN]) -> Result<Self, WireError> {
        let kind = match b[0] {
            0 => ReplyKind::Accept,
            1 => ReplyKind::WrongNode,
            2 => ReplyKind::UnsupportedVersion,
            3 => ReplyKind::Failed,
            4 => ReplyKind::ResumeRejected,
            k => return Err(WireError::UnknownReply(k)),
        };
        let len = usize::from(u16::from_be_bytes([b[1], b[2]]));
        if len > MAX_NOISE_MSG {
            return Err(WireError::TooLong(len));
        }
        Ok(Self { kind, len })
    }
}

/// Keys for the two directions of an encrypted stream.
pub struct SessionKeys {
    /// The AEAD both keys are for.
    pub cipher: Cipher,
    /// Key for what this side sends.
    pub send: [u8; 32],
    /// Key for what this side receives.
    pub recv: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKeys({})", self.cipher.name())
    }
}

/// The result of a completed handshake.
#[derive(Debug)]
pub struct Established {
    /// The authenticated peer.
    pub peer: NodeId,
    /// The virtual port the stream is for.
    pub port: u16,
    /// Encrypted or plaintext.
    pub mode: StreamMode,
    /// Keys, present when the mode is encrypted.
    pub keys: Option<SessionKeys>,
    /// Keys of the authenticated end mark, present when the mode is
    /// plaintext ([`crate::plain_chunks`]).
    pub end_keys: Option<EndKeys>,
    /// The stream answers a connect-back request (`port` is its token).
    pub reverse: bool,
    /// The connection carries an existing stream (`port` is its upgrade id).
    pub upgrade: bool,
    /// The Noise handshake hash: the same on both sides and unique to this
    /// handshake.
    pub binding: [u8; 32],
    /// The peer proved it holds this node's network secret (always false
    /// when this node has none); on a resumed handshake, it had proved it
    /// when the ticket was issued.
    pub peer_member: bool,
    /// The handshake was a resumption ([`crate::resume`]).
    pub resumed: bool,
    /// On the initiator's side of a full handshake, the resumption ticket
    /// the responder issued, if it issues them.
    pub ticket: Option<Box<Ticket>>,
}

impl Established {
    /// The id under which this stream can be moved to another connection
    /// between the same nodes (carried in the port field of an upgrade
    /// hello). Both ends derive it from the handshake hash; it names the
    /// stream among this peer's, it is not a secret: only the peer itself can
    /// complete the upgrade handshake.
    pub fn upgrade_id(&self) -> u16 {
        u16::from_be_bytes([self.binding[0], self.binding[1]])
    }
}

/// Options the initiator chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitiatorOptions {
    /// Ask for plaintext payload (granted only if the responder also allows it).
    pub plaintext: bool,
    /// The AEAD to use.
    pub cipher: Cipher,
    /// Connect back at the responder's request; the port is then its token.
    pub reverse: bool,
    /// Move an existing stream; the port is then its upgrade id.
    pub upgrade: bool,
    /// This node's network, if it has one: its membership proof goes to the
    /// responder, and the responder's is checked.
    pub network: Option<NetworkKey>,
}

impl InitiatorOptions {
    /// A new encrypted stream (ChaCha20-Poly1305), neither a connect-back
    /// nor an upgrade, outside any network: the base other options change.
    pub const ENCRYPTED: Self = Self {
        plaintext: false,
        cipher: Cipher::ChaChaPoly,
        reverse: false,
        upgrade: false,
        network: None,
    };
}

fn builder(cipher: Cipher, seed: [u8; 32], local: &SecretKey) -> snow::Builder<'static> {
    let resolver = noise_crypto::resolver(seed, Some(local.x25519_pair()));
    snow::Builder::with_resolver(cipher.noise_params(false), resolver)
}

/// A resumption's Noise builder: no static keys, the ticket's key as PSK.
fn resume_builder(cipher: Cipher, seed: [u8; 32]) -> snow::Builder<'static> {
    let resolver = noise_crypto::resolver(seed, None);
    snow::Builder::with_resolver(cipher.noise_params(true), resolver)
}

/// A resumption hello's prologue: the header's prologue part, then the
/// ticket, so that neither can be changed on the way.
fn resume_prologue(header: &[u8; HELLO_HEADER_LEN], ticket: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(PROLOGUE_LEN + ticket.len());
    p.extend_from_slice(&header[..PROLOGUE_LEN]);
    p.extend_from_slice(ticket);
    p
}

/// HMAC-SHA256 of `label` under `key`: the key schedule's derivations, and
/// a responder's resumption key and ticket nonce from its handshake's seed
/// (independent of the ephemeral key the seed also makes).
fn hmac32(key: &[u8; 32], label: &[u8]) -> [u8; 32] {
    use aws_lc_rs::hmac;
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), label);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// The initiator's side of a handshake in progress.
pub struct Initiator {
    hs: snow::HandshakeState,
    me: NodeId,
    target: NodeId,
    port: u16,
    options: InitiatorOptions,
    /// A resumption: the responder proved membership when it issued it.
    resumed: Option<bool>,
}

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Initiator(to {:?}:{})", self.target, self.port)
    }
}

impl Initiator {
    /// Starts a handshake towards `target`; returns the state and the hello bytes.
    /// `seed` must come from a CSPRNG: it makes the ephemeral key.
    pub fn new(
        local: &SecretKey,
        target: NodeId,
        port: u16,
        options: InitiatorOptions,
        seed: [u8; 32],
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        Self::claiming(local, local.node_id(), target, port, options, seed)
    }

    /// [`Initiator::new`], claiming to be `me`: tests use it to claim the
    /// negation of `local`'s key, which `local`'s secret also proves.
    fn claiming(
        local: &SecretKey,
        me: NodeId,
        target: NodeId,
        port: u16,
        options: InitiatorOptions,
        seed: [u8; 32],
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        let remote = target.x25519_public().ok_or(HandshakeError::BadKey)?;
        let secret = local.x25519_pair().0;
        let header = HelloHeader::asking(&options, target, port, false);
        let prologue = header.encode();
        let mut hs = builder(options.cipher, seed, local)
            .local_private_key(&secret)
            .and_then(|b| b.remote_public_key(&remote))
            .and_then(|b| b.prologue(&prologue[..PROLOGUE_LEN]))
            .and_then(|b| b.build_initiator())
            .map_err(noise)?;
        let mut payload = [0u8; NODE_ID_LEN + PROOF_LEN];
        payload[..NODE_ID_LEN].copy_from_slice(me.as_bytes());
        let payload = match &options.network {
            Some(net) => {
                payload[NODE_ID_LEN..].copy_from_slice(&net.proof(&me, &target));
                &payload[..]
            }
            None => &payload[..NODE_ID_LEN],
        };
        let mut msg = [0u8; MAX_NOISE_MSG];
        let n = hs.write_message(payload, &mut msg).map_err(noise)?;
        let out = header.with_body(&[&msg[..n]]);
        Ok((
            Self {
                hs,
                me,
                target,
                port,
                options,
                resumed: None,
            },
            out,
        ))
    }

    /// Starts a resumption towards the node that issued `ticket`
    /// ([`crate::resume`]); returns the state and the hello bytes. If the
    /// reply is [`ReplyKind::ResumeRejected`], forget the ticket and start
    /// a full handshake ([`Initiator::new`]) on the same connection.
    pub fn resume(
        local: &SecretKey,
        ticket: &Ticket,
        port: u16,
        options: InitiatorOptions,
        seed: [u8; 32],
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        let header = HelloHeader::asking(&options, ticket.peer, port, true);
        let prologue = resume_prologue(&header.encode(), &ticket.sealed);
        let mut hs = resume_builder(options.cipher, seed)
            .psk(0, &ticket.key)
            .and_then(|b| b.prologue(&prologue))
            .and_then(|b| b.build_initiator())
            .map_err(noise)?;
        let mut msg = [0u8; MAX_NOISE_MSG];
        let n = hs.write_message(&[], &mut msg).map_err(noise)?;
        let out = header.with_body(&[&ticket.sealed, &msg[..n]]);
        Ok((
            Self {
                hs,
                me: local.node_id(),
                target: ticket.peer,
                port,
                options,
                resumed: Some(ticket.peer_member),
            },
            out,
        ))
    }

    /// Whether this is a resumption.
    pub fn is_resumption(&self) -> bool {
        self.resumed.is_some()
    }

    /// Completes the handshake with the responder's reply. Returns the
    /// stream's parameters and the key confirmation, which must be sent to
    /// the responder before (or with) the first stream bytes.
    pub fn handle_reply(
        mut self,
        header: ReplyHeader,
        body: &[u8],
    ) -> Result<(Established, [u8; CONFIRM_LEN]), HandshakeError> {
        match header.kind {
            ReplyKind::Accept => {}
            ReplyKind::WrongNode => {
                let id: [u8; NODE_ID_LEN] = body.try_into().map_err(|_| WireError::BadNodeId)?;
                let found = NodeId::from_bytes(id).map_err(|_| WireError::BadNodeId)?;
                return Err(HandshakeError::WrongNode {
                    expected: self.target,
                    found,
                });
            }
            ReplyKind::UnsupportedVersion => {
                let v = body.first().copied().unwrap_or(0);
                return Err(WireError::UnsupportedVersion(v).into());
            }
            ReplyKind::Failed => return Err(HandshakeError::PeerFailed),
            ReplyKind::ResumeRejected if self.resumed.is_some() => {
                return Err(HandshakeError::ResumeRejected)
            }
            ReplyKind::ResumeRejected => return Err(HandshakeError::BadPayload),
        }
        let mut payload = [0u8; MAX_NOISE_MSG];
        let n = self
            .hs
            .read_message(body, &mut payload)
            .map_err(|_| HandshakeError::AuthFailed)?;
        let (status, mode, extras, mut rest) = match &payload[..n] {
            [status, mode, extras, rest @ ..] => (*status, *mode, *extras, rest),
            _ => return Err(HandshakeError::BadPayload),
        };
        if extras & !(EXTRA_PROOF | EXTRA_TICKET) != 0 || (self.resumed.is_some() && extras != 0) {
            return Err(HandshakeError::BadPayload);
        }
        let mut take = |len: usize| -> Result<&[u8], HandshakeError> {
            let (head, tail) = rest
                .split_at_checked(len)
                .ok_or(HandshakeError::BadPayload)?;
            rest = tail;
            Ok(head)
        };
        let proof = if extras & EXTRA_PROOF != 0 {
            Some(take(PROOF_LEN)?)
        } else {
            None
        };
        let issued = if extras & EXTRA_TICKET != 0 {
            let key: [u8; RESUME_KEY_LEN] = take(RESUME_KEY_LEN)?
                .try_into()
                .map_err(|_| HandshakeError::BadPayload)?;
            let sealed: [u8; TICKET_LEN] = take(TICKET_LEN)?
                .try_into()
                .map_err(|_| HandshakeError::BadPayload)?;
            Some((key, sealed))
        } else {
            None
        };
        if !rest.is_empty() {
            return Err(HandshakeError::BadPayload);
        }
        match status {
            0 => {}
            1 => return Err(HandshakeError::Refused(Refusal::NoSuchPort)),
            2 => return Err(HandshakeError::Refused(Refusal::NotAdmitted)),
            _ => return Err(HandshakeError::BadPayload),
        }
        let cipher = self.options.cipher;
        let mode = match mode {
            0 => StreamMode::Encrypted(cipher),
            1 => StreamMode::Plaintext,
            _ => return Err(HandshakeError::BadPayload),
        };
        let peer_member = match self.resumed {
            Some(member) => member,
            None => self.options.network.is_some_and(|net| {
                proof.is_some_and(|proof| net.verify(&self.target, &self.me, proof))
            }),
        };
        let ticket = issued
            .map(|(key, sealed)| Box::new(Ticket::new(self.target, peer_member, sealed, key)));
        let binding = handshake_hash(&self.hs);
        let schedule = KeySchedule::new(&mut self.hs);
        let est = Established {
            upgrade: self.options.upgrade,
            binding,
            peer: self.target,
            port: self.port,
            mode,
            keys: matches!(mode, StreamMode::Encrypted(_)).then_some(SessionKeys {
                cipher,
                send: schedule.initiator_send,
                recv: schedule.responder_send,
            }),
            end_keys: (mode == StreamMode::Plaintext).then(|| EndKeys {
                send: EndKey::new(&schedule.initiator_end),
                recv: EndKey::new(&schedule.responder_end),
            }),
            reverse: self.options.reverse,
            peer_member,
            resumed: self.resumed.is_some(),
            ticket,
        };
        Ok((est, schedule.confirmation))
    }
}

/// The keys derived from Noise's split, so that no key serves two purposes.
struct KeySchedule {
    initiator_send: [u8; 32],
    responder_send: [u8; 32],
    /// A plaintext stream's end-mark keys.
    initiator_end: [u8; 32],
    responder_end: [u8; 32],
    confirmation: [u8; CONFIRM_LEN],
}

impl KeySchedule {
    fn new(hs: &mut snow::HandshakeState) -> Self {
        let (k1, k2) = hs.dangerously_get_raw_split();
        let confirm = hmac32(&k1, b"reach v2 key confirmation");
        let mut confirmation = [0u8; CONFIRM_LEN];
        confirmation.copy_from_slice(&confirm[..CONFIRM_LEN]);
        Self {
            initiator_send: hmac32(&k1, b"reach v2 stream key"),
            responder_send: hmac32(&k2, b"reach v2 stream key"),
            initiator_end: hmac32(&k1, b"reach v4 plaintext end key"),
            responder_end: hmac32(&k2, b"reach v4 plaintext end key"),
            confirmation,
        }
    }
}

/// An accepted stream waiting for the initiator's key confirmation.
pub struct Unconfirmed {
    est: Established,
    expected: [u8; CONFIRM_LEN],
}

impl std::fmt::Debug for Unconfirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Unconfirmed({:?})", self.est)
    }
}

impl Unconfirmed {
    /// The authenticated initiator (it has not confirmed the keys yet: a
    /// replayed hello names the node it was recorded from).
    pub fn peer(&self) -> NodeId {
        self.est.peer
    }

    /// The stream's parameters so far.
    pub fn established(&self) -> &Established {
        &self.est
    }

    /// The stream before the confirmation came, and the confirmation the
    /// caller must check before the first byte it reads from the
    /// initiator. Only for an encrypted stream this node asked for (a
    /// connect-back): a replayer cannot read or write its records, so the
    /// check can wait for the first read without letting anything in,
    /// and the node that asked saves the round trip.
    pub fn defer(self) -> (Established, [u8; CONFIRM_LEN]) {
        (self.est, self.expected)
    }

    /// The stream, if `confirmation` is the initiator's (checked in
    /// constant time).
    pub fn confirm(self, confirmation: &[u8; CONFIRM_LEN]) -> Result<Established, HandshakeError> {
        check_confirmation(&self.expected, confirmation)?;
        Ok(self.est)
    }
}

/// Whether `got` is the `expected` key confirmation (constant time): for
/// [`Unconfirmed::confirm`], and for a caller that took the stream with
/// [`Unconfirmed::defer`].
pub fn check_confirmation(
    expected: &[u8; CONFIRM_LEN],
    got: &[u8; CONFIRM_LEN],
) -> Result<(), HandshakeError> {
    aws_lc_rs::constant_time::verify_slices_are_equal(expected, got)
        .map_err(|_| HandshakeError::NotConfirmed)
}

/// What a responder's handshake produced besides the reply bytes.
#[derive(Debug)]
pub enum Responded {
    /// The stream is open once the initiator confirms the keys.
    Accepted(Unconfirmed),
    /// The initiator authenticated but was refused.
    Refused {
        /// The authenticated initiator.
        peer: NodeId,
        /// Why.
        refusal: Refusal,
    },
    /// The hello was for another node (or malformed, or failed authentication);
    /// the error says which. The reply tells the initiator.
    Failed(HandshakeError),
}

/// Responder's policy inputs.
#[derive(Clone, Copy, Debug)]
pub struct ResponderOptions {
    /// Grant plaintext streams to initiators that ask for them.
    pub allow_plaintext: bool,
    /// Grant plaintext, when asked, on this virtual port whatever
    /// `allow_plaintext` says (a hub's circuit port: the hub hands the bare
    /// socket to the kernel, and what crosses it is encrypted end to end).
    pub plaintext_port: Option<u16>,
    /// Answer a hello for another NodeId with this node's real NodeId (hubs;
    /// see the module docs). Otherwise such a hello gets a generic failure.
    pub reveal_identity: bool,
    /// This node's network, if it has one: initiators' membership proofs
    /// are checked, and this node's proof goes back to them.
    pub network: Option<NetworkKey>,
}

/// What the responder knows of an authenticated initiator when it decides.
#[derive(Clone, Copy, Debug)]
pub struct Knock<'a> {
    /// The initiator, authenticated by its static key.
    pub peer: NodeId,
    /// It proved it holds this node's network secret.
    pub member: bool,
    /// Its hello.
    pub hello: &'a HelloHeader,
}

/// Answers a hello whose header failed to decode; `None` means the bytes are not
/// from a reach peer at all and deserve no answer.
pub fn reply_to_bad_header(err: &WireError) -> Option<Vec<u8>> {
    match err {
        WireError::BadMagic => None,
        WireError::UnsupportedVersion(_) => Some(reply(ReplyKind::UnsupportedVersion, &[VERSION])),
        _ => Some(reply(ReplyKind::Failed, &[])),
    }
}

/// The generic failure reply (a malformed or unauthenticated hello).
pub fn reply_failed() -> Vec<u8> {
    reply(ReplyKind::Failed, &[])
}

fn reply(kind: ReplyKind, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(REPLY_HEADER_LEN + body.len());
    out.extend_from_slice(
        &ReplyHeader {
            kind,
            len: body.len(),
        }
        .encode(),
    );
    out.extend_from_slice(body);
    out
}

/// A responder's resumption: the key its tickets are sealed with, and the
/// time now (tickets expire; see [`crate::resume`]).
#[derive(Clone, Copy, Debug)]
pub struct Resumption<'a> {
    /// Seals the tickets issued and opens those offered.
    pub key: &'a TicketKey,
    /// Now, for the tickets' lifetime.
    pub now: std::time::Instant,
}

/// Runs the responder's side on a decoded hello header and its body.
/// `admit` decides for the authenticated initiator and its hello (port, flags).
/// With `resumption`, accepted initiators get a ticket and resumption
/// hellos are honoured; without, they are answered `ResumeRejected`.
/// Returns the reply to send and the outcome.
pub fn respond(
    local: &SecretKey,
    header: &HelloHeader,
    body: &[u8],
    options: ResponderOptions,
    resumption: Option<Resumption<'_>>,
    admit: impl FnOnce(&Knock<'_>) -> Admission,
    seed: [u8; 32],
) -> (Vec<u8>, Responded) {
    let me = local.node_id();
    if header.target != me {
        let err = HandshakeError::WrongNode {
            expected: header.target,
            found: me,
        };
        let reply = if options.reveal_identity {
            reply(ReplyKind::WrongNode, me.as_bytes())
        } else {
            reply(ReplyKind::Failed, &[])
        };
        return (reply, Responded::Failed(err));
    }
    if header.resume {
        return resume(header, body, options, resumption, admit, seed);
    }
    let failed = |e| (reply(ReplyKind::Failed, &[]), Responded::Failed(e));
    let prologue = header.encode();
    let secret = local.x25519_pair().0;
    let hs = builder(header.cipher, seed, local)
        .local_private_key(&secret)
        .and_then(|b| b.prologue(&prologue[..PROLOGUE_LEN]))
        .and_then(|b| b.build_responder());
    let mut hs = match hs {
        Ok(hs) => hs,
        Err(e) => return failed(noise(e)),
    };
    let mut payload = [0u8; MAX_NOISE_MSG];
    let Ok(n) = hs.read_message(body, &mut payload) else {
        return failed(HandshakeError::AuthFailed);
    };
    let Some(peer) = claimed_initiator(&hs, &payload[..n]) else {
        return failed(HandshakeError::ClaimMismatch);
    };
    let member = options
        .network
        .is_some_and(|net| net.verify(&peer, &me, &payload[NODE_ID_LEN..n]));
    let admission = admit(&Knock {
        peer,
        member,
        hello: header,
    });
    // What goes back with an acceptance: this node's membership proof, and
    // a resumption ticket.
    let mut extras = Vec::new();
    let mut flags = 0;
    if admission == Admission::Accept {
        if let Some(net) = &options.network {
            flags |= EXTRA_PROOF;
            extras.extend_from_slice(&net.proof(&me, &peer));
        }
        if let Some(r) = resumption {
            flags |= EXTRA_TICKET;
            let key = hmac32(&seed, b"reach resumption key");
            let nonce = hmac32(&seed, b"reach ticket nonce");
            let mut n = [0u8; 12];
            n.copy_from_slice(&nonce[..12]);
            let grant = Grant { peer, member, key };
            extras.extend_from_slice(&key);
            extras.extend_from_slice(&r.key.seal(&grant, n, r.now));
        }
    }
    let decided = Decided {
        peer,
        member,
        admission,
        plaintext: grants_plaintext(&options, header),
        resumed: false,
    };
    finish(hs, header, &decided, flags, &extras)
}

/// The responder's side of a resumption hello ([`crate::resume`]).
fn resume(
    header: &HelloHeader,
    body: &[u8],
    options: ResponderOptions,
    resumption: Option<Resumption<'_>>,
    admit: impl FnOnce(&Knock<'_>) -> Admission,
    seed: [u8; 32],
) -> (Vec<u8>, Responded) {
    let rejected = |e: TicketError| {
        (
            reply(ReplyKind::ResumeRejected, &[]),
            Responded::Failed(e.into()),
        )
    };
    let Some(r) = resumption else {
        return rejected(TicketError::NotIssuedHere);
    };
    let Some((sealed, msg)) = body.split_first_chunk::<TICKET_LEN>() else {
        return (
            reply(ReplyKind::Failed, &[]),
            Responded::Failed(HandshakeError::BadPayload),
        );
    };
    let grant = match r.key.open(sealed, r.now) {
        Ok(grant) => grant,
        Err(e) => return rejected(e),
    };
    let failed = |e| (reply(ReplyKind::Failed, &[]), Responded::Failed(e));
    let prologue = resume_prologue(&header.encode(), sealed);
    let hs = resume_builder(header.cipher, seed)
        .psk(0, &grant.key)
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_responder());
    let mut hs = match hs {
        Ok(hs) => hs,
        Err(e) => return failed(noise(e)),
    };
    let mut payload = [0u8; MAX_NOISE_MSG];
    match hs.read_message(msg, &mut payload) {
        Ok(0) => {}
        Ok(_) => return failed(HandshakeError::BadPayload),
        Err(_) => return failed(HandshakeError::AuthFailed),
    }
    let admission = admit(&Knock {
        peer: grant.peer,
        member: grant.member,
        hello: header,
    });
    let decided = Decided {
        peer: grant.peer,
        member: grant.member,
        admission,
        plaintext: grants_plaintext(&options, header),
        resumed: true,
    };
    finish(hs, header, &decided, 0, &[])
}

/// Whether the responder grants the plaintext a hello asks for.
fn grants_plaintext(options: &ResponderOptions, header: &HelloHeader) -> bool {
    header.plaintext_requested
        && (options.allow_plaintext || options.plaintext_port == Some(header.port))
}

/// What a responder decided about an authenticated initiator.
struct Decided {
    peer: NodeId,
    member: bool,
    admission: Admission,
    plaintext: bool,
    resumed: bool,
}

/// The responder's msg2 and outcome once it has decided.
fn finish(
    mut hs: snow::HandshakeState,
    header: &HelloHeader,
    decided: &Decided,
    extras_flags: u8,
    extras: &[u8],
) -> (Vec<u8>, Responded) {
    let &Decided {
        peer,
        member,
        admission,
        plaintext,
        resumed,
    } = decided;
    let failed = |e| (reply(ReplyKind::Failed, &[]), Responded::Failed(e));
    let status = match admission {
        Admission::Accept => 0,
        Admission::Refuse(Refusal::NoSuchPort) => 1,
        Admission::Refuse(Refusal::NotAdmitted) => 2,
    };
    let mut body = Vec::with_capacity(3 + extras.len());
    body.extend_from_slice(&[status, u8::from(plaintext), extras_flags]);
    body.extend_from_slice(extras);
    let mut msg = [0u8; MAX_NOISE_MSG];
    let len = match hs.write_message(&body, &mut msg) {
        Ok(len) => len,
        Err(e) => return failed(noise(e)),
    };
    let out = reply(ReplyKind::Accept, &msg[..len]);
    if let Admission::Refuse(refusal) = admission {
        return (out, Responded::Refused { peer, refusal });
    }
    let binding = handshake_hash(&hs);
    let schedule = KeySchedule::new(&mut hs);
    let mode = if plaintext {
        StreamMode::Plaintext
    } else {
        StreamMode::Encrypted(header.cipher)
    };
    let keys = (!plaintext).then_some(SessionKeys {
        cipher: header.cipher,
        send: schedule.responder_send,
        recv: schedule.initiator_send,
    });
    let end_keys = plaintext.then(|| EndKeys {
        send: EndKey::new(&schedule.responder_end),
        recv: EndKey::new(&schedule.initiator_end),
    });
    let est = Established {
        peer,
        port: header.port,
        mode,
        keys,
        end_keys,
        reverse: header.reverse,
        upgrade: header.upgrade,
        binding,
        peer_member: member,
        resumed,
        ticket: None,
    };
    let pending = Unconfirmed {
        est,
        expected: schedule.confirmation,
    };
    (out, Responded::Accepted(pending))
}

fn handshake_hash(hs: &snow::HandshakeState) -> [u8; 32] {
    let mut b = [0u8; 32];
    let h = hs.get_handshake_hash();
    let n = h.len().min(32);
    b[..n].copy_from_slice(&h[..n]);
    b
}

/// The NodeId the initiator claims in its payload, if it matches the X25519
/// static key it proved possession of.
fn claimed_initiator(hs: &snow::HandshakeState, payload: &[u8]) -> Option<NodeId> {
    let id: [u8; NODE_ID_LEN] = payload.get(..NODE_ID_LEN)?.try_into().ok()?;
    let id = NodeId::from_bytes(id).ok()?;
    let proven = hs.get_remote_static()?;
    (id.x25519_public()?.as_slice() == proven).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OPTS: InitiatorOptions = InitiatorOptions::ENCRYPTED;
    const RESP: ResponderOptions = ResponderOptions {
        allow_plaintext: false,
        plaintext_port: None,
        reveal_identity: true,
        network: None,
    };

    /// The responder's end of a handshake run by [`run`].
    #[derive(Debug)]
    enum Resp {
        /// Accepted, and confirmed with the initiator's confirmation.
        Confirmed(Established),
        /// Anything else.
        Other(Responded),
    }

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed([seed; 32])
    }

    /// Passes `hello` through the wire codecs to `resp_key`'s responder
    /// (deciding with `admit`, its randomness from `seed`) and its reply
    /// back to `init`, as drivers would: the initiator's result and the
    /// responder's outcome.
    fn through(
        init: Initiator,
        hello: &[u8],
        resp_key: &SecretKey,
        (resp, resumption): (ResponderOptions, Option<Resumption<'_>>),
        admit: impl FnOnce(&Knock<'_>) -> Admission,
        seed: [u8; 32],
    ) -> (
        Result<(Established, [u8; CONFIRM_LEN]), HandshakeError>,
        Responded,
    ) {
        let hb: [u8; HELLO_HEADER_LEN] = hello[..HELLO_HEADER_LEN].try_into().expect("len");
        let header = HelloHeader::decode(&hb).expect("header");
        assert_eq!(header.noise_len, hello.len() - HELLO_HEADER_LEN);
        let (reply, outcome) = respond(
            resp_key,
            &header,
            &hello[HELLO_HEADER_LEN..],
            resp,
            resumption,
            admit,
            seed,
        );
        let rh: [u8; REPLY_HEADER_LEN] = reply[..REPLY_HEADER_LEN].try_into().expect("len");
        let rh = ReplyHeader::decode(&rh).expect("reply header");
        (init.handle_reply(rh, &reply[REPLY_HEADER_LEN..]), outcome)
    }

    /// Runs a handshake through the wire codecs, as a driver would.
    fn run(
        init_key: &SecretKey,
        target: NodeId,
        resp_key: &SecretKey,
        opts: InitiatorOptions,
        resp: ResponderOptions,
        admission: Admission,
    ) -> (Result<Established, HandshakeError>, Resp) {
        let (init, hello) = Initiator::new(init_key, target, 7, opts, [1; 32]).expect("init");
        match through(init, &hello, resp_key, (resp, None), |_| admission, [2; 32]) {
            (Ok((est, confirmation)), Responded::Accepted(pending)) => {
                let resp = pending.confirm(&confirmation).expect("confirmed");
                (Ok(est), Resp::Confirmed(resp))
            }
            (init, outcome) => (init.map(|(est, _)| est), Resp::Other(outcome)),
        }
    }

    #[test]
    fn both_sides_learn_each_other_and_agree_on_keys() {
        for cipher in [Cipher::ChaChaPoly, Cipher::AesGcm] {
            let (a, b) = (key(1), key(2));
            let opts = InitiatorOptions { cipher, ..OPTS };
            let (init, resp) = run(&a, b.node_id(), &b, opts, RESP, Admission::Accept);
            let init = init.expect("initiator established");
            let Resp::Confirmed(resp) = resp else {
                panic!("responder did not accept: {resp:?}")
            };
            assert_eq!(init.peer, b.node_id());
            assert_eq!(resp.peer, a.node_id());
            assert_eq!(init.mode, StreamMode::Encrypted(cipher));
            let (ik, rk) = (init.keys.expect("keys"), resp.keys.expect("keys"));
            assert_eq!(ik.send, rk.recv);
            assert_eq!(ik.recv, rk.send);
            assert_ne!(ik.send, ik.recv);
        }
    }

    /// Runs `hello` from `init` through `resp_key`'s responder, admitting
    /// it, and back: what the admission saw (peer, port, reverse) and both
    /// sides' results.
    fn complete(
        init: Initiator,
        hello: &[u8],
        resp_key: &SecretKey,
    ) -> ((NodeId, u16, bool), Established, Established) {
        let mut seen = None;
        let admit = |k: &Knock<'_>| {
            seen = Some((k.peer, k.hello.port, k.hello.reverse));
            Admission::Accept
        };
        let (init, outcome) = through(init, hello, resp_key, (RESP, None), admit, [2; 32]);
        let Responded::Accepted(pending) = outcome else {
            panic!("not accepted")
        };
        let (init, confirmation) = init.expect("established");
        let resp = pending.confirm(&confirmation).expect("confirmed");
        (seen.expect("admission asked"), init, resp)
    }

    #[test]
    fn the_reverse_flag_reaches_both_sides_and_the_admission() {
        let (a, b) = (key(1), key(2));
        let opts = InitiatorOptions {
            reverse: true,
            ..OPTS
        };
        let (init, hello) = Initiator::new(&a, b.node_id(), 99, opts, [1; 32]).expect("init");
        let hb: [u8; HELLO_HEADER_LEN] = hello[..HELLO_HEADER_LEN].try_into().expect("len");
        assert!(HelloHeader::decode(&hb).expect("header").reverse);
        let (seen, init, resp) = complete(init, &hello, &b);
        assert_eq!(seen, (a.node_id(), 99, true));
        assert!(init.reverse);
        assert!(resp.reverse);
    }

    #[test]
    fn a_key_and_its_negation_reach_and_are_seen_as_one_node() {
        // One secret proves both `A` and `-A` (same X25519 form): the peer that
        // claims `-A` is admitted as the node `A`, so policy lists and per-node
        // caps see one node, and dialing `-B` reaches `B` itself.
        let (a, b) = (key(1), key(2));
        let minus_a = crate::identity::tests::negated(a.node_id());
        let (init, hello) =
            Initiator::claiming(&a, minus_a, b.node_id(), 7, OPTS, [1; 32]).expect("init");
        let ((admitted, _, _), _, resp) = complete(init, &hello, &b);
        assert_eq!(admitted.as_bytes(), minus_a.as_bytes(), "the claim as sent");
        assert!(std::collections::HashSet::from([a.node_id()]).contains(&admitted));
        assert_eq!(resp.peer, a.node_id());

        let minus_b = crate::identity::tests::negated(b.node_id());
        let (init, resp) = run(&a, minus_b, &b, OPTS, RESP, Admission::Accept);
        assert_eq!(init.expect("established").peer, b.node_id());
        assert!(matches!(resp, Resp::Confirmed(_)));
    }

    #[test]
    fn reaching_another_node_names_the_mismatch() {
        let (a, b, c) = (key(1), key(2), key(3));
        let (init, resp) = run(&a, b.node_id(), &c, OPTS, RESP, Admission::Accept);
        assert_eq!(
            init.expect_err("must fail"),
            HandshakeError::WrongNode {
                expected: b.node_id(),
                found: c.node_id()
            }
        );
        assert!(matches!(
            resp,
            Resp::Other(Responded::Failed(HandshakeError::WrongNode { .. }))
        ));
    }

    #[test]
    fn a_node_that_does_not_reveal_itself_gives_a_wrong_hello_nothing_to_learn() {
        let (a, b, c) = (key(1), key(2), key(3));
        let hidden = ResponderOptions {
            reveal_identity: false,
            ..RESP
        };
        let (init, resp) = run(&a, b.node_id(), &c, OPTS, hidden, Admission::Accept);
        assert_eq!(init.expect_err("must fail"), HandshakeError::PeerFailed);
        assert!(matches!(
            resp,
            Resp::Other(Responded::Failed(HandshakeError::WrongNode { .. }))
        ));
    }

    /// One hello, answered twice by the responder: what a replayer gets.
    fn replay(opts: InitiatorOptions, resp: ResponderOptions) {
        let (a, b) = (key(1), key(2));
        let (init, hello) = Initiator::new(&a, b.node_id(), 7, opts, [1; 32]).expect("init");
        let hb: [u8; HELLO_HEADER_LEN] = hello[..HELLO_HEADER_LEN].try_into().expect("len");
        let header = HelloHeader::decode(&hb).expect("header");
        let answer = |seed| {
            let (reply, outcome) = respond(
                &b,
                &header,
                &hello[HELLO_HEADER_LEN..],
                resp,
                None,
                |_| Admission::Accept,
                [seed; 32],
            );
            let Responded::Accepted(pending) = outcome else {
                panic!("a recorded hello checks out again: {outcome:?}")
            };
            (reply, pending)
        };
        let (reply, original) = answer(2);
        let rh: [u8; REPLY_HEADER_LEN] = reply[..REPLY_HEADER_LEN].try_into().expect("len");
        let rh = ReplyHeader::decode(&rh).expect("reply header");
        let (_, confirmation) = init
            .handle_reply(rh, &reply[REPLY_HEADER_LEN..])
            .expect("established");
        // The replayer has the hello and everything on the wire, including
        // the original confirmation, but not the initiator's ephemeral secret.
        let (_, replayed) = answer(3);
        assert_eq!(
            replayed.confirm(&confirmation).expect_err("replay"),
            HandshakeError::NotConfirmed
        );
        assert_eq!(
            answer(4).1.confirm(&[0; CONFIRM_LEN]).expect_err("guess"),
            HandshakeError::NotConfirmed
        );
        original
            .confirm(&confirmation)
            .expect("the real initiator confirms");
    }

    #[test]
    fn a_replayed_hello_is_never_confirmed() {
        replay(OPTS, RESP);
        let plain = InitiatorOptions {
            plaintext: true,
            ..OPTS
        };
        replay(
            plain,
            ResponderOptions {
                allow_plaintext: true,
                ..RESP
            },
        );
    }

    #[test]
    fn members_prove_the_network_secret_both_ways() {
        let (a, b) = (key(1), key(2));
        let net = Some(NetworkKey::from_secret(b"sesame"));
        let other = Some(NetworkKey::from_secret(b"other"));
        for (init_net, resp_net, want) in [
            (net, net, true),
            (net, other, false),
            (None, net, false),
            (net, None, false),
        ] {
            let opts = InitiatorOptions {
                network: init_net,
                ..OPTS
            };
            let resp = ResponderOptions {
                network: resp_net,
                ..RESP
            };
            let (init, resp) = run(&a, b.node_id(), &b, opts, resp, Admission::Accept);
            let Resp::Confirmed(resp) = resp else {
                panic!("not accepted: {resp:?}")
            };
            assert_eq!(init.expect("initiator").peer_member, want);
            assert_eq!(resp.peer_member, want);
        }
    }

    #[test]
    fn stream_keys_are_not_the_raw_noise_split() {
        let (a, b) = (key(1), key(2));
        let (init, hello) = Initiator::new(&a, b.node_id(), 7, OPTS, [1; 32]).expect("init");
        let hb: [u8; HELLO_HEADER_LEN] = hello[..HELLO_HEADER_LEN].try_into().expect("len");
        let header = HelloHeader::decode(&hb).expect("header");
        let (reply, _) = respond(
            &b,
            &header,
            &hello[HELLO_HEADER_LEN..],
            RESP,
            None,
            |_| Admission::Accept,
            [2; 32],
        );
        let rh: [u8; REPLY_HEADER_LEN] = reply[..REPLY_HEADER_LEN].try_into().expect("len");
        let rh = ReplyHeader::decode(&rh).expect("reply header");
        let (est, confirmation) = init
            .handle_reply(rh, &reply[REPLY_HEADER_LEN..])
            .expect("established");
        let keys = est.keys.expect("keys");
        assert_ne!(&keys.send[..CONFIRM_LEN], &confirmation[..]);
        assert_ne!(keys.send, keys.recv);
    }

    #[test]
    fn both_sides_agree_on_the_binding_and_see_the_upgrade_flag() {
        let (a, b) = (key(1), key(2));
        let opts = InitiatorOptions {
            upgrade: true,
            ..OPTS
        };
        let (init, resp) = run(&a, b.node_id(), &b, opts, RESP, Admission::Accept);
        let init = init.expect("initiator");
        let Resp::Confirmed(resp) = resp else {
            panic!("responder: {resp:?}");
        };
        assert!(init.upgrade && resp.upgrade);
        assert_eq!(init.binding, resp.binding);
        assert_eq!(init.upgrade_id(), resp.upgrade_id());
        let (other, _) = run(&a, b.node_id(), &b, OPTS, RESP, Admission::Accept);
        let other = other.expect("second handshake");
        assert!(!other.upgrade);
        assert_ne!(other.binding, init.binding, "every handshake binds anew");
    }

    #[test]
    fn plaintext_only_when_both_opt_in() {
        let (a, b) = (key(1), key(2));
        let ask = InitiatorOptions {
            plaintext: true,
            ..OPTS
        };
        let allow = ResponderOptions {
            allow_plaintext: true,
            ..RESP
        };
        // `run` asks for port 7: plaintext there only if that port allows it.
        let port = |p| ResponderOptions {
            plaintext_port: Some(p),
            ..RESP
        };
        let cases = [
            (ask, allow, true),
            (ask, RESP, false),
            (OPTS, allow, false),
            (ask, port(7), true),
            (ask, port(8), false),
            (OPTS, port(7), false),
        ];
        for (opts, resp, want_plain) in cases {
            let (init, resp) = run(&a, b.node_id(), &b, opts, resp, Admission::Accept);
            let init = init.expect("established");
            assert_eq!(init.mode == StreamMode::Plaintext, want_plain);
            assert_eq!(init.keys.is_none(), want_plain);
            assert_eq!(init.end_keys.is_some(), want_plain);
            let Resp::Confirmed(resp) = resp else {
                panic!("responder: {resp:?}");
            };
            if let (Some(i), Some(r)) = (init.end_keys, resp.end_keys) {
                // Each side's end mark checks out at the other, not at itself.
                use crate::plain_chunks::{Deframer, Framer, HEADER_LEN};
                let ends = |send, recv| {
                    let mark = Framer::new(send).end_mark().expect("nothing owed");
                    let mut d = Deframer::new(recv);
                    d.spare().copy_from_slice(&mark[..HEADER_LEN]);
                    d.received(0, HEADER_LEN).expect("end header");
                    d.spare().copy_from_slice(&mark[HEADER_LEN..]);
                    d.received(0, mark.len() - HEADER_LEN).is_ok()
                };
                assert!(ends(i.send.clone(), r.recv.clone()));
                assert!(ends(r.send.clone(), i.recv.clone()));
                assert!(!ends(i.send, i.recv));
            }
        }
    }

    #[test]
    fn refusal_reaches_the_initiator_authenticated() {
        let (a, b) = (key(1), key(2));
        let (init, resp) = run(
            &a,
            b.node_id(),
            &b,
            OPTS,
            RESP,
            Admission::Refuse(Refusal::NoSuchPort),
        );
        assert_eq!(
            init.expect_err("refused"),
            HandshakeError::Refused(Refusal::NoSuchPort)
        );
        assert!(matches!(
            resp,
            Resp::Other(Responded::Refused {
                refusal: Refusal::NoSuchPort,
                ..
            })
        ));
    }

    #[test]
    fn tampered_prologue_fails_authentication() {
        let (a, b) = (key(1), key(2));
        let (_, mut hello) = Initiator::new(&a, b.node_id(), 7, OPTS, [1; 32]).expect("init");
        hello[39] ^= 1; // the virtual port
        let hb: [u8; HELLO_HEADER_LEN] = hello[..HELLO_HEADER_LEN].try_into().expect("len");
        let header = HelloHeader::decode(&hb).expect("still decodes");
        let (reply, outcome) = respond(
            &b,
            &header,
            &hello[HELLO_HEADER_LEN..],
            RESP,
            None,
            |_| Admission::Accept,
            [2; 32],
        );
        assert!(matches!(
            outcome,
            Responded::Failed(HandshakeError::AuthFailed)
        ));
        assert_eq!(reply[0], 3);
    }

    #[test]
    fn version_and_magic_errors_are_specific() {
        let mut h = HelloHeader {
            plaintext_requested: false,
            cipher: Cipher::AesGcm,
            reverse: false,
            upgrade: false,
            resume: false,
            target: key(1).node_id(),
            port: 1,
            noise_len: 10,
        }
        .encode();
        h[3] = 9;
        assert_eq!(
            HelloHeader::decode(&h),
            Err(WireError::UnsupportedVersion(9))
        );
        let reply = reply_to_bad_header(&WireError::UnsupportedVersion(9)).expect("reply");
        assert_eq!(reply, vec![2, 0, 1, VERSION]);
        h[0] = b'G';
        assert_eq!(HelloHeader::decode(&h), Err(WireError::BadMagic));
        assert_eq!(reply_to_bad_header(&WireError::BadMagic), None);
    }

    /// One exchange of `hello` with `resp_key`'s responder (with tickets
    /// under `tk` at `now`, admitting with `admission`): the initiator's and
    /// the responder's results, the responder confirmed with the
    /// initiator's confirmation.
    fn exchange(
        init: Initiator,
        hello: &[u8],
        resp_key: &SecretKey,
        resumption: Option<Resumption<'_>>,
        admission: Admission,
    ) -> (
        Result<Established, HandshakeError>,
        Result<Established, HandshakeError>,
    ) {
        let (init, outcome) = through(
            init,
            hello,
            resp_key,
            (RESP, resumption),
            |_| admission,
            [2; 32],
        );
        let resp = match (outcome, &init) {
            (Responded::Accepted(p), Ok((_, c))) => p.confirm(c),
            (Responded::Accepted(_), Err(_)) => Err(HandshakeError::NotConfirmed),
            (Responded::Refused { refusal, .. }, _) => Err(HandshakeError::Refused(refusal)),
            (Responded::Failed(e), _) => Err(e),
        };
        (init.map(|(est, _)| est), resp)
    }

    /// A full handshake from `a` to `b` under ticket key `tk`: the ticket
    /// `a` got.
    fn ticket_for(a: &SecretKey, b: &SecretKey, tk: &TicketKey, now: std::time::Instant) -> Ticket {
        let (init, hello) = Initiator::new(a, b.node_id(), 7, OPTS, [1; 32]).expect("init");
        let r = Resumption { key: tk, now };
        let (init, resp) = exchange(init, &hello, b, Some(r), Admission::Accept);
        let (init, resp) = (init.expect("initiator"), resp.expect("responder"));
        assert!(!init.resumed && !resp.resumed && resp.ticket.is_none());
        *init
            .ticket
            .expect("a ticket is issued with every accepted full handshake")
    }

    #[test]
    fn a_second_handshake_resumes_with_the_ticket_of_the_first() {
        let (a, b) = (key(1), key(2));
        let now = std::time::Instant::now();
        let tk = TicketKey::new([9; 32], now);
        let r = Resumption { key: &tk, now };
        let ticket = ticket_for(&a, &b, &tk, now);
        assert_eq!(ticket.peer, b.node_id());
        for (cipher, plaintext) in [
            (Cipher::ChaChaPoly, false),
            (Cipher::AesGcm, false),
            (Cipher::AesGcm, true),
        ] {
            let opts = InitiatorOptions {
                cipher,
                plaintext,
                ..OPTS
            };
            let (init, hello) = Initiator::resume(&a, &ticket, 9, opts, [4; 32]).expect("resume");
            assert!(init.is_resumption());
            let (i, rsp) = exchange(init, &hello, &b, Some(r), Admission::Accept);
            let (i, rsp) = (i.expect("initiator"), rsp.expect("responder"));
            assert!(i.resumed && rsp.resumed);
            assert_eq!((i.peer, rsp.peer), (b.node_id(), a.node_id()));
            assert_eq!((i.port, rsp.port), (9, 9));
            assert_eq!(i.binding, rsp.binding);
            assert!(i.ticket.is_none(), "a resumption issues no new ticket");
            if plaintext {
                // RESP does not allow plaintext.
                assert_eq!(i.mode, StreamMode::Encrypted(cipher));
            }
            let (ik, rk) = (i.keys.expect("keys"), rsp.keys.expect("keys"));
            assert_eq!((ik.send, ik.recv), (rk.recv, rk.send));
            assert_ne!(ik.send, ik.recv);
        }
        // Fresh ephemerals: two resumptions never share keys.
        let run = |seed| {
            let (init, hello) = Initiator::resume(&a, &ticket, 9, OPTS, seed).expect("resume");
            exchange(init, &hello, &b, Some(r), Admission::Accept)
                .0
                .expect("resumed")
                .binding
        };
        assert_ne!(run([5; 32]), run([6; 32]));
    }

    #[test]
    fn members_stay_members_on_resumption() {
        let net = NetworkKey::from_secret(b"sesame");
        let (a, b) = (key(1), key(2));
        let now = std::time::Instant::now();
        let tk = TicketKey::new([9; 32], now);
        let r = Resumption { key: &tk, now };
        let opts = InitiatorOptions {
            network: Some(net),
            ..OPTS
        };
        let resp = ResponderOptions {
            network: Some(net),
            ..RESP
        };
        let (init, hello) = Initiator::new(&a, b.node_id(), 7, opts, [1; 32]).expect("init");
        let member = |k: &Knock<'_>| {
            assert!(k.member);
            Admission::Accept
        };
        let (est, _) = through(init, &hello, &b, (resp, Some(r)), member, [2; 32]);
        let (est, _) = est.expect("full");
        assert!(est.peer_member);
        let ticket = est.ticket.expect("ticket");
        let (init, hello) = Initiator::resume(&a, &ticket, 7, opts, [3; 32]).expect("resume");
        let mut seen = None;
        let admit = |k: &Knock<'_>| {
            seen = Some((k.peer, k.member));
            Admission::Accept
        };
        let (est, outcome) = through(init, &hello, &b, (resp, Some(r)), admit, [2; 32]);
        assert_eq!(seen, Some((a.node_id(), true)));
        let (est, _) = est.expect("resumed");
        assert!(est.resumed && est.peer_member);
        let Responded::Accepted(p) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(p.established().peer_member);
    }

    #[test]
    fn a_ticket_not_honoured_gets_resume_rejected_so_a_full_hello_can_follow() {
        let (a, b) = (key(1), key(2));
        let now = std::time::Instant::now();
        let tk = TicketKey::new([9; 32], now);
        let ticket = ticket_for(&a, &b, &tk, now);
        let later = now + crate::resume::TICKET_LIFETIME + std::time::Duration::from_secs(1);
        let restarted = TicketKey::new([10; 32], now);
        for (r, why) in [
            (
                Some(Resumption {
                    key: &restarted,
                    now,
                }),
                TicketError::NotIssuedHere,
            ),
            (
                Some(Resumption {
                    key: &tk,
                    now: later,
                }),
                TicketError::Expired,
            ),
            (None, TicketError::NotIssuedHere),
        ] {
            let (init, hello) = Initiator::resume(&a, &ticket, 7, OPTS, [3; 32]).expect("resume");
            let (i, rsp) = exchange(init, &hello, &b, r, Admission::Accept);
            assert_eq!(i.err(), Some(HandshakeError::ResumeRejected));
            assert_eq!(rsp.err(), Some(HandshakeError::Ticket(why)));
        }
    }

    #[test]
    fn a_resumption_is_admitted_afresh_and_a_replay_is_never_confirmed() {
        let (a, b) = (key(1), key(2));
        let now = std::time::Instant::now();
        let tk = TicketKey::new([9; 32], now);
        let r = Resumption { key: &tk, now };
        let ticket = ticket_for(&a, &b, &tk, now);
        let refuse = Admission::Refuse(Refusal::NotAdmitted);
        let (init, hello) = Initiator::resume(&a, &ticket, 7, OPTS, [3; 32]).expect("resume");
        let (i, rsp) = exchange(init, &hello, &b, Some(r), refuse);
        assert_eq!(i.err(), Some(HandshakeError::Refused(Refusal::NotAdmitted)));
        assert_eq!(
            rsp.err(),
            Some(HandshakeError::Refused(Refusal::NotAdmitted))
        );
        // A recorded resumption hello, replayed: the responder answers with
        // a fresh ephemeral, so no confirmation the replayer can make (here:
        // the original's) matches.
        let (orig, hello) = Initiator::resume(&a, &ticket, 7, OPTS, [3; 32]).expect("resume");
        let accept = |_: &Knock<'_>| Admission::Accept;
        let (orig, _) = through(orig, &hello, &b, (RESP, Some(r)), accept, [20; 32]);
        let (_, recorded_confirmation) = orig.expect("original");
        let hb: [u8; HELLO_HEADER_LEN] = hello[..HELLO_HEADER_LEN].try_into().expect("len");
        let header = HelloHeader::decode(&hb).expect("header");
        let (_, replayed) = respond(
            &b,
            &header,
            &hello[HELLO_HEADER_LEN..],
            RESP,
            Some(r),
            |_| Admission::Accept,
            [21; 32],
        );
        let Responded::Accepted(pending) = replayed else {
            panic!("{replayed:?}")
        };
        assert_eq!(
            pending.confirm(&recorded_confirmation).err(),
            Some(HandshakeError::NotConfirmed)
        );
    }

    #[test]
    fn a_tampered_resumption_hello_fails() {
        let (a, b, c) = (key(1), key(2), key(3));
        let now = std::time::Instant::now();
        let tk = TicketKey::new([9; 32], now);
        let r = Resumption { key: &tk, now };
        let ticket = ticket_for(&a, &b, &tk, now);
        let (_, hello) = Initiator::resume(&a, &ticket, 7, OPTS, [3; 32]).expect("resume");
        for i in 4..hello.len() {
            if (40..42).contains(&i) {
                continue; // the length field: the body would not be read whole
            }
            let mut bad = hello.clone();
            bad[i] ^= 0x01;
            let (init, _) = Initiator::resume(&a, &ticket, 7, OPTS, [3; 32]).expect("resume");
            let Ok(header) = HelloHeader::decode(&bad[..HELLO_HEADER_LEN].try_into().expect("len"))
            else {
                continue;
            };
            let (i_res, rsp) = exchange(init, &bad, &b, Some(r), Admission::Accept);
            assert!(i_res.is_err() && rsp.is_err(), "byte {i} ({header:?})");
        }
        // Another node holding the ticket's bytes but not its key gets nowhere.
        let stolen = Ticket::new(b.node_id(), false, ticket.sealed, [0; 32]);
        let (init, hello) = Initiator::resume(&c, &stolen, 7, OPTS, [3; 32]).expect("resume");
        let (i, rsp) = exchange(init, &hello, &b, Some(r), Admission::Accept);
        assert!(i.is_err());
        assert_eq!(rsp.err(), Some(HandshakeError::AuthFailed));
    }

    proptest! {
        #[test]
        fn hello_header_decoder_never_panics(bytes in any::<[u8; HELLO_HEADER_LEN]>()) {
            if let Ok(h) = HelloHeader::decode(&bytes) {
                prop_assert_eq!(h.encode(), bytes);
            }
        }

        #[test]
        fn reply_header_round_trips_or_errors(bytes in any::<[u8; REPLY_HEADER_LEN]>()) {
            if let Ok(h) = ReplyHeader::decode(&bytes) {
                prop_assert_eq!(h.encode(), bytes);
            }
        }

        #[test]
        fn responder_survives_arbitrary_noise_messages(
            msg in proptest::collection::vec(any::<u8>(), 0..MAX_NOISE_MSG),
            plaintext in any::<bool>(),
            resume in any::<bool>(),
        ) {
            let b = key(2);
            let header = HelloHeader {
                plaintext_requested: plaintext,
                cipher: Cipher::ChaChaPoly,
                reverse: false,
                upgrade: false,
                resume,
                target: b.node_id(),
                port: 1,
                noise_len: msg.len(),
            };
            let tk = TicketKey::new([5; 32], std::time::Instant::now());
            let r = Resumption { key: &tk, now: std::time::Instant::now() };
            let (_, outcome) = respond(&b, &header, &msg, RESP, Some(r), |_| Admission::Accept, [3; 32]);
            prop_assert!(matches!(outcome, Responded::Failed(_)), "garbage must not be accepted");
        }

        #[test]
        fn initiator_survives_arbitrary_replies(
            kind in 0u8..5,
            body in proptest::collection::vec(any::<u8>(), 0..200),
            resuming in any::<bool>(),
        ) {
            let (a, b) = (key(1), key(2));
            let (init, _) = if resuming {
                let ticket = Ticket::new(b.node_id(), false, [7; TICKET_LEN], [8; 32]);
                Initiator::resume(&a, &ticket, 7, OPTS, [1; 32]).expect("resume")
            } else {
                Initiator::new(&a, b.node_id(), 7, OPTS, [1; 32]).expect("init")
            };
            let mut hb = [kind, 0, 0];
            hb[1..].copy_from_slice(&(body.len() as u16).to_be_bytes());
            let header = ReplyHeader::decode(&hb).expect("valid header");
            prop_assert!(init.handle_reply(header, &body).is_err());
        }
    }
}
