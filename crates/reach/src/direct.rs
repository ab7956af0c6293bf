//! The Direct module: race TCP connections to a target's candidate addresses.
//!
//! Candidates are ordered by `reach_proto::candidates::order_candidates` and
//! started with staggered delays by `reach_proto::race::DirectRace`; every attempt
//! runs the full handshake, so reaching a wrong node (a stale address, another
//! host in an overlapping private range) fails that attempt and the race goes on.
//! The first authenticated stream wins; dropping the `JoinSet` cancels the rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_proto::candidates::{order_candidates, LocalAddr};
use reach_proto::handshake::{HandshakeError, InitiatorOptions};
use reach_proto::race::{DirectRace, RaceStep};
use reach_proto::setup_plan::SetupModule;
use reach_proto::{SecretKey, VirtualAddr};
use tokio::task::JoinSet;

use crate::error::{Attempt, AttemptError, ConnectError};
use crate::handshake::{initiate, tcp_connect, Me};
use crate::stream::{Direction, ReachStream};
use crate::ticket_store::TicketStore;

/// Settings of one direct connection race.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RaceSettings {
    pub options: InitiatorOptions,
    pub attempt_delay: Duration,
    pub timeout: Duration,
    /// What the stream reports: Direct, or Reverse when connecting back.
    pub module: SetupModule,
    /// An address of the target that answered before: candidates on its IP
    /// go first (the port may differ: a connecting process listens on a new
    /// port each time), so a candidate ahead of it that a firewall drops
    /// costs no attempt delay.
    pub first: Option<std::net::SocketAddr>,
}

/// Races the target's direct candidates; returns the first authenticated stream.
pub(crate) async fn connect(
    local: &SecretKey,
    tickets: Option<&Arc<TicketStore>>,
    local_addrs: &[LocalAddr],
    target: &VirtualAddr,
    settings: RaceSettings,
) -> Result<ReachStream, ConnectError> {
    let started = Instant::now();
    let node = target.node;
    let mut candidates = order_candidates(&target.direct, local_addrs);
    if let Some(known) = settings.first {
        // Stable: the exact address first, then others on its IP, then the rest.
        candidates.sort_by_key(|c| match (*c == known, c.ip() == known.ip()) {
            (true, _) => 0,
            (false, true) => 1,
            _ => 2,
        });
    }
    if candidates.is_empty() {
        return Err(ConnectError::NoAddresses { node });
    }
    tracing::debug!(%node, ?candidates, "direct race");
    let mut race = DirectRace::new(
        candidates,
        started,
        settings.attempt_delay,
        settings.timeout,
    );
    let mut running = JoinSet::new();
    let mut failed = Vec::new();
    loop {
        let wait_until = match race.poll(Instant::now()) {
            RaceStep::Start(_, addr) => {
                let local = local.clone();
                let tickets = tickets.cloned();
                let port = target.port;
                running.spawn(async move {
                    let result = async {
                        let mut tcp = tcp_connect(addr).await?;
                        let me = Me {
                            secret: &local,
                            tickets: tickets.as_deref(),
                        };
                        let est = initiate(&mut tcp, me, node, port, settings.options).await?;
                        // A connect-back is the target's half of the asker's
                        // outbound stream: inbound here.
                        let direction = if settings.options.reverse {
                            Direction::Inbound
                        } else {
                            Direction::Outbound
                        };
                        Ok(ReachStream::over_tcp(
                            tcp,
                            est,
                            settings.module,
                            direction,
                            started,
                        )?)
                    }
                    .await;
                    (addr, result)
                });
                continue;
            }
            RaceStep::Wait(t) => t,
            RaceStep::Exhausted => {
                return Err(ConnectError::Failed {
                    node,
                    attempts: failed,
                })
            }
            RaceStep::TimedOut => {
                return Err(ConnectError::TimedOut {
                    node,
                    after: settings.timeout,
                    attempts: failed,
                })
            }
        };
        tokio::select! {
            Some(done) = running.join_next() => {
                let Ok((addr, result)) = done else {
                    race.handle_failure(Instant::now());
                    continue;
                };
                match result {
                    Ok(stream) => return Ok(stream),
                    Err(AttemptError::Handshake(HandshakeError::Refused(refusal))) => {
                        // An authenticated answer from the right node: no other
                        // address will change it.
                        return Err(ConnectError::Refused { node, refusal });
                    }
                    Err(error) => {
                        tracing::debug!(%addr, %error, "direct attempt failed");
                        failed.push(Attempt { addr, error });
                        race.handle_failure(Instant::now());
                    }
                }
            }
            () = tokio::time::sleep_until(wait_until.into()) => {}
        }
    }
}
