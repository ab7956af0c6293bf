//! The resumption tickets a node holds for the nodes it met: in memory, and
//! with a state directory also in `STATE_DIR/tickets/NODEID` (one line each,
//! mode 0600: a ticket's resumption key is a secret), so that a short-lived
//! process (`reach connect`, an ssh `ProxyCommand`) resumes with a peer an
//! earlier process met. A file that does not parse, or whose ticket is too
//! old to offer, is nothing held (and is removed). Each peer's file is read
//! at most once per process: a connection to a peer with no ticket costs
//! no file system access after the first.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use reach_proto::resume::{Ticket, Tickets, MAX_TICKETS};
use reach_proto::NodeId;

/// A node's tickets, in memory and in its state directory.
#[derive(Debug)]
pub(crate) struct TicketStore {
    mem: Mutex<Held>,
    dir: Option<PathBuf>,
}

/// The tickets in memory, and the peers whose file was read already.
#[derive(Debug, Default)]
struct Held {
    tickets: Tickets,
    read: HashSet<NodeId>,
}

/// Seconds since 1970 now (0 for a clock before it: every stored ticket
/// then looks new, and the peer refuses those it no longer honours).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TicketStore {
    /// A store keeping its files in `dir`, if any.
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        Self {
            mem: Mutex::default(),
            dir,
        }
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Held> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ticket to offer `peer`, from memory or, the first time, from the
    /// state directory.
    pub(crate) fn get(&self, peer: &NodeId) -> Option<Ticket> {
        let now = Instant::now();
        {
            let mut held = self.mem();
            if let Some(t) = held.tickets.get(peer, now) {
                return Some(t);
            }
            // Bounded like the tickets: past it, files may be read again.
            if held.read.len() >= MAX_TICKETS {
                held.read.clear();
            }
            if !held.read.insert(*peer) {
                return None;
            }
        }
        let path = self.dir.as_ref()?.join(peer.to_string());
        let text = std::fs::read_to_string(&path).ok()?;
        let Some((ticket, age)) = Ticket::from_text(*peer, &text, unix_now()) else {
            let _ = std::fs::remove_file(&path);
            return None;
        };
        let received = now.checked_sub(age).unwrap_or(now);
        self.mem().tickets.insert(ticket.clone(), received);
        Some(ticket)
    }

    /// Keeps a ticket just received.
    pub(crate) fn insert(&self, ticket: Ticket) {
        if let Some(dir) = &self.dir {
            let text = ticket.to_text(unix_now());
            let path = dir.join(ticket.peer.to_string());
            // Best effort: without the file, the next process runs a full
            // handshake, as without a state directory.
            let written = std::fs::create_dir_all(dir)
                .and_then(|()| crate::files::write_cache(&path, text.as_bytes(), 0o600));
            if let Err(e) = written {
                tracing::debug!("cannot keep a resumption ticket in {}: {e}", path.display());
            }
        }
        self.mem().tickets.insert(ticket, Instant::now());
    }

    /// Forgets `peer`'s ticket (it refused it).
    pub(crate) fn remove(&self, peer: &NodeId) {
        self.mem().tickets.remove(peer);
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.join(peer.to_string()));
        }
    }
}
