//! The setup driver's memory: which module last worked for each target.
//!
//! Kept in memory and, when the endpoint has a state directory, on disk as one
//! small file per target (`STATE_DIR/modules/NODEID`, holding the module's
//! name), so short-lived processes such as `reach connect` benefit too. One
//! file per target lets concurrent processes update different targets without
//! losing each other's entries; each file is replaced atomically.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use reach_proto::NodeId;

use crate::stream::SetupModule;

/// Per-target module cache.
#[derive(Debug, Default)]
pub(crate) struct ModuleCache {
    mem: Mutex<HashMap<NodeId, SetupModule>>,
    dir: Option<PathBuf>,
}

impl ModuleCache {
    /// A cache persisted under `dir` (created on first write), if given.
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        Self {
            mem: Mutex::default(),
            dir,
        }
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, SetupModule>> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The module that last worked for `node`.
    pub(crate) fn get(&self, node: &NodeId) -> Option<SetupModule> {
        if let Some(m) = self.mem().get(node) {
            return Some(*m);
        }
        let path = self.dir.as_ref()?.join(node.to_string());
        // A missing or unreadable entry is simply not cached.
        let module = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
        self.mem().insert(*node, module);
        Some(module)
    }

    /// Records the module that worked for `node`, or forgets it (`None`).
    pub(crate) fn set(&self, node: NodeId, module: Option<SetupModule>) {
        {
            let mut mem = self.mem();
            match module {
                Some(m) if mem.get(&node) == Some(&m) => return,
                Some(m) => mem.insert(node, m),
                None => mem.remove(&node),
            };
        }
        let Some(dir) = &self.dir else { return };
        let path = dir.join(node.to_string());
        let result = match module {
            Some(m) => std::fs::create_dir_all(dir).and_then(|()| {
                let tmp = dir.join(format!(".{node}.{}", std::process::id()));
                std::fs::write(&tmp, format!("{m}\n"))?;
                std::fs::rename(&tmp, &path)
            }),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if let Err(e) = result {
            tracing::debug!("cannot update the module cache {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_new_cache_on_the_same_dir_and_can_be_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = crate::keystore::generate().expect("key").node_id();
        let a = ModuleCache::new(Some(dir.path().join("modules")));
        assert_eq!(a.get(&node), None);
        a.set(node, Some(SetupModule::Reverse));
        let b = ModuleCache::new(Some(dir.path().join("modules")));
        assert_eq!(b.get(&node), Some(SetupModule::Reverse));
        b.set(node, None);
        assert_eq!(
            ModuleCache::new(Some(dir.path().join("modules"))).get(&node),
            None
        );
        std::fs::write(
            dir.path().join("modules").join(node.to_string()),
            "teleport",
        )
        .expect("write");
        assert_eq!(
            ModuleCache::new(Some(dir.path().join("modules"))).get(&node),
            None
        );
    }
}
