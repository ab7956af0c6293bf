//! The Splice module: a direct kernel TCP connection between two hosts that
//! are both behind NATs or firewalls, by TCP simultaneous open
//! (SmartSockets section 3.4).
//!
//! ```text
//!  asker                        hubs                         target
//!  bind port A, echo x2 -> mapping, predict
//!  SpliceOffer{cands A} --------------------------------------->
//!                                        bind port B, echo x2 -> predict
//!  <--------------------------------------- SpliceAnswer{cands B}
//!                                           SYNs from B to every cand A
//!  SYNs from A to every cand B   ==== simultaneous open ====
//!  Noise IK initiator on the first connection   responder on each
//! ```
//! Each side sends its SYNs from the one port it learned its mapping on
//! (SO_REUSEADDR and SO_REUSEPORT let one socket per candidate share it). A
//! SYN that reaches the other side before that side's own SYN has opened its
//! NAT is dropped (and the later SYN then meets a socket in SYN_SENT) or
//! answered with a reset by a rejecting firewall, after which that candidate
//! is retried after a pause that doubles from 2 to 100 ms, until the
//! deadline (`reach_proto::punch` schedules the attempts). Meanwhile a
//! listener on the same port accepts a SYN that finds no connecting socket.
//! The answering side sends first, so the asker's SYNs, sent one hub path
//! later, find its NAT open. Both send to candidates in the offered order
//! (each connect system call is made before the next attempt starts): two
//! sequential NATs then allocate their i-th mappings for each other's i-th
//! candidates.
//!
//! The stream is authenticated end to end like every other; the target
//! checks that the handshake comes from the node that made the offer.

mod attempts;
mod probe;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_proto::handshake::{Admission, InitiatorOptions, Knock, Refusal};
use reach_proto::link::Rendezvous;
use reach_proto::node_session::SpliceOffer;
use reach_proto::setup_plan::SetupModule;
use reach_proto::VirtualAddr;
use tokio::task::JoinSet;

use crate::counters::bump;
use crate::error::ModuleError;
use crate::handshake::{initiate, respond};
use crate::hub_session::Session;
use crate::node::Shared;
use crate::offers::SpliceRefusal;
use crate::stream::{Direction, ReachStream};

use crate::offers::{AskerTurn, ANSWERS_PER_ASKER};
use attempts::punch;
pub(crate) use probe::probe;
pub use probe::NatReport;
use probe::{prepare, Prepared};

/// How long the target keeps punching after it answered.
const TARGET_WINDOW: Duration = Duration::from_secs(3);
/// How long the asker waits for the answer, at most.
const ANSWER_BUDGET: Duration = Duration::from_secs(2);
/// How long the asker punches after the answer, at most.
const PUNCH_BUDGET: Duration = Duration::from_secs(2);

/// The asker's side: offers, waits for the answer, punches, and runs the
/// handshake on the first connection that opens.
/// With `options.upgrade` the connection is to carry the routed stream whose
/// upgrade id is `target.port`.
pub(crate) async fn connect(
    shared: &Arc<Shared>,
    target: &VirtualAddr,
    options: InitiatorOptions,
    budget: Duration,
    started: Instant,
) -> Result<ReachStream, ModuleError> {
    let deadline = Instant::now() + budget;
    let (session, link) = shared.hub_link().await?;
    let prepared = prepare(shared, &link.status().echo)
        .await?
        .predictable()
        .map_err(ModuleError::Unpredictable)?;
    let node = target.node;
    let (token, answer) = shared.offers.register(node).map_err(ModuleError::Random)?;
    let offer = Rendezvous::SpliceOffer {
        token,
        vport: target.port,
        candidates: prepared.candidates.clone(),
        upgrade: options.upgrade,
    };
    if !session.relay(node, offer) {
        shared.offers.remove(node, token);
        return Err(ModuleError::LinkLost);
    }
    let asked = Instant::now();
    let wait = deadline.min(asked + ANSWER_BUDGET);
    let answer = tokio::time::timeout_at(wait.into(), answer).await;
    shared.offers.remove(node, token);
    let theirs = match answer {
        Ok(Ok(Ok(c))) => c,
        Ok(Ok(Err(SpliceRefusal::Declined(reason)))) => return Err(ModuleError::Declined(reason)),
        Ok(Ok(Err(SpliceRefusal::Undeliverable(reason)))) => {
            return Err(ModuleError::Undeliverable(reason))
        }
        Ok(Err(_)) => return Err(ModuleError::OfferDropped),
        Err(_) => return Err(ModuleError::NoAnswer(wait.saturating_duration_since(asked))),
    };
    let punch_deadline = deadline.min(Instant::now() + PUNCH_BUDGET);
    let (tasks, mut opened) = punch(prepared.local, &theirs, punch_deadline);
    let mut last = ModuleError::NoConnection {
        theirs: theirs.clone(),
        profile: prepared.profile,
    };
    while let Ok(Some(mut tcp)) =
        tokio::time::timeout_at(punch_deadline.into(), opened.recv()).await
    {
        let hs = initiate(&mut tcp, shared.me(), node, target.port, options);
        match tokio::time::timeout_at(deadline.into(), hs).await {
            Ok(Ok(est)) => {
                drop(tasks);
                return ReachStream::over_tcp(
                    tcp,
                    est,
                    SetupModule::Splice,
                    Direction::Outbound,
                    started,
                )
                .map_err(ModuleError::Socket);
            }
            Ok(Err(e)) => match ModuleError::handshake(e) {
                refused @ ModuleError::Refused(_) => return Err(refused),
                other => last = other,
            },
            Err(_) => {
                last = ModuleError::HandshakeTimedOut(deadline.saturating_duration_since(started))
            }
        }
    }
    Err(last)
}

/// The target's side: answers an offer relayed by the hubs and punches.
pub(crate) async fn answer(
    shared: Arc<Shared>,
    session: Arc<Session>,
    echoes: Vec<SocketAddr>,
    offer: SpliceOffer,
) {
    let SpliceOffer {
        from,
        token,
        vport,
        upgrade,
        candidates: theirs,
    } = offer;
    let started = Instant::now();
    let reply = |msg: Rendezvous| {
        session.relay(from, msg);
    };
    let decline = |reason: String| {
        tracing::debug!(%from, "declining splice: {reason}");
        reply(Rendezvous::SpliceDeclined { token, reason });
    };
    let Some(_turn) = AskerTurn::take(&shared.offers, from) else {
        return decline(format!(
            "already answering {ANSWERS_PER_ASKER} offers from this node"
        ));
    };
    if upgrade {
        let wait = crate::stream::upgrade::REGISTER_WAIT;
        if crate::stream::upgrade::lookup_soon(&shared.upgrades, from, vport, wait)
            .await
            .is_none()
        {
            return decline("no routed stream here to move".into());
        }
    } else if shared.admit_port(vport) != Admission::Accept {
        return decline(format!("no service on virtual port {vport}"));
    } else if !shared.may_admit(&from, vport) {
        // The same answer as a refused handshake gets, before any work.
        bump(&shared.counters.refused_by_policy);
        tracing::warn!(peer = %from, "refused a splice: the access policy does not admit this node");
        return decline("the node's access policy does not admit you".into());
    }
    let prepared = match prepare(&shared, &echoes).await.map(Prepared::predictable) {
        Ok(Ok(p)) => p,
        Ok(Err(profile)) => return decline(ModuleError::Unpredictable(profile).to_string()),
        Err(e) => return decline(e.to_string()),
    };
    reply(Rendezvous::SpliceAnswer {
        token,
        candidates: prepared.candidates.clone(),
    });
    let deadline = Instant::now() + TARGET_WINDOW;
    let (tasks, mut opened) = punch(prepared.local, &theirs, deadline);
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            Some(tcp) = opened.recv() => {
                let shared = shared.clone();
                handshakes.spawn(async move {
                    let mut tcp = tcp;
                    let mut moving = None;
                    let admit = |k: &Knock<'_>| {
                        if k.peer != from || k.hello.reverse {
                            Admission::Refuse(Refusal::NotAdmitted)
                        } else {
                            shared.admit_inbound(k, &mut moving)
                        }
                    };
                    let est = respond(&mut tcp, shared.responder(), admit).await;
                    shared
                        .finish_inbound(tcp, est, moving, SetupModule::Splice, started)
                        .await
                });
            }
            Some(done) = handshakes.join_next() => {
                match done {
                    Ok(Ok(())) => {
                        drop(tasks);
                        tracing::debug!(peer = %from, "spliced");
                        return;
                    }
                    Ok(Err(e)) => tracing::debug!(%from, "spliced connection failed its handshake: {e}"),
                    Err(_) => {}
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                tracing::debug!(%from, profile = %prepared.profile, "splice window closed");
                return;
            }
        }
    }
}
