//! Who may open streams to this node: the listener's access policy.
//!
//! ```text
//! handshake (peer authenticated, member proof checked) --> AccessPolicy::admits
//!     open?  in --allow?  in --allow-file (re-read when it changes)?
//!     a member of this node's network (proved its secret)?
//! ```
//! The handshake authenticates the peer first, so the decision is about a
//! proven NodeId, and a refused peer gets an authenticated refusal. Every
//! accepting path asks the same policy: direct and spliced connections,
//! routed streams, and a connect-back this node is asked to make (checked
//! before it dials, and again on the identity the handshake proves).
//!
//! The library's default is [`AccessPolicy::open`], as a TCP listener
//! accepts everyone and the application sees the peer's NodeId; the CLI's
//! servers of legacy services (`expose`) refuse to start without a policy.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use reach_proto::NodeId;

/// Why a policy could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The allow file could not be read.
    #[error("cannot read the allow file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line of the allow file is not a NodeId.
    #[error("{path}:{line}: not a NodeId: {text:?}")]
    BadLine {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// The line.
        text: String,
    },
}

/// A file of NodeIds, one a line (`#` starts a comment), re-read when it
/// changes.
#[derive(Debug)]
struct AllowFile {
    path: PathBuf,
    /// What identifies the version read: inode, size, modification time.
    stamp: Option<(u64, u64, i64, i64)>,
    nodes: HashSet<NodeId>,
}

fn stamp(path: &Path) -> Option<(u64, u64, i64, i64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// Parses an allow file's text.
fn parse(path: &Path, text: &str) -> Result<HashSet<NodeId>, PolicyError> {
    let mut nodes = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line_text = line.split('#').next().unwrap_or("").trim();
        if line_text.is_empty() {
            continue;
        }
        let id = line_text.parse().map_err(|_| PolicyError::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            text: line_text.to_string(),
        })?;
        nodes.insert(id);
    }
    Ok(nodes)
}

impl AllowFile {
    fn load(path: &Path) -> Result<Self, PolicyError> {
        let stamp = stamp(path);
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            stamp,
            nodes: parse(path, &text)?,
        })
    }

    /// Re-reads the file if it changed (or if `force`). A file that became
    /// unreadable or invalid keeps the last good list: a half-written edit
    /// must not open or close the door, and it is logged.
    fn refresh(&mut self, force: bool) {
        let now = stamp(&self.path);
        if !force && now == self.stamp {
            return;
        }
        self.stamp = now;
        match Self::load(&self.path) {
            Ok(fresh) => {
                tracing::info!(
                    file = %self.path.display(),
                    nodes = fresh.nodes.len(),
                    "allow file re-read"
                );
                self.nodes = fresh.nodes;
            }
            Err(e) => tracing::warn!("{e}; keeping the {} nodes read before", self.nodes.len()),
        }
    }
}

/// Who may open streams to an endpoint. Clones share the allow file, so
/// [`reload`](Self::reload) reaches every user.
#[derive(Clone, Debug)]
pub struct AccessPolicy {
    open: bool,
    members: bool,
    allow: HashSet<NodeId>,
    file: Option<Arc<Mutex<AllowFile>>>,
}

impl AccessPolicy {
    /// Every authenticated node may open streams.
    pub fn open() -> Self {
        Self {
            open: true,
            ..Self::nobody()
        }
    }

    /// No node may, until allowed by [`allow`](Self::allow),
    /// [`allow_file`](Self::allow_file) or [`allow_members`](Self::allow_members).
    pub fn nobody() -> Self {
        Self {
            open: false,
            members: false,
            allow: HashSet::new(),
            file: None,
        }
    }

    /// Also admits `node`.
    pub fn allow(mut self, node: NodeId) -> Self {
        self.allow.insert(node);
        self
    }

    /// Also admits the nodes listed in `path`, one NodeId a line (`#`
    /// starts a comment). The file is re-read when it changes (checked at
    /// each handshake) and on [`reload`](Self::reload).
    pub fn allow_file(mut self, path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let file = AllowFile::load(path.as_ref())?;
        self.file = Some(Arc::new(Mutex::new(file)));
        Ok(self)
    }

    /// Also admits nodes that prove they hold the endpoint's network secret
    /// (see `EndpointBuilder::network_secret`).
    pub fn allow_members(mut self, yes: bool) -> Self {
        self.members = yes;
        self
    }

    /// Whether any node at all can be admitted.
    pub fn admits_anyone(&self) -> bool {
        self.open || self.members || !self.allow.is_empty() || self.file.is_some()
    }

    /// Re-reads the allow file now (on SIGHUP, say).
    pub fn reload(&self) {
        if let Some(f) = &self.file {
            f.lock().unwrap_or_else(|p| p.into_inner()).refresh(true);
        }
    }

    fn listed(&self, peer: &NodeId) -> bool {
        if self.allow.contains(peer) {
            return true;
        }
        self.file.as_ref().is_some_and(|f| {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            f.refresh(false);
            f.nodes.contains(peer)
        })
    }

    /// Whether `peer`, authenticated, may open a stream; `member` says it
    /// proved this node's network secret.
    pub fn admits(&self, peer: &NodeId, member: bool) -> bool {
        self.open || (member && self.members) || self.listed(peer)
    }

    /// Whether `peer` could be admitted once it proves what it can: for
    /// deciding before any work is done for it (a connect-back, a splice),
    /// when its membership proof has not been seen yet.
    pub fn may_admit(&self, peer: &NodeId) -> bool {
        self.admits(peer, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::SecretKey;

    fn id(seed: u8) -> NodeId {
        SecretKey::from_seed([seed; 32]).node_id()
    }

    #[test]
    fn each_rule_admits_what_it_names_and_nothing_else() {
        let (a, b) = (id(1), id(2));
        assert!(AccessPolicy::open().admits(&a, false));
        assert!(!AccessPolicy::nobody().admits(&a, true));
        let listed = AccessPolicy::nobody().allow(a);
        assert!(listed.admits(&a, false) && !listed.admits(&b, false));
        assert!(
            !listed.admits(&b, true),
            "membership counts only if allowed"
        );
        let members = AccessPolicy::nobody().allow_members(true);
        assert!(members.admits(&b, true) && !members.admits(&b, false));
        assert!(members.may_admit(&b));
        assert!(!AccessPolicy::nobody().admits_anyone());
    }

    #[test]
    fn the_allow_file_is_reread_when_it_changes_and_a_bad_edit_keeps_the_old_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("allow");
        let (a, b) = (id(1), id(2));
        std::fs::write(&path, format!("# who may connect\n{a}  # laptop\n\n")).expect("write");
        let p = AccessPolicy::nobody().allow_file(&path).expect("load");
        assert!(p.admits(&a, false) && !p.admits(&b, false));
        // A new version (different size) is seen at the next decision.
        std::fs::write(&path, format!("{b}\n")).expect("write");
        assert!(p.admits(&b, false) && !p.admits(&a, false));
        // An invalid edit keeps what was read before.
        std::fs::write(&path, "not a node id, and longer than before\n").expect("write");
        assert!(p.admits(&b, false));
        std::fs::write(&path, format!("{a}\n")).expect("write");
        p.reload();
        assert!(p.admits(&a, false));
    }

    #[test]
    fn a_bad_allow_file_is_refused_at_start_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("allow");
        std::fs::write(&path, format!("{}\nbogus\n", id(1))).expect("write");
        let err = AccessPolicy::nobody()
            .allow_file(&path)
            .expect_err("bad line");
        assert!(
            err.to_string().ends_with(":2: not a NodeId: \"bogus\""),
            "{err}"
        );
        let missing = AccessPolicy::nobody().allow_file(dir.path().join("none"));
        assert!(matches!(missing, Err(PolicyError::Read { .. })));
    }
}
