//! The overlay map: each hub's links as it reports them, signed and
//! flooded, so that any hub can draw the whole federation (hubs, links,
//! which side dialled, round trips, attached nodes), as SmartSockets drew
//! its hub overlay (its Figure 2). Routing does not use it: routes come
//! from the distance-vector gossip ([`crate::routes`]), which gives each
//! hub only a next hop per destination, not the graph.
//!
//! A card replaces its origin's older one whole (newer `state` wins); its
//! origin signs it ([`card_signed_bytes`]) so no other hub can forge,
//! alter or freeze it.

use serde::{Deserialize, Serialize};

use crate::identity::NodeId;

/// Most links one hub's card lists; a hub with more lists the first ones
/// (by neighbour id) and counts the rest in `unlisted`. A card is then
/// about 10 KB, well inside a frame.
pub const MAX_CARD_LINKS: usize = 256;

/// One link of a hub, as that hub sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LinkCard {
    /// The neighbour hub (decoded without the point check: see
    /// [`crate::identity::relayed_id`]).
    #[serde(with = "crate::identity::relayed_id")]
    pub hub: NodeId,
    /// Whether the card's hub dialled this link (the other one accepted
    /// it): the direction a hub behind a NAT or firewall can link in.
    pub dialled: bool,
    /// The link's smoothed round trip in microseconds (0: not measured
    /// yet).
    pub rtt_us: u32,
}

const CARD_LABEL: &[u8] = b"reach hub links v1|";

/// What a hub signs for its card at `state`: its attached node count, the
/// links it lists and how many it left out.
pub fn card_signed_bytes(
    origin: &NodeId,
    state: u64,
    nodes: u32,
    unlisted: u32,
    links: &[LinkCard],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(CARD_LABEL.len() + 56 + 37 * links.len());
    m.extend_from_slice(CARD_LABEL);
    m.extend_from_slice(origin.as_bytes());
    m.extend_from_slice(&state.to_be_bytes());
    m.extend_from_slice(&nodes.to_be_bytes());
    m.extend_from_slice(&unlisted.to_be_bytes());
    m.extend_from_slice(&(links.len() as u32).to_be_bytes());
    for l in links {
        m.extend_from_slice(l.hub.as_bytes());
        m.push(u8::from(l.dialled));
        m.extend_from_slice(&l.rtt_us.to_be_bytes());
    }
    m
}

/// Whether a card's round trip moved far enough from the one last flooded
/// to flood again: by a quarter and by at least half a millisecond, or
/// from unmeasured to measured. Small jitter floods nothing; a path that
/// got much slower shows within a gossip interval.
pub fn rtt_moved(flooded_us: u32, now_us: u32) -> bool {
    if flooded_us == 0 || now_us == 0 {
        return flooded_us != now_us;
    }
    let diff = flooded_us.abs_diff(now_us);
    diff >= 500 && u64::from(diff) * 4 >= u64::from(flooded_us)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;

    fn card(seed: u8, dialled: bool, rtt_us: u32) -> LinkCard {
        LinkCard {
            hub: SecretKey::from_seed([seed; 32]).node_id(),
            dialled,
            rtt_us,
        }
    }

    #[test]
    fn every_field_of_a_card_is_signed() {
        let key = SecretKey::from_seed([1; 32]);
        let me = key.node_id();
        let links = [card(2, true, 800), card(3, false, 0)];
        let base = card_signed_bytes(&me, 7, 3, 0, &links);
        let sig = key.sign(&base);
        assert!(me.verify(&base, &sig));
        let mut other = links;
        other[0].dialled = false;
        for changed in [
            card_signed_bytes(&me, 8, 3, 0, &links),
            card_signed_bytes(&me, 7, 4, 0, &links),
            card_signed_bytes(&me, 7, 3, 1, &links),
            card_signed_bytes(&me, 7, 3, 0, &links[..1]),
            card_signed_bytes(&me, 7, 3, 0, &other),
            card_signed_bytes(&me, 7, 3, 0, &[links[0], card(3, false, 1)]),
        ] {
            assert!(!me.verify(&changed, &sig));
        }
    }

    #[test]
    fn jitter_floods_nothing_a_slower_path_floods() {
        assert!(!rtt_moved(800, 900), "100 us of jitter");
        assert!(!rtt_moved(10_000, 12_000), "a fifth");
        assert!(rtt_moved(10_000, 13_000), "three tenths");
        assert!(!rtt_moved(100, 300), "under half a millisecond");
        assert!(rtt_moved(800, 2_000));
        assert!(rtt_moved(0, 50), "first measurement");
        assert!(rtt_moved(50, 0));
        assert!(!rtt_moved(0, 0));
    }
}
