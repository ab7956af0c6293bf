//! A session's receive keys, renewed while it runs.
//!
//! The receiver makes the keys its peer seals with and hands them over the
//! stream. Every [`REKEY_EVERY`] (by default) it makes new ones: datagrams sealed
//! before the peer heard of them still open with the previous keys, kept
//! until the next renewal; anything older is refused. So no key seals
//! more than [`REKEY_EVERY`] of traffic (far below the counter's limit at
//! any rate), and a key that leaks opens at most two periods of it.

use std::time::{Duration, Instant};

use reach_proto::Cipher;

use super::datagram::{index_of, Keys, Kind, OpenError, Opener};

/// How often a session's receive keys are renewed (WireGuard's
/// REKEY_AFTER_TIME).
pub const REKEY_EVERY: Duration = Duration::from_secs(120);

/// The current receive keys and, after a renewal, the previous ones.
pub struct Keyring {
    cipher: Cipher,
    current: (Keys, Opener),
    previous: Option<(u32, Opener)>,
    made: Instant,
    every: Duration,
}

impl Keyring {
    /// A session's first keys, made at `now`, to be renewed `every` so
    /// often.
    pub fn new(cipher: Cipher, keys: Keys, now: Instant, every: Duration) -> Self {
        Self {
            cipher,
            current: (keys, Opener::new(cipher, &keys)),
            previous: None,
            made: now,
            every,
        }
    }

    /// The keys to hand the peer.
    pub fn current(&self) -> Keys {
        self.current.0
    }

    /// The receive indices in use (current first).
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.current.0.index).chain(self.previous.as_ref().map(|p| p.0))
    }

    /// Whether the current keys are due for renewal.
    pub fn due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.made) >= self.every
    }

    /// Makes `next` current; the current keys open one period more. Returns
    /// the index retired for good (the previous keys'), to forget.
    pub fn rekey(&mut self, next: Keys, now: Instant) -> Option<u32> {
        let old = std::mem::replace(&mut self.current, (next, Opener::new(self.cipher, &next)));
        self.made = now;
        self.previous
            .replace((old.0.index, old.1))
            .map(|(index, _)| index)
    }

    /// Opens `datagram` with the keys its index names.
    pub fn open<'a>(&mut self, datagram: &'a mut [u8]) -> Result<(Kind, u64, &'a [u8]), OpenError> {
        let index = index_of(datagram).ok_or(OpenError::Short(datagram.len()))?;
        if index == self.current.0.index {
            return self.current.1.open(datagram);
        }
        match &mut self.previous {
            Some((i, opener)) if *i == index => opener.open(datagram),
            _ => Err(OpenError::Retired(index)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::datagram::tests::{keys, sealed as sealed_as};
    use super::super::datagram::Sealer;
    use super::*;

    fn sealed(sealer: &mut Sealer, payload: &[u8]) -> Vec<u8> {
        sealed_as(sealer, Kind::Data, payload)
    }

    #[test]
    fn the_previous_keys_open_until_the_next_renewal_and_older_ones_never() {
        let t0 = Instant::now();
        let cipher = Cipher::ChaChaPoly;
        let mut ring = Keyring::new(cipher, keys(1, 1), t0, REKEY_EVERY);
        let mut first = Sealer::new(cipher, &ring.current());
        let early = sealed(&mut first, b"sealed before the renewal");
        let late = sealed(&mut first, b"still on its way");
        assert!(!ring.due(t0 + REKEY_EVERY - Duration::from_millis(1)));
        assert!(ring.due(t0 + REKEY_EVERY));

        assert_eq!(ring.rekey(keys(2, 2), t0 + REKEY_EVERY), None);
        assert_eq!(ring.indices().collect::<Vec<_>>(), vec![2, 1]);
        let mut second = Sealer::new(cipher, &ring.current());
        let new = sealed(&mut second, b"under the new keys");
        let mut d = new.clone();
        assert_eq!(
            ring.open(&mut d).expect("new keys").2,
            b"under the new keys"
        );
        let mut d = late.clone();
        assert_eq!(
            ring.open(&mut d).expect("previous keys").2,
            b"still on its way"
        );
        // The replay window goes with the keys.
        let mut d = late.clone();
        assert!(matches!(ring.open(&mut d), Err(OpenError::Replay(_))));

        // The next renewal retires the first keys for good.
        assert_eq!(ring.rekey(keys(3, 3), t0 + 2 * REKEY_EVERY), Some(1));
        assert_eq!(ring.indices().collect::<Vec<_>>(), vec![3, 2]);
        let mut d = early.clone();
        assert_eq!(ring.open(&mut d), Err(OpenError::Retired(1)));
        let mut d = new.clone();
        assert!(
            matches!(ring.open(&mut d), Err(OpenError::Replay(_))),
            "the second keys still open, and remember what they opened"
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_open_and_never_panic(
            mut d in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            index in 0u32..4,
        ) {
            // Small indices so that some bytes name a live session.
            let t0 = Instant::now();
            let mut ring = Keyring::new(Cipher::AesGcm, keys(1, 1), t0, REKEY_EVERY);
            ring.rekey(keys(2, 2), t0);
            if d.len() >= 5 {
                d[1..5].copy_from_slice(&index.to_be_bytes());
            }
            proptest::prop_assert!(ring.open(&mut d).is_err());
        }
    }

    #[test]
    fn a_datagram_under_the_right_index_and_the_wrong_key_is_forged() {
        let t0 = Instant::now();
        let cipher = Cipher::AesGcm;
        let mut ring = Keyring::new(cipher, keys(7, 1), t0, REKEY_EVERY);
        let mut wrong = Sealer::new(cipher, &keys(7, 9));
        let mut d = sealed(&mut wrong, b"x");
        assert_eq!(ring.open(&mut d), Err(OpenError::Forged));
        let mut short = [0u8; 3];
        assert_eq!(ring.open(&mut short), Err(OpenError::Short(3)));
    }
}
