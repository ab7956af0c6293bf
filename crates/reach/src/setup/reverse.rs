//! The Reverse module, both sides: the asker sends a connect-back request
//! through the hubs and waits for the target's connection; the target,
//! asked, dials the asker's advertised addresses.
//!
//! ```text
//!  asker: connect ---- ConnectBack{token} via hubs ---> target: answer
//!         waits on (target, token) in Shared  <--- TCP + handshake (reverse)
//! ```
//! A failure on the target's side travels back as `ConnectBackFailed`, so
//! the asker gives up at once instead of at its budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_proto::handshake::{Admission, InitiatorOptions};
use reach_proto::link::ConnectBack;
use reach_proto::setup_plan::SetupModule;
use reach_proto::VirtualAddr;

use crate::direct::RaceSettings;
use crate::error::ModuleError;
use crate::hub_session::Session;
use crate::node::Shared;
use crate::stream::ReachStream;

/// How long a node tries to connect back to a node that asked.
const CONNECT_BACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the target, through the hubs, to connect to us, and waits for it.
/// With `upgrade`, the connection is to carry the routed stream with that
/// upgrade id (the target hands it to that stream, not to `accept`).
pub(super) async fn connect(
    shared: &Arc<Shared>,
    target: &VirtualAddr,
    budget: Duration,
    started: Instant,
    upgrade: Option<u16>,
) -> Result<ReachStream, ModuleError> {
    let (session, _) = shared.hub_link().await?;
    let mut b = [0u8; 2];
    let wait = loop {
        getrandom::fill(&mut b).map_err(ModuleError::Random)?;
        if let Some(w) = shared.expect_connect_back(target.node, u16::from_le_bytes(b)) {
            break w;
        }
    };
    let asked = session.connect_back(ConnectBack {
        from: shared.secret.node_id(),
        target: target.node,
        token: wait.token(),
        vport: target.port,
        addrs: shared.advertised.get(),
        upgrade,
    });
    if !asked {
        return Err(ModuleError::LinkLost);
    }
    let mut stream = wait.wait(budget).await?;
    let info = stream.info_mut();
    info.virtual_port = target.port;
    info.setup_time = started.elapsed();
    Ok(stream)
}

/// Answers a connect-back request: dials the asker and hands the stream to
/// this endpoint's `accept`, or, for an upgrade, to the routed stream it
/// takes over.
pub(crate) async fn answer(shared: &Shared, session: &Arc<Session>, cb: ConnectBack) {
    let fail = |reason: String| session.connect_back_failed(cb.from, cb.token, reason);
    // An upgrade carries a stream admitted when it was opened: no port or
    // policy check, but it must exist.
    let moving = match cb.upgrade {
        Some(id) => match crate::stream::upgrade::lookup_soon(
            &shared.upgrades,
            cb.from,
            id,
            crate::stream::upgrade::REGISTER_WAIT,
        )
        .await
        {
            Some(slot) => Some(slot),
            None => {
                fail("no such stream to move here".into());
                return;
            }
        },
        None => None,
    };
    if moving.is_none() {
        if shared.admit_port(cb.vport) != Admission::Accept {
            tracing::debug!(from = %cb.from, vport = cb.vport, "not connecting back: port not served");
            fail(format!("no service on virtual port {}", cb.vport));
            return;
        }
        // Checked before dialling on the hub's word for who asked, and again
        // below on the identity (and membership) the handshake proves.
        if !shared.may_admit(&cb.from, cb.vport) {
            shared.admit_peer(&cb.from, false, cb.vport, "connect-back");
            fail("the node's access policy does not admit you".into());
            return;
        }
    }
    let mut addrs = cb.addrs;
    addrs.truncate(reach_proto::link::MAX_NODE_ADDRS);
    let target = VirtualAddr::new(cb.from, cb.token).with_direct(addrs);
    let settings = RaceSettings {
        options: InitiatorOptions {
            reverse: true,
            ..shared.initiator_options()
        },
        attempt_delay: shared.attempt_delay,
        timeout: CONNECT_BACK_TIMEOUT,
        module: SetupModule::Reverse,
        first: shared.cache.addr(&cb.from),
    };
    if let Some(slot) = &moving {
        slot.begin();
    }
    let made = shared.direct_connect(&target, settings).await;
    if let Some(slot) = moving {
        // `target` is the asker's NodeId: the handshake proved it.
        match made.map(ReachStream::into_new_path) {
            Ok(Some(path)) => {
                tracing::debug!(peer = %cb.from, "routed stream moving to a connect-back");
                slot.attach(path);
            }
            Ok(None) => {
                slot.fail("the connect-back is not encrypted".into());
                fail("the connect-back is not encrypted".into());
            }
            Err(e) => {
                slot.fail(e.to_string());
                fail(format!("the node could not connect back: {e}"));
            }
        }
        return;
    }
    match made {
        Ok(stream)
            if !shared.admit_peer(
                &cb.from,
                stream.info().peer_member,
                cb.vport,
                "connect-back",
            ) =>
        {
            drop(stream);
            fail("the node's access policy does not admit you".into());
        }
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
