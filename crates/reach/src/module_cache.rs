//! The setup driver's memory, per target node: which module last worked, and
//! which direct address last answered (by the Direct module or a connect-back).
//!
//! Kept in memory and, when the endpoint has a state directory, on disk as one
//! small file per target (`STATE_DIR/modules/NODEID`: the module's name or `-`,
//! then the address or `-`), so short-lived processes such as `reach connect`
//! benefit too. One file per target lets concurrent processes update different
//! targets without losing each other's entries; each file is replaced
//! atomically.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use reach_proto::setup_plan::SetupModule;
use reach_proto::NodeId;

/// What is remembered about one target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    module: Option<SetupModule>,
    addr: Option<SocketAddr>,
}

impl Entry {
    fn parse(text: &str) -> Self {
        let mut words = text.split_whitespace();
        Self {
            module: words.next().and_then(|w| w.parse().ok()),
            addr: words.next().and_then(|w| w.parse().ok()),
        }
    }

    fn render(&self) -> String {
        let module = self.module.map_or("-".into(), |m| m.to_string());
        let addr = self.addr.map_or("-".into(), |a| a.to_string());
        format!("{module} {addr}\n")
    }
}

/// Per-target module and address cache.
#[derive(Debug, Default)]
pub(crate) struct ModuleCache {
    mem: Mutex<HashMap<NodeId, Entry>>,
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

    fn mem(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Entry>> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, node: &NodeId) -> Entry {
        if let Some(e) = self.mem().get(node) {
            return *e;
        }
        // A missing or unreadable file is simply nothing cached.
        let e = self
            .dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.join(node.to_string())).ok())
            .map(|t| Entry::parse(&t))
            .unwrap_or_default();
        self.mem().insert(*node, e);
        e
    }

    /// The module that last worked for `node`.
    pub(crate) fn get(&self, node: &NodeId) -> Option<SetupModule> {
        self.entry(node).module
    }

    /// The direct address of `node` that last answered.
    pub(crate) fn addr(&self, node: &NodeId) -> Option<SocketAddr> {
        self.entry(node).addr
    }

    /// Records the module that worked for `node`, or forgets it (`None`).
    pub(crate) fn set(&self, node: NodeId, module: Option<SetupModule>) {
        self.update(node, |e| e.module = module);
    }

    /// Records the direct address of `node` that answered.
    pub(crate) fn set_addr(&self, node: NodeId, addr: SocketAddr) {
        self.update(node, |e| e.addr = Some(addr));
    }

    fn update(&self, node: NodeId, change: impl FnOnce(&mut Entry)) {
        let old = self.entry(&node);
        let mut new = old;
        change(&mut new);
        if new == old {
            return;
        }
        self.mem().insert(node, new);
        let Some(dir) = &self.dir else { return };
        let path = dir.join(node.to_string());
        let result = if new == Entry::default() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        } else {
            std::fs::create_dir_all(dir)
                .and_then(|()| crate::files::write_cache(&path, new.render().as_bytes(), 0o600))
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
        let modules = dir.path().join("modules");
        let node = crate::keystore::generate().expect("key").node_id();
        let a = ModuleCache::new(Some(modules.clone()));
        assert_eq!(a.get(&node), None);
        a.set(node, Some(SetupModule::Reverse));
        let addr: SocketAddr = "192.0.2.7:4000".parse().expect("addr");
        a.set_addr(node, addr);
        let b = ModuleCache::new(Some(modules.clone()));
        assert_eq!(b.get(&node), Some(SetupModule::Reverse));
        assert_eq!(b.addr(&node), Some(addr));
        b.set(node, None);
        let c = ModuleCache::new(Some(modules.clone()));
        assert_eq!((c.get(&node), c.addr(&node)), (None, Some(addr)));
        std::fs::write(modules.join(node.to_string()), "teleport nowhere").expect("write");
        let d = ModuleCache::new(Some(modules));
        assert_eq!((d.get(&node), d.addr(&node)), (None, None));
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_cache_files_never_panics(s in "\\PC{0,80}") {
            let e = Entry::parse(&s);
            proptest::prop_assert_eq!(Entry::parse(&e.render()), e);
        }
    }
}
