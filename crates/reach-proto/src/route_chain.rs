//! Hash chains that authenticate the routing gossip's state numbers and hop
//! counts, so that a linked hub can neither forge nor freeze another hub's
//! routes (the construction of SEAD: Hu, Johnson and Perrig, "SEAD: Secure
//! Efficient Distance Vector Routing for Mobile Wireless Ad Hoc Networks",
//! 2002).
//!
//! Why: hubs choose routes by (state, hops) ([`crate::routes`]): newer state
//! wins, then fewer hops. Unauthenticated, any linked hub could advertise
//! state `u64::MAX` for another hub and hold every route to it forever, or
//! claim to be next to it. Signing every state would cost an ed25519
//! verification per hub per gossip interval at every hub (at 1000 hubs,
//! 500 a second each); a hash chain costs a few hashes.
//!
//! How: each hub makes a one-way chain `e[0]` = a secret, `e[p + 1]` =
//! `H(p, e[p])`, of [`SEQS`] × [`METRICS`] steps, and signs its top once per
//! incarnation (an [`Anchor`]). State `base + i` at hop count `m` is proved
//! by the element at position `(SEQS - 1 - i) × METRICS + m`. Hashing walks
//! up the chain and nothing walks down, so:
//! - a newer state (a lower position) can only come from its origin;
//! - a hub that heard hop count `m` can prove `m + 1` (one hash) and never
//!   less than `m`.
//!
//! What remains: a hub may pass on the element it heard instead of hashing
//! it, claiming its neighbour's hop count: a path through it can look one
//! hop shorter than it is, never more, and its states stay the origin's.
//! (SEAD notes the same; closing it needs per-link authentication of each
//! advert's sender, which a hub link already has, but not of its claim.)
//!
//! A verifier keeps, per origin, the lowest position it has verified; a
//! newer claim is hashed up to it, an equal-state claim with more hops up
//! to the next state's boundary, and an older state is stale without any
//! work. One state step costs [`METRICS`] hashes; a forgery at most the
//! whole chain (about 9000 hashes), after which the hub cuts the link that
//! sent it.

use aws_lc_rs::digest;

use crate::identity::{NodeId, SecretKey, Signature};
use crate::routes::MAX_HOPS;

/// State numbers one chain covers; then the hub signs a new one. At one
/// state step per 2 s gossip interval, a chain lasts about 17 minutes, and
/// making one costs under 10k hashes.
pub const SEQS: u32 = 512;
/// Hop counts per state: 0 to [`MAX_HOPS`].
pub const METRICS: u32 = MAX_HOPS as u32 + 1;
/// Elements in a chain above its secret.
const LEN: u32 = SEQS * METRICS;

/// A chain element: 128 bits, enough against inverting a hash whose every
/// step is salted with the origin, incarnation and position.
pub type Proof = [u8; 16];

const STEP_LABEL: &[u8] = b"reach route chain v1";
const SEED_LABEL: &[u8] = b"reach route chain seed v1";
const ANCHOR_LABEL: &[u8] = b"reach route anchor v1";

/// A hub's signed chain top for one incarnation: states `base` to
/// `base + SEQS - 1` are proved against `top`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Anchor {
    /// The hub whose chain this is, and whose key signed it.
    #[serde(with = "crate::identity::relayed_id")]
    pub origin: NodeId,
    /// The first state number the chain covers.
    pub base: u64,
    /// The chain's top element.
    pub top: Proof,
    /// The origin's signature over the three.
    pub sig: Signature,
}

impl Anchor {
    fn message(origin: &NodeId, base: u64, top: &Proof) -> Vec<u8> {
        let mut m = Vec::with_capacity(ANCHOR_LABEL.len() + 32 + 8 + 16);
        m.extend_from_slice(ANCHOR_LABEL);
        m.extend_from_slice(origin.as_bytes());
        m.extend_from_slice(&base.to_be_bytes());
        m.extend_from_slice(top);
        m
    }

    /// Whether the origin signed it.
    pub fn is_signed(&self) -> bool {
        self.origin.verify(
            &Self::message(&self.origin, self.base, &self.top),
            &self.sig,
        )
    }
}

/// One step up the chain of `origin`'s incarnation `base`, from position
/// `pos`.
fn step(origin: &NodeId, base: u64, pos: u32, e: &Proof) -> Proof {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(STEP_LABEL);
    ctx.update(origin.as_bytes());
    ctx.update(&base.to_be_bytes());
    ctx.update(&pos.to_be_bytes());
    ctx.update(e);
    let mut out = [0; 16];
    out.copy_from_slice(&ctx.finish().as_ref()[..16]);
    out
}

/// Where state `base + i` at `hops` sits on the chain.
fn position(i: u32, hops: u8) -> u32 {
    (SEQS - 1 - i) * METRICS + u32::from(hops)
}

/// The origin's side: a chain and its signed anchor.
pub struct Chain {
    anchor: Anchor,
    /// The elements at hop count 0, by state offset: what the origin
    /// advertises (the rest it never needs).
    heads: Vec<Proof>,
}

impl Chain {
    /// A new chain for `key`'s hub covering states from `base`. Its secret
    /// is derived from the key and `base`, so no randomness is needed and
    /// each incarnation's chain differs.
    pub fn new(key: &SecretKey, base: u64) -> Self {
        use aws_lc_rs::hmac;
        let origin = key.node_id();
        let mac = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &key.seed()),
            &[SEED_LABEL, &base.to_be_bytes()].concat(),
        );
        let mut e = [0; 16];
        e.copy_from_slice(&mac.as_ref()[..16]);
        let mut heads = vec![[0; 16]; SEQS as usize];
        for pos in 0..LEN {
            if pos % METRICS == 0 {
                heads[(SEQS - 1 - pos / METRICS) as usize] = e;
            }
            e = step(&origin, base, pos, &e);
        }
        let sig = key.sign(&Anchor::message(&origin, base, &e));
        Self {
            anchor: Anchor {
                origin,
                base,
                top: e,
                sig,
            },
            heads,
        }
    }

    /// The signed anchor, for every hub that will check this hub's states.
    pub fn anchor(&self) -> &Anchor {
        &self.anchor
    }

    /// The proof of `state` at hop count 0; `None` outside this chain.
    pub fn proof(&self, state: u64) -> Option<Proof> {
        let i = state.checked_sub(self.anchor.base)?;
        self.heads.get(usize::try_from(i).ok()?).copied()
    }
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("origin", &self.anchor.origin)
            .field("base", &self.anchor.base)
            .finish_non_exhaustive()
    }
}

/// What a claimed (state, hops, proof) turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Proved by the origin's chain.
    Valid,
    /// Older than what was verified before (or than this chain): nothing to
    /// check, nothing to learn.
    Stale,
    /// Beyond this chain: a newer incarnation whose anchor has not arrived.
    Unknown,
    /// Does not hash to the chain: a forgery (or a broken hub).
    Forged,
}

/// The receiving side: checks one origin's claims against its anchor.
#[derive(Debug, Clone)]
pub struct Verifier {
    anchor: Anchor,
    /// The lowest position verified, and its element.
    low: (u32, Proof),
    /// The first state boundary above `low`, and its element: claims of
    /// `low`'s state with more hops are hashed up to it.
    ceiling: (u32, Proof),
}

impl Verifier {
    /// A verifier for `anchor`, or `None` if its origin did not sign it.
    pub fn new(anchor: Anchor) -> Option<Self> {
        if !anchor.is_signed() {
            return None;
        }
        let top = (LEN, anchor.top);
        Some(Self {
            anchor,
            low: top,
            ceiling: top,
        })
    }

    /// The anchor it checks against.
    pub fn anchor(&self) -> &Anchor {
        &self.anchor
    }

    /// Checks that `proof` proves `state` at `hops`, and remembers it.
    pub fn check(&mut self, state: u64, hops: u8, proof: &Proof) -> Check {
        let Some(i) = state.checked_sub(self.anchor.base) else {
            return Check::Stale;
        };
        let Some(i) = u32::try_from(i).ok().filter(|i| *i < SEQS) else {
            return Check::Unknown;
        };
        if u32::from(hops) >= METRICS {
            return Check::Forged;
        }
        let pos = position(i, hops);
        let target = if pos <= self.low.0 {
            self.low
        } else if pos < self.ceiling.0 {
            self.ceiling
        } else {
            return Check::Stale;
        };
        let boundary = (pos / METRICS + 1) * METRICS;
        let mut at_boundary = None;
        let mut e = *proof;
        for p in pos..target.0 {
            e = step(&self.anchor.origin, self.anchor.base, p, &e);
            if p + 1 == boundary {
                at_boundary = Some(e);
            }
        }
        if e != target.1 {
            return Check::Forged;
        }
        if pos < self.low.0 {
            self.low = (pos, *proof);
            if let Some(c) = at_boundary {
                self.ceiling = (boundary, c);
            }
        }
        Check::Valid
    }

    /// The proof of one more hop than `hops`, from a verified `proof` of
    /// `state` at `hops`: what a hub advertises for a route it learned.
    pub fn next_hop(&self, state: u64, hops: u8, proof: &Proof) -> Proof {
        let i = state
            .saturating_sub(self.anchor.base)
            .min(u64::from(SEQS - 1)) as u32;
        step(
            &self.anchor.origin,
            self.anchor.base,
            position(i, hops.min(MAX_HOPS)),
            proof,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    /// The proof of `state` at `hops` as hubs along a path compute it.
    fn along(chain: &Chain, v: &Verifier, state: u64, hops: u8) -> Proof {
        let mut p = chain.proof(state).expect("in the chain");
        for h in 0..hops {
            p = v.next_hop(state, h, &p);
        }
        p
    }

    #[test]
    fn states_and_hop_counts_proved_along_a_path_check() {
        let chain = Chain::new(&key(1), 1000);
        let mut v = Verifier::new(chain.anchor().clone()).expect("signed");
        for state in [1000, 1001, 1005, 1005, 1200, 1511] {
            for hops in [3, 0, 7, 16] {
                let p = along(&chain, &v, state, hops);
                assert_eq!(v.check(state, hops, &p), Check::Valid, "{state} {hops}");
            }
        }
        // Older states need no work and teach nothing.
        let p = along(&chain, &v, 1200, 0);
        assert_eq!(v.check(1200, 0, &p), Check::Stale);
        // Beyond the chain: a later incarnation's states.
        assert_eq!(v.check(1512, 0, &[0; 16]), Check::Unknown);
        assert_eq!(v.check(999, 0, &[0; 16]), Check::Stale);
    }

    #[test]
    fn a_hub_cannot_raise_the_state_or_lower_the_hop_count_it_heard() {
        let chain = Chain::new(&key(1), 1);
        let mut v = Verifier::new(chain.anchor().clone()).expect("signed");
        let heard = along(&chain, &v, 10, 3);
        // The same element claimed for a newer state, or for fewer hops.
        assert_eq!(v.check(11, 3, &heard), Check::Forged);
        assert_eq!(v.check(10, 2, &heard), Check::Forged);
        assert_eq!(v.check(u64::MAX, 0, &heard), Check::Unknown);
        // One hop more is what it can prove.
        let next = v.next_hop(10, 3, &heard);
        assert_eq!(v.check(10, 4, &next), Check::Valid);
        assert_eq!(v.check(10, 3, &heard), Check::Valid);
    }

    #[test]
    fn anchors_signed_by_someone_else_or_altered_are_refused() {
        let chain = Chain::new(&key(1), 1);
        let mut a = chain.anchor().clone();
        a.base += 1;
        assert!(Verifier::new(a).is_none(), "altered base");
        let mut a = chain.anchor().clone();
        a.origin = key(2).node_id();
        assert!(Verifier::new(a).is_none(), "claimed by another hub");
        let other = Chain::new(&key(2), 1);
        let mut a = other.anchor().clone();
        a.origin = key(1).node_id();
        assert!(Verifier::new(a).is_none(), "signed by another key");
        // Different incarnations have different chains.
        assert_ne!(Chain::new(&key(1), 2).anchor().top, chain.anchor().top);
    }

    /// One chain for every case: making it is most of a case's cost.
    fn shared_chain() -> &'static Chain {
        static CHAIN: std::sync::OnceLock<Chain> = std::sync::OnceLock::new();
        CHAIN.get_or_init(|| Chain::new(&key(3), 50))
    }

    proptest! {
        #[test]
        fn random_proofs_never_check(state in 0u64..600, hops in 0u8..20, proof: [u8; 16]) {
            let mut v = Verifier::new(shared_chain().anchor().clone()).expect("signed");
            prop_assert_ne!(v.check(state, hops, &proof), Check::Valid);
        }
    }
}
