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
//!
//! A first connection (nothing cached) does not wait for modules that fail
//! slowly: Routed starts beside them after a hedge delay (`race`,
//! `hedge_delay`), and when it wins, the modules it overtook go on as
//! upgrades of the routed stream (`upgrade`); the cache learns where the
//! stream settles.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach_proto::setup_plan::{self, Budgets, Facts, SetupModule, Site};
use reach_proto::{NodeId, VirtualAddr};

use crate::direct::RaceSettings;
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
        let stream = shared
            .direct_connect(target, race_settings(shared, &target.node, timeout))
            .await?;
        shared
            .cache
            .set_addr(target.node, stream.info().remote_addr);
        return Ok(stream);
    };
    let node = target.node;
    let link = session
        .wait_link(deadline.min(started + SESSION_WAIT))
        .await
        .ok();
    let run = Run {
        shared,
        session,
        site: shared.site(link.as_ref().map(|l| l.status().observed)),
        budgets: shared.budgets(),
        cached: shared.cache.get(&node),
        hub_session: link.is_some(),
        started,
        deadline,
        log: Mutex::default(),
    };
    let order = setup_plan::order(run.cached, &shared.modules);
    let routed_at = order.iter().position(|m| *m == SetupModule::Routed);
    let result = match routed_at {
        // A first connection, or a slow cached module: the modules before
        // Routed run in turn while Routed starts after a short delay; see
        // `race`.
        Some(at) if at > 0 && races(run.cached) && run.hub_session => {
            let hedge = hedge_delay(session.link_rtt());
            race(&run, target, &order, at, hedge).await
        }
        _ => run.in_order(target.clone(), &order).await,
    };
    match result {
        Ok(stream) => Ok(stream),
        Err(Some(refused)) => Err(refused),
        Err(None) => Err(ConnectError::Unreachable {
            node,
            after: started.elapsed(),
            modules: run.take_log().failures,
        }),
    }
}

/// Whether a connection whose cached module is `cached` starts Routed
/// beside the modules before it: a first connection (nothing cached), or one
/// whose cached module takes several round trips of the hub path by nature
/// (Reverse asks through the hubs and waits for the connect-back and its
/// handshake; Splice exchanges endpoints through them, then punches), which
/// Routed (one round trip of the hub path) beats: the stream flows routed at
/// once and moves onto the cached module's connection underneath. Direct
/// needs no hubs, and a cached Routed is Routed already.
fn races(cached: Option<SetupModule>) -> bool {
    matches!(
        cached,
        None | Some(SetupModule::Reverse | SetupModule::Splice)
    )
}

/// How long a first connection lets the modules before Routed run alone
/// before Routed starts beside them (happy-eyeballs style, RFC 8305): about
/// what Direct needs when it works (the directory lookup and the TCP and
/// Noise round trips, estimated from the hub link's round trip), and never
/// more than [`MAX_HEDGE`], so a node that can only be reached through the
/// hubs waits at most that much longer than it would once cached.
pub(crate) fn hedge_delay(hub_rtt: Option<Duration>) -> Duration {
    match hub_rtt {
        Some(rtt) => (rtt * 2 + MIN_HEDGE).min(MAX_HEDGE),
        None => DEFAULT_HEDGE,
    }
}

/// The hedge delay's floor (local paths: scheduling, handshake CPU).
const MIN_HEDGE: Duration = Duration::from_millis(25);
/// The hedge delay's ceiling.
const MAX_HEDGE: Duration = Duration::from_millis(250);
/// The hedge delay before the hub link's round trip is known (RFC 8305's
/// recommended connection attempt delay).
const DEFAULT_HEDGE: Duration = Duration::from_millis(250);

/// What failed so far, shared by the modules a race runs side by side.
#[derive(Default)]
struct Log {
    /// Every module that failed or was skipped, with why.
    failures: Vec<ModuleFailure>,
    /// Modules that ran and failed (skipped ones are only in `failures`).
    failed_before: Vec<SetupModule>,
}

/// One `connect`: what the modules need to know, and what failed so far.
struct Run<'a> {
    shared: &'a Arc<Shared>,
    session: &'a Arc<crate::hub_session::Session>,
    site: Site,
    budgets: Budgets,
    cached: Option<SetupModule>,
    hub_session: bool,
    started: Instant,
    deadline: Instant,
    log: Mutex<Log>,
}

impl Run<'_> {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_log(&self) -> Log {
        std::mem::take(&mut *self.log())
    }

    fn failed(&self, module: SetupModule, error: ModuleError, ran: bool) {
        let mut log = self.log();
        if ran {
            log.failed_before.push(module);
        }
        log.failures.push(ModuleFailure { module, error });
    }

    /// Asks the gateway about the target's addresses that are public
    /// addresses of this node's own NAT (DPF's same-network query) and
    /// puts the internal endpoints they forward to first: the target is
    /// behind the same gateway, reached on the LAN, where the NAT would
    /// have had to hairpin. Only a node that speaks to its gateway (port
    /// mapping on) asks.
    async fn resolve_own_nat(&self, target: &mut VirtualAddr) {
        let Some(mapper) = &self.shared.mapper else {
            return;
        };
        for external in self.site.at_own_nat(&target.direct) {
            if let Some(internal) = mapper.same_network(external).await {
                if !target.direct.contains(&internal) {
                    tracing::debug!(node = %target.node, %external, %internal, "behind the same gateway: the internal endpoint goes first");
                    target.direct.insert(0, internal);
                }
            }
        }
    }

    /// Tries `order` in turn: the first stream, `Err(Some(_))` when the
    /// target refused (no point going on), `Err(None)` when every module
    /// failed (see the log).
    async fn in_order(
        &self,
        mut target: VirtualAddr,
        order: &[SetupModule],
    ) -> Result<ReachStream, Option<ConnectError>> {
        let (shared, node) = (self.shared, target.node);
        // The directory is asked for the target's addresses only when
        // Direct's turn comes, so a cached Routed or Reverse spends no round
        // trip on it.
        let mut looked_up = !target.direct.is_empty() || !self.hub_session;
        // Where the target's hub sees it: tells whether it shares our NAT.
        let mut target_seen_at = None;
        for (i, module) in order.iter().copied().enumerate() {
            let now = Instant::now();
            if now >= self.deadline {
                break;
            }
            let remaining = self.deadline - now;
            let last = i + 1 == order.len();
            // Reverse needs to know where the target is when this node is
            // behind a NAT: an address in the virtual address does not say.
            let reverse_needs_site = module == SetupModule::Reverse
                && self.site.reverse_needs_target_site(target_seen_at);
            // Hints that are only other networks' private addresses (the
            // address was taken before the target's gateway mapped a port,
            // say) send Direct to the directory, which knows more.
            let hints_unlikely = module == SetupModule::Direct
                && self.hub_session
                && !target.direct.iter().any(|a| {
                    reach_proto::candidates::plausibly_reachable(a.ip(), &self.site.local)
                });
            if (module == SetupModule::Direct && (!looked_up || hints_unlikely))
                || reverse_needs_site
            {
                looked_up = true;
                match self
                    .session
                    .lookup(node, self.deadline.min(Instant::now() + LOOKUP_BUDGET))
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
            if module == SetupModule::Direct {
                self.resolve_own_nat(&mut target).await;
            }
            let facts = Facts {
                site: &self.site,
                target_addrs: &target.direct,
                target_seen_at,
                hub_session: self.hub_session,
            };
            let budget = match setup_plan::plan(module, &facts, remaining, last, &self.budgets) {
                Ok(budget) => budget,
                Err(skip) => {
                    self.failed(module, skip.into(), false);
                    continue;
                }
            };
            let result = match module {
                SetupModule::Direct => shared
                    .direct_connect(&target, race_settings(shared, &node, budget))
                    .await
                    .map_err(|e| match e {
                        ConnectError::Refused { refusal, .. } => ModuleError::Refused(refusal),
                        other => ModuleError::Direct(Box::new(other)),
                    }),
                SetupModule::Reverse => {
                    reverse::connect(shared, &target, budget, self.started, None).await
                }
                SetupModule::Splice => {
                    let options = shared.initiator_options();
                    crate::splice::connect(shared, &target, options, budget, self.started).await
                }
                SetupModule::Routed => {
                    let failed_before = self.log().failed_before.clone();
                    let from_cache = i == 0 && self.cached.is_some();
                    let upgrade_to = upgrade_modules(shared, node, from_cache, &failed_before);
                    routed::connect(shared, &target, budget, self.started)
                        .await
                        .map(|s| upgradable(shared, s, &target, upgrade_to, false))
                }
            };
            match result {
                Ok(mut stream) => {
                    shared.cache.set(node, Some(module));
                    if module == SetupModule::Direct {
                        shared.cache.set_addr(node, stream.info().remote_addr);
                    }
                    stream.info_mut().failed_before = self.log().failed_before.clone();
                    return Ok(stream);
                }
                Err(ModuleError::Refused(refusal)) => {
                    return Err(Some(ConnectError::Refused { node, refusal }))
                }
                Err(error) => {
                    if self.cached == Some(module) {
                        shared.cache.set(node, None);
                    }
                    tracing::debug!(%node, %module, %error, "setup module failed");
                    self.failed(module, error, true);
                }
            }
        }
        Err(None)
    }
}

/// A first connection (nothing cached), or one whose cached module is slow
/// by nature (see [`races`]): the modules before Routed (`order` up to
/// `routed_at`, the cached one first) run in turn as usual, and Routed
/// starts beside them after `hedge`. The first stream is returned. When Routed wins, the
/// modules before it that have not failed yet go on in the background as
/// upgrades and take the stream over when one works (`upgrade`), so the
/// first byte flows at once and the path still ends where the sequential
/// driver would have put it; the cache learns that final path.
async fn race(
    run: &Run<'_>,
    target: &VirtualAddr,
    order: &[SetupModule],
    routed_at: usize,
    hedge: Duration,
) -> Result<ReachStream, Option<ConnectError>> {
    let (shared, node) = (run.shared, target.node);
    let better = &order[..routed_at];
    let chain = run.in_order(target.clone(), better);
    let relayed = async {
        tokio::time::sleep(hedge).await;
        let remaining = run.deadline.saturating_duration_since(Instant::now());
        routed::connect(shared, target, remaining, run.started).await
    };
    tokio::pin!(chain, relayed);
    let routed = tokio::select! {
        first = &mut chain => match first {
            Err(None) => None,
            done => return done,
        },
        routed = &mut relayed => Some(routed),
    };
    let routed = match routed {
        Some(r) => r,
        // Every module before Routed failed: Routed is the answer (or
        // nothing is), with the upgrades a routed stream gets anyway.
        None => {
            return match relayed.await {
                Ok(stream) => {
                    shared.cache.set(node, Some(SetupModule::Routed));
                    let failed_before = run.log().failed_before.clone();
                    let upgrade_to = upgrade_modules(shared, node, false, &failed_before);
                    let mut stream = upgradable(shared, stream, target, upgrade_to, false);
                    stream.info_mut().failed_before = failed_before;
                    Ok(stream)
                }
                Err(ModuleError::Refused(refusal)) => {
                    Err(Some(ConnectError::Refused { node, refusal }))
                }
                Err(error) => {
                    run.failed(SetupModule::Routed, error, true);
                    Err(None)
                }
            };
        }
    };
    match routed {
        Ok(stream) => {
            // Routed first: the modules before it that have not failed
            // move the stream later if they can (the one under way starts
            // again, as an upgrade). The cache waits for where it settles.
            let tried: Vec<SetupModule> = run.log().failures.iter().map(|f| f.module).collect();
            let upgrade_to: Vec<SetupModule> = better
                .iter()
                .copied()
                .filter(|m| !tried.contains(m))
                .collect();
            tracing::debug!(%node, ?upgrade_to, "routed first; better paths go on in the background");
            let mut stream = upgradable(shared, stream, target, upgrade_to, true);
            stream.info_mut().failed_before = run.log().failed_before.clone();
            Ok(stream)
        }
        Err(ModuleError::Refused(refusal)) => Err(Some(ConnectError::Refused { node, refusal })),
        Err(error) => {
            run.failed(SetupModule::Routed, error, true);
            chain.await
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hedge_follows_the_hub_round_trip_within_bounds() {
        assert_eq!(hedge_delay(None), DEFAULT_HEDGE);
        let ms = Duration::from_millis;
        assert_eq!(hedge_delay(Some(ms(0))), MIN_HEDGE);
        assert_eq!(hedge_delay(Some(ms(40))), ms(105));
        assert_eq!(hedge_delay(Some(ms(400))), MAX_HEDGE);
    }
}
