//! Public proxy ports (GCB's proxy sockets): a node publishes a service it
//! serves at a virtual port, and unmodified TCP clients reach it through a
//! port of the hub.
//!
//! ```text
//!  client --TCP--> hub:PORT --(ConnectBack{vport, token})--> node's session
//!                  hub <--- node dials the hub, Noise IK, FLAG_REVERSE ----
//!  client <==== hub pipes the client and that stream ====> node --> service
//! ```
//! Each client connection makes the node connect back to the hub: outbound
//! from the node, so it works behind any NAT that let the node reach the hub
//! in the first place, and authenticated end to end between node and hub.
//! A node that cannot connect back (a firewall that passes its session but
//! no new connection) gets the client over its session instead, as a routed
//! stream from the hub's own connect-only node. The client's leg is plain
//! TCP, as for any server. The hub checks the
//! client's source address against the exposure's ranges before it asks the
//! node for anything. Exposures end with the session that made them; a node
//! that comes back asks for its old port, and gets it when it is free.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use reach::proto::candidates::in_prefix;
use reach::proto::link::{ConnectBack, Control};
use reach::proto::NodeId;
use reach_legacy::proxy::ProxyStats;
use tokio::net::{TcpListener, TcpStream};

use crate::core::{Event, ExposeRequest, LinkId, ProxyPort};
use crate::status::{ExposureStatus, STATUS_MAX_NODES};
use crate::{Inner, State};

/// How long a node has to connect back for one client before the client is
/// carried over the node's session instead.
const CONNECT_BACK_WAIT: Duration = Duration::from_secs(4);
/// How long setting up a stream over the node's session may take.
const SESSION_WAIT: Duration = Duration::from_secs(6);
/// After a failed connect-back, clients of the exposure go over the session
/// straight away for this long; then connect-back is tried again.
const SESSION_FOR: Duration = Duration::from_secs(60);

/// One published service.
pub(crate) struct Exposure {
    link: LinkId,
    proxy: ProxyPort,
    stats: Arc<ProxyStats>,
    task: tokio::task::JoinHandle<()>,
}

/// The proxy ports held, with their live counters, for status reports.
pub(crate) fn exposure_status(s: &State) -> Vec<ExposureStatus> {
    let mut list: Vec<ExposureStatus> = s
        .exposures
        .values()
        .map(|e| ExposureStatus {
            proxy: e.proxy.clone(),
            counters: e.stats.snapshot(),
        })
        .collect();
    list.sort_by_key(|e| e.proxy.port);
    list
}

impl Drop for Exposure {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Acts on the core's events. Called with the state locked after every
/// frame: nothing here waits, and without events (nearly always) it does
/// nothing at all. `via` is this hub's address on the link the events came
/// from.
pub(crate) fn handle(inner: &Arc<Inner>, s: &mut State, via: SocketAddr) {
    let events = s.core.poll_events();
    if events.is_empty() {
        return;
    }
    for ev in events {
        match ev {
            Event::Expose(req) => {
                let (link, node, vport) = (req.link, req.node, req.vport);
                let offered = inner.config.proxy_ports.is_some();
                let reply = match expose(inner, s, req, via) {
                    Ok(port) => {
                        tracing::info!(%node, vport, port, "service exposed");
                        Control::Exposed {
                            vport,
                            port,
                            proxy: inner
                                .session_client
                                .as_ref()
                                .map_or(inner.endpoint.node_id(), |c| c.node_id()),
                        }
                    }
                    Err(reason) => {
                        tracing::info!(%node, vport, "exposure refused: {reason}");
                        Control::ExposeRefused {
                            vport,
                            offered,
                            reason,
                        }
                    }
                };
                s.core.send_control(link, &reply);
            }
            Event::StatusQuery { link } => {
                let json = s.status().to_json(STATUS_MAX_NODES).to_string();
                s.core.send_control(link, &Control::StatusReport { json });
            }
            Event::DialBack(req) => crate::dial_back::start(inner, req, via),
            Event::CircuitPull { hub, addr, leg } => {
                crate::circuits::dial_back(inner, s, hub, addr, leg);
            }
            Event::LinkGone { link } => {
                let mut ended = Vec::new();
                s.exposures.retain(|port, e| {
                    let keep = e.link != link;
                    if !keep {
                        tracing::info!(node = %e.proxy.node, vport = e.proxy.vport, port, "exposure ended with its session; port held for the node");
                        ended.push(*port);
                    }
                    keep
                });
                for port in ended {
                    s.holds.release(port);
                }
            }
        }
    }
    s.flush();
}

/// Checks the policy and binds a proxy port; returns it.
fn expose(
    inner: &Arc<Inner>,
    s: &mut State,
    req: ExposeRequest,
    via: SocketAddr,
) -> Result<u16, String> {
    let ExposeRequest {
        link,
        node,
        vport,
        want_port,
        allow_from,
    } = req;
    let config = &inner.config;
    let (lo, hi) = config
        .proxy_ports
        .ok_or("this hub offers no proxy ports (reach hub --proxy-ports)")?;
    if !config.expose_allowed.is_empty() && !config.expose_allowed.contains(&node) {
        return Err(format!("node {node} may not expose services on this hub"));
    }
    // The same service asked for again on the same session keeps its port.
    if let Some((port, _)) = s
        .exposures
        .iter()
        .find(|(_, e)| e.link == link && e.proxy.vport == vport)
    {
        return Ok(*port);
    }
    let held = s
        .exposures
        .values()
        .filter(|e| e.proxy.node == node)
        .count();
    if held >= config.max_exposures {
        return Err(format!(
            "node {node} already exposes {held} services here (the limit)"
        ));
    }
    let ip = via.ip();
    let wanted = want_port.filter(|p| (lo..=hi).contains(p));
    // The port this node had before (it left, or the hub restarted) comes
    // first; ports held for other nodes are skipped.
    let held = s.holds.held_for(&node);
    for port in wanted.into_iter().chain(held).chain(lo..=hi) {
        if s.exposures.contains_key(&port) || !s.holds.may_take(port, &node) {
            continue;
        }
        let Ok(listener) = bind(SocketAddr::new(ip, port)) else {
            continue;
        };
        let stats = Arc::new(ProxyStats::default());
        let task = tokio::spawn(serve(
            inner.clone(),
            listener,
            Target {
                reverse_failed: Arc::default(),
                link,
                node,
                vport,
                via,
            },
            allow_from.clone(),
            stats.clone(),
        ));
        s.holds.take(port, node);
        s.exposures.insert(
            port,
            Exposure {
                link,
                proxy: ProxyPort {
                    port,
                    node,
                    vport,
                    allow_from,
                },
                stats,
                task,
            },
        );
        return Ok(port);
    }
    Err(format!(
        "every proxy port in {lo}-{hi} is taken or held for its node"
    ))
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// Where a proxy port's clients go.
#[derive(Clone)]
struct Target {
    /// When a connect-back last failed for this exposure.
    reverse_failed: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    link: LinkId,
    node: NodeId,
    vport: u16,
    /// This hub's address as the node reached it: the node connects back
    /// there first.
    via: SocketAddr,
}

/// Accepts the proxy port's clients.
async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    target: Target,
    allow: Vec<(IpAddr, u8)>,
    stats: Arc<ProxyStats>,
) {
    loop {
        let (tcp, from) = reach::accept::accept(&listener, "proxy port").await;
        let ip = from.ip().to_canonical();
        if !allow.is_empty() && !allow.iter().any(|(net, len)| in_prefix(ip, *net, *len)) {
            tracing::info!(%from, node = %target.node, "client outside the exposure's ranges: refused");
            stats.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let slot = match inner.proxy_clients.try_take(ip) {
            Ok(slot) => slot,
            Err(full) => {
                let n = stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(%from, node = %target.node, "proxy client limit: refused a client, {full} connected ({n} refused so far)");
                }
                continue;
            }
        };
        stats.started();
        let (stats, inner, target) = (stats.clone(), inner.clone(), target.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if client(inner, tcp, from, target, &stats).await {
                stats.ended();
            } else {
                stats.failed();
            }
        });
    }
}

/// Carries one client to the node, then pipes: over a connection the node
/// makes back to the hub, or, when that fails, over the node's session.
/// False if neither worked.
async fn client(
    inner: Arc<Inner>,
    mut tcp: TcpStream,
    from: SocketAddr,
    target: Target,
    stats: &ProxyStats,
) -> bool {
    let recently_failed = {
        let at = target
            .reverse_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        at.is_some_and(|t| t.elapsed() < SESSION_FOR)
    };
    let reverse = if recently_failed {
        Err("it failed less than a minute ago".to_string())
    } else {
        connect_back(&inner, &target).await
    };
    let mut stream = match reverse {
        Ok(s) => s,
        Err(e) => {
            if !recently_failed {
                *target
                    .reverse_failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(tokio::time::Instant::now());
            }
            match over_session(&inner, &target).await {
                Ok(s) => {
                    tracing::info!(%from, node = %target.node, "proxy client carried over the node's session (no connect-back: {e})");
                    s
                }
                Err(e2) => {
                    tracing::info!(%from, node = %target.node, "proxy client dropped: connect-back: {e}; session: {e2}");
                    // A reset, not a clean close: nothing was served.
                    reach_legacy::proxy::reset_on_close(&tcp);
                    return false;
                }
            }
        }
    };
    tracing::debug!(%from, node = %target.node, "proxy client connected");
    let _ = tcp.set_nodelay(true);
    let (first, idle) = (inner.config.proxy_first_byte, inner.config.proxy_idle);
    let moved = {
        let mut tcp = reach_legacy::proxy::Metered::new(&mut tcp, stats);
        reach_legacy::proxy::copy_with_idle(&mut tcp, &mut stream, first, idle).await
    };
    reach_legacy::proxy::reset_if_failed(&tcp, &moved);
    tracing::debug!(%from, ?moved, "proxy client done");
    true
}

/// A routed stream to the exposure's node over its session, from the hub's
/// session client.
async fn over_session(inner: &Inner, target: &Target) -> Result<reach::ReachStream, String> {
    let client = inner
        .session_client
        .as_ref()
        .ok_or("the hub has no session client")?
        .endpoint(
            &inner.endpoint,
            inner.config.policy.network_secret.as_deref(),
        )
        .await
        .map_err(|e| format!("the hub's session client: {e}"))?;
    let vaddr = reach::VirtualAddr::new(target.node, target.vport);
    client
        .connect_timeout(&vaddr, SESSION_WAIT)
        .await
        .map_err(|e| e.to_string())
}

/// Asks the node to connect back to the hub, and waits for it.
async fn connect_back(inner: &Inner, target: &Target) -> Result<reach::ReachStream, String> {
    let mut b = [0u8; 2];
    let Some(wait) = (0..8).find_map(|_| {
        getrandom::fill(&mut b).ok()?;
        inner
            .endpoint
            .expect_connect_back(target.node, u16::from_le_bytes(b))
    }) else {
        return Err("no free connect-back token".into());
    };
    let mut addrs = vec![target.via];
    addrs.extend(inner.listen().into_iter().filter(|a| *a != target.via));
    let ask = Control::ConnectBack(ConnectBack {
        from: inner.endpoint.node_id(),
        target: target.node,
        token: wait.token(),
        vport: target.vport,
        addrs,
        upgrade: None,
    });
    {
        let mut s = inner.state();
        s.core.send_control(target.link, &ask);
        s.flush();
    }
    wait.wait(CONNECT_BACK_WAIT)
        .await
        .map_err(|e| e.to_string())
}
