//! Many-port ("birthday") punching, the sockets side: a member behind a
//! NAT that maps each destination to a random port opens
//! [`BIRTHDAY_SOCKETS`] spare sockets and probes the peer from each, so its
//! NAT holds that many mappings towards the peer; the peer, whose own
//! mapping is predictable, probes random ports of this member's public
//! address ([`crate::udp::paths::Paths::spray`]). The first spray probe
//! that lands on one of the mappings arrives on its spare socket, which
//! then carries the peer's path; the other spares close.
//!
//! ```text
//! hard side: 256 sockets --probe--> peer's mapping   (opens 256 mappings)
//! easy side: 1 socket --probe--> hard side's IP, 2048 random ports
//!            a hit arrives on spare i -> spare i is the path
//! ```
//!
//! Spare sockets are bounded per member ([`MAX_SPARES`]) and live for one
//! first round ([`crate::udp::paths::FIRST_ROUND`] and a second).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::udp::paths::{BIRTHDAY_SOCKETS, FIRST_ROUND};
use crate::udp_io::Socket;

/// Spare sockets one member holds at most (four peers punched at once).
pub const MAX_SPARES: usize = 4 * BIRTHDAY_SOCKETS;
/// Peers' addresses a spare socket probes at most.
pub const MAX_TARGETS: usize = 4;
/// Between two probes from every spare (the mappings are made by the
/// first; later ones reach a peer whose filter opened meanwhile).
const RESEND: Duration = Duration::from_secs(1);
/// Datagrams waiting for the driver; more are dropped (counted).
pub const QUEUE: usize = 256;

/// A datagram that arrived on a spare socket.
pub(crate) struct SpareDatagram {
    /// The spare it came in on.
    pub socket: Arc<Socket>,
    /// Who sent it.
    pub from: SocketAddr,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// A member's count of open spare sockets.
#[derive(Debug, Default)]
pub(crate) struct SpareCount(AtomicUsize);

/// One peer's spare sockets during a first round.
pub(crate) struct Birthday {
    sockets: Vec<Arc<Socket>>,
    targets: Vec<SocketAddr>,
    /// Receive on every spare (aborted when dropped).
    readers: tokio::task::JoinSet<()>,
    next_send: Instant,
    until: Instant,
    count: Arc<SpareCount>,
}

impl Drop for Birthday {
    fn drop(&mut self) {
        self.count
            .0
            .fetch_sub(self.sockets.len(), Ordering::Relaxed);
    }
}

/// Why no spares were opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BirthdayError {
    #[error("{MAX_SPARES} spare sockets are open already")]
    Full,
    #[error("cannot open a spare socket: {0}")]
    Io(#[from] io::Error),
}

impl Birthday {
    /// Opens the spares to probe `targets` from, each read into `tx`.
    pub(crate) fn open(
        targets: Vec<SocketAddr>,
        count: &Arc<SpareCount>,
        tx: &tokio::sync::mpsc::Sender<SpareDatagram>,
        now: Instant,
    ) -> Result<Self, BirthdayError> {
        let n = BIRTHDAY_SOCKETS;
        if count
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                (c + n <= MAX_SPARES).then_some(c + n)
            })
            .is_err()
        {
            return Err(BirthdayError::Full);
        }
        let mut b = Birthday {
            sockets: Vec::with_capacity(n),
            targets,
            readers: tokio::task::JoinSet::new(),
            next_send: now,
            until: now + FIRST_ROUND + Duration::from_secs(1),
            count: count.clone(),
        };
        for _ in 0..n {
            let socket = match crate::udp_io::bind(0).and_then(Socket::new) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    // Only the ones opened count against the bound.
                    count.0.fetch_sub(n - b.sockets.len(), Ordering::Relaxed);
                    return Err(BirthdayError::Io(e));
                }
            };
            b.readers.spawn(read_spare(socket.clone(), tx.clone()));
            b.sockets.push(socket);
        }
        Ok(b)
    }

    /// Whether `socket` is one of these spares.
    pub(crate) fn holds(&self, socket: &Arc<Socket>) -> bool {
        self.sockets.iter().any(|s| Arc::ptr_eq(s, socket))
    }

    /// The spares and the addresses to probe from each, when a send is
    /// due at `now` (then the next is a second later).
    pub(crate) fn due(&mut self, now: Instant) -> Option<(&[Arc<Socket>], &[SocketAddr])> {
        if now < self.next_send || now >= self.until {
            return None;
        }
        self.next_send = now + RESEND;
        Some((&self.sockets, &self.targets))
    }

    /// Whether the round is over.
    pub(crate) fn over(&self, now: Instant) -> bool {
        now >= self.until
    }

    /// The addresses probed.
    pub(crate) fn targets(&self) -> &[SocketAddr] {
        &self.targets
    }
}

/// Receives on a spare until it fails, handing every datagram on.
async fn read_spare(socket: Arc<Socket>, tx: tokio::sync::mpsc::Sender<SpareDatagram>) {
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = match socket.io.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) if crate::udp_io::transient(&e) => continue,
            Err(_) => return,
        };
        let d = SpareDatagram {
            socket: socket.clone(),
            from: SocketAddr::new(from.ip().to_canonical(), from.port()),
            bytes: buf[..n].to_vec(),
        };
        if tx.try_send(d).is_err() {
            tracing::debug!("a spare socket's datagram dropped: the driver is behind");
        }
    }
}

/// Whether `ip` may be a public address (spares probe only those: a
/// peer's LAN addresses are reached by its ordinary candidates).
pub(crate) fn public(ip: std::net::IpAddr) -> bool {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64))
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || s & 0xfe00 == 0xfc00
                || s & 0xffc0 == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_targets() {
        for ip in [
            "198.51.100.7",
            "203.0.113.1",
            "2001:db8::1",
            "::ffff:192.0.2.1",
        ] {
            assert!(public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.1.1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn spares_are_bounded_and_given_back_when_dropped() {
        let count = Arc::new(SpareCount::default());
        let (tx, mut rx) = tokio::sync::mpsc::channel(QUEUE);
        let now = Instant::now();
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut open: Vec<Birthday> = (0..MAX_SPARES / BIRTHDAY_SOCKETS)
            .map(|_| Birthday::open(vec![target], &count, &tx, now).expect("spares"))
            .collect();
        assert!(matches!(
            Birthday::open(vec![target], &count, &tx, now),
            Err(BirthdayError::Full)
        ));
        // A datagram to a spare comes out of the queue with its socket.
        let b = open.pop().expect("one");
        let spare = b.sockets[3].clone();
        let at = SocketAddr::from(([127, 0, 0, 1], spare.port));
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"hello", at).unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .expect("a datagram");
        assert!(b.holds(&d.socket) && Arc::ptr_eq(&d.socket, &spare));
        assert_eq!(d.bytes, b"hello");
        drop(b);
        assert!(Birthday::open(vec![target], &count, &tx, now).is_ok());
    }

    #[test]
    fn sends_are_due_once_a_second_within_the_round() {
        let count = Arc::new(SpareCount::default());
        let now = Instant::now();
        let mut b = Birthday {
            sockets: Vec::new(),
            targets: vec!["198.51.100.7:4000".parse().unwrap()],
            readers: tokio::task::JoinSet::new(),
            next_send: now,
            until: now + FIRST_ROUND + Duration::from_secs(1),
            count,
        };
        assert!(b.due(now).is_some());
        assert!(b.due(now + Duration::from_millis(500)).is_none());
        assert!(b.due(now + RESEND).is_some());
        assert!(!b.over(now + FIRST_ROUND));
        assert!(b.over(now + FIRST_ROUND + Duration::from_secs(1)));
        assert!(b.due(now + FIRST_ROUND + Duration::from_secs(1)).is_none());
    }
}
