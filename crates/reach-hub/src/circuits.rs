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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reach::{CircuitJoinError, Endpoint, ReachStream};
use reach_proto::circuit::{
    is_limit, CircuitAnswer, CircuitHello, Offered, HELLO_HEADER_LEN, HELLO_LEN, NO_CIRCUITS,
};
use reach_proto::NodeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::{Inner, State};

/// How long a node may take to send its circuit hello after its handshake.
const HELLO_WITHIN: Duration = Duration::from_secs(5);

/// How long a hub waits for a leg it asked the next hub to dial back with.
const PULL_WITHIN: Duration = Duration::from_secs(10);

/// Most legs a hub dials back at once for hubs that asked it to.
const MAX_DIAL_BACKS: usize = 64;

/// Serves one connection to the circuit port, until the hub stops (the
/// task must not keep the hub's listener alive).
pub(crate) async fn serve(inner: Arc<Inner>, stream: ReachStream) {
    until_stopped(&inner, serve_one(&inner, stream)).await;
}

/// Runs `work` until it ends or the hub stops.
async fn until_stopped(inner: &Inner, work: impl std::future::Future<Output = ()>) {
    let mut stop = inner.stop.subscribe();
    tokio::select! {
        _ = work => {}
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
    // The header first: a hello of another version is refused with the
    // reason, not waited on for bytes that never come.
    let mut hello = [0u8; HELLO_LEN];
    let read = async {
        let (header, rest) = hello.split_at_mut(HELLO_HEADER_LEN);
        tcp.read_exact(header).await?;
        if let Some(Err(e)) = header.first_chunk().map(CircuitHello::check_header) {
            return std::io::Result::Ok(Err(e));
        }
        tcp.read_exact(rest).await?;
        Ok(Ok(()))
    };
    match tokio::time::timeout(HELLO_WITHIN, read).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return refuse(tcp, from, &e.to_string()).await,
        _ => {
            tracing::debug!(%from, "circuit connection closed: no hello within {HELLO_WITHIN:?}");
            return;
        }
    }
    let hello = match CircuitHello::decode(&hello) {
        Ok(h) => h,
        Err(e) => return refuse(tcp, from, &e.to_string()).await,
    };
    if hello.pulled {
        return pulled_leg_arrived(inner, tcp, from, &hello).await;
    }
    serve_hello(inner, tcp, from, hello).await;
}

/// Serves a circuit connection from `from` (a node, or a linked hub with a
/// leg) whose hello has been read: pairs it, or carries it on.
async fn serve_hello(inner: &Inner, tcp: TcpStream, from: NodeId, hello: CircuitHello) {
    let Some(limits) = inner.config.circuits else {
        return unavailable(tcp, from, NO_CIRCUITS).await;
    };
    // A node speaks for itself; a leg comes from a linked hub, which speaks
    // for the node whose end it carries.
    let (toward, serves, wrong) = {
        let s = inner.state();
        let leg = hello.from != from;
        let toward = hello.toward.filter(|hub| *hub != s.core.id());
        let wrong = if leg && !s.core.has_hub_link(&from) {
            Some("a circuit leg comes from a linked hub only")
        } else if toward.is_some() && !leg && !s.core.has_node(&hello.from) {
            Some("a node's circuit is carried on from its own hub only")
        } else {
            None
        };
        // Pairs here: one end is attached here (a leg's node is not).
        let serves = s.core.has_node(&hello.peer) || (!leg && s.core.has_node(&from));
        (toward, serves, wrong)
    };
    if let Some(why) = wrong {
        return refuse(tcp, from, why).await;
    }
    if let Some(hub) = toward {
        return carry_on(inner, tcp, from, hello, hub).await;
    }
    let now = Instant::now();
    let offered = {
        let mut s = inner.state();
        s.circuits
            .offer(now, hello.ticket, hello.from, hello.peer, tcp, serves)
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
        Offered::Refused(tcp, why) => refused(inner, tcp, from, &hello, why).await,
        Offered::Paired { waiting, arrived } => {
            let closed = Closed {
                inner,
                ends: (hello.from, hello.peer),
            };
            relay(waiting, arrived, &hello).await;
            drop(closed);
        }
    }
}

/// Carries the circuit `hello` names on towards the hub of its other end:
/// a leg to the next hub, spliced to `tcp` once that hub has paired it or
/// carried it on in turn. The hub never waits for the other end itself.
async fn carry_on(
    inner: &Inner,
    tcp: TcpStream,
    from: NodeId,
    hello: CircuitHello,
    toward: NodeId,
) {
    let Some(leg) = hello.next_leg() else {
        return refuse(tcp, from, "the circuit crossed too many hubs").await;
    };
    let next = {
        let mut s = inner.state();
        match s.core.next_hub_towards(&toward) {
            Some((hub, addrs)) => {
                // The leg goes the way the hub link was dialled: a hub that
                // dialled this one may sit behind a NAT or firewall, so it
                // is asked to dial back instead.
                let pulled = s.core.dialled_hub(&hub) == Some(false);
                let reserved = s.circuits.extend(hello.from, hello.peer);
                reserved.map(|()| (hub, addrs, pulled))
            }
            None => Err("no route to the other node's hub"),
        }
    };
    let (hub, addrs, pulled) = match next {
        Ok(next) => next,
        Err(why) => return refused(inner, tcp, from, &hello, why).await,
    };
    let closed = Closed {
        inner,
        ends: (hello.from, hello.peer),
    };
    let onward = if pulled {
        pull(inner, hub, leg).await
    } else {
        inner.endpoint.circuit_leg(hub, addrs, leg).await
    };
    match onward {
        Ok(onward) => {
            tracing::debug!(%from, %hub, peer = %hello.peer, "circuit carried on");
            relay_onward(tcp, onward, &hello).await;
        }
        Err(e) if e.unavailable => unavailable(tcp, from, &e.why).await,
        Err(e) => {
            refuse(
                tcp,
                from,
                &format!("carrying the circuit on to hub {hub}: {e}"),
            )
            .await
        }
    }
    drop(closed);
}

/// Asks linked hub `hub` (which dialled this one) to dial back and present
/// `leg`, and waits for it to pair or carry the leg on: the connection, from
/// then on a pipe towards the circuit's other end.
async fn pull(
    inner: &Inner,
    hub: NodeId,
    leg: CircuitHello,
) -> Result<TcpStream, CircuitJoinError> {
    let (tx, rx) = oneshot::channel();
    let deadline = Instant::now() + PULL_WITHIN;
    {
        let mut s = inner.state();
        if let Err((_, why)) = s.pulls.ask(Instant::now(), hub, leg, tx, deadline) {
            return Err(CircuitJoinError {
                why: why.to_string(),
                unavailable: true,
            });
        }
        if !s.core.pull_circuit(&hub, &leg) {
            s.pulls.cancel(&leg.ticket);
            return Err(format!("no link to hub {hub} any more").into());
        }
        s.flush();
    }
    match tokio::time::timeout_at(deadline.into(), rx).await {
        Ok(Ok(tcp)) => Endpoint::circuit_answer(tcp).await,
        _ => {
            inner.state().pulls.cancel(&leg.ticket);
            Err(format!("hub {hub} did not dial back within {PULL_WITHIN:?}").into())
        }
    }
}

/// A leg this hub asked for came back, from `from`: hands it to the
/// waiting task, or refuses it if this hub asked nobody for it.
async fn pulled_leg_arrived(inner: &Inner, tcp: TcpStream, from: NodeId, hello: &CircuitHello) {
    let waiter = inner.state().pulls.arrived(&from, hello);
    match waiter {
        Ok(tx) => {
            if tx.send(tcp).is_err() {
                tracing::debug!(%from, peer = %hello.peer, "pulled circuit leg came after its wait ended");
            }
        }
        Err(why) => refuse(tcp, from, why).await,
    }
}

/// Carries the leg `leg` that linked hub `hub` (at `addr`) asked for from
/// this side: dials it back, presents the leg marked pulled, and serves the
/// connection as a leg that came from `hub`. Bounded by [`MAX_DIAL_BACKS`]
/// at once; runs until the hub stops.
pub(crate) fn dial_back(
    inner: &Arc<Inner>,
    s: &mut State,
    hub: NodeId,
    addr: SocketAddr,
    leg: CircuitHello,
) {
    if s.dial_backs >= MAX_DIAL_BACKS {
        s.dial_backs_refused += 1;
        let n = s.dial_backs_refused;
        if n.is_power_of_two() {
            tracing::warn!(%hub, "circuit pull refused: {MAX_DIAL_BACKS} dial-backs under way ({n} so far)");
        }
        return;
    }
    s.dial_backs += 1;
    let inner = inner.clone();
    tokio::spawn(async move {
        // Counted down however the task ends.
        let _under_way = DialBack(&inner);
        let serve = async {
            let back = CircuitHello {
                pulled: true,
                ..leg
            };
            match inner
                .endpoint
                .circuit_pulled_leg(hub, vec![addr], back)
                .await
            {
                Ok(tcp) => {
                    tracing::debug!(%hub, peer = %leg.peer, "circuit leg pulled: dialled back");
                    serve_hello(&inner, tcp, hub, leg).await
                }
                Err(e) => tracing::debug!(%hub, "circuit pull: dialling back failed: {e}"),
            }
        };
        until_stopped(&inner, serve).await;
    });
}

/// A dial-back under way, counted in the hub's state while it lives.
struct DialBack<'a>(&'a Inner);

impl Drop for DialBack<'_> {
    fn drop(&mut self) {
        self.0.state().dial_backs -= 1;
    }
}

/// Answers a half the table refused (a limit as `Unavailable`, so the
/// node backs off), logging the first and every power of two.
async fn refused(inner: &Inner, tcp: TcpStream, from: NodeId, hello: &CircuitHello, why: &str) {
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

/// Tells both halves they are paired and relays until the circuit ends.
async fn relay(mut a: TcpStream, mut b: TcpStream, hello: &CircuitHello) {
    let paired = CircuitAnswer::Paired.encode();
    let told = async {
        a.write_all(&paired).await?;
        b.write_all(&paired).await
    };
    if let Err(e) = told.await {
        tracing::debug!(from = %hello.from, peer = %hello.peer, "circuit lost before it started: {e}");
        return;
    }
    tracing::debug!(from = %hello.from, peer = %hello.peer, "circuit paired");
    splice_until_closed(a, b, hello).await;
}

/// Tells the half that asked (`tcp`) that its circuit is paired further
/// on, and relays between it and the leg to the next hub (which is this
/// hub's own connection, told nothing).
async fn relay_onward(mut tcp: TcpStream, onward: TcpStream, hello: &CircuitHello) {
    if let Err(e) = tcp.write_all(&CircuitAnswer::Paired.encode()).await {
        tracing::debug!(from = %hello.from, peer = %hello.peer, "circuit lost before it started: {e}");
        return;
    }
    splice_until_closed(tcp, onward, hello).await;
}

/// Moves bytes between `a` and `b` in the kernel until both ends close.
async fn splice_until_closed(a: TcpStream, b: TcpStream, hello: &CircuitHello) {
    let (from, peer) = (hello.from, hello.peer);
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
