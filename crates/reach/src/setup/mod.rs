//! The setup driver: tries the connection-setup modules in order, each within
//! a time budget, and caches the winner per target (SmartSockets section 3.2).
//!
//! ```text
//!  connect(target) --> order (cached first) --> for each module:
//!     facts: lookup (when Direct's turn comes, or Reverse needs the
//!            target's site), hub session, where the hubs see us
//!     reach_proto::setup_plan::plan(facts) --> Skip(reason) | Run(budget)
//!     run it (direct / reverse / splice / routed) --> stream: cache, return
//!                                                 --> failure: record, next
//! ```
//! The decisions (order, skips, budgets) are the sans-IO planner's, tested
//! there; this module gathers facts and does the I/O. Each module lives
//! under its name, both its sides: `crate::direct` (the connection race),
//! `reverse`, `crate::splice`, `routed`; `upgrade` moves a routed stream to
//! a direct path later. Better than the
//! paper's driver in two ways: a module that cannot work is skipped instead
//! of burning its timeout, and the cached module is tried first, so repeated
//! connections to a node behind a dropping firewall cost no timeout once the
//! cache knows better. A cached module that fails is dropped from the cache
//! and the full order runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_proto::setup_plan::{self, Budgets, Facts, SetupModule, Site};
use reach_proto::{NodeId, VirtualAddr};

use crate::direct::{self, RaceSettings};
use crate::error::{ConnectError, ModuleError, ModuleFailure};
use crate::node::Shared;
use crate::stream::ReachStream;
mod reverse;
mod routed;
mod upgrade;

pub(crate) use reverse::answer as answer_connect_back;
pub(crate) use routed::accept as accept_routed;

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
    let site = Site {
        local: shared.local_addrs.get().to_vec(),
        advertised: shared.advertised.clone(),
        seen_at: link.as_ref().map(|l| l.status().observed),
    };
    let budgets = Budgets {
        direct: shared.direct_budget,
        reverse: shared.reverse_budget,
        splice: shared.splice_budget,
    };
    let cached = shared.cache.get(&node);
    let order = setup_plan::order(cached, &shared.modules);
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
        // Reverse needs to know where the target is when this node is
        // behind a NAT: an address in the virtual address does not say.
        let reverse_needs_site =
            module == SetupModule::Reverse && site.reverse_needs_target_site(target_seen_at);
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
        let facts = Facts {
            site: &site,
            target_addrs: &target.direct,
            target_seen_at,
            hub_session: link.is_some(),
        };
        let budget = match setup_plan::plan(module, &facts, remaining, last, &budgets) {
            Ok(budget) => budget,
            Err(skip) => {
                failures.push(ModuleFailure {
                    module,
                    error: skip.into(),
                });
                continue;
            }
        };
        let result = match module {
            SetupModule::Direct => direct::connect(
                &shared.secret,
                &shared.local_addrs.get(),
                &target,
                race_settings(shared, &node, budget),
            )
            .await
            .map_err(|e| match e {
                ConnectError::Refused { refusal, .. } => ModuleError::Refused(refusal),
                other => ModuleError::Direct(Box::new(other)),
            }),
            SetupModule::Reverse => reverse::connect(shared, &target, budget, started, None).await,
            SetupModule::Splice => {
                let options = shared.initiator_options();
                crate::splice::connect(shared, &target, options, budget, started).await
            }
            SetupModule::Routed => {
                let upgrade_to =
                    upgrade_modules(shared, node, i == 0 && cached.is_some(), &failed_before);
                routed::connect(shared, &target, budget, started)
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
            Err(ModuleError::Refused(refusal)) => {
                return Err(ConnectError::Refused { node, refusal })
            }
            Err(error) => {
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

pub(crate) fn race_settings(shared: &Shared, node: &NodeId, timeout: Duration) -> RaceSettings {
    RaceSettings {
        options: shared.initiator_options(),
        attempt_delay: shared.attempt_delay,
        timeout,
        module: SetupModule::Direct,
        first: shared.cache.addr(node),
    }
}
