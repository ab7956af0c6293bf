//! The setup driver: tries the connection-setup modules in order, each within
//! a time budget, and caches the winner per target (SmartSockets section 3.2).
//!
//! Better than the paper's driver in two ways: a module that cannot work is
//! skipped instead of burning its timeout (Direct without any address, Reverse
//! or Routed without a hub session, Reverse when we advertise no address), and
//! the cached module is tried first, so repeated connections to a node behind
//! a dropping firewall cost no timeout once the cache knows better. A cached
//! module that fails is dropped from the cache and the full order runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use reach_proto::candidates::{classify, plausibly_reachable, AddrClass};
use reach_proto::handshake::HandshakeError;
use reach_proto::link::ConnectBack;
use reach_proto::{NodeId, VirtualAddr};

use crate::direct::{self, RaceSettings};
use crate::endpoint::Shared;
use crate::error::{AttemptError, ConnectError, ModuleFailure};
use crate::handshake::initiate;
use crate::setup_module::SetupModule;
use crate::stream::{Direction, ReachStream};
mod upgrade;

use upgrade::{upgradable, upgrade_modules};

/// How long `connect` waits for a hub session that is still coming up.
const SESSION_WAIT: Duration = Duration::from_secs(3);
/// How long a directory lookup may take.
pub(crate) const LOOKUP_BUDGET: Duration = Duration::from_secs(2);

/// Connects to `target` within `timeout`.
pub(crate) async fn connect(
    shared: &Arc<Shared>,
    target: &VirtualAddr,
    timeout: Duration,
) -> Result<ReachStream, ConnectError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let Some(session) = &shared.session else {
        // No hub: the Direct module is all there is.
        let stream = direct::connect(
            &shared.secret,
            &shared.local_addrs.get(),
            target,
            race_settings(shared, &target.node, timeout),
        )
        .await?;
        shared
            .cache
            .set_addr(target.node, stream.info().remote_addr);
        return Ok(stream);
    };
    let node = target.node;
    let mut target = target.clone();
    let link = session
        .wait_link(deadline.min(started + SESSION_WAIT))
        .await
        .ok();
    // The directory is asked for the target's addresses only when Direct's
    // turn comes, so a cached Routed or Reverse spends no round trip on it.
    let mut looked_up = !target.direct.is_empty() || link.is_none();
    // Where the target's hub sees it: tells whether it shares our NAT.
    let mut target_seen_at = None;
    let seen_at = link.as_ref().map(|l| l.status().observed);
    let cached = shared.cache.get(&node);
    let order: Vec<SetupModule> = cached
        .into_iter()
        .chain(
            shared
                .modules
                .iter()
                .copied()
                .filter(|m| Some(*m) != cached),
        )
        .collect();
    let mut failures = Vec::new();
    // Modules that ran and failed (skipped ones are only in `failures`).
    let mut failed_before = Vec::new();
    for (i, module) in order.iter().copied().enumerate() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let remaining = deadline - now;
        let last = i + 1 == order.len();
        let skip = |why: &str| ModuleFailure {
            module,
            error: format!("skipped: {why}"),
        };
        // Reverse needs to know where the target is when this node is
        // behind a NAT: an address in the virtual address does not say.
        let reverse_needs_site = module == SetupModule::Reverse
            && target_seen_at.is_none()
            && behind_nat(shared, seen_at);
        if (module == SetupModule::Direct && !looked_up) || reverse_needs_site {
            looked_up = true;
            match session
                .lookup(node, deadline.min(Instant::now() + LOOKUP_BUDGET))
                .await
            {
                Ok(Some(entry)) => {
                    if target.direct.is_empty() || module == SetupModule::Direct {
                        target.direct = entry.addrs;
                    }
                    target_seen_at = Some(entry.observed);
                }
                Ok(None) => tracing::debug!(%node, "no hub knows the node"),
                Err(e) => tracing::debug!(%node, "lookup failed: {e}"),
            }
        }
        let result = match module {
            SetupModule::Direct if target.direct.is_empty() => {
                failures.push(skip("no direct address known"));
                continue;
            }
            SetupModule::Direct => {
                let local = shared.local_addrs.get();
                let plausible = target
                    .direct
                    .iter()
                    .any(|a| plausibly_reachable(a.ip(), &local));
                let budget = match (last, plausible) {
                    (true, _) => remaining,
                    (false, true) => remaining.min(shared.direct_budget),
                    // Only other networks' private addresses (a target behind
                    // a NAT, seen from outside its LAN): such attempts fail at
                    // once or are dropped, so they get a short budget.
                    (false, false) => remaining
                        .min(shared.direct_budget)
                        .min(UNLIKELY_DIRECT_BUDGET),
                };
                direct::connect(
                    &shared.secret,
                    &shared.local_addrs.get(),
                    &target,
                    race_settings(shared, &node, budget),
                )
                .await
                .map_err(|e| match e {
                    refused @ ConnectError::Refused { .. } => Err(refused),
                    other => Ok(other.to_string()),
                })
            }
            SetupModule::Reverse | SetupModule::Splice | SetupModule::Routed if link.is_none() => {
                failures.push(skip("no hub session"));
                continue;
            }
            SetupModule::Reverse if shared.advertised.is_empty() => {
                failures.push(skip("this node advertises no address to connect back to"));
                continue;
            }
            SetupModule::Reverse if !reverse_plausible(shared, seen_at, target_seen_at) => {
                failures.push(skip(
                    "this node is behind a NAT and the target is not on its network",
                ));
                continue;
            }
            SetupModule::Reverse => {
                let budget = if last {
                    remaining
                } else {
                    remaining.min(shared.reverse_budget)
                };
                reverse(shared, &target, budget, started).await.map_err(Ok)
            }
            SetupModule::Splice => {
                let budget = if last {
                    remaining
                } else {
                    remaining.min(shared.splice_budget)
                };
                let options = shared.initiator_options();
                crate::splice::connect(shared, &target, options, budget, started).await
            }
            SetupModule::Routed => {
                let upgrade_to =
                    upgrade_modules(shared, node, i == 0 && cached.is_some(), &failed_before);
                routed(shared, &target, remaining, started)
                    .await
                    .map(|s| upgradable(shared, s, &target, upgrade_to))
            }
        };
        match result {
            Ok(mut stream) => {
                shared.cache.set(node, Some(module));
                if module == SetupModule::Direct {
                    shared.cache.set_addr(node, stream.info().remote_addr);
                }
                stream.info_mut().failed_before = failed_before;
                return Ok(stream);
            }
            Err(Err(refused)) => return Err(refused),
            Err(Ok(error)) => {
                if cached == Some(module) {
                    shared.cache.set(node, None);
                }
                tracing::debug!(%node, %module, %error, "setup module failed");
                failed_before.push(module);
                failures.push(ModuleFailure { module, error });
            }
        }
    }
    Err(ConnectError::Unreachable {
        node,
        after: started.elapsed(),
        modules: failures,
    })
}

/// Direct's budget when the target advertises only private addresses of
/// networks this host is not on: enough for a routed private network (a
/// campus, a VPN), far less than a dropped SYN's timeout.
const UNLIKELY_DIRECT_BUDGET: Duration = Duration::from_millis(500);

/// Whether this node is behind a NAT with only private addresses to
/// advertise: the hub sees it at an address that is not its own.
fn behind_nat(shared: &Shared, seen_at: Option<SocketAddr>) -> bool {
    let Some(ours) = seen_at else {
        return false;
    };
    let natted = !shared.local_addrs.get().iter().any(|l| l.ip == ours.ip());
    natted
        && shared
            .advertised
            .iter()
            .all(|a| matches!(classify(a.ip()), AddrClass::Private | AddrClass::Shared))
}

/// Whether the target could connect back to an address we advertise. Not
/// when we are behind a NAT with private addresses only and the target's hub
/// sees it at another public address (another site): our LAN addresses are
/// useless there, and the attempt would cost the whole Reverse budget.
fn reverse_plausible(
    shared: &Shared,
    seen_at: Option<SocketAddr>,
    target_seen_at: Option<SocketAddr>,
) -> bool {
    match (seen_at, target_seen_at) {
        (Some(ours), Some(theirs)) => !(behind_nat(shared, seen_at) && ours.ip() != theirs.ip()),
        _ => true,
    }
}

pub(crate) fn race_settings(shared: &Shared, node: &NodeId, timeout: Duration) -> RaceSettings {
    RaceSettings {
        options: shared.initiator_options(),
        attempt_delay: shared.attempt_delay,
        timeout,
        module: SetupModule::Direct,
        first: shared.cache.addr(node),
    }
}

/// Asks the target, through the hubs, to connect to us, and waits for it.
async fn reverse(
    shared: &Arc<Shared>,
    target: &VirtualAddr,
    budget: Duration,
    started: Instant,
) -> Result<ReachStream, String> {
    let (session, link) = shared.hub_link().await?;
    let mut b = [0u8; 2];
    let wait = loop {
        getrandom::fill(&mut b).map_err(|e| e.to_string())?;
        if let Some(w) = shared.expect_connect_back(target.node, u16::from_le_bytes(b)) {
            break w;
        }
    };
    session.connect_back(
        &link,
        ConnectBack {
            from: shared.secret.node_id(),
            target: target.node,
            token: wait.token(),
            vport: target.port,
            addrs: shared.advertised.clone(),
        },
    );
    let mut stream = wait.wait(budget).await.map_err(|e| e.to_string())?;
    let info = stream.info_mut();
    info.virtual_port = target.port;
    info.setup_time = started.elapsed();
    Ok(stream)
}

/// Opens a routed stream through the hubs and runs the handshake over it.
async fn routed(
    shared: &Arc<Shared>,
    target: &VirtualAddr,
    budget: Duration,
    started: Instant,
) -> Result<ReachStream, Result<String, ConnectError>> {
    let (session, link) = shared.hub_link().await.map_err(Ok)?;
    let me = shared.secret.node_id();
    let (mut rs, addrs) = session.open(&link, &me, &target.node);
    let hs = initiate(
        &mut rs,
        &shared.secret,
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
        Ok(Err(AttemptError::Handshake(HandshakeError::Refused(refusal)))) => {
            Err(Err(ConnectError::Refused {
                node: target.node,
                refusal,
            }))
        }
        Ok(Err(e)) => Err(Ok(e.to_string())),
        Err(_) => Err(Ok(format!("no handshake answer within {budget:?}"))),
    }
}
