//! What other nodes ask of this one over the hub link, served.
//!
//! Data flow: the hub session turns what arrives from other nodes into
//! `hub_session::Request`s on a bounded queue; [`serve`] takes them one by
//! one and starts the work each needs, in the module it belongs to: a
//! responder handshake on an inbound routed stream (`setup::routed`), a
//! connect-back (`setup::reverse`), a splice answer (`splice`), a relay
//! circuit joined (`circuit`). Streams that come out of these go to the endpoint's
//! `accept` queue. Answers to what this node asked (splice answers, failed
//! connect-backs) resolve their waiters in [`Shared`].

use std::sync::Arc;

use reach_proto::node_session::Event;
use tokio::sync::mpsc;

use crate::hub_session::{Request, Session};
use crate::node::Shared;
use crate::offers::SpliceRefusal;

/// Serves requests from the hub session until it is gone.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut rx: mpsc::Receiver<Request>,
) {
    while let Some(req) = rx.recv().await {
        match req {
            Request::Routed { stream, src, addrs } => {
                tokio::spawn(crate::setup::accept_routed(
                    shared.clone(),
                    stream,
                    src,
                    addrs,
                ));
            }
            Request::ConnectBack(cb) => {
                let (shared, session) = (shared.clone(), session.clone());
                tokio::spawn(async move {
                    crate::setup::answer_connect_back(&shared, &session, cb).await;
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
            Request::CircuitOffer(offer) => {
                let (shared, session) = (shared.clone(), session.clone());
                tokio::spawn(async move {
                    crate::circuit::answer(shared, offer).await;
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
