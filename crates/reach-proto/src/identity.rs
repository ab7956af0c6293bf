//! Node identities: the ed25519 key pair of a node and its public `NodeId`.
//!
//! A `NodeId` is the node's ed25519 public key. Its text form is the 52-character
//! lowercase RFC 4648 base32 encoding (no padding): short enough to paste, and a
//! valid DNS label, so later steps can resolve `NODEID.reach` names.
//!
//! The Noise handshake needs X25519 keys. Instead of a second key pair we derive
//! them from the ed25519 one (the birational map of RFC 7748 section 4.1, as
//! libsodium's `crypto_sign_ed25519_pk_to_curve25519` does). The responder checks
//! that the X25519 static key the initiator proved possession of is the one derived
//! from the NodeId the initiator claims, so one handshake proves the NodeId itself.
//! The combined use of one key for both is analysed in <https://eprint.iacr.org/2021/509>.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::noise_crypto::X25519Pair;

/// Length of a NodeId in bytes (an ed25519 public key).
pub const NODE_ID_LEN: usize = 32;
/// Length of a NodeId's text form: base32 of 32 bytes without padding.
pub const NODE_ID_TEXT_LEN: usize = 52;

/// The public identity of a node: its ed25519 public key.
///
/// Equality, hashing and order ignore the sign bit (the top bit of the last
/// byte). An ed25519 point `A` and its negation `-A` differ only in that bit,
/// share one X25519 form (the Montgomery map keeps only `y`), and whoever holds
/// the secret of one holds the secret of the other (the scalar's negation). So
/// a handshake cannot tell them apart, and neither could a signature: they are
/// one node. Comparing them as one keeps every decision keyed by NodeId (policy
/// lists, per-node caps, hub registrations, directories) from counting one
/// secret twice. The bytes as given are kept: signatures verify against them.
#[derive(Clone, Copy)]
pub struct NodeId([u8; NODE_ID_LEN]);

/// The top bit of a compressed ed25519 point: the sign of `x`.
const SIGN_BIT: u8 = 0x80;

impl NodeId {
    /// The key without its sign bit: the same for `A` and `-A`.
    fn principal(&self) -> [u8; NODE_ID_LEN] {
        let mut b = self.0;
        b[NODE_ID_LEN - 1] &= !SIGN_BIT;
        b
    }
}

impl PartialEq for NodeId {
    fn eq(&self, other: &Self) -> bool {
        self.principal() == other.principal()
    }
}

impl Eq for NodeId {}

impl std::hash::Hash for NodeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.principal().hash(state);
    }
}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NodeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.principal().cmp(&other.principal())
    }
}

/// Why a NodeId could not be parsed or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeIdError {
    /// The text form has the wrong number of characters.
    #[error("node id must be {NODE_ID_TEXT_LEN} base32 characters, got {0}")]
    BadLength(usize),
    /// The text form has a character outside the base32 alphabet.
    #[error("node id is not base32 (letters a-z and digits 2-7)")]
    BadEncoding,
    /// The bytes are not a valid ed25519 public key.
    #[error("node id is not a valid ed25519 public key")]
    NotAPublicKey,
}

impl NodeId {
    /// Builds a NodeId from raw bytes, checking that they are an ed25519 point.
    pub fn from_bytes(bytes: [u8; NODE_ID_LEN]) -> Result<Self, NodeIdError> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| NodeIdError::NotAPublicKey)?;
        Ok(Self(bytes))
    }

    /// The raw public key bytes.
    pub fn as_bytes(&self) -> &[u8; NODE_ID_LEN] {
        &self.0
    }

    /// The X25519 public key derived from this ed25519 key, used as the Noise
    /// static key. Returns `None` for a key that has no valid Montgomery form.
    pub fn x25519_public(&self) -> Option<[u8; 32]> {
        let vk = VerifyingKey::from_bytes(&self.0).ok()?;
        Some(vk.to_montgomery().to_bytes())
    }

    /// Whether `sig` is this key's ed25519 signature over `msg` (strict
    /// verification: no malleable or small-order forms). False also for an
    /// id that is not a public key (relayed ids are not checked on decode).
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> bool {
        VerifyingKey::from_bytes(&self.0).is_ok_and(|vk| {
            vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig.0))
                .is_ok()
        })
    }

    /// A short prefix of the text form, for logs where the full id is noise.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(10);
        s
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32_NOPAD.encode(&self.0).to_ascii_lowercase())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != NODE_ID_TEXT_LEN {
            return Err(NodeIdError::BadLength(s.chars().count()));
        }
        let upper = s.to_ascii_uppercase();
        let bytes = BASE32_NOPAD
            .decode(upper.as_bytes())
            .map_err(|_| NodeIdError::BadEncoding)?;
        let arr: [u8; NODE_ID_LEN] = bytes.try_into().map_err(|_| NodeIdError::BadEncoding)?;
        Self::from_bytes(arr)
    }
}

/// An ed25519 signature (64 bytes; on the wire, the raw bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({:02x?}..)", &self.0[..4])
    }
}

// serde derives arrays only up to 32 elements: two halves on the wire.
impl serde::Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (a, b) = self.0.split_at(32);
        let a: &[u8; 32] = a.try_into().map_err(serde::ser::Error::custom)?;
        let b: &[u8; 32] = b.try_into().map_err(serde::ser::Error::custom)?;
        (a, b).serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (a, b) = <([u8; 32], [u8; 32])>::deserialize(d)?;
        let mut sig = [0; 64];
        sig[..32].copy_from_slice(&a);
        sig[32..].copy_from_slice(&b);
        Ok(Self(sig))
    }
}

/// A node's secret key: the ed25519 signing key and the X25519 key pair derived
/// from it, computed once here rather than on every handshake.
#[derive(Clone)]
pub struct SecretKey {
    signing: SigningKey,
    x25519: X25519Pair,
}

impl SecretKey {
    /// Builds a key from a 32-byte seed (the ed25519 secret key).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(&seed);
        let secret = signing.to_scalar_bytes();
        // The Montgomery form of the ed25519 public key equals the X25519 public
        // key of the derived secret (RFC 7748 section 4.1); computing it from the
        // verifying key avoids a second base-point multiplication.
        let public = signing.verifying_key().to_montgomery().to_bytes();
        Self {
            signing,
            x25519: (secret, public),
        }
    }

    /// The seed, for storing the key. Handle with care.
    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// The public NodeId of this key.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.signing.verifying_key().to_bytes())
    }

    /// An ed25519 signature over `msg`: hubs sign the state they gossip
    /// (route chain anchors, directory parts) so that no other hub can forge
    /// it. Callers put a distinct label at the start of each kind of message.
    pub fn sign(&self, msg: &[u8]) -> Signature {
        use ed25519_dalek::Signer;
        Signature(self.signing.sign(msg).to_bytes())
    }

    /// The X25519 (secret, public) pair used as the Noise static key (see the
    /// module doc).
    pub(crate) fn x25519_pair(&self) -> X25519Pair {
        self.x25519
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(for {:?})", self.node_id())
    }
}

// On the wire (hub control messages) a NodeId is its 32 raw bytes; decoding
// checks that they are a public key, like `from_bytes`.
impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = <[u8; NODE_ID_LEN]>::deserialize(d)?;
        NodeId::from_bytes(bytes).map_err(serde::de::Error::custom)
    }
}

/// Serde for NodeIds relayed in hub gossip (route adverts, directory
/// indexes): the raw bytes, decoded without the ed25519 point check.
///
/// Why: the check is a point decompression, 3.3 us each on this machine
/// type, and a hub decodes thousands of relayed ids per gossip message (a
/// route advert per hub, an index entry per node), so checking would make
/// gossip CPU-bound long before it is bandwidth-bound. The ids were checked
/// where they entered the network: the hub that admitted each node or hub
/// proved its key in a handshake. Here they are only keys into tables; an id
/// that is used to connect (a learned hub) goes through a handshake, which
/// fails cleanly on a key that is not a point.
pub mod relayed_id {
    use super::{NodeId, NODE_ID_LEN};

    /// Encodes like `NodeId`'s own `Serialize`.
    pub fn serialize<S: serde::Serializer>(id: &NodeId, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&id.0, s)
    }

    /// Decodes 32 bytes without the point check.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<NodeId, D::Error> {
        let bytes = <[u8; NODE_ID_LEN] as serde::Deserialize>::deserialize(d)?;
        Ok(NodeId(bytes))
    }

    /// The same for a list of ids.
    pub mod list {
        use super::super::{NodeId, NODE_ID_LEN};

        /// Encodes like `Vec<NodeId>`.
        pub fn serialize<S: serde::Serializer>(ids: &[NodeId], s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = s.serialize_seq(Some(ids.len()))?;
            for id in ids {
                seq.serialize_element(&id.0)?;
            }
            seq.end()
        }

        /// Decodes without the point check.
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<NodeId>, D::Error> {
            let raw = <Vec<[u8; NODE_ID_LEN]> as serde::Deserialize>::deserialize(d)?;
            Ok(raw.into_iter().map(NodeId).collect())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::noise_crypto::x25519_public;
    use proptest::prelude::*;

    #[test]
    fn text_form_round_trips_and_is_a_dns_label() {
        let id = SecretKey::from_seed([7; 32]).node_id();
        let text = id.to_string();
        assert_eq!(text.len(), NODE_ID_TEXT_LEN);
        assert!(text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_eq!(text.parse::<NodeId>(), Ok(id));
        assert_eq!(text.to_uppercase().parse::<NodeId>(), Ok(id));
    }

    #[test]
    fn bad_text_forms_say_what_is_wrong() {
        assert_eq!("abc".parse::<NodeId>(), Err(NodeIdError::BadLength(3)));
        let bad = "1".repeat(NODE_ID_TEXT_LEN);
        assert_eq!(bad.parse::<NodeId>(), Err(NodeIdError::BadEncoding));
    }

    #[test]
    fn derived_x25519_keys_agree() {
        // The responder's identity check can only succeed if the X25519 public key
        // derived from the NodeId matches the secret derived from the seed: run a
        // one-way Noise X handshake towards the derived public key to prove it.
        let sk = SecretKey::from_seed([42; 32]);
        let public = sk.node_id().x25519_public().expect("valid point");
        assert_eq!(x25519_public(&sk.x25519_pair().0), Some(public));
        assert_eq!(sk.x25519_pair().1, public);
        let params: snow::params::NoiseParams = "Noise_X_25519_ChaChaPoly_BLAKE2s"
            .parse()
            .expect("valid pattern");
        let mut init = snow::Builder::new(params.clone())
            .local_private_key(&[1; 32])
            .and_then(|b| b.remote_public_key(&public))
            .and_then(|b| b.build_initiator())
            .expect("initiator");
        let mut resp = snow::Builder::new(params)
            .local_private_key(&sk.x25519_pair().0)
            .and_then(|b| b.build_responder())
            .expect("responder");
        let (mut msg, mut out) = ([0u8; 128], [0u8; 128]);
        let n = init.write_message(b"hi", &mut msg).expect("write");
        assert_eq!(resp.read_message(&msg[..n], &mut out).expect("read"), 2);
    }

    /// The negation of a key: the same bytes with the sign bit flipped.
    pub(crate) fn negated(id: NodeId) -> NodeId {
        let mut b = *id.as_bytes();
        b[NODE_ID_LEN - 1] ^= SIGN_BIT;
        NodeId::from_bytes(b).expect("the negation of a point is a point")
    }

    #[test]
    fn a_key_and_its_negation_are_one_node() {
        use std::collections::{BTreeSet, HashSet};
        let a = SecretKey::from_seed([9; 32]).node_id();
        let minus_a = negated(a);
        assert_ne!(a.as_bytes(), minus_a.as_bytes(), "different bytes");
        assert_eq!(
            a.x25519_public(),
            minus_a.x25519_public(),
            "one X25519 key, so one handshake secret proves both"
        );
        assert_eq!(a, minus_a);
        assert_eq!(HashSet::from([a, minus_a]).len(), 1);
        assert_eq!(BTreeSet::from([a, minus_a]).len(), 1);
        let b = SecretKey::from_seed([10; 32]).node_id();
        assert_ne!(a, b);
        assert_eq!(a.cmp(&b), minus_a.cmp(&b), "order agrees with equality");
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".*") {
            let _ = s.parse::<NodeId>();
        }

        #[test]
        fn parsing_base32ish_text_never_panics(s in "[a-z2-7]{52}") {
            if let Ok(id) = s.parse::<NodeId>() {
                prop_assert_eq!(id.to_string(), s);
            }
        }
    }
}
