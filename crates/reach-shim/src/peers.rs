//! Which pool address each brokered socket was connected to, for
//! `getpeername`: one atomic word per descriptor, so the table needs no
//! lock (a `fork` in the middle of an update cannot leave a child
//! deadlocked) and costs `close` one load when the descriptor was never
//! brokered.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

/// Descriptors below this are remembered (higher ones answer
/// `getpeername` with the relay's address).
const SLOTS: usize = 65_536;
const SET: u64 = 1 << 48;
/// A listening socket whose port the agent serves.
const LISTENING: u64 = 1 << 49;

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: AtomicU64 = AtomicU64::new(0);
static PEERS: [AtomicU64; SLOTS] = [EMPTY; SLOTS];

fn slot(fd: i32) -> Option<&'static AtomicU64> {
    usize::try_from(fd).ok().and_then(|i| PEERS.get(i))
}

/// Remembers that `fd` stands for `peer`.
pub(crate) fn set(fd: i32, peer: SocketAddrV4) {
    if let Some(s) = slot(fd) {
        let word = SET | (u64::from(u32::from(*peer.ip())) << 16) | u64::from(peer.port());
        s.store(word, Ordering::Release);
    }
}

/// The pool address `fd` stands for, if brokered.
pub(crate) fn get(fd: i32) -> Option<SocketAddrV4> {
    let word = slot(fd)?.load(Ordering::Acquire);
    (word & SET != 0).then(|| {
        let ip = Ipv4Addr::from(((word >> 16) & 0xffff_ffff) as u32);
        SocketAddrV4::new(ip, (word & 0xffff) as u16)
    })
}

/// Marks `fd` as a listening socket the agent serves.
pub(crate) fn mark_listening(fd: i32) {
    if let Some(s) = slot(fd) {
        s.store(LISTENING, Ordering::Release);
    }
}

/// Whether `fd` is a listening socket the agent serves.
pub(crate) fn is_listening(fd: i32) -> bool {
    slot(fd).is_some_and(|s| s.load(Ordering::Acquire) & LISTENING != 0)
}

/// `to` is a duplicate of `from` now: it stands for what `from` does (or
/// for nothing).
pub(crate) fn copy(from: i32, to: i32) {
    if let Some(s) = slot(to) {
        let word = slot(from).map_or(0, |f| f.load(Ordering::Acquire));
        s.store(word, Ordering::Release);
    }
}

/// Forgets `fd` (it is being closed).
pub(crate) fn clear(fd: i32) {
    if let Some(s) = slot(fd) {
        if s.load(Ordering::Relaxed) != 0 {
            s.store(0, Ordering::Release);
        }
    }
}
