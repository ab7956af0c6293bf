//! The cryptographic providers behind the Noise handshake.
//!
//! snow resolves each primitive through a `CryptoResolver`. Ours supplies two:
//! - randomness from a seed the caller passes in (the core never reads an OS
//!   RNG; tests pass fixed seeds and get reproducible transcripts), and
//! - X25519 from aws-lc, over twice as fast as the default ladder here, with the
//!   node's static public key computed once per identity rather than once per
//!   handshake. It also rejects low-order peer keys (an all-zero shared secret),
//!   which the default provider does not.
//!
//! Hashing and the handshake's AEAD come from snow's default resolver.

use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{BoxedCryptoResolver, CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// An X25519 key pair: (secret, public).
pub(crate) type X25519Pair = ([u8; 32], [u8; 32]);

/// The X25519 public key of a secret (base-point multiplication), for tests.
#[cfg(test)]
pub(crate) fn x25519_public(secret: &[u8; 32]) -> Option<[u8; 32]> {
    let key = PrivateKey::from_private_key(&X25519, secret).ok()?;
    key.compute_public_key().ok()?.as_ref().try_into().ok()
}

/// A resolver with seeded randomness and aws-lc X25519; `static_pair` lets the
/// static key skip its base-point multiplication.
pub(crate) fn resolver(seed: [u8; 32], static_pair: Option<X25519Pair>) -> BoxedCryptoResolver {
    Box::new(FallbackResolver::new(
        Box::new(Resolver { seed, static_pair }),
        Box::new(DefaultResolver),
    ))
}

struct Resolver {
    seed: [u8; 32],
    static_pair: Option<X25519Pair>,
}

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededRandom {
            seed: self.seed,
            counter: 0,
        }))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        matches!(choice, DHChoice::Curve25519)
            .then(|| Box::new(AwsX25519::new(self.static_pair)) as Box<dyn Dh>)
    }

    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }

    fn resolve_cipher(&self, _: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

/// SHA-256 in counter mode over a 32-byte seed drawn by the driver from a CSPRNG.
struct SeededRandom {
    seed: [u8; 32],
    counter: u64,
}

impl Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        for chunk in dest.chunks_mut(32) {
            let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            ctx.update(&self.seed);
            ctx.update(&self.counter.to_be_bytes());
            self.counter += 1;
            chunk.copy_from_slice(&ctx.finish().as_ref()[..chunk.len()]);
        }
        Ok(())
    }
}

struct AwsX25519 {
    known: Option<X25519Pair>,
    secret: [u8; 32],
    public: [u8; 32],
    /// The imported key, kept because aws-lc derives the public key on every
    /// import: importing per DH would add a base-point multiplication to each.
    key: Option<PrivateKey>,
}

impl AwsX25519 {
    fn new(known: Option<X25519Pair>) -> Self {
        Self {
            known,
            secret: [0; 32],
            public: [0; 32],
            key: None,
        }
    }

    fn import(&mut self) {
        self.key = PrivateKey::from_private_key(&X25519, &self.secret).ok();
        self.public = match (self.known, &self.key) {
            (Some((s, p)), _) if s == self.secret => p,
            (_, Some(k)) => k
                .compute_public_key()
                .ok()
                .and_then(|p| p.as_ref().try_into().ok())
                .unwrap_or([0; 32]),
            // Cannot happen for a 32-byte secret; an all-zero public key and a
            // missing key then fail every DH rather than panic.
            (_, None) => [0; 32],
        };
    }
}

impl Dh for AwsX25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        if let Ok(s) = privkey.try_into() {
            self.secret = s;
            self.import();
        }
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        rng.try_fill_bytes(&mut self.secret)?;
        self.import();
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.secret
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let key = self.key.as_ref().ok_or(snow::Error::Dh)?;
        // snow may pass its whole key buffer; the key is its first 32 bytes.
        let peer = UnparsedPublicKey::new(&X25519, pubkey.get(..32).ok_or(snow::Error::Dh)?);
        agreement::agree(key, peer, snow::Error::Dh, |shared| {
            out.get_mut(..shared.len())
                .ok_or(snow::Error::Dh)?
                .copy_from_slice(shared);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> [u8; 32] {
        let v: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        v.try_into().expect("32 bytes")
    }

    fn dh_with(secret: &[u8; 32], peer: &[u8; 32]) -> Result<[u8; 32], snow::Error> {
        let mut dh = AwsX25519::new(None);
        dh.set(secret);
        let mut out = [0u8; 32];
        dh.dh(peer, &mut out).map(|()| out)
    }

    #[test]
    fn x25519_matches_the_rfc_7748_test_vectors() {
        // RFC 7748 section 6.1.
        let alice = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let alice_pub = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let bob = hex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
        let bob_pub = hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        let shared = hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(x25519_public(&alice), Some(alice_pub));
        assert_eq!(x25519_public(&bob), Some(bob_pub));
        assert_eq!(dh_with(&alice, &bob_pub).expect("dh"), shared);
        assert_eq!(dh_with(&bob, &alice_pub).expect("dh"), shared);
    }

    #[test]
    fn low_order_peer_keys_are_rejected() {
        // The all-zero point has order 1: the shared secret would be zero.
        assert!(dh_with(&[7; 32], &[0; 32]).is_err());
    }

    #[test]
    fn a_known_static_pair_is_used_without_recomputing() {
        let secret = [5u8; 32];
        let public = x25519_public(&secret).expect("public");
        let mut dh = AwsX25519::new(Some((secret, public)));
        dh.set(&secret);
        assert_eq!(dh.pubkey(), public);
    }
}
