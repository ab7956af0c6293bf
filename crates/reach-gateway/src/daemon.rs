//! The gateway daemon's driver: the NAT-PMP/PCP socket on the LAN side,
//! batches of requests into [`Service`], lease expiry on a timer, and the
//! start: journal replayed, table restored, kernel reconciled to it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;

use crate::journal::Journal;
use crate::nft::Kernel;
use crate::probe::{Outcome, Prober};
use crate::service::{Counters, Service, ServiceError};
use crate::table::Key;
use crate::table::{Policy, Table};

/// The NAT-PMP and PCP server port (RFC 6886, RFC 6887).
pub const PORT: u16 = 5351;
/// Datagrams served in one batch at most (one journal sync and one
/// kernel transaction for all of them).
const BATCH: usize = 64;
/// Longest datagram read (PCP's limit is 1100 bytes).
const MAX_DATAGRAM: usize = 1100;
/// How often the WAN's address is looked at again.
const ADDRESS_CHECK: Duration = Duration::from_secs(10);
/// Probes in flight at once.
const PROBES_IN_FLIGHT: usize = 32;
/// How long one probe waits for the client's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The LAN interface: requests are served on its IPv4 address.
    pub lan: String,
    /// The WAN interface: its IPv4 address is the external one.
    pub wan: String,
    /// The limits (`internal` empty: the LAN interface's own subnet).
    pub policy: Policy,
    /// Where the journal lives.
    pub state_dir: PathBuf,
    /// The nftables table (ip family) the daemon owns.
    pub table: String,
    /// The UDP port (normally [`PORT`]).
    pub port: u16,
    /// Whether UPnP IGD is served too (SSDP on UDP 1900, HTTP on
    /// `upnp_port`).
    pub upnp: bool,
    /// The UPnP HTTP port (0: any free one; SSDP tells clients).
    pub upnp_port: u16,
    /// How clients that are gone are found (DPF's probe).
    pub probe: crate::probe::Settings,
}

/// Why the daemon stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// An interface is missing or has no IPv4 address.
    #[error("interface {0} has no IPv4 address (is it up, and named right?)")]
    NoAddress(String),
    /// The socket could not be bound.
    #[error("cannot serve NAT-PMP/PCP on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The state directory or journal failed.
    #[error("{0}")]
    Journal(#[from] crate::journal::JournalError),
    /// The kernel table could not be set up at start.
    #[error("{0}")]
    Kernel(#[from] crate::nft::NftError),
    /// The state directory could not be made.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A durable change failed while serving.
    #[error("{0}")]
    Service(#[from] ServiceError),
    /// The socket failed while serving.
    #[error("socket: {0}")]
    Socket(std::io::Error),
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An interface's first IPv4 address and prefix length.
pub fn interface_v4(name: &str) -> Option<(Ipv4Addr, u8)> {
    if_addrs::get_if_addrs()
        .ok()?
        .into_iter()
        .filter(|i| i.name == name)
        .find_map(|i| match i.addr {
            if_addrs::IfAddr::V4(a) => Some((a.ip, a.prefixlen)),
            _ => None,
        })
}

/// A started gateway: bound, restored and reconciled; [`Gateway::run`]
/// serves.
pub struct Gateway {
    socket: UdpSocket,
    service: Service<Kernel>,
    wan: String,
    /// UPnP control requests from the HTTP server.
    calls: Option<tokio::sync::mpsc::Receiver<crate::upnp_io::Call>>,
    /// The UPnP tasks (ended with the gateway).
    upnp_tasks: Vec<tokio::task::JoinHandle<()>>,
    upnp_addr: Option<SocketAddr>,
    /// The LAN address probes go out from.
    lan_ip: Ipv4Addr,
    prober: Prober,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for t in &self.upnp_tasks {
            t.abort();
        }
    }
}

impl Gateway {
    /// Starts the gateway: binds the LAN socket, replays and compacts the
    /// journal, restores the unexpired mappings and makes the kernel
    /// table hold exactly their rules (rules outside it untouched).
    pub async fn start(mut config: Config) -> Result<Self, DaemonError> {
        let (lan_ip, lan_len) =
            interface_v4(&config.lan).ok_or_else(|| DaemonError::NoAddress(config.lan.clone()))?;
        let external = interface_v4(&config.wan).map(|(ip, _)| ip);
        if external.is_none() {
            tracing::warn!(wan = %config.wan, "the WAN interface has no IPv4 address yet: requests are refused until it has one");
        }
        if config.policy.internal.is_empty() {
            config.policy.internal.push((lan_ip, lan_len));
        }
        std::fs::create_dir_all(&config.state_dir).map_err(|source| DaemonError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let addr = SocketAddr::new(IpAddr::V4(lan_ip), config.port);
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|source| DaemonError::Bind { addr, source })?;
        let now = unix_now();
        let (mut journal, saved) = Journal::open(&config.state_dir.join("mappings.journal"))?;
        let mut table = Table::new(config.policy.clone());
        let mut dropped = 0;
        for m in saved {
            if !table.restore(m, now) {
                dropped += 1;
            }
        }
        let mut kernel = Kernel::new(config.table.clone(), config.wan.clone());
        let live: Vec<_> = table.mappings().copied().collect();
        if dropped > 0 {
            // Leases that ended while the daemon was down leave the
            // journal now (the reconciliation below takes their rules).
            journal.compact(&live)?;
        }
        let (added, deleted) = kernel.reconcile(&live)?;
        tracing::info!(
            %addr,
            mappings = live.len(),
            expired_while_down = dropped,
            rules_added = added,
            rules_deleted = deleted,
            table = %config.table,
            "gateway serving NAT-PMP and PCP"
        );
        let service = Service::new(table, journal, kernel, external, now);
        let mut gateway = Self {
            socket,
            service,
            wan: config.wan,
            calls: None,
            upnp_tasks: Vec::new(),
            upnp_addr: None,
            lan_ip,
            prober: Prober::new(config.probe, now),
        };
        if config.upnp {
            gateway
                .start_upnp(lan_ip, &config.policy, config.upnp_port, &config.state_dir)
                .await?;
        }
        Ok(gateway)
    }

    async fn start_upnp(
        &mut self,
        lan: Ipv4Addr,
        policy: &Policy,
        port: u16,
        state_dir: &std::path::Path,
    ) -> Result<(), DaemonError> {
        use crate::upnp_io;
        let uuid = upnp_io::device_uuid(&state_dir.join("upnp-uuid")).map_err(|source| {
            DaemonError::StateDir {
                path: state_dir.to_path_buf(),
                source,
            }
        })?;
        let http = upnp_io::bind_http(lan, port)
            .await
            .map_err(|source| DaemonError::Bind {
                addr: SocketAddr::from((lan, port)),
                source,
            })?;
        let ssdp = upnp_io::bind_ssdp(lan).map_err(|source| DaemonError::Bind {
            addr: SocketAddr::from((crate::upnp::SSDP_GROUP, crate::upnp::SSDP_PORT)),
            source,
        })?;
        let addr = http.local_addr().map_err(DaemonError::Socket)?;
        let location = format!("http://{addr}{}", crate::upnp::DESCRIPTION);
        let admission = upnp_io::Admission(policy.internal.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        self.upnp_tasks.push(tokio::spawn(upnp_io::serve_http(
            http,
            admission.clone(),
            uuid.clone(),
            tx,
        )));
        self.upnp_tasks.push(tokio::spawn(upnp_io::serve_ssdp(
            ssdp,
            admission,
            location.clone(),
            uuid,
        )));
        self.calls = Some(rx);
        self.upnp_addr = Some(addr);
        tracing::info!(%location, "gateway serving UPnP IGD");
        Ok(())
    }

    /// Where UPnP's HTTP server listens, if it runs.
    pub fn upnp_addr(&self) -> Option<SocketAddr> {
        self.upnp_addr
    }

    /// The address it serves on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Its counters.
    pub fn counters(&self) -> Counters {
        self.service.counters
    }

    /// Serves until `stop` resolves (the mappings stay: leases, not the
    /// daemon's life, end them) or a durable change fails.
    pub async fn run(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        tokio::pin!(stop);
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut calls = self.calls.take();
        let mut address_check = tokio::time::interval(ADDRESS_CHECK);
        address_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // The probe round under way, if any (its task ends with the loop).
        let mut probing: Option<Round> = None;
        loop {
            let probe_at = self.prober.next_round().map(|at| {
                let wait = at.saturating_sub(unix_now());
                tokio::time::Instant::now() + Duration::from_secs(wait)
            });
            let probe_sleep = async {
                match probe_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let expiry = self.service.next_expiry().map(|at| {
                let wait = at.saturating_sub(unix_now());
                tokio::time::Instant::now() + Duration::from_secs(wait)
            });
            let expiry_sleep = async {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut stop => {
                    tracing::info!(mappings = self.service.table().len(), counters = ?self.service.counters, "gateway stopping; its mappings stay until their leases end");
                    return Ok(());
                }
                r = self.socket.recv_from(&mut buf) => {
                    let (n, from) = r.map_err(DaemonError::Socket)?;
                    let mut batch = vec![(buf[..n.min(MAX_DATAGRAM)].to_vec(), from)];
                    while batch.len() < BATCH {
                        match self.socket.try_recv_from(&mut buf) {
                            Ok((n, from)) => batch.push((buf[..n.min(MAX_DATAGRAM)].to_vec(), from)),
                            Err(_) => break,
                        }
                    }
                    let replies = self.service.serve(&batch, unix_now())?;
                    for (b, to) in replies {
                        if let Err(e) = self.socket.send_to(&b, to).await {
                            tracing::debug!(%to, "answer not sent: {e}");
                        }
                    }
                }
                Some((req, client, answer)) = async {
                    match calls.as_mut() {
                        Some(c) => c.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let reply = self.service.soap(&req, client, unix_now())?;
                    let _ = answer.send(reply);
                }
                () = expiry_sleep => {
                    self.service.expire(unix_now())?;
                }
                _ = address_check.tick() => {
                    self.service.set_external(interface_v4(&self.wan).map(|(ip, _)| ip));
                }
                () = probe_sleep => {
                    let targets = self.prober.start_round(self.service.table(), unix_now());
                    tracing::debug!(mappings = targets.len(), "probing the clients of TCP mappings");
                    probing = Some(Round(tokio::spawn(probe_all(self.lan_ip, targets))));
                }
                done = async {
                    match probing.as_mut() {
                        Some(round) => (&mut round.0).await,
                        None => std::future::pending().await,
                    }
                } => {
                    probing = None;
                    let outcomes = done.unwrap_or_default();
                    let gone = self.prober.finish_round(&outcomes, self.service.table(), unix_now());
                    self.service.drop_gone(&gone)?;
                }
            }
        }
    }
}

/// One probe's result: the mapping, the endpoint probed, what it found.
type Probed = (Key, SocketAddrV4, Outcome);

/// A probe round's task, aborted when the daemon stops.
struct Round(tokio::task::JoinHandle<Vec<Probed>>);

impl Drop for Round {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Probes every target from the LAN address `from`, [`PROBES_IN_FLIGHT`]
/// at a time, each within [`PROBE_TIMEOUT`].
async fn probe_all(from: Ipv4Addr, targets: Vec<(Key, SocketAddrV4)>) -> Vec<Probed> {
    let mut out = Vec::with_capacity(targets.len());
    let mut running = tokio::task::JoinSet::new();
    let mut rest = targets.into_iter();
    loop {
        while running.len() < PROBES_IN_FLIGHT {
            let Some((key, internal)) = rest.next() else {
                break;
            };
            running.spawn(async move { (key, internal, probe(from, internal).await) });
        }
        match running.join_next().await {
            Some(Ok(p)) => out.push(p),
            // A probe task that failed says nothing about its client.
            Some(Err(_)) => {}
            None => return out,
        }
    }
}

/// One probe: a TCP connection to the client's endpoint, closed at once
/// with a reset (no state left behind on either side).
async fn probe(from: Ipv4Addr, to: SocketAddrV4) -> Outcome {
    let connect = async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((from, 0)))?;
        socket.connect(SocketAddr::V4(to)).await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, connect).await {
        Ok(Ok(stream)) => {
            // A zero linger resets at once; it does not block.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            Outcome::Alive
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        Ok(Err(_)) | Err(_) => Outcome::Silent,
    }
}
