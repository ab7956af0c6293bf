//! Local control of running proxies: every `expose`, `forward` and `socks`
//! process answers on a Unix socket, `STATE_DIR/proxies/PID.sock`, so that
//! `reach status` lists them with live counters and `reach stop` ends one.
//!
//! The protocol is one request line (`status`, `stop`, or `rebind` for a
//! vpn) and one JSON reply line. A socket whose process is gone (killed hard) refuses connections;
//! listing removes it. The directory is private to the user (0700), as the
//! state directory is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use reach_legacy::proxy::{ProxyCounters, ProxyStats};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// How long one proxy may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request line read.
const MAX_REQUEST: usize = 64;
/// Longest reply line read: a vpn's peers and a proxy's listed streams
/// (at most [`MAX_LISTED_STREAMS`], a few hundred bytes each) fit.
const MAX_REPLY: usize = 256 * 1024;
/// Streams a report lists at most (the newest); `streams_total` counts all.
pub const MAX_LISTED_STREAMS: usize = 200;

/// What a running proxy reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProxyReport {
    /// Its id for `reach stop`: the process id.
    pub id: u32,
    /// The name given with `--name`, also accepted by `reach stop`.
    #[serde(default)]
    pub name: Option<String>,
    /// `expose`, `forward` or `socks`, with ` udp` for UDP.
    pub kind: String,
    /// The plain side: the exposed service, or where it listens.
    pub local: String,
    /// The reach side: the virtual address served or forwarded to (none for
    /// SOCKS, whose targets vary).
    pub vaddr: Option<String>,
    /// The hub's proxy port, for an exposure published there, or how the
    /// hub answered.
    pub public: Option<String>,
    /// Seconds since the Unix epoch when it started.
    pub started: u64,
    /// Its connections and bytes so far.
    pub counters: ProxyCounters,
    /// A vpn's peers (empty for other proxies).
    #[serde(default)]
    pub peers: Vec<VpnPeerReport>,
    /// A vpn's UDP socket and its counters (None: no UDP paths, or not a
    /// vpn).
    #[serde(default)]
    pub udp: Option<VpnUdpReport>,
    /// The port mapping its gateway holds for it, e.g. "192.0.2.1:40022
    /// by pcp at 10.1.0.1, renewed within 3600 s" (None: none).
    #[serde(default)]
    pub port_mapping: Option<String>,
    /// Its open reach streams, newest last (at most
    /// [`MAX_LISTED_STREAMS`]): where each runs and what it carried.
    #[serde(default)]
    pub streams: Vec<StreamReport>,
    /// How many streams it has open, listed or not.
    #[serde(default)]
    pub streams_total: usize,
}

/// One open reach stream, as `reach status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamReport {
    /// Numbers the process's streams in the order they opened.
    pub id: u64,
    /// The peer's NodeId.
    pub peer: String,
    /// The virtual port it was opened to.
    pub port: u16,
    /// `out` (this node connected) or `in` (it accepted).
    pub direction: String,
    /// The setup module that made it: direct, reverse, splice, routed.
    pub first_module: String,
    /// Where it runs now: the first module, or where a routed stream
    /// moved (direct, reverse, splice, or `circuit`: a relay circuit the
    /// hub splices).
    pub module: String,
    /// Milliseconds after it opened that it moved (none: it did not).
    pub moved_after_ms: Option<u64>,
    /// The local and remote addresses of the connection it runs on now
    /// (a routed stream's: its hub link's).
    pub local: String,
    /// See `local`.
    pub remote: String,
    /// The hubs its routed path crosses, or crossed before it moved, that
    /// this node knows of (its hub, then the peer's when that is another).
    pub via: Vec<String>,
    /// The kernel's smoothed round trip on its own TCP connection, in
    /// microseconds (none for a routed stream, whose connection is the
    /// shared hub link).
    pub rtt_us: Option<u64>,
    /// How long it took to set up, in microseconds.
    pub setup_us: u64,
    /// Bytes read from it.
    pub bytes_in: u64,
    /// Bytes written to it.
    pub bytes_out: u64,
    /// Milliseconds since it opened.
    pub age_ms: u64,
}

impl StreamReport {
    /// The report of one live stream.
    pub fn of(l: &reach::LiveStream) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let opened = std::time::Instant::now().checked_sub(l.age);
        let (module, local, remote) = match &l.moved {
            Some(m) if m.module == reach::SetupModule::Routed => {
                ("circuit".to_string(), m.local_addr, m.remote_addr)
            }
            Some(m) => (m.module.to_string(), m.local_addr, m.remote_addr),
            None => (
                l.info.module.to_string(),
                l.info.local_addr,
                l.info.remote_addr,
            ),
        };
        StreamReport {
            id: l.id,
            peer: l.info.peer.to_string(),
            port: l.info.virtual_port,
            direction: match l.info.direction {
                reach::Direction::Outbound => "out",
                reach::Direction::Inbound => "in",
            }
            .into(),
            first_module: l.info.module.to_string(),
            module,
            moved_after_ms: l
                .moved
                .as_ref()
                .map(|m| opened.map_or(0, |o| ms(m.at.saturating_duration_since(o)))),
            local: local.to_string(),
            remote: remote.to_string(),
            via: l.via.iter().map(ToString::to_string).collect(),
            rtt_us: l.rtt.map(us),
            setup_us: us(l.info.setup_time),
            bytes_in: l.bytes_in,
            bytes_out: l.bytes_out,
            age_ms: ms(l.age),
        }
    }
}

/// How `reach status` names an endpoint's port mapping.
pub fn port_mapping_text(endpoint: &reach::Endpoint) -> Option<String> {
    let m = endpoint.port_mapping()?;
    let left = m
        .expires
        .saturating_duration_since(std::time::Instant::now());
    Some(format!(
        "{} by {} at {}, lease ends in {} s",
        m.external,
        m.protocol,
        m.gateway,
        left.as_secs()
    ))
}

/// A vpn's UDP socket, as `reach status` shows it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct VpnUdpReport {
    /// The socket's port.
    pub port: u16,
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams received that opened.
    pub received: u64,
    /// Datagrams dropped: no session, forged, replayed, not sent.
    pub dropped: u64,
    /// Paths that came up.
    pub paths_up: u64,
    /// Paths that went down.
    pub paths_down: u64,
    /// Times it moved to a fresh socket (`reach vpn rebind`).
    #[serde(default)]
    pub rebinds: u64,
    /// Times a session's receive keys were renewed (`--rekey-every`).
    #[serde(default)]
    pub rekeys: u64,
    /// Many-port rounds it opened spare sockets for (its NAT maps ports
    /// at random), and those a peer's spray hit.
    #[serde(default)]
    pub birthdays: u64,
    /// See `birthdays`.
    #[serde(default)]
    pub birthday_hits: u64,
}

/// One peer of a running vpn, as `reach status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VpnPeerReport {
    /// Its virtual IPv4 address.
    pub ip: String,
    /// Its ULA.
    pub ula: String,
    /// Its NodeId.
    pub node: String,
    /// The path its packets take: `udp-direct ADDR` (a UDP path no NAT
    /// translates), `udp-punched ADDR` (one through NAT mappings, opened
    /// by hole punching), or the module of its stream, where the stream
    /// settled (direct, reverse, splice, routed).
    pub path: String,
    /// The peer's address on its UDP path, when one is up (whether or
    /// not packets take it: see `path`).
    #[serde(default)]
    pub udp_path: Option<String>,
    /// How that path crosses the network: `udp-direct` (no NAT
    /// translates it) or `udp-punched` (through NAT mappings).
    #[serde(default)]
    pub udp_kind: Option<String>,
    /// The UDP path's round trip in microseconds, when one is up.
    #[serde(default)]
    pub udp_rtt_us: Option<u64>,
    /// How long the latest hole punch took to bring the UDP path up, in
    /// microseconds (from the first probe to the first answer).
    #[serde(default)]
    pub udp_setup_us: Option<u64>,
    /// The hubs its stream is relayed through, while the stream is
    /// routed: the one this member's stream runs to, then the peer's own
    /// hub when that is another (empty: not relayed).
    #[serde(default)]
    pub via: Vec<String>,
    /// The stream's latest round trip in microseconds (a ping every 10 s,
    /// queued behind the stream's packets as they are).
    #[serde(default)]
    pub stream_rtt_us: Option<u64>,
    /// Packets and bytes each way.
    pub packets_out: u64,
    /// See `packets_out`.
    pub packets_in: u64,
    /// See `packets_out`.
    pub bytes_out: u64,
    /// See `packets_out`.
    pub bytes_in: u64,
}

impl ProxyReport {
    /// A report of this process, started now, with nothing counted yet.
    pub fn new(kind: String, local: String, vaddr: Option<String>, name: Option<String>) -> Self {
        ProxyReport {
            id: std::process::id(),
            name,
            kind,
            local,
            vaddr,
            public: None,
            started: now_secs(),
            counters: ProxyCounters::default(),
            peers: Vec::new(),
            udp: None,
            port_mapping: None,
            streams: Vec::new(),
            streams_total: 0,
        }
    }

    /// This report with `endpoint`'s open streams (the newest
    /// [`MAX_LISTED_STREAMS`]).
    pub fn with_streams(mut self, endpoint: &reach::Endpoint) -> Self {
        let live = endpoint.streams();
        self.streams_total = live.len();
        let skip = live.len().saturating_sub(MAX_LISTED_STREAMS);
        self.streams = live[skip..].iter().map(StreamReport::of).collect();
        self
    }
}

/// A request to a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Answer with a [`ProxyReport`].
    Status,
    /// End the proxy gracefully.
    Stop,
    /// A vpn: move its UDP paths to a fresh socket and punch afresh.
    Rebind,
}

impl Request {
    /// Parses one request line (without or with its newline).
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        match line.trim_ascii() {
            b"status" => Ok(Request::Status),
            b"stop" => Ok(Request::Stop),
            b"rebind" => Ok(Request::Rebind),
            other => Err(format!(
                "unknown request {:?} (expected status, stop or rebind)",
                String::from_utf8_lossy(&other[..other.len().min(MAX_REQUEST)])
            )),
        }
    }

    fn line(self) -> &'static [u8] {
        match self {
            Request::Status => b"status\n",
            Request::Stop => b"stop\n",
            Request::Rebind => b"rebind\n",
        }
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("proxies")
}

/// A running proxy's control socket. Dropping it removes the socket.
pub struct Control {
    path: Option<PathBuf>,
    stop: Arc<tokio::sync::Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Control {
    /// Opens this process's control socket. Asked, it reports `template`
    /// with the counters of `stats` and the open streams of `endpoint`. A socket
    /// that cannot be made (a state directory path too long for a Unix
    /// socket, say) is logged, and the proxy runs unlisted.
    pub fn start(
        state_dir: &Path,
        template: ProxyReport,
        stats: Arc<ProxyStats>,
        endpoint: Option<Arc<reach::Endpoint>>,
    ) -> Control {
        let report = move || {
            let r = ProxyReport {
                counters: stats.snapshot(),
                ..template.clone()
            };
            match &endpoint {
                Some(e) => r.with_streams(e),
                None => r,
            }
        };
        Self::start_live(state_dir, report)
    }

    /// Opens this process's control socket; asked, it reports what
    /// `report` makes then.
    pub fn start_live(
        state_dir: &Path,
        report: impl Fn() -> ProxyReport + Send + Sync + 'static,
    ) -> Control {
        Self::start_rebinding(state_dir, report, || {
            Err("this proxy has no UDP socket to rebind".into())
        })
    }

    /// [`Control::start_live`] for a process that also rebinds when asked
    /// (a vpn): `rebind` answers with what it did, or why not.
    pub fn start_rebinding(
        state_dir: &Path,
        report: impl Fn() -> ProxyReport + Send + Sync + 'static,
        rebind: impl Fn() -> Result<String, String> + Send + Sync + 'static,
    ) -> Control {
        let stop = Arc::new(tokio::sync::Notify::new());
        match bind(state_dir) {
            Ok((path, listener)) => {
                let acts = Acts {
                    report: Box::new(report),
                    rebind: Box::new(rebind),
                };
                let task = tokio::spawn(serve(listener, Arc::new(acts), stop.clone()));
                Control {
                    path: Some(path),
                    stop,
                    task: Some(task),
                }
            }
            Err(e) => {
                tracing::warn!("reach status will not list this proxy: {e:#}");
                Control {
                    path: None,
                    stop,
                    task: None,
                }
            }
        }
    }

    /// Resolves when `reach stop` asks this proxy to end.
    pub async fn stopped(&self) {
        self.stop.notified().await
    }
}

fn bind(state_dir: &Path) -> anyhow::Result<(PathBuf, UnixListener)> {
    let dir = dir(state_dir);
    // Anyone who can reach the sockets can stop the proxies: the directory
    // must be this user's alone, or the command fails.
    reach::files::private_dir(&dir).context("the control socket directory")?;
    let path = dir.join(format!("{}.sock", std::process::id()));
    // A socket left by an earlier process with this pid.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    Ok((path, listener))
}

/// What a control socket does when asked.
struct Acts {
    report: Box<dyn Fn() -> ProxyReport + Send + Sync>,
    rebind: Box<dyn Fn() -> Result<String, String> + Send + Sync>,
}

async fn serve(listener: UnixListener, acts: Arc<Acts>, stop: Arc<tokio::sync::Notify>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (acts, stop) = (acts.clone(), stop.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(ANSWER_TIMEOUT, answer(conn, &acts, &stop)).await;
        });
    }
}

async fn answer(conn: UnixStream, acts: &Acts, stop: &tokio::sync::Notify) -> std::io::Result<()> {
    let mut conn = BufReader::new(conn);
    let mut line = Vec::new();
    (&mut conn)
        .take(MAX_REQUEST as u64)
        .read_until(b'\n', &mut line)
        .await?;
    let reply = match Request::parse(&line) {
        Ok(Request::Status) => {
            serde_json::to_string(&(acts.report)()).map_err(std::io::Error::other)?
        }
        Ok(Request::Rebind) => match (acts.rebind)() {
            Ok(done) => serde_json::json!({ "rebound": done }).to_string(),
            Err(e) => serde_json::json!({ "error": e }).to_string(),
        },
        Ok(Request::Stop) => {
            // notify_one keeps the permit if nobody waits yet.
            stop.notify_one();
            r#"{"stopping":true}"#.to_string()
        }
        Err(e) => serde_json::json!({ "error": e }).to_string(),
    };
    let conn = conn.get_mut();
    conn.write_all(reply.as_bytes()).await?;
    conn.write_all(b"\n").await?;
    conn.shutdown().await
}

/// Sends `request` to the proxy whose socket is `path`; returns its reply
/// line. `Ok(None)`: nobody listens there any more (the socket is stale).
async fn ask(path: &Path, request: Request) -> anyhow::Result<Option<String>> {
    let exchange = async {
        let mut conn = match UnixStream::connect(path).await {
            Ok(c) => c,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        conn.write_all(request.line()).await?;
        let mut reply = Vec::new();
        BufReader::new(conn)
            .take(MAX_REPLY as u64)
            .read_until(b'\n', &mut reply)
            .await?;
        anyhow::Ok(Some(String::from_utf8_lossy(&reply).trim().to_string()))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| anyhow::bail!("no answer within {ANSWER_TIMEOUT:?}"))
}

/// Control sockets in the state directory, by process id.
fn sockets(state_dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let path = e.path();
            let pid = path
                .file_name()?
                .to_str()?
                .strip_suffix(".sock")?
                .parse()
                .ok()?;
            Some((pid, path))
        })
        .collect();
    found.sort();
    found
}

/// The running proxies, each as it reports itself. Stale sockets are
/// removed; a proxy that does not answer properly is reported as a warning.
pub async fn list(state_dir: &Path) -> Vec<ProxyReport> {
    let mut out = Vec::new();
    for (pid, path) in sockets(state_dir) {
        match ask(&path, Request::Status).await {
            Ok(None) => {
                let _ = std::fs::remove_file(&path);
            }
            Ok(Some(line)) => match serde_json::from_str::<ProxyReport>(&line) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!("proxy {pid} sent a report that makes no sense: {e}"),
            },
            Err(e) => tracing::warn!("proxy {pid} did not answer: {e:#}"),
        }
    }
    out
}

/// Asks the proxy `id` (a process id, a name given with `--name`, or `all`)
/// to stop; returns the ids asked.
pub async fn stop(state_dir: &Path, id: &str) -> anyhow::Result<Vec<u32>> {
    let stopped = stop_where(state_dir, |r| {
        id == "all" || r.id.to_string() == id || r.name.as_deref() == Some(id)
    })
    .await;
    if stopped.is_empty() && id != "all" {
        anyhow::bail!("no running proxy with id {id} (reach status lists them)");
    }
    Ok(stopped)
}

/// Asks every running proxy whose report `chosen` picks to stop; returns
/// the ids asked.
pub async fn stop_where(state_dir: &Path, chosen: impl Fn(&ProxyReport) -> bool) -> Vec<u32> {
    ask_where(state_dir, chosen, Request::Stop)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// Sends `request` to every running proxy whose report `chosen` picks;
/// returns the ids that answered, with their replies.
pub async fn ask_where(
    state_dir: &Path,
    chosen: impl Fn(&ProxyReport) -> bool,
    request: Request,
) -> Vec<(u32, String)> {
    let mut answered = Vec::new();
    for report in list(state_dir).await.into_iter().filter(|r| chosen(r)) {
        let path = dir(state_dir).join(format!("{}.sock", report.id));
        match ask(&path, request).await {
            Ok(Some(reply)) => answered.push((report.id, reply)),
            Ok(None) => {
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => tracing::warn!("proxy {} did not answer: {e:#}", report.id),
        }
    }
    answered
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn report(id: u32) -> ProxyReport {
        ProxyReport {
            id,
            name: Some("web".into()),
            kind: "forward".into(),
            local: "127.0.0.1:2222".into(),
            vaddr: Some("x".into()),
            public: None,
            started: 1,
            counters: ProxyCounters::default(),
            peers: Vec::new(),
            udp: None,
            port_mapping: Some("192.0.2.1:40022 by pcp at 10.1.0.1, lease ends in 7199 s".into()),
            streams: Vec::new(),
            streams_total: 0,
        }
    }

    #[test]
    fn requests_parse() {
        assert_eq!(Request::parse(b"status\n"), Ok(Request::Status));
        assert_eq!(Request::parse(b" stop "), Ok(Request::Stop));
        assert_eq!(Request::parse(b"rebind\n"), Ok(Request::Rebind));
        let e = Request::parse(b"halt").unwrap_err();
        assert!(e.contains("unknown request"), "{e}");
    }

    proptest! {
        #[test]
        fn arbitrary_requests_and_replies_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::parse(&bytes);
            let _ = serde_json::from_slice::<ProxyReport>(&bytes);
        }
    }

    #[tokio::test]
    async fn a_proxy_is_listed_then_stopped_and_a_stale_socket_is_cleaned() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A socket whose process is gone.
        let stale = dir.path().join("proxies").join("999999999.sock");
        std::fs::create_dir_all(stale.parent().expect("parent")).expect("mkdir");
        {
            use std::os::unix::fs::PermissionsExt;
            let private = std::fs::Permissions::from_mode(0o700);
            std::fs::set_permissions(stale.parent().expect("parent"), private).expect("chmod");
        }
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        let me = std::process::id();
        let control = Control::start(dir.path(), report(me), Arc::default(), None);
        let listed = list(dir.path()).await;
        assert_eq!(listed, vec![report(me)]);
        assert!(!stale.exists(), "the stale socket is removed");
        for wrong in ["12", "db"] {
            let err = stop(dir.path(), wrong).await.unwrap_err();
            assert!(err.to_string().contains("no running proxy"), "{err}");
        }
        assert_eq!(stop(dir.path(), "web").await.expect("stop"), vec![me]);
        tokio::time::timeout(ANSWER_TIMEOUT, control.stopped())
            .await
            .expect("the stop request arrives");
        drop(control);
        assert!(
            list(dir.path()).await.is_empty(),
            "its socket is gone with it"
        );
    }
}
