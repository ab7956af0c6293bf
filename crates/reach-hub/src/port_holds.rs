//! Proxy ports held for the node that published on them, for a while after
//! it leaves, and across a restart of the hub.
//!
//! ```text
//! published  --> held for its node while the exposure lasts
//! node leaves --> held until now + hold (the node may come back for it)
//! hub restarts --> holds read back from STATE_DIR/proxy-ports; exposures
//!                  that were live are held for `hold` from the restart
//! ```
//! Without this, a port freed when its node's session ended (a hub restart
//! ends them all) went to the next node that asked, so another node could
//! take a victim's public port and receive its clients. Times are wall
//! clock seconds (they must survive the restart); the file is rewritten
//! atomically at every change.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reach::NodeId;

/// Default time a proxy port stays held for its node after it leaves.
pub const DEFAULT_PORT_HOLD: Duration = Duration::from_secs(600);

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hold {
    node: NodeId,
    /// `None` while the node's exposure is live; else when the hold ends
    /// (Unix seconds).
    until: Option<u64>,
}

/// The hub's port holds.
#[derive(Debug)]
pub(crate) struct PortHolds {
    path: Option<PathBuf>,
    hold: Duration,
    held: HashMap<u16, Hold>,
}

impl PortHolds {
    /// Holds kept in `path` (none kept without one), each for `hold` after
    /// its node leaves. Reads what an earlier run left: live exposures of
    /// that run are held for `hold` from now.
    pub(crate) fn load(path: Option<PathBuf>, hold: Duration) -> Self {
        let mut held = HashMap::new();
        let now = unix_now();
        if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            for line in text.lines() {
                let mut parts = line.split_whitespace();
                let (Some(port), Some(node), Some(until)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let (Ok(port), Ok(node)) = (port.parse::<u16>(), node.parse::<NodeId>()) else {
                    tracing::warn!("ignoring a bad line in the proxy port holds: {line:?}");
                    continue;
                };
                let until = match until {
                    "live" => now + hold.as_secs(),
                    t => match t.parse::<u64>() {
                        Ok(t) => t,
                        Err(_) => continue,
                    },
                };
                if until > now {
                    held.insert(
                        port,
                        Hold {
                            node,
                            until: Some(until),
                        },
                    );
                }
            }
            if !held.is_empty() {
                tracing::info!(
                    ports = held.len(),
                    "proxy ports held for their nodes from the last run"
                );
            }
        }
        let holds = Self { path, hold, held };
        holds.save();
        holds
    }

    /// Whether `node` may take `port`: it is free, or held for `node`, or
    /// its hold has ended.
    pub(crate) fn may_take(&self, port: u16, node: &NodeId) -> bool {
        match self.held.get(&port) {
            None => true,
            Some(h) if h.node == *node => true,
            Some(h) => h.until.is_some_and(|t| t <= unix_now()),
        }
    }

    /// The port held for `node` (its old one), if any.
    pub(crate) fn held_for(&self, node: &NodeId) -> Vec<u16> {
        let now = unix_now();
        let mut ports: Vec<u16> = self
            .held
            .iter()
            .filter(|(_, h)| h.node == *node && h.until.is_none_or(|t| t > now))
            .map(|(p, _)| *p)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// `node` publishes on `port` now.
    pub(crate) fn take(&mut self, port: u16, node: NodeId) {
        self.held.insert(port, Hold { node, until: None });
        self.save();
    }

    /// The exposure on `port` ended: held for its node a while longer.
    pub(crate) fn release(&mut self, port: u16) {
        let until = unix_now() + self.hold.as_secs();
        if let Some(h) = self.held.get_mut(&port) {
            h.until = Some(until);
        }
        let now = unix_now();
        self.held.retain(|_, h| h.until.is_none_or(|t| t > now));
        self.save();
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let mut text = String::from("# proxy port, node, held until (Unix seconds, or live)\n");
        let mut ports: Vec<_> = self.held.iter().collect();
        ports.sort_by_key(|(p, _)| **p);
        for (port, h) in ports {
            let until = h.until.map_or("live".to_string(), |t| t.to_string());
            text.push_str(&format!("{port} {} {until}\n", h.node));
        }
        if let Err(e) = reach::files::write_atomically(path, text.as_bytes(), 0o600) {
            tracing::warn!(
                "cannot save the proxy port holds in {}: {e}",
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        reach::SecretKey::from_seed([n; 32]).node_id()
    }

    #[test]
    fn a_port_stays_its_nodes_after_it_leaves_and_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("proxy-ports");
        let (a, b) = (id(1), id(2));
        let mut holds = PortHolds::load(Some(path.clone()), Duration::from_secs(600));
        holds.take(40000, a);
        assert!(!holds.may_take(40000, &b));
        holds.release(40000);
        assert!(!holds.may_take(40000, &b), "held after a leaves");
        assert!(holds.may_take(40000, &a));
        holds.take(40001, b);
        // The hub restarts: both holds come back.
        let again = PortHolds::load(Some(path), Duration::from_secs(600));
        assert!(!again.may_take(40000, &b));
        assert!(
            !again.may_take(40001, &a),
            "a live exposure is held after a restart"
        );
        assert_eq!(again.held_for(&a), vec![40000]);
        // A zero hold lets the port go at once.
        let mut brief = PortHolds::load(None, Duration::ZERO);
        brief.take(40002, a);
        brief.release(40002);
        assert!(brief.may_take(40002, &b));
    }
}
