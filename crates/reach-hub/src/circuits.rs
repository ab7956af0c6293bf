//! Relay circuits, the hub's side (the protocol is `reach_proto::circuit`):
//! a node's plaintext connection to the circuit port names its ticket and
//! peer; the hub pairs it with the peer's connection under the same ticket
//! and moves bytes between the two in the kernel ([`kernel_copy`]) until
//! both ends close. The bytes are the nodes' end-to-end encrypted records:
//! the hub neither reads nor re-encrypts them, which is what makes a
//! circuit cheaper than a routed stream (opened and sealed again on every
//! hub link, and framed through the hub's core).
//!
//! [`kernel_copy`]: crate::kernel_copy

use std::sync::Arc;
use std::time::{Duration, Instant};

use reach::ReachStream;
use reach_proto::circuit::{
    is_limit, CircuitAnswer, CircuitHello, Offered, HELLO_LEN, NO_CIRCUITS,
};
use reach_proto::NodeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Inner;

/// How long a node may take to send its circuit hello after its handshake.
const HELLO_WITHIN: Duration = Duration::from_secs(5);

/// Serves one connection to the circuit port, until the hub stops (the
/// task must not keep the hub's listener alive).
pub(crate) async fn serve(inner: Arc<Inner>, stream: ReachStream) {
    let mut stop = inner.stop.subscribe();
    tokio::select! {
        _ = serve_one(&inner, stream) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

async fn serve_one(inner: &Inner, stream: ReachStream) {
    let from = stream.peer();
    let mut tcp = match stream.into_plain_tcp() {
        Some(tcp) => tcp,
        None => {
            // Encrypted: the hub could not hand it to the kernel.
            tracing::debug!(%from, "circuit connection refused: not plaintext");
            return;
        }
    };
    let mut hello = [0u8; HELLO_LEN];
    match tokio::time::timeout(HELLO_WITHIN, tcp.read_exact(&mut hello)).await {
        Ok(Ok(_)) => {}
        _ => {
            tracing::debug!(%from, "circuit connection closed: no hello within {HELLO_WITHIN:?}");
            return;
        }
    }
    let hello = match CircuitHello::decode(&hello) {
        Ok(h) => h,
        Err(e) => return refuse(tcp, from, &e.to_string()).await,
    };
    let Some(limits) = inner.config.circuits else {
        return unavailable(tcp, from, NO_CIRCUITS).await;
    };
    let now = Instant::now();
    let offered = {
        let mut s = inner.state();
        let serves = s.core.has_node(&from) || s.core.has_node(&hello.peer);
        s.circuits
            .offer(now, hello.ticket, from, hello.peer, tcp, serves)
    };
    match offered {
        Offered::Waiting => {
            // The half waits in the table; this task only ends its wait.
            tokio::time::sleep_until((now + limits.wait).into()).await;
            let late = inner.state().circuits.expire(Instant::now());
            for tcp in late {
                refuse(tcp, from, "the other node did not join in time").await;
            }
        }
        Offered::Refused(tcp, why) => {
            let n = inner.state().circuits.counters.refused;
            if n.is_power_of_two() {
                tracing::warn!(%from, peer = %hello.peer, "circuit refused: {why} ({n} so far)");
            }
            if is_limit(why) {
                unavailable(tcp, from, why).await;
            } else {
                refuse(tcp, from, why).await;
            }
        }
        Offered::Paired { waiting, arrived } => {
            let closed = Closed {
                inner,
                ends: (from, hello.peer),
            };
            relay(waiting, arrived, from, hello.peer).await;
            drop(closed);
        }
    }
}

/// Releases a paired circuit's place in the table however its relay ends.
struct Closed<'a> {
    inner: &'a Inner,
    ends: (NodeId, NodeId),
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        let (a, b) = self.ends;
        self.inner.state().circuits.closed(&a, &b);
    }
}

/// Tells both nodes they are paired and relays until the circuit ends.
async fn relay(mut a: TcpStream, mut b: TcpStream, from: NodeId, peer: NodeId) {
    let paired = CircuitAnswer::Paired.encode();
    let told = async {
        a.write_all(&paired).await?;
        b.write_all(&paired).await
    };
    if let Err(e) = told.await {
        tracing::debug!(%from, %peer, "circuit lost before it started: {e}");
        return;
    }
    tracing::debug!(%from, %peer, "circuit paired");
    match crate::kernel_copy::relay(a, b).await {
        Ok(m) => {
            tracing::debug!(%from, %peer, forward = m.forward, backward = m.backward, "circuit ended")
        }
        Err(e) => tracing::debug!(%from, %peer, "circuit cut: {e}"),
    }
}

/// Answers a circuit hello saying the hub offers none now, and closes.
async fn unavailable(mut tcp: TcpStream, from: NodeId, why: &str) {
    tracing::debug!(%from, "circuit refused: {why}");
    let answer = CircuitAnswer::Unavailable(why.to_string()).encode();
    let _ = tokio::time::timeout(HELLO_WITHIN, tcp.write_all(&answer)).await;
}

/// Answers a circuit hello with a refusal and closes.
async fn refuse(mut tcp: TcpStream, from: NodeId, why: &str) {
    tracing::debug!(%from, "circuit refused: {why}");
    let answer = CircuitAnswer::Refused(why.to_string()).encode();
    let _ = tokio::time::timeout(HELLO_WITHIN, tcp.write_all(&answer)).await;
}
