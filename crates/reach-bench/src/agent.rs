//! The measuring agent that `reach-bench lab` runs inside lab hosts: a
//! server that answers plain TCP and reach streams alike, and a client that
//! measures throughput, round trips or setup against it and prints one JSON
//! line.
//!
//! Each connection starts with one byte naming what it is for:
//! - `T`: bulk. The client writes until it shuts its side down; the server
//!   counts, then answers with the count (8 bytes, little-endian), so the
//!   client times the bytes that arrived, not the ones it buffered.
//! - `P`: ping-pong. The server echoes every byte as it comes.
//! - `S`: setup only. Nothing follows; the server drops the connection.
//!
//! Plain TCP, TCP through socat or rathole, and reach streams (direct or
//! routed) all meet the same server code, so they differ only in the path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use reach::{Endpoint, HubTarget, ListenPorts, SetupModule, VirtualAddr};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Application buffer for bulk writes and reads.
const BUF: usize = 256 * 1024;
/// The virtual port the agent's reach endpoint serves.
pub const VPORT: u16 = 1;
/// How long a run may take beyond its sending time: setup, the server's
/// answer, and round trips or setups counted.
const RUN_SLACK: Duration = Duration::from_secs(60);
/// How long one connection may take to set up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `reach-bench agent`.
#[derive(Subcommand, Debug)]
pub enum AgentCmd {
    /// Answer bulk, ping-pong and setup connections on plain TCP and on a
    /// reach endpoint, until killed.
    Serve(ServeArgs),
    /// Measure against a server and print the result as one JSON line.
    Run(RunArgs),
    /// Ask a NAT-PMP gateway for many TCP mappings (this host's ports
    /// FIRST.. on), WINDOW requests in flight, and print how fast they were
    /// granted as one JSON line.
    Natpmp(NatpmpArgs),
}

/// Flags of `agent natpmp`.
#[derive(Args, Debug)]
pub struct NatpmpArgs {
    /// The gateway's address.
    #[arg(long)]
    gateway: std::net::Ipv4Addr,
    /// How many mappings.
    #[arg(long)]
    count: u16,
    /// The first internal port (each request the next).
    #[arg(long, default_value_t = 20000)]
    first: u16,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Lease asked for, seconds (0 deletes the mappings instead).
    #[arg(long, default_value_t = 3600)]
    lifetime: u32,
}

/// What `agent natpmp` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct Granted {
    /// Mappings granted.
    pub granted: u32,
    /// Requests refused or unanswered.
    pub failed: u32,
    /// Seconds for all of them.
    pub secs: f64,
    /// The median time from a request to its answer, microseconds.
    pub median_us: f64,
}

/// Flags of `agent serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Plain TCP address to listen on.
    #[arg(long)]
    tcp: SocketAddr,
    /// Address the reach endpoint listens on.
    #[arg(long)]
    reach: SocketAddr,
    /// Attach to this hub, NODEID@IP:PORT (for routed streams).
    #[arg(long)]
    hub: Option<String>,
    /// Identity and state.
    #[arg(long)]
    state_dir: PathBuf,
    /// Write the reach endpoint's virtual address here once serving.
    #[arg(long)]
    addr_file: PathBuf,
}

/// What to measure.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Op {
    /// Bulk throughput, Gbit/s.
    Throughput,
    /// Median round trip of 1-byte ping-pongs, microseconds.
    Latency,
    /// Median setup time of sequential connections, milliseconds.
    Setup,
}

/// Flags of `agent run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// What to measure.
    #[arg(long, value_enum)]
    op: Op,
    /// A plain TCP server address.
    #[arg(long, conflicts_with = "vaddr")]
    tcp: Option<SocketAddr>,
    /// A reach server's virtual address.
    #[arg(long)]
    vaddr: Option<String>,
    /// Reach: attach to this hub, NODEID@IP:PORT.
    #[arg(long)]
    hub: Option<String>,
    /// Reach: setup modules, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "direct")]
    modules: Vec<SetupModule>,
    /// Reach: send payload unencrypted (authenticated still).
    #[arg(long)]
    plaintext: bool,
    /// Reach: keep routed streams on hub links (no relay circuit).
    #[arg(long)]
    no_circuits: bool,
    /// Reach: every handshake a full one (no resumption tickets).
    #[arg(long)]
    no_resumption: bool,
    /// Reach: identity and state.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Throughput: parallel streams.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Throughput: seconds of sending.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Latency and setup: how many.
    #[arg(long, default_value_t = 200)]
    count: u32,
}

/// What `agent run` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct Measured {
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// Bytes moved (throughput only).
    pub bytes: u64,
}

/// Runs an agent command.
pub async fn run(cmd: AgentCmd) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::Serve(a) => serve(a).await,
        AgentCmd::Natpmp(a) => {
            let g = tokio::time::timeout(RUN_SLACK, natpmp_load(a))
                .await
                .with_context(|| format!("no result within {RUN_SLACK:?}"))??;
            println!("{}", serde_json::to_string(&g)?);
            Ok(())
        }
        AgentCmd::Run(a) => {
            // A path that stalls fails the run instead of hanging it.
            let limit = Duration::try_from_secs_f64(a.secs).unwrap_or_default() + RUN_SLACK;
            let m = tokio::time::timeout(limit, measure(a))
                .await
                .with_context(|| format!("no result within {limit:?}"))??;
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
    }
}

fn hub_target(s: &str) -> anyhow::Result<HubTarget> {
    s.parse().map_err(|e| anyhow::anyhow!("bad hub {s:?}: {e}"))
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let tcp = TcpListener::bind(a.tcp)
        .await
        .with_context(|| format!("cannot listen on {}", a.tcp))?;
    let mut b = Endpoint::builder()
        .state_dir(&a.state_dir)
        .bind_ip(a.reach.ip())
        .listen_ports(ListenPorts::Fixed(a.reach.port()))
        .accept_ports(vec![VPORT])
        // Plaintext takes effect only when the client asks for it too.
        .plaintext(true);
    if let Some(h) = &a.hub {
        b = b.hub(hub_target(h)?);
    }
    let endpoint = b.bind().await?;
    if a.hub.is_some() {
        endpoint.wait_hub(CONNECT_TIMEOUT).await?;
    }
    std::fs::write(&a.addr_file, endpoint.virtual_addr(VPORT).to_string())
        .with_context(|| format!("cannot write {}", a.addr_file.display()))?;
    let plain = async {
        loop {
            let (s, _) = reach::accept::accept(&tcp, "agent").await;
            let _ = s.set_nodelay(true);
            tokio::spawn(answer(s));
        }
    };
    let streams = async {
        loop {
            match endpoint.accept().await {
                Ok(s) => drop(tokio::spawn(answer(s))),
                Err(e) => return e,
            }
        }
    };
    tokio::select! {
        () = plain => Ok(()),
        e = streams => Err(e.into()),
    }
}

/// Serves one connection as its first byte says.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    let mut op = [0u8; 1];
    s.read_exact(&mut op).await?;
    let mut buf = vec![0u8; BUF];
    match op[0] {
        b'T' => {
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_le_bytes()).await?;
            s.shutdown().await
        }
        b'P' => loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return s.shutdown().await;
            }
            s.write_all(&buf[..n]).await?;
            s.flush().await?;
        },
        _ => Ok(()),
    }
}

/// A connection of either kind.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Opens connections to the server under test.
enum Dialer {
    Tcp(SocketAddr),
    Reach(Endpoint, VirtualAddr),
}

impl Dialer {
    async fn new(a: &RunArgs) -> anyhow::Result<Dialer> {
        if let Some(addr) = a.tcp {
            return Ok(Dialer::Tcp(addr));
        }
        let Some(vaddr) = &a.vaddr else {
            bail!("give --tcp or --vaddr");
        };
        let vaddr: VirtualAddr = vaddr.parse().context("bad --vaddr")?;
        let mut b = Endpoint::builder()
            .accept_ports(Vec::new())
            .modules(a.modules.clone())
            .circuits(!a.no_circuits)
            .resumption(!a.no_resumption)
            .plaintext(a.plaintext);
        if let Some(dir) = &a.state_dir {
            b = b.state_dir(dir);
        }
        if let Some(h) = &a.hub {
            b = b.hub(hub_target(h)?);
        }
        let endpoint = b.bind().await?;
        if a.hub.is_some() {
            endpoint.wait_hub(CONNECT_TIMEOUT).await?;
        }
        Ok(Dialer::Reach(endpoint, vaddr))
    }

    /// A connection; with `settle`, a reach stream that moves in the
    /// background (a routed stream onto a circuit, say) is measured where
    /// it settles, not while it moves.
    async fn dial(&self, settle: bool) -> anyhow::Result<Box<dyn Conn>> {
        Ok(match self {
            Dialer::Tcp(addr) => {
                let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .context("TCP connect timed out")??;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Dialer::Reach(e, vaddr) => {
                let s = e.connect_timeout(vaddr, CONNECT_TIMEOUT).await?;
                if settle {
                    tokio::time::timeout(CONNECT_TIMEOUT, s.upgrade_settled())
                        .await
                        .context("the stream did not settle on a path")?;
                }
                Box::new(s)
            }
        })
    }
}

async fn measure(a: RunArgs) -> anyhow::Result<Measured> {
    let dialer = Dialer::new(&a).await?;
    match a.op {
        Op::Throughput => {
            let secs = Duration::try_from_secs_f64(a.secs).context("bad --secs")?;
            let mut conns = Vec::new();
            for _ in 0..a.streams.max(1) {
                conns.push(dialer.dial(true).await?);
            }
            let started = Instant::now();
            let until = started + secs;
            let tasks: Vec<_> = conns
                .into_iter()
                .map(|c| tokio::spawn(bulk(c, until)))
                .collect();
            let mut bytes = 0;
            for t in tasks {
                bytes += t.await??;
            }
            let elapsed = started.elapsed().as_secs_f64();
            Ok(Measured {
                value: bytes as f64 * 8.0 / elapsed / 1e9,
                unit: "Gbit/s".into(),
                bytes,
            })
        }
        Op::Latency => {
            let mut c = dialer.dial(true).await?;
            c.write_all(b"P").await?;
            let mut rtts = Vec::new();
            let mut b = [0u8; 1];
            // A few unmeasured rounds first: the path's first packets pay
            // for cold caches and the window's first growth.
            for i in 0..a.count + 20 {
                let t = Instant::now();
                c.write_all(b"x").await?;
                c.flush().await?;
                c.read_exact(&mut b).await?;
                if i >= 20 {
                    rtts.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            Ok(Measured {
                value: crate::median(rtts),
                unit: "us".into(),
                bytes: 0,
            })
        }
        Op::Setup => {
            // The first connection warms the module cache, as a long-running
            // process's would be.
            drop(dialer.dial(false).await?);
            let mut times = Vec::new();
            for _ in 0..a.count {
                let t = Instant::now();
                let mut c = dialer.dial(false).await?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                c.write_all(b"S").await?;
            }
            Ok(Measured {
                value: crate::median(times),
                unit: "ms".into(),
                bytes: 0,
            })
        }
    }
}

/// Writes until `until`, then asks how much arrived.
async fn bulk(mut c: Box<dyn Conn>, until: Instant) -> anyhow::Result<u64> {
    c.write_all(b"T").await?;
    let buf = vec![0x5au8; BUF];
    let mut sent = 0u64;
    while Instant::now() < until {
        c.write_all(&buf).await?;
        sent += BUF as u64;
    }
    c.shutdown().await?;
    let mut n = [0u8; 8];
    c.read_exact(&mut n).await?;
    let got = u64::from_le_bytes(n);
    // The server counts what arrived: anything else is data lost on the way.
    if got != sent {
        bail!("sent {sent} bytes, the server received {got}");
    }
    Ok(got)
}

/// Sends the mapping requests of `a`, `a.window` at a time, and times
/// their answers (matched by internal port). An unanswered request is sent
/// again after 250 ms, three times at most.
async fn natpmp_load(a: NatpmpArgs) -> anyhow::Result<Granted> {
    use reach_gateway::natpmp::Request;
    use reach_gateway::table::Protocol;
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    socket.connect((a.gateway, reach_gateway::PORT)).await?;
    let request = |port: u16| {
        Request::Map {
            protocol: Protocol::Tcp,
            internal_port: port,
            suggested_port: 0,
            lifetime: a.lifetime,
        }
        .encode()
    };
    let ports: Vec<u16> = (0..a.count).map(|i| a.first.wrapping_add(i)).collect();
    let mut next = 0usize;
    // port -> (first sent, last sent, tries)
    let mut flight: std::collections::HashMap<u16, (Instant, Instant, u32)> = Default::default();
    let mut latencies = Vec::with_capacity(ports.len());
    let (mut granted, mut failed) = (0u32, 0u32);
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let retry = Duration::from_millis(250);
    while next < ports.len() || !flight.is_empty() {
        while flight.len() < a.window.max(1) && next < ports.len() {
            let p = ports[next];
            next += 1;
            socket.send(&request(p)).await?;
            let now = Instant::now();
            flight.insert(p, (now, now, 1));
        }
        match tokio::time::timeout(retry, socket.recv(&mut buf)).await {
            Ok(n) => {
                let n = n?;
                // version 0, 128 + opcode, result, epoch, internal port, ...
                if n >= 16 {
                    let port = u16::from_be_bytes([buf[8], buf[9]]);
                    if let Some((sent, _, _)) = flight.remove(&port) {
                        if buf[2..4] == [0, 0] {
                            granted += 1;
                            latencies.push(sent.elapsed().as_secs_f64() * 1e6);
                        } else {
                            failed += 1;
                        }
                    }
                }
            }
            Err(_) => {
                let now = Instant::now();
                let stale: Vec<u16> = flight
                    .iter()
                    .filter(|(_, (_, last, _))| now.duration_since(*last) >= retry)
                    .map(|(p, _)| *p)
                    .collect();
                for p in stale {
                    let Some(entry) = flight.get_mut(&p) else {
                        continue;
                    };
                    if entry.2 >= 4 {
                        flight.remove(&p);
                        failed += 1;
                    } else {
                        entry.1 = now;
                        entry.2 += 1;
                        socket.send(&request(p)).await?;
                    }
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let median_us = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    Ok(Granted {
        granted,
        failed,
        secs,
        median_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(op: Op, tcp: Option<SocketAddr>, vaddr: Option<String>, state: PathBuf) -> RunArgs {
        RunArgs {
            op,
            tcp,
            vaddr,
            hub: None,
            modules: vec![SetupModule::Direct],
            plaintext: false,
            no_circuits: false,
            no_resumption: false,
            state_dir: Some(state),
            streams: 2,
            secs: 0.2,
            count: 10,
        }
    }

    #[tokio::test]
    async fn the_agent_measures_tcp_and_reach_on_loopback() {
        let dir = crate::TempDir::new("agent-test").expect("dir");
        let free = |_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
        };
        let (tcp, reach_addr) = (free(0), free(1));
        let addr_file = dir.0.join("addr");
        let server = tokio::spawn(serve(ServeArgs {
            tcp,
            reach: reach_addr,
            hub: None,
            state_dir: dir.0.join("server"),
            addr_file: addr_file.clone(),
        }));
        let vaddr = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(v) = std::fs::read_to_string(&addr_file) {
                    if !v.is_empty() {
                        return v;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the server writes its address");
        for (tcp, vaddr) in [(Some(tcp), None), (None, Some(vaddr))] {
            let state = dir.0.join("client");
            let bulk = measure(run_args(Op::Throughput, tcp, vaddr.clone(), state.clone()))
                .await
                .expect("throughput");
            assert!(bulk.value > 0.0 && bulk.bytes > 0, "{bulk:?}");
            let rtt = measure(run_args(Op::Latency, tcp, vaddr.clone(), state.clone()))
                .await
                .expect("latency");
            assert!(rtt.value > 0.0 && rtt.unit == "us", "{rtt:?}");
            let setup = measure(run_args(Op::Setup, tcp, vaddr, state))
                .await
                .expect("setup");
            assert!(setup.value > 0.0 && setup.unit == "ms", "{setup:?}");
        }
        server.abort();
    }
}
