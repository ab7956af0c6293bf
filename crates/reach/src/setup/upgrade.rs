//! When a routed stream tries to move, and the background task that makes
//! the new connection (Direct or Splice, with `FLAG_UPGRADE`; Reverse, a
//! connect-back that names the stream; when none works or none is to be
//! tried, a relay circuit at the hub, `circuit`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_proto::handshake::InitiatorOptions;
use reach_proto::setup_plan::{self, SetupModule};
use reach_proto::{NodeId, VirtualAddr};

use crate::direct::RaceSettings;
use crate::node::Shared;
use crate::stream::upgrade::Slot;
use crate::stream::ReachStream;

/// How often a target whose routed stream came from the cache is offered an
/// upgrade: the pair may have become able to splice (a NAT or firewall
/// changed), but one that cannot should not be tried on every connection.
const RETRY_UPGRADE_AFTER: Duration = Duration::from_secs(60);

/// How long a routed stream must live before it moves onto a relay circuit:
/// a circuit costs three handshakes (each node with the hub, then end to
/// end), wasted on a request that is answered and closed within this.
const CIRCUIT_AFTER: Duration = Duration::from_millis(50);

/// The modules that may move a routed stream to `node` in the background:
/// those after Routed in the configured order; and, when Routed was tried
/// first because the cache said so, the Direct, Reverse and Splice the order has
/// before it (none of them ran), at most every [`RETRY_UPGRADE_AFTER`].
pub(crate) fn upgrade_modules(
    shared: &Shared,
    node: NodeId,
    from_cache: bool,
    failed_before: &[SetupModule],
) -> Vec<SetupModule> {
    let movers = |m: &&SetupModule| {
        matches!(
            m,
            SetupModule::Direct | SetupModule::Reverse | SetupModule::Splice
        )
    };
    let after: Vec<SetupModule> = shared
        .modules
        .iter()
        .skip_while(|m| **m != SetupModule::Routed)
        .filter(movers)
        .filter(|m| !failed_before.contains(*m))
        .copied()
        .collect();
    if !after.is_empty() || !from_cache {
        return after;
    }
    let now = Instant::now();
    let mut tried = shared
        .upgrades_tried
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    tried.retain(|_, at| now.saturating_duration_since(*at) < RETRY_UPGRADE_AFTER);
    if tried.contains_key(&node) {
        return Vec::new();
    }
    tried.insert(node, now);
    shared
        .modules
        .iter()
        .take_while(|m| **m != SetupModule::Routed)
        .filter(movers)
        .copied()
        .collect()
}

/// Starts moving an encrypted routed stream to a connection made by
/// `modules` (tried in order in the background), else to a relay circuit
/// at the hub; the stream carries on routed until one works, and for good
/// if none does.
/// With `settle_cache`, the cache learns where the stream ends up: Routed
/// if nothing moves it (a first connection that Routed won, whose cache
/// entry waited for this).
pub(crate) fn upgradable(
    shared: &Arc<Shared>,
    stream: ReachStream,
    target: &VirtualAddr,
    modules: Vec<SetupModule>,
    settle_cache: bool,
) -> ReachStream {
    let id = stream.upgrade_id();
    let Some(id) = id.filter(|_| !modules.is_empty() || shared.circuits) else {
        if settle_cache {
            shared.cache.set(target.node, Some(SetupModule::Routed));
        }
        return stream;
    };
    let slot = Slot::default();
    slot.begin();
    let target = VirtualAddr {
        port: id,
        ..target.clone()
    };
    tokio::spawn(upgrade(
        shared.clone(),
        target,
        modules,
        slot.clone(),
        settle_cache,
    ));
    stream.into_upgradable(slot, None)
}

/// Makes a connection for the routed stream with upgrade id `target.port`.
async fn upgrade(
    shared: Arc<Shared>,
    mut target: VirtualAddr,
    modules: Vec<SetupModule>,
    slot: Slot,
    settle_cache: bool,
) {
    let begun = Instant::now();
    if !shared.upgrade_after.is_zero() {
        tokio::time::sleep(shared.upgrade_after).await;
        if slot.abandoned() {
            slot.fail("the stream ended before it could move".into());
            return;
        }
    }
    // Where the target is (its addresses for Direct, its site for Reverse),
    // from the directory.
    let mut target_seen_at = None;
    let wants_entry = modules.contains(&SetupModule::Reverse)
        || (target.direct.is_empty() && modules.contains(&SetupModule::Direct));
    if let (true, Some(session)) = (wants_entry, &shared.session) {
        let deadline = Instant::now() + super::LOOKUP_BUDGET;
        if let Ok(Some(entry)) = session.lookup(target.node, deadline).await {
            if target.direct.is_empty() {
                target.direct = entry.addrs;
            }
            target_seen_at = Some(entry.observed);
        }
    }
    // The setup driver's planner decides skips (no connect-back from behind
    // a NAT to another network, say) and budgets here too.
    let site = shared.site(
        shared
            .session
            .as_ref()
            .and_then(|s| s.status())
            .map(|s| s.observed),
    );
    let budgets = shared.budgets();
    // Each module within its own budget: no overall deadline in the background.
    let longest = budgets.direct.max(budgets.reverse).max(budgets.splice);
    let options = InitiatorOptions {
        upgrade: true,
        ..shared.initiator_options()
    };
    let mut failures = Vec::new();
    for module in modules {
        let facts = setup_plan::Facts {
            site: &site,
            target_addrs: &target.direct,
            target_seen_at,
            hub_session: shared.session.is_some(),
        };
        let budget = match setup_plan::plan(module, &facts, longest, false, &budgets) {
            Ok(budget) => budget,
            Err(skip) => {
                failures.push(format!("{module}: {skip}"));
                continue;
            }
        };
        let made = match module {
            SetupModule::Direct => {
                let settings = RaceSettings {
                    options,
                    ..super::race_settings(&shared, &target.node, budget)
                };
                shared
                    .direct_connect(&target, settings)
                    .await
                    .map_err(|e| e.to_string())
            }
            SetupModule::Reverse => {
                let id = Some(target.port);
                super::reverse::connect(&shared, &target, budget, Instant::now(), id)
                    .await
                    .map_err(|e| e.to_string())
            }
            SetupModule::Splice => {
                crate::splice::connect(&shared, &target, options, budget, Instant::now())
                    .await
                    .map_err(|e| e.to_string())
            }
            SetupModule::Routed => continue,
        };
        match made.map(ReachStream::into_new_path) {
            Ok(Some(path)) => {
                tracing::debug!(node = %target.node, %module, "upgrade connection made");
                // The next connection to the node goes this way at once.
                shared.cache.set(target.node, Some(module));
                if module == SetupModule::Direct {
                    shared.cache.set_addr(target.node, path.remote);
                }
                slot.attach(path);
                return;
            }
            Ok(None) => failures.push(format!("{module}: not encrypted")),
            Err(e) => failures.push(format!("{module}: {e}")),
        }
    }
    if settle_cache {
        // Nothing better than Routed: the next connection goes there at
        // once (and is offered upgrades now and then, see above).
        shared.cache.set(target.node, Some(SetupModule::Routed));
    }
    slot.modules_done();
    if shared.circuits {
        // The stream may have lived that long already (the modules above).
        tokio::time::sleep_until((begun + CIRCUIT_AFTER).into()).await;
        if slot.abandoned() {
            slot.fail("the stream ended before it could move".into());
            return;
        }
        match crate::circuit::open(&shared, target.node, target.port).await {
            Ok(path) => {
                tracing::debug!(node = %target.node, hub = %path.remote, "moved onto a relay circuit");
                slot.attach(path);
                return;
            }
            Err(e) => failures.push(format!("circuit: {e}")),
        }
    }
    tracing::debug!(node = %target.node, ?failures, "stream stays routed");
    slot.fail(failures.join("; "));
}
