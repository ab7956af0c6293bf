//! Resumption tickets: two nodes that met before open a stream with one
//! Diffie-Hellman per side instead of Noise IK's four.
//!
//! # Why
//! A full handshake ([`crate::handshake`]) proves both static keys: four
//! X25519 operations on each side plus an ephemeral key, about 300 us of CPU
//! for the two sides together here, most of a direct setup between hosts
//! close to each other. A node that opens many streams to the same peer (an
//! application reconnecting, a proxy, a hub's circuits) proves the same
//! identities again and again.
//!
//! # How
//! In an accepted full handshake, the responder hands the initiator, inside
//! Noise msg2 (encrypted, authenticated, forward secret), a fresh random
//! *resumption key* and a *ticket*: that key, the initiator's NodeId and
//! whether it proved membership of the network, sealed with AES-256-GCM under
//! a key only the responder process holds ([`TicketKey`], random, never
//! stored). The responder keeps nothing per peer: an outsider can grow no
//! table by collecting tickets.
//!
//! To resume, the initiator sends the ticket in clear beside a Noise
//! `NNpsk0` message keyed by the resumption key: one ephemeral key and one
//! DH (`ee`) per side. The responder opens the ticket, learns whom it was
//! issued to, decides admission for that node as for a full handshake, and
//! answers. What holds:
//! - **Identities**: only the responder process can open the ticket and so
//!   learn the resumption key; only the node it was issued to received that
//!   key, inside a handshake that proved both static keys. Whoever completes
//!   the `NNpsk0` exchange is one of the two.
//! - **Forward secrecy** of each stream: its keys come from fresh ephemerals
//!   (`ee`); a later theft of the resumption key exposes no recorded stream.
//! - **Replay**: a replayed resumption hello gets a fresh responder ephemeral,
//!   and the responder hands the stream on only after the initiator's key
//!   confirmation, as for a full handshake.
//! - **Lifetime**: a ticket is honoured for [`TICKET_LIFETIME`] from its
//!   issue, and only by the process that issued it (its key dies with it).
//!   A refused ticket costs the initiator one round trip: it then runs the
//!   full handshake on the same connection.
//! - **Policy**: admission is decided afresh on every resumption, so a node
//!   removed from an allow list is refused at once.
//!
//! The sealed ticket is [`TICKET_LEN`] bytes:
//! `nonce [12] | AES-256-GCM(version u8 | NodeId [32] | flags u8 | issued u32 | key [32]) | tag [16]`,
//! `issued` in seconds since the ticket key was made.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::identity::{NodeId, NODE_ID_LEN};

/// How long a ticket is honoured after its issue.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(3600);
/// How long before its end an initiator stops offering a ticket: a ticket
/// sent at the very end of its life would be refused on arrival.
const OFFER_MARGIN: Duration = Duration::from_secs(60);
/// Length of a resumption key.
pub const RESUME_KEY_LEN: usize = 32;
/// Length of a sealed ticket.
pub const TICKET_LEN: usize = NONCE_LEN + PLAIN_LEN + TAG_LEN;
/// Tickets an initiator keeps (one per peer; the oldest goes first).
pub const MAX_TICKETS: usize = 4096;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const PLAIN_LEN: usize = 1 + NODE_ID_LEN + 1 + 4 + RESUME_KEY_LEN;
const TICKET_VERSION: u8 = 1;
const FLAG_MEMBER: u8 = 1;
/// Bound to every ticket, so a ticket key could never open anything else.
const AAD: &[u8] = b"reach resumption ticket";

/// Why a responder does not honour a ticket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TicketError {
    /// Not sealed by this process's ticket key (another process, a restart,
    /// or bytes that are no ticket at all).
    #[error("the resumption ticket was not issued here (or this node restarted since)")]
    NotIssuedHere,
    /// Issued here, but longer ago than [`TICKET_LIFETIME`].
    #[error("the resumption ticket has expired")]
    Expired,
    /// Issued here, but its contents do not decode (a ticket of another
    /// version).
    #[error("the resumption ticket is malformed")]
    Malformed,
}

/// What a ticket grants: resumption for one initiator.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    /// The initiator the ticket was issued to.
    pub peer: NodeId,
    /// It had proved membership of the responder's network.
    pub member: bool,
    /// The resumption key.
    pub key: [u8; RESUME_KEY_LEN],
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grant({:?}, member: {})", self.peer, self.member)
    }
}

/// A responder's ticket key: seals and opens the tickets it issues. Made at
/// random when the node starts, never stored.
pub struct TicketKey {
    key: LessSafeKey,
    made: Instant,
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketKey")
    }
}

impl TicketKey {
    /// A ticket key from 32 random bytes (a CSPRNG's), made at `now`.
    pub fn new(secret: [u8; 32], now: Instant) -> Self {
        let key = UnboundKey::new(&AES_256_GCM, &secret).expect("AES-256 keys are 32 bytes");
        Self {
            key: LessSafeKey::new(key),
            made: now,
        }
    }

    /// Seals `grant` into a ticket; `nonce` must be random (never reused
    /// under this key: 96 random bits per ticket).
    pub fn seal(&self, grant: &Grant, nonce: [u8; NONCE_LEN], now: Instant) -> [u8; TICKET_LEN] {
        let issued =
            u32::try_from(now.saturating_duration_since(self.made).as_secs()).unwrap_or(u32::MAX);
        let mut out = [0u8; TICKET_LEN];
        out[..NONCE_LEN].copy_from_slice(&nonce);
        let plain = &mut out[NONCE_LEN..NONCE_LEN + PLAIN_LEN];
        plain[0] = TICKET_VERSION;
        plain[1..1 + NODE_ID_LEN].copy_from_slice(grant.peer.as_bytes());
        plain[1 + NODE_ID_LEN] = if grant.member { FLAG_MEMBER } else { 0 };
        plain[2 + NODE_ID_LEN..6 + NODE_ID_LEN].copy_from_slice(&issued.to_be_bytes());
        plain[6 + NODE_ID_LEN..].copy_from_slice(&grant.key);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut out[NONCE_LEN..NONCE_LEN + PLAIN_LEN],
            )
            .expect("sealing a fixed-size ticket cannot fail");
        out[NONCE_LEN + PLAIN_LEN..].copy_from_slice(tag.as_ref());
        out
    }

    /// Opens a ticket this key sealed, if it is still within its lifetime
    /// at `now`.
    pub fn open(&self, ticket: &[u8; TICKET_LEN], now: Instant) -> Result<Grant, TicketError> {
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&ticket[..NONCE_LEN]);
        let mut sealed = [0u8; PLAIN_LEN + TAG_LEN];
        sealed.copy_from_slice(&ticket[NONCE_LEN..]);
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut sealed,
            )
            .map_err(|_| TicketError::NotIssuedHere)?;
        if plain[0] != TICKET_VERSION || plain[1 + NODE_ID_LEN] & !FLAG_MEMBER != 0 {
            return Err(TicketError::Malformed);
        }
        let mut id = [0u8; NODE_ID_LEN];
        id.copy_from_slice(&plain[1..1 + NODE_ID_LEN]);
        let peer = NodeId::from_bytes(id).map_err(|_| TicketError::Malformed)?;
        let mut issued = [0u8; 4];
        issued.copy_from_slice(&plain[2 + NODE_ID_LEN..6 + NODE_ID_LEN]);
        let issued = Duration::from_secs(u64::from(u32::from_be_bytes(issued)));
        let age = now
            .saturating_duration_since(self.made)
            .saturating_sub(issued);
        if age > TICKET_LIFETIME {
            return Err(TicketError::Expired);
        }
        let mut key = [0u8; RESUME_KEY_LEN];
        key.copy_from_slice(&plain[6 + NODE_ID_LEN..]);
        Ok(Grant {
            peer,
            member: plain[1 + NODE_ID_LEN] & FLAG_MEMBER != 0,
            key,
        })
    }
}

/// A ticket an initiator holds for one responder.
#[derive(Clone)]
pub struct Ticket {
    /// The responder that issued it.
    pub peer: NodeId,
    /// The responder proved membership of this node's network when it
    /// issued the ticket.
    pub peer_member: bool,
    pub(crate) sealed: [u8; TICKET_LEN],
    pub(crate) key: [u8; RESUME_KEY_LEN],
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket(from {:?})", self.peer)
    }
}

impl Ticket {
    pub(crate) fn new(
        peer: NodeId,
        peer_member: bool,
        sealed: [u8; TICKET_LEN],
        key: [u8; RESUME_KEY_LEN],
    ) -> Self {
        Self {
            peer,
            peer_member,
            sealed,
            key,
        }
    }
}

/// The version of a ticket's text form ([`Ticket::to_text`]).
const TEXT_VERSION: &str = "reach-ticket-v1";

impl Ticket {
    /// The ticket as one line of text, for a node's state directory (the
    /// file holds a secret: the caller keeps it private): version,
    /// membership, the sealed ticket and the resumption key in hex, and
    /// when it was received, `received_unix` (seconds since 1970).
    pub fn to_text(&self, received_unix: u64) -> String {
        use data_encoding::HEXLOWER;
        format!(
            "{TEXT_VERSION} {} {} {} {received_unix}\n",
            u8::from(self.peer_member),
            HEXLOWER.encode(&self.sealed),
            HEXLOWER.encode(&self.key),
        )
    }

    /// A ticket from `peer`, read back from [`Ticket::to_text`]'s line, with
    /// its age at `now_unix`; `None` if the text is not such a line or the
    /// ticket is no longer worth offering.
    pub fn from_text(peer: NodeId, text: &str, now_unix: u64) -> Option<(Ticket, Duration)> {
        use data_encoding::HEXLOWER;
        let mut words = text.split_whitespace();
        if words.next()? != TEXT_VERSION {
            return None;
        }
        let peer_member = match words.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        fn hex<const N: usize>(word: &str) -> Option<[u8; N]> {
            HEXLOWER.decode(word.as_bytes()).ok()?.try_into().ok()
        }
        let sealed = hex::<TICKET_LEN>(words.next()?)?;
        let key = hex::<RESUME_KEY_LEN>(words.next()?)?;
        let received: u64 = words.next()?.parse().ok()?;
        if words.next().is_some() {
            return None;
        }
        // A clock that went back makes the ticket look new: the responder
        // still refuses it once expired, and a full handshake follows.
        let age = Duration::from_secs(now_unix.saturating_sub(received));
        if !offerable(age) {
            return None;
        }
        Some((
            Ticket {
                peer,
                peer_member,
                sealed,
                key,
            },
            age,
        ))
    }
}

/// Whether a ticket received `age` ago is still worth offering.
fn offerable(age: Duration) -> bool {
    age < TICKET_LIFETIME - OFFER_MARGIN
}

/// Whether a ticket received at `received` is still worth offering at `now`.
fn fresh(received: Instant, now: Instant) -> bool {
    offerable(now.saturating_duration_since(received))
}

/// The tickets an initiator holds, one per responder, at most
/// [`MAX_TICKETS`].
#[derive(Debug, Default)]
pub struct Tickets {
    /// Each ticket with when it was received.
    by_peer: HashMap<NodeId, (Ticket, Instant)>,
}

impl Tickets {
    /// The ticket to offer `peer` at `now`, if one is fresh.
    pub fn get(&self, peer: &NodeId, now: Instant) -> Option<Ticket> {
        self.by_peer
            .get(peer)
            .filter(|(_, at)| fresh(*at, now))
            .map(|(t, _)| t.clone())
    }

    /// Keeps `ticket` (replacing the peer's previous one); when full, the
    /// stale ones go, then the oldest.
    pub fn insert(&mut self, ticket: Ticket, now: Instant) {
        if self.by_peer.len() >= MAX_TICKETS && !self.by_peer.contains_key(&ticket.peer) {
            self.by_peer.retain(|_, (_, at)| fresh(*at, now));
            if self.by_peer.len() >= MAX_TICKETS {
                let oldest = self
                    .by_peer
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(peer, _)| *peer);
                if let Some(peer) = oldest {
                    self.by_peer.remove(&peer);
                }
            }
        }
        self.by_peer.insert(ticket.peer, (ticket, now));
    }

    /// Forgets `peer`'s ticket (it was refused).
    pub fn remove(&mut self, peer: &NodeId) {
        self.by_peer.remove(peer);
    }

    /// Tickets held.
    pub fn len(&self) -> usize {
        self.by_peer.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_peer.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use proptest::prelude::*;

    fn node(n: u8) -> NodeId {
        SecretKey::from_seed([n; 32]).node_id()
    }

    fn grant() -> Grant {
        Grant {
            peer: node(1),
            member: true,
            key: [9; RESUME_KEY_LEN],
        }
    }

    #[test]
    fn a_ticket_opens_only_under_its_key_and_only_within_its_lifetime() {
        let t0 = Instant::now();
        let key = TicketKey::new([1; 32], t0);
        let ticket = key.seal(&grant(), [2; NONCE_LEN], t0 + Duration::from_secs(10));
        assert_eq!(key.open(&ticket, t0 + Duration::from_secs(20)), Ok(grant()));
        assert_eq!(
            key.open(&ticket, t0 + Duration::from_secs(10) + TICKET_LIFETIME),
            Ok(grant())
        );
        assert_eq!(
            key.open(&ticket, t0 + Duration::from_secs(12) + TICKET_LIFETIME),
            Err(TicketError::Expired)
        );
        // Another process (a restart) has another key.
        let other = TicketKey::new([3; 32], t0);
        assert_eq!(other.open(&ticket, t0), Err(TicketError::NotIssuedHere));
        // Any flipped bit is detected.
        for i in 0..TICKET_LEN {
            let mut bad = ticket;
            bad[i] ^= 0x10;
            assert_eq!(
                key.open(&bad, t0),
                Err(TicketError::NotIssuedHere),
                "byte {i}"
            );
        }
    }

    #[test]
    fn an_initiator_keeps_one_fresh_ticket_per_peer_and_a_bounded_number() {
        let t0 = Instant::now();
        let mut tickets = Tickets::default();
        let ticket = |peer: NodeId| Ticket::new(peer, false, [0; TICKET_LEN], [0; 32]);
        tickets.insert(ticket(node(1)), t0);
        assert!(tickets.get(&node(1), t0).is_some());
        assert!(tickets.get(&node(2), t0).is_none());
        // Not offered once close to its end.
        assert!(tickets
            .get(&node(1), t0 + TICKET_LIFETIME - OFFER_MARGIN)
            .is_none());
        tickets.remove(&node(1));
        assert!(tickets.is_empty());
        // At the bound, the oldest goes.
        let mut at = t0;
        for i in 0..MAX_TICKETS + 10 {
            at += Duration::from_millis(1);
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let peer = SecretKey::from_seed(id).node_id();
            tickets.insert(ticket(peer), at);
        }
        assert_eq!(tickets.len(), MAX_TICKETS);
    }

    #[test]
    fn a_ticket_survives_its_text_form_until_it_is_too_old_to_offer() {
        let t = Ticket::new(node(2), true, [7; TICKET_LEN], [8; RESUME_KEY_LEN]);
        let text = t.to_text(1000);
        let (back, age) = Ticket::from_text(node(2), &text, 1010).expect("parses");
        assert_eq!(age, Duration::from_secs(10));
        assert_eq!(
            (back.peer, back.peer_member, back.sealed, back.key),
            (t.peer, t.peer_member, t.sealed, t.key)
        );
        let late = 1000 + (TICKET_LIFETIME - OFFER_MARGIN).as_secs();
        assert!(Ticket::from_text(node(2), &text, late).is_none());
        assert!(Ticket::from_text(node(2), &text.replace("v1", "v2"), 1010).is_none());
        assert!(Ticket::from_text(node(2), &format!("{} extra", text.trim()), 1010).is_none());
    }

    proptest! {
        #[test]
        fn reading_arbitrary_ticket_text_never_panics(text in "\\PC{0,400}", now in any::<u64>()) {
            let _ = Ticket::from_text(node(2), &text, now);
        }

        #[test]
        fn opening_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), TICKET_LEN)) {
            let key = TicketKey::new([1; 32], Instant::now());
            let ticket: [u8; TICKET_LEN] = bytes.try_into().expect("length");
            prop_assert_eq!(key.open(&ticket, Instant::now()), Err(TicketError::NotIssuedHere));
        }
    }
}
