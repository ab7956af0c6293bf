//! Local ports recently used for splicing, so a new splice does not reuse
//! one.
//!
//! A NAT keeps a mapping for minutes after its connection ends. A splice that
//! happens to bind a local port used a little earlier to reach the same
//! address echo is shown that earlier mapping, while its new mappings (towards
//! the peer) are allocated afresh: for a sequential NAT the prediction is then
//! off by however many ports were allocated in between, and the splice fails.
//! The kernel hands out ephemeral ports at random, so among a few hundred
//! splices such a reuse is likely; remembering the ports for [`MEMORY`] avoids
//! it.
//!
//! Kept in memory and, with a state directory, as one empty file per port in
//! `STATE_DIR/splice-ports/` (its modification time is when it was used), so
//! the short-lived `reach connect` processes of one node share it without
//! read-modify-write races.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How long a port is avoided after use: RFC 5382's transitory TCP mapping
/// timeout.
pub(crate) const MEMORY: Duration = Duration::from_secs(4 * 60);

/// Ports used recently, per this node.
#[derive(Debug, Default)]
pub(crate) struct PortMemory {
    mem: Mutex<HashMap<u16, Instant>>,
    dir: Option<PathBuf>,
}

impl PortMemory {
    /// A memory shared through `dir` (created on first use), if given.
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        Self {
            mem: Mutex::default(),
            dir,
        }
    }

    /// Whether `port` was used within [`MEMORY`], by this process or another
    /// one of this node.
    pub(crate) fn recently_used(&self, port: u16) -> bool {
        let now = Instant::now();
        let mut mem = self.mem.lock().unwrap_or_else(|p| p.into_inner());
        mem.retain(|_, at| now.saturating_duration_since(*at) < MEMORY);
        if mem.contains_key(&port) {
            return true;
        }
        let Some(dir) = &self.dir else {
            return false;
        };
        std::fs::metadata(dir.join(port.to_string()))
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age < MEMORY)
            })
    }

    /// Records that `port` is being used now.
    pub(crate) fn remember(&self, port: u16) {
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port, Instant::now());
        let Some(dir) = &self.dir else {
            return;
        };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        // Creating (or truncating) the file sets its modification time.
        let _ = std::fs::File::create(dir.join(port.to_string()));
        // Ports are random: this prunes about every 16th use, keeping the
        // directory small without listing it every time.
        if port % 16 == 0 {
            self.prune();
        }
    }

    /// Removes files older than [`MEMORY`].
    fn prune(&self) {
        let Some(dir) = &self.dir else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age >= MEMORY);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_remembered_across_instances_sharing_a_directory() {
        let dir = std::env::temp_dir().join(format!("reach-ports-{}", std::process::id()));
        let a = PortMemory::new(Some(dir.clone()));
        assert!(!a.recently_used(40000));
        a.remember(40000);
        assert!(a.recently_used(40000));
        let b = PortMemory::new(Some(dir.clone()));
        assert!(
            b.recently_used(40000),
            "another process of the node sees it"
        );
        assert!(!b.recently_used(40001));
        let _ = std::fs::remove_dir_all(dir);
        let mem_only = PortMemory::new(None);
        mem_only.remember(5);
        assert!(mem_only.recently_used(5));
    }
}
