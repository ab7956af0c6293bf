//! What other nodes ask of this one over the hub link, served.
//!
//! Data flow: the hub session turns what arrives from other nodes into
//! `hub_session::Request`s on a bounded queue; [`serve`] takes them one by
//! one and starts the work each needs: a responder handshake on an inbound
//! routed stream, a connect-back (dial the asker), a splice answer (punch
//! towards the asker). Streams that come out of these go to the endpoint's
//! `accept` queue. Answers to what this node asked (splice answers, failed
//! connect-backs) resolve their waiters in [`Shared`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_proto::handshake::{Admission, InitiatorOptions, Refusal};
use reach_proto::link::ConnectBack;
use reach_proto::node_session::Event;
use reach_proto::setup_plan::SetupModule;
use reach_proto::{NodeId, VirtualAddr};
use tokio::sync::mpsc;

use crate::direct::{self, RaceSettings};
use crate::handshake::respond;
use crate::hub_session::{Request, Session};
use crate::node::Shared;
use crate::offers::SpliceRefusal;
use crate::routed::RoutedStream;
use crate::stream::{Direction, ReachStream};

/// How long a node tries to connect back to a node that asked.
const CONNECT_BACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves requests from the hub session until it is gone.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut rx: mpsc::Receiver<Request>,
) {
    while let Some(req) = rx.recv().await {
        match req {
            Request::Routed { stream, src, addrs } => {
                tokio::spawn(accept_routed(shared.clone(), stream, src, addrs));
            }
            Request::ConnectBack(cb) => {
                let (shared, session) = (shared.clone(), session.clone());
                tokio::spawn(async move {
                    connect_back(&shared, &session, cb).await;
                    session.answer_done();
                });
            }
            Request::SpliceOffer { offer, echoes } => {
                let (shared, session) = (shared.clone(), session.clone());
                tokio::spawn(async move {
                    crate::splice::answer(shared, session.clone(), echoes, offer).await;
                    session.answer_done();
                });
            }
            Request::Answer(Event::SpliceAnswer {
                from,
                token,
                result,
            }) => {
                let result = result.map_err(SpliceRefusal::Declined);
                shared.offers.resolve(from, token, result)
            }
            Request::Answer(Event::ConnectBackFailed {
                target,
                token,
                reason,
            }) => shared.fail_reverse(target, token, &reason),
            Request::Answer(Event::Undeliverable { to, msg, reason }) => {
                let refusal = SpliceRefusal::Undeliverable(reason);
                shared.offers.resolve(to, msg.token(), Err(refusal))
            }
            Request::Answer(_) => {}
        }
    }
}

/// Runs the responder's handshake on an inbound routed stream and queues it.
async fn accept_routed(
    shared: Arc<Shared>,
    mut rs: RoutedStream,
    src: NodeId,
    link: (SocketAddr, SocketAddr),
) {
    let started = Instant::now();
    let admit = |_: &NodeId, h: &reach_proto::handshake::HelloHeader| {
        if h.reverse {
            // Connect-backs are TCP connections by definition.
            return Admission::Refuse(Refusal::NotAdmitted);
        }
        shared.admit_port(h.port)
    };
    let hs = respond(&mut rs, &shared.secret, shared.responder_options(), admit);
    match tokio::time::timeout(shared.handshake_timeout, hs).await {
        Ok(Ok(est)) => {
            // The peer may move this stream to a direct connection later.
            let stream = ReachStream::over_routed(rs, est, link, Direction::Inbound, started);
            let slot = crate::stream::upgrade::Slot::default();
            let registration = stream.upgrade_id().and_then(|id| {
                crate::stream::upgrade::register(
                    &shared.upgrades,
                    (stream.peer(), id),
                    slot.clone(),
                )
            });
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

/// Answers a connect-back request: dials the asker and hands the stream to
/// this endpoint's `accept`.
async fn connect_back(shared: &Shared, session: &Arc<Session>, cb: ConnectBack) {
    let fail = |reason: String| session.connect_back_failed(cb.from, cb.token, reason);
    if shared.admit_port(cb.vport) != Admission::Accept {
        tracing::debug!(from = %cb.from, vport = cb.vport, "not connecting back: port not served");
        fail(format!("no service on virtual port {}", cb.vport));
        return;
    }
    let mut addrs = cb.addrs;
    addrs.truncate(reach_proto::link::MAX_NODE_ADDRS);
    let target = VirtualAddr::new(cb.from, cb.token).with_direct(addrs);
    let settings = RaceSettings {
        options: InitiatorOptions {
            plaintext: shared.plaintext,
            cipher: shared.cipher,
            reverse: true,
            upgrade: false,
        },
        attempt_delay: shared.attempt_delay,
        timeout: CONNECT_BACK_TIMEOUT,
        module: SetupModule::Reverse,
        first: shared.cache.addr(&cb.from),
    };
    match direct::connect(&shared.secret, &shared.local_addrs.get(), &target, settings).await {
        Ok(mut stream) => {
            shared.cache.set_addr(cb.from, stream.info().remote_addr);
            stream.info_mut().virtual_port = cb.vport;
            tracing::debug!(peer = %cb.from, "connected back");
            shared.deliver(stream).await;
        }
        Err(e) => {
            tracing::debug!(peer = %cb.from, "cannot connect back: {e}");
            fail(format!("the node could not connect back: {e}"));
        }
    }
}
