//! Relay circuits, the nodes' side (the protocol is `reach_proto::circuit`).
//!
//! The node that opened a routed stream offers a circuit at its hub to the
//! other node and joins it; the other node joins too (at that hub when it
//! can reach it, else at its own, which carries the circuit on hub by hub);
//! the hubs pair the connections and move bytes between them in the kernel. Then the upgrade
//! handshake (`FLAG_UPGRADE`, Noise IK end to end) runs over the circuit as
//! over a direct connection, and the stream moves there with the ordinary
//! handover (`stream::upgrade`): the hub relays records it cannot open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_proto::circuit::{
    ticket_token, CircuitAnswer, CircuitHello, CIRCUIT_VPORT, MAX_HOPS, TICKET_LEN,
};
use reach_proto::handshake::{Admission, InitiatorOptions, Knock, Refusal};
use reach_proto::link::Rendezvous;
use reach_proto::node_session::CircuitOffer;
use reach_proto::setup_plan::SetupModule;
use reach_proto::{NodeId, VirtualAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::direct::RaceSettings;
use crate::handshake::{initiate, respond};
use crate::node::Shared;
use crate::stream::upgrade::NewPath;
use crate::stream::{Direction, ReachStream};

/// How long joining a circuit may take, from dialling the hub until the
/// other node is there.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the answering node tries to reach the offering node's hub
/// before it joins at its own hub instead, which carries the circuit there.
const OFFERED_HUB_DIAL: Duration = Duration::from_secs(1);

/// Why joining a circuit failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct CircuitJoinError {
    /// What went wrong.
    pub why: String,
    /// The hub offers no circuits now (none at all, or a limit is reached):
    /// ask it for none for a while.
    pub unavailable: bool,
}

impl From<String> for CircuitJoinError {
    fn from(why: String) -> Self {
        Self {
            why,
            unavailable: false,
        }
    }
}

/// Joins the circuit `hello` names at `hub` (at `addrs`), within the node's
/// share of concurrent joins; the bare connection, from then on a pipe to
/// the other end.
async fn join(
    shared: &Shared,
    hub: NodeId,
    addrs: Vec<SocketAddr>,
    hello: CircuitHello,
) -> Result<TcpStream, CircuitJoinError> {
    let _turn = shared.circuit_gate.turn(JOIN_TIMEOUT).await?;
    join_at(shared, hub, addrs, hello, JOIN_TIMEOUT).await
}

/// Dials `hub` (within `dial_within`) and joins the circuit there.
async fn join_at(
    shared: &Shared,
    hub: NodeId,
    addrs: Vec<SocketAddr>,
    hello: CircuitHello,
    dial_within: Duration,
) -> Result<TcpStream, CircuitJoinError> {
    let joined = match dial(shared, hub, addrs, dial_within).await {
        Ok(tcp) => pair(tcp, &hello).await,
        Err(e) => Err(e),
    };
    paused_if_unavailable(shared, joined)
}

/// Pauses circuits at this node when `joined` says the hub offers none.
fn paused_if_unavailable(
    shared: &Shared,
    joined: Result<TcpStream, CircuitJoinError>,
) -> Result<TcpStream, CircuitJoinError> {
    if let Err(e) = &joined {
        if e.unavailable {
            shared.circuit_gate.pause(&e.why);
        }
    }
    joined
}

/// Dials `hub` at `addrs` on its circuit port: an authenticated connection
/// in plaintext mode (the hub hands the socket to the kernel, and what
/// crosses it is encrypted end to end).
async fn dial(
    shared: &Shared,
    hub: NodeId,
    addrs: Vec<SocketAddr>,
    timeout: Duration,
) -> Result<TcpStream, CircuitJoinError> {
    let target = VirtualAddr::new(hub, CIRCUIT_VPORT).with_direct(addrs);
    let settings = RaceSettings {
        options: InitiatorOptions {
            plaintext: true,
            ..shared.initiator_options()
        },
        attempt_delay: shared.attempt_delay,
        timeout,
        module: SetupModule::Direct,
        first: None,
    };
    let stream = match shared.direct_connect(&target, settings).await {
        Ok(s) => s,
        // No circuit port there: a hub that offers none.
        Err(crate::error::ConnectError::Refused { refusal, .. }) => {
            return Err(CircuitJoinError {
                why: format!("the hub refused the circuit connection: {refusal:?}"),
                unavailable: true,
            })
        }
        Err(e) => return Err(format!("dialling the hub: {e}").into()),
    };
    stream.into_plain_tcp().ok_or_else(|| {
        "the hub did not grant a plaintext circuit connection"
            .to_string()
            .into()
    })
}

/// Sends `hello` on a connection to a hub's circuit port and waits for the
/// hub's answer ([`await_pairing`]).
async fn pair(tcp: TcpStream, hello: &CircuitHello) -> Result<TcpStream, CircuitJoinError> {
    await_pairing(present(tcp, hello).await?).await
}

/// Sends `hello` on a connection to a hub's circuit port, within
/// [`JOIN_TIMEOUT`].
async fn present(mut tcp: TcpStream, hello: &CircuitHello) -> Result<TcpStream, CircuitJoinError> {
    match tokio::time::timeout(JOIN_TIMEOUT, tcp.write_all(&hello.encode())).await {
        Ok(Ok(())) => Ok(tcp),
        Ok(Err(e)) => Err(format!("sending the circuit hello: {e}").into()),
        Err(_) => Err("sending the circuit hello timed out".to_string().into()),
    }
}

/// Waits on a connection to a hub's circuit port, whose hello went out,
/// until the hub pairs it (or refuses); the connection, from then on a pipe
/// to the circuit's other end.
pub(crate) async fn await_pairing(mut tcp: TcpStream) -> Result<TcpStream, CircuitJoinError> {
    let paired = async {
        let status = tcp.read_u8().await?;
        let len = if CircuitAnswer::has_reason(status) {
            tcp.read_u8().await?
        } else {
            0
        };
        match CircuitAnswer::reason_len(status, len) {
            Ok(None) => std::io::Result::Ok(Ok(())),
            Ok(Some(n)) => {
                let mut reason = vec![0u8; n];
                tcp.read_exact(&mut reason).await?;
                Ok(Err(CircuitJoinError {
                    why: format!(
                        "the hub refused the circuit: {}",
                        String::from_utf8_lossy(&reason)
                    ),
                    unavailable: CircuitAnswer::is_unavailable(status),
                }))
            }
            Err(other) => Ok(Err(format!("the hub answered with status {other}").into())),
        }
    };
    match tokio::time::timeout(JOIN_TIMEOUT, paired).await {
        Ok(Ok(Ok(()))) => Ok(tcp),
        Ok(Ok(Err(refused))) => Err(refused),
        Ok(Err(e)) => Err(format!("waiting for the hub to pair the circuit: {e}").into()),
        Err(_) => {
            Err(format!("the other node did not join the circuit within {JOIN_TIMEOUT:?}").into())
        }
    }
}

/// A hub's side of a circuit it carries on: dials the next hub `hub` at
/// `addrs` and sends it `hello` (the next leg's); the connection once that
/// hub has paired or carried it on in turn.
pub(crate) async fn leg(
    shared: &Shared,
    hub: NodeId,
    addrs: Vec<SocketAddr>,
    hello: CircuitHello,
) -> Result<TcpStream, CircuitJoinError> {
    let tcp = dial(shared, hub, addrs, JOIN_TIMEOUT).await?;
    pair(tcp, &hello).await
}

/// A hub's side of a circuit leg another hub asked it to carry (the asking
/// hub could not dial it): dials `hub` at `addrs` and presents `hello`
/// (marked pulled); the connection, on which this hub then answers as if
/// the leg had arrived from `hub`.
pub(crate) async fn pulled_leg(
    shared: &Shared,
    hub: NodeId,
    addrs: Vec<SocketAddr>,
    hello: CircuitHello,
) -> Result<TcpStream, CircuitJoinError> {
    present(dial(shared, hub, addrs, JOIN_TIMEOUT).await?, &hello).await
}

/// Moves the routed stream with upgrade id `id` to `peer` onto a circuit at
/// this node's hub: offers it, joins it and runs the upgrade handshake over
/// it. The new path, or why not.
pub(crate) async fn open(shared: &Arc<Shared>, peer: NodeId, id: u16) -> Result<NewPath, String> {
    // Before the offer: a paused node does not make its peer work either.
    if shared.circuit_gate.paused() {
        return Err("the hub offered no circuits lately".into());
    }
    let (session, link) = shared.hub_link().await.map_err(|e| e.to_string())?;
    let hub = link.status().hub;
    let addrs = vec![link.status().remote];
    // The ticket starts with an offer token, so that a peer that cannot
    // join can say so at once (`ticket_token`).
    let (token, declined) = shared.offers.register(peer).map_err(|e| e.to_string())?;
    let mut ticket = [0u8; TICKET_LEN];
    getrandom::fill(&mut ticket).map_err(|e| e.to_string())?;
    ticket[..4].copy_from_slice(&token.to_le_bytes());
    let offer = Rendezvous::CircuitOffer {
        ticket,
        upgrade: id,
        hub,
        addrs: addrs.clone(),
    };
    if !session.relay(peer, offer) {
        shared.offers.remove(peer, token);
        return Err("the hub link went down".into());
    }
    let hello = CircuitHello {
        ticket,
        from: shared.secret.node_id(),
        peer,
        toward: None,
        hops: MAX_HOPS,
        pulled: false,
    };
    let joined = tokio::select! {
        joined = join(shared, hub, addrs, hello) => joined.map_err(|e| e.why),
        Ok(Err(refusal)) = declined => Err(format!("the other node cannot join: {refusal:?}")),
    };
    shared.offers.remove(peer, token);
    let mut tcp = joined?;
    let started = Instant::now();
    let options = InitiatorOptions {
        upgrade: true,
        ..shared.initiator_options()
    };
    let hs = initiate(&mut tcp, shared.me(), peer, id, options);
    let est = match tokio::time::timeout(shared.handshake_timeout, hs).await {
        Ok(Ok(est)) => est,
        Ok(Err(e)) => return Err(format!("the upgrade handshake failed: {e}")),
        Err(_) => return Err("the upgrade handshake timed out".into()),
    };
    let stream = ReachStream::over_tcp(tcp, est, SetupModule::Routed, Direction::Outbound, started)
        .map_err(|e| e.to_string())?;
    stream
        .into_new_path()
        .ok_or_else(|| "the circuit is not encrypted".to_string())
}

/// Answers `offer`: joins the circuit if the routed stream it names is
/// here, and takes the stream over once the peer's upgrade handshake
/// arrives on it.
pub(crate) async fn answer(shared: Arc<Shared>, offer: CircuitOffer) {
    let (from, id) = (offer.from, offer.upgrade);
    let decline = |reason: &str| {
        tracing::debug!(%from, "circuit offer declined: {reason}");
        if let Some(session) = &shared.session {
            let token = ticket_token(&offer.ticket);
            let reason = reason.to_string();
            session.relay(from, Rendezvous::SpliceDeclined { token, reason });
        }
    };
    if !shared.circuits {
        return decline("circuits are off here");
    }
    // A circuit is for a stream still open (unlike a direct path, it
    // teaches the module cache nothing).
    let registered = crate::stream::upgrade::lookup_soon(
        &shared.upgrades,
        from,
        id,
        crate::stream::upgrade::REGISTER_WAIT,
    )
    .await;
    if registered.is_none() || !crate::stream::upgrade::is_live(&shared.upgrades, from, id) {
        return decline("no such stream here");
    }
    let started = Instant::now();
    let mut tcp = match join_offered(&shared, &offer).await {
        Ok(tcp) => tcp,
        Err(e) => return decline(&e.why),
    };
    let mut moving = None;
    let admit = |k: &Knock<'_>| {
        // A circuit carries the offered stream, nothing else.
        if !k.hello.upgrade || k.peer != from || k.hello.port != id {
            return Admission::Refuse(Refusal::NotAdmitted);
        }
        shared.admit_inbound(k, &mut moving)
    };
    let hs = respond(&mut tcp, shared.responder(), admit);
    let est = match tokio::time::timeout(shared.handshake_timeout, hs).await {
        Ok(est) => est,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the upgrade handshake over the circuit timed out",
        )
        .into()),
    };
    if let Err(e) = shared
        .finish_inbound(tcp, est, moving, SetupModule::Routed, started)
        .await
    {
        tracing::debug!(%from, "stream stays routed: {e}");
    }
}

/// Joins the circuit `offer` names: at the offering node's hub when this node
/// can reach it (one relay), else at this node's own hub, which carries the
/// circuit on, hub by hub, to the offering node's hub
/// ([`CircuitHello::toward`]).
async fn join_offered(
    shared: &Shared,
    offer: &CircuitOffer,
) -> Result<TcpStream, CircuitJoinError> {
    let hello = CircuitHello {
        ticket: offer.ticket,
        from: shared.secret.node_id(),
        peer: offer.from,
        toward: None,
        hops: MAX_HOPS,
        pulled: false,
    };
    let own = shared.hub_link().await.ok().map(|(_, link)| {
        let status = link.status();
        (status.hub, status.remote)
    });
    let _turn = shared.circuit_gate.turn(JOIN_TIMEOUT).await?;
    let Some((own_hub, own_addr)) = own.filter(|(hub, _)| *hub != offer.hub) else {
        return join_at(shared, offer.hub, offer.addrs.clone(), hello, JOIN_TIMEOUT).await;
    };
    match dial(shared, offer.hub, offer.addrs.clone(), OFFERED_HUB_DIAL).await {
        Ok(tcp) => paused_if_unavailable(shared, pair(tcp, &hello).await),
        Err(e) => {
            tracing::debug!(hub = %offer.hub, "the offering node's hub is out of reach ({e}); joining at this node's hub");
            let hello = CircuitHello {
                toward: Some(offer.hub),
                ..hello
            };
            join_at(shared, own_hub, vec![own_addr], hello, JOIN_TIMEOUT).await
        }
    }
}
