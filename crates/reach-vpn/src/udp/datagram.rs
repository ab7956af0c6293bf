//! The vpn's UDP datagrams, sealed per packet.
//!
//! ```text
//! kind u8 | receiver index u32 | counter u64 | ciphertext | tag (16)
//! ```
//! The 13-byte header is the AEAD's associated data; the nonce is the
//! counter (4 zero bytes, then the counter big-endian), which the sender
//! never repeats under one key. The receiver index names the session at
//! the receiver, so it finds the key without trying each. Keys are made
//! for each session and handed over the peers' encrypted, authenticated
//! reach stream ([`Keys`]), one per direction.
//!
//! Sealing works in place in a caller's buffer that leaves [`HEADER_LEN`]
//! bytes before the payload and [`TAG_LEN`] after it; opening decrypts in
//! place. No allocation per datagram.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use reach_proto::Cipher;

use super::replay::{Replay, ReplayWindow};

/// Length of the header.
pub const HEADER_LEN: usize = 13;
/// Length of the tag.
pub const TAG_LEN: usize = 16;
/// Datagrams one key seals at most; the session must be rekeyed before.
pub const MAX_COUNTER: u64 = 1 << 48;

/// What a datagram carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A packet (offload header and packet, as on the device).
    Data,
    /// A path probe.
    Probe,
    /// The answer to a probe.
    ProbeAck,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Data => 1,
            Kind::Probe => 2,
            Kind::ProbeAck => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Kind::Data),
            2 => Some(Kind::Probe),
            3 => Some(Kind::ProbeAck),
            _ => None,
        }
    }
}

/// One direction's key material, handed to the peer over the stream.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    /// The receiver's index for this session.
    pub index: u32,
    /// The key datagrams to the receiver are sealed with.
    pub key: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys {{ index: {}, key: .. }}", self.index)
    }
}

/// Why a datagram was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Shorter than a header and a tag.
    #[error("datagram of {0} bytes is shorter than a header and a tag")]
    Short(usize),
    /// An unknown kind.
    #[error("unknown datagram kind {0}")]
    Kind(u8),
    /// It did not authenticate: forged, corrupted, or another session's.
    #[error("datagram failed authentication")]
    Forged,
    /// A replay, a duplicate or too old.
    #[error("{0}")]
    Replay(#[from] Replay),
    /// Sealed under keys this session renewed twice since (or never had).
    #[error("datagram under retired keys (index {0})")]
    Retired(u32),
}

/// The receiver index of a datagram, to find its session; `None` if too
/// short to be one.
pub fn index_of(datagram: &[u8]) -> Option<u32> {
    let b = datagram.get(1..5)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn aead(cipher: Cipher, key: &[u8; 32]) -> LessSafeKey {
    let alg = match cipher {
        Cipher::AesGcm => &AES_256_GCM,
        _ => &CHACHA20_POLY1305,
    };
    // Both algorithms take 32-byte keys: this cannot fail.
    LessSafeKey::new(UnboundKey::new(alg, key).unwrap_or_else(|_| unreachable!("32-byte key")))
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals datagrams to the peer.
pub struct Sealer {
    key: LessSafeKey,
    index: u32,
    counter: u64,
    /// What it was made from, to tell the same keys offered again.
    made_from: (Cipher, [u8; 32]),
}

/// The session needs new keys before it can seal more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the session sealed {MAX_COUNTER} datagrams: it must be rekeyed")]
pub struct Exhausted;

impl Sealer {
    /// Seals to the peer that handed over `keys`.
    pub fn new(cipher: Cipher, keys: &Keys) -> Self {
        Self {
            key: aead(cipher, &keys.key),
            index: keys.index,
            counter: 0,
            made_from: (cipher, keys.key),
        }
    }

    /// Takes `keys` the peer handed over into `slot`: a new sealer for new
    /// keys, but the one there for the same keys offered again (the peer
    /// offers its keys on every new stream). A sealer made afresh would
    /// count from 0 again, and the peer's replay window, which has seen
    /// those counters, would refuse everything it sealed until it passed
    /// the highest one seen: a path that looks up and carries nothing one
    /// way (seen in the lab's vpn matrix under load, when a second
    /// stream's offer came seconds after the path was up).
    pub fn renew(slot: &mut Option<Sealer>, cipher: Cipher, keys: &Keys) {
        let same = slot
            .as_ref()
            .is_some_and(|s| s.index == keys.index && s.made_from == (cipher, keys.key));
        if !same {
            *slot = Some(Sealer::new(cipher, keys));
        }
    }

    /// Datagrams sealed so far.
    pub fn sealed(&self) -> u64 {
        self.counter
    }

    /// Seals the `len` payload bytes at `buf[HEADER_LEN..]` as a `kind`
    /// datagram: writes the header before them and the tag after; returns
    /// the datagram's length (`HEADER_LEN + len + TAG_LEN`). `buf` must
    /// hold that many bytes.
    pub fn seal(&mut self, kind: Kind, buf: &mut [u8], len: usize) -> Result<usize, Exhausted> {
        if self.counter >= MAX_COUNTER {
            return Err(Exhausted);
        }
        let counter = self.counter;
        self.counter += 1;
        let total = HEADER_LEN + len + TAG_LEN;
        let (header, rest) = buf[..total].split_at_mut(HEADER_LEN);
        header[0] = kind.code();
        header[1..5].copy_from_slice(&self.index.to_be_bytes());
        header[5..13].copy_from_slice(&counter.to_be_bytes());
        let (payload, tag_out) = rest.split_at_mut(len);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&*header), payload)
            .unwrap_or_else(|_| unreachable!("payloads fit the AEAD's limits"));
        tag_out.copy_from_slice(tag.as_ref());
        Ok(total)
    }
}

/// Opens datagrams from the peer.
pub struct Opener {
    key: LessSafeKey,
    window: ReplayWindow,
}

impl Opener {
    /// Opens what the peer seals with `keys` (this side made them).
    pub fn new(cipher: Cipher, keys: &Keys) -> Self {
        Self {
            key: aead(cipher, &keys.key),
            window: ReplayWindow::default(),
        }
    }

    /// Authenticates and decrypts `datagram` in place (its index already
    /// matched this session); returns its kind, counter and payload.
    pub fn open<'a>(&mut self, datagram: &'a mut [u8]) -> Result<(Kind, u64, &'a [u8]), OpenError> {
        let len = datagram.len();
        if len < HEADER_LEN + TAG_LEN {
            return Err(OpenError::Short(len));
        }
        let kind = Kind::from_code(datagram[0]).ok_or(OpenError::Kind(datagram[0]))?;
        let mut c = [0u8; 8];
        c.copy_from_slice(&datagram[5..13]);
        let counter = u64::from_be_bytes(c);
        // Cheap refusal of a replay before the decryption; the window
        // moves only after the datagram authenticated.
        self.window.check(counter)?;
        let (header, rest) = datagram.split_at_mut(HEADER_LEN);
        let plain = self
            .key
            .open_in_place(nonce(counter), Aad::from(&*header), rest)
            .map_err(|_| OpenError::Forged)?;
        self.window.take(counter)?;
        Ok((kind, counter, plain))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(in crate::udp) fn keys(index: u32, k: u8) -> Keys {
        Keys {
            index,
            key: [k; 32],
        }
    }

    pub(in crate::udp) fn sealed(s: &mut Sealer, kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN + payload.len() + TAG_LEN];
        buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        let n = s.seal(kind, &mut buf, payload.len()).unwrap();
        assert_eq!(n, buf.len());
        buf
    }

    #[test]
    fn the_same_keys_offered_again_keep_the_counter_and_new_keys_start_over() {
        let cipher = Cipher::ChaChaPoly;
        let k = keys(7, 1);
        let mut slot = None;
        Sealer::renew(&mut slot, cipher, &k);
        let mut o = Opener::new(cipher, &k);
        for _ in 0..3 {
            let mut d = sealed(slot.as_mut().unwrap(), Kind::Data, b"x");
            o.open(&mut d).unwrap();
        }
        // The peer's keys again (a second stream): the counter goes on,
        // and what is sealed next still opens.
        Sealer::renew(&mut slot, cipher, &k);
        assert_eq!(slot.as_ref().unwrap().sealed(), 3);
        let mut d = sealed(slot.as_mut().unwrap(), Kind::Data, b"y");
        assert_eq!(o.open(&mut d).unwrap().1, 3);
        // What a fresh sealer would have sent is refused as a replay.
        let mut fresh = Sealer::new(cipher, &k);
        let mut d = sealed(&mut fresh, Kind::Data, b"z");
        assert_eq!(o.open(&mut d), Err(OpenError::Replay(Replay::Seen(0))));
        // New keys (a rekey) or another cipher: a new sealer from 0.
        Sealer::renew(&mut slot, cipher, &keys(8, 2));
        assert_eq!(slot.as_ref().unwrap().sealed(), 0);
        Sealer::renew(&mut slot, cipher, &keys(8, 2));
        let _ = sealed(slot.as_mut().unwrap(), Kind::Data, b"w");
        Sealer::renew(&mut slot, Cipher::AesGcm, &keys(8, 2));
        assert_eq!(slot.as_ref().unwrap().sealed(), 0);
    }

    #[test]
    fn datagrams_open_once_in_any_order_and_only_with_their_key() {
        for cipher in [Cipher::AesGcm, Cipher::ChaChaPoly] {
            let k = keys(7, 1);
            let (mut s, mut o) = (Sealer::new(cipher, &k), Opener::new(cipher, &k));
            let a = sealed(&mut s, Kind::Data, b"first");
            let b = sealed(&mut s, Kind::Probe, b"second");
            assert_eq!(index_of(&a), Some(7));
            let mut b1 = b.clone();
            assert_eq!(o.open(&mut b1).unwrap(), (Kind::Probe, 1, &b"second"[..]));
            let mut a1 = a.clone();
            assert_eq!(o.open(&mut a1).unwrap(), (Kind::Data, 0, &b"first"[..]));
            let mut again = a.clone();
            assert_eq!(o.open(&mut again), Err(OpenError::Replay(Replay::Seen(0))));
            // Another key, a flipped bit, a changed header: forged.
            let mut other = Opener::new(cipher, &keys(7, 2));
            let mut c = sealed(&mut s, Kind::Data, b"third");
            assert_eq!(other.open(&mut c.clone()), Err(OpenError::Forged));
            let last = c.len() - 1;
            c[last] ^= 1;
            assert_eq!(o.open(&mut c.clone()), Err(OpenError::Forged));
            c[last] ^= 1;
            c[0] = Kind::ProbeAck.code();
            assert_eq!(o.open(&mut c.clone()), Err(OpenError::Forged));
        }
    }

    #[test]
    fn a_forged_datagram_does_not_move_the_window() {
        let k = keys(1, 3);
        let (mut s, mut o) = (
            Sealer::new(Cipher::AesGcm, &k),
            Opener::new(Cipher::AesGcm, &k),
        );
        // A forger sends counter 10_000 (ahead of the window) with junk.
        let mut forged = vec![1u8; HEADER_LEN + 4 + TAG_LEN];
        forged[5..13].copy_from_slice(&10_000u64.to_be_bytes());
        assert_eq!(o.open(&mut forged), Err(OpenError::Forged));
        // The genuine first datagram still opens.
        let mut d = sealed(&mut s, Kind::Data, b"x");
        assert!(o.open(&mut d).is_ok());
    }

    #[test]
    fn short_and_unknown_datagrams_are_named() {
        let mut o = Opener::new(Cipher::AesGcm, &keys(1, 1));
        assert_eq!(o.open(&mut [0u8; 28]), Err(OpenError::Short(28)));
        let mut d = vec![9u8; 40];
        assert_eq!(o.open(&mut d), Err(OpenError::Kind(9)));
        assert_eq!(index_of(&[1, 2]), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_open_and_never_panic(mut d in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut o = Opener::new(Cipher::ChaChaPoly, &keys(1, 1));
            prop_assert!(o.open(&mut d).is_err());
        }
    }
}
