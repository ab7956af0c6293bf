//! The Routed module, both sides: the opener opens a stream on its hub
//! link and runs the handshake over it; the target's hub session hands the
//! opened stream to `accept`, which runs the responder's handshake and
//! queues the stream for the endpoint's `accept`.
//!
//! ```text
//!  opener: connect -- Open{dst} --> hubs --> target's session --> accept
//!          Noise IK over the routed stream <-------------------->
//! ```
//! A routed stream the peer may later move to a direct connection is
//! registered for that here (`stream::upgrade`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_proto::handshake::{Admission, Established, Knock, Refusal};
use reach_proto::{NodeId, VirtualAddr};

use crate::error::ModuleError;
use crate::handshake::{confirm, initiate, respond_announcing};
use crate::node::Shared;
use crate::routed::RoutedStream;
use crate::stream::upgrade::{self, Slot};
use crate::stream::{Direction, ReachStream};

/// Opens a routed stream through the hubs and runs the handshake over it.
pub(super) async fn connect(
    shared: &Arc<Shared>,
    target: &VirtualAddr,
    budget: Duration,
    started: Instant,
) -> Result<ReachStream, ModuleError> {
    let (session, link) = shared.hub_link().await?;
    let (mut rs, addrs) = session
        .open(&link, &target.node)
        .ok_or(ModuleError::LinkLost)?;
    let hs = initiate(
        &mut rs,
        shared.me(),
        target.node,
        target.port,
        shared.initiator_options(),
    );
    match tokio::time::timeout(budget, hs).await {
        Ok(Ok(est)) => Ok(ReachStream::over_routed(
            rs,
            est,
            addrs,
            Direction::Outbound,
            started,
        )),
        Ok(Err(e)) => Err(ModuleError::handshake(e)),
        Err(_) => Err(ModuleError::HandshakeTimedOut(budget)),
    }
}

/// Runs the responder's handshake on an inbound routed stream and queues it.
pub(crate) async fn accept(
    shared: Arc<Shared>,
    mut rs: RoutedStream,
    src: NodeId,
    link: (SocketAddr, SocketAddr),
) {
    let started = Instant::now();
    let admit = |k: &Knock<'_>| {
        if k.hello.reverse {
            // Connect-backs are TCP connections by definition.
            return Admission::Refuse(Refusal::NotAdmitted);
        }
        shared.admit_new(k, "routed")
    };
    // Registered for moves before the reply goes out: the initiator may
    // start moving the stream as soon as it has the reply, and its new
    // connection must find the stream here.
    let slot = Slot::default();
    let mut registration = None;
    let register = |est: &Established| {
        if est.keys.is_some() {
            let key = (est.peer, est.upgrade_id());
            registration = upgrade::register(&shared.upgrades, key, slot.clone());
        }
    };
    let hs = async {
        let responder = shared.responder();
        let pending = respond_announcing(&mut rs, responder, admit, register).await?;
        confirm(&mut rs, responder.counters, pending).await
    };
    match tokio::time::timeout(shared.handshake_timeout, hs).await {
        Ok(Ok(est)) => {
            // The peer may move this stream to a direct connection later.
            let stream = ReachStream::over_routed(rs, est, link, Direction::Inbound, started);
            let stream = match registration {
                Some(r) => stream.into_upgradable(slot, Some(r)),
                None => stream,
            };
            tracing::debug!(peer = %stream.peer(), "accepted routed stream");
            shared.deliver(stream).await;
        }
        Ok(Err(e)) => tracing::warn!(%src, "rejected routed stream: {e}"),
        Err(_) => tracing::warn!(%src, "rejected routed stream: handshake timed out"),
    }
}
