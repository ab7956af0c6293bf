//! `reach-bench hub`: what a hub costs in memory per attached node and per
//! routed stream, and routed throughput beside a direct stream.
//!
//! The hub is the real `reach hub` binary (built beside this one), so its
//! resident set size is its own: read from `/proc/PID/status` while it is
//! idle, after `nodes` sessions attached, with `streams` routed streams open,
//! and after every stream moved a full credit window towards a reader that
//! does not read (the worst case of buffering on the path).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reach::{Endpoint, HubTarget, ReachStream, SecretKey, SetupModule, VirtualAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{drain, median, pump, Row};

/// The hub process, killed when dropped.
struct HubProcess {
    child: Child,
    target: HubTarget,
    _dir: crate::TempDir,
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed when dropped.
fn start_hub(reach: &Path) -> anyhow::Result<HubProcess> {
    let dir = crate::TempDir::new("hub")?;
    let addr_file = dir.0.join("hub.txt");
    let child = Command::new(reach)
        .arg("--state-dir")
        .arg(&dir.0)
        .args([
            "hub",
            "--bind",
            "127.0.0.1",
            "--tcp-port",
            "0",
            "--addr-file",
        ])
        .arg(&addr_file)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {}", reach.display()))?;
    let mut hub = HubProcess {
        child,
        target: HubTarget {
            id: None,
            host: String::new(),
            port: 0,
        },
        _dir: dir,
    };
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            if !text.trim().is_empty() {
                hub.target = text.trim().parse().map_err(anyhow::Error::msg)?;
                return Ok(hub);
            }
        }
        if let Some(status) = hub.child.try_wait()? {
            bail!("reach hub exited with {status}");
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("reach hub did not start within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resident set size of `pid` in bytes.
fn rss(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib * 1024.0)
}

/// Waits until the hub's RSS stops growing (allocations settle after a burst).
async fn settled_rss(pid: u32) -> anyhow::Result<f64> {
    let mut last = rss(pid)?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss(pid)?;
        if (now - last).abs() < 64.0 * 1024.0 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// A node attached to `hub`; `circuits`: whether its routed streams move
/// onto relay circuits (off for the streams whose memory at the hub is
/// measured: a circuit moves them into the kernel, where it does not show).
async fn node(
    hub: &HubTarget,
    seed: u32,
    modules: Vec<SetupModule>,
    circuits: bool,
) -> anyhow::Result<Endpoint> {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&seed.to_le_bytes());
    key[4] = 0xbe;
    let ep = Endpoint::builder()
        .secret_key(SecretKey::from_seed(key))
        .bind_ip([127, 0, 0, 1].into())
        .hub(hub.clone())
        .modules(modules)
        .circuits(circuits)
        .bind()
        .await?;
    ep.wait_hub(Duration::from_secs(30)).await?;
    Ok(ep)
}

fn row(name: &str, unit: &str, value: f64) -> Row {
    Row::new(name, unit, value, None)
}

/// Routed streams per node pair: a hub holds at most 4096 per node link,
/// so larger counts spread over several pairs.
const STREAMS_PER_PAIR: usize = 2048;

/// Nodes one `hub-nodes` process attaches: each holds two sockets there
/// (its listener and its hub link), so a few thousand fit any limit.
const NODES_PER_PROCESS: u32 = 2500;

/// Raises this process's open-file limit (inherited by the processes it
/// starts) to `need`, within the hard limit (raised too where allowed); a
/// limit still too low is an error saying what to raise.
fn raise_fd_limit(need: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= need {
        return Ok(());
    }
    if setrlimit(Resource::RLIMIT_NOFILE, need, hard.max(need)).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, need.min(hard), hard)?;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < need {
        bail!("the open-file limit is {soft}, {need} needed: raise ulimit -n (the hard limit)");
    }
    Ok(())
}

/// `reach-bench hub-nodes`: nodes to attach and hold.
#[derive(clap::Args, Debug)]
pub struct HubNodesArgs {
    /// The hub, NODEID@IP:PORT.
    #[arg(long)]
    hub: String,
    /// Nodes to attach.
    #[arg(long)]
    count: u32,
    /// Seed of the first node's key (the others follow).
    #[arg(long)]
    first: u32,
}

/// Attaches `count` nodes, prints "ready" once all are registered, and
/// holds them until stdin closes.
pub async fn hold_nodes(args: HubNodesArgs) -> anyhow::Result<()> {
    raise_fd_limit(u64::from(args.count) * 3 + 256)?;
    let hub: HubTarget = args.hub.parse().map_err(anyhow::Error::msg)?;
    let mut held = Vec::with_capacity(args.count as usize);
    for i in 0..args.count {
        held.push(node(&hub, args.first + i, vec![SetupModule::Routed], false).await?);
    }
    println!("ready");
    let mut rest = Vec::new();
    tokio::io::stdin().read_to_end(&mut rest).await?;
    drop(held);
    Ok(())
}

/// `hub-nodes` processes holding `nodes` attached nodes between them;
/// killed when dropped.
struct NodeHolders(Vec<Child>);

impl Drop for NodeHolders {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `hub-nodes` processes for `nodes` nodes and waits until each
/// says they are attached.
fn attach_nodes(hub: &HubTarget, nodes: u32) -> anyhow::Result<NodeHolders> {
    use std::io::BufRead;
    let exe = std::env::current_exe()?;
    let target = hub.to_string();
    let mut holders = NodeHolders(Vec::new());
    let mut first = 10;
    let mut left = nodes;
    while left > 0 {
        let count = left.min(NODES_PER_PROCESS);
        let child = Command::new(&exe)
            .args(["hub-nodes", "--hub", &target, "--count"])
            .arg(count.to_string())
            .arg("--first")
            .arg(first.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        holders.0.push(child);
        first += count;
        left -= count;
    }
    for c in &mut holders.0 {
        let out = c.stdout.take().context("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("a hub-nodes process did not attach its nodes (said {line:?})");
        }
    }
    Ok(holders)
}

/// Runs the hub measurements.
pub async fn run(reach: &Path, nodes: u32, streams: usize, mib: u64) -> anyhow::Result<Vec<Row>> {
    let pairs = streams.div_ceil(STREAMS_PER_PAIR).max(1);
    // The hub holds a socket per node.
    raise_fd_limit(u64::from(nodes) + pairs as u64 * 8 + 1024)?;
    let hub = start_hub(reach)?;
    let pid = hub.child.id();
    let idle = settled_rss(pid).await?;

    // Sessions: `nodes` endpoints attached to the hub at once, held by
    // processes of their own.
    let attached = tokio::task::block_in_place(|| attach_nodes(&hub.target, nodes))?;
    let with_nodes = settled_rss(pid).await?;

    // Routed streams: all open at once between node pairs (at most
    // STREAMS_PER_PAIR each), then each moves a whole window towards a
    // reader that does not read yet.
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel::<ReachStream>();
    let mut servers = Vec::with_capacity(pairs);
    let mut clients = Vec::with_capacity(pairs);
    let mut acceptors = Vec::with_capacity(pairs);
    for p in 0..pairs as u32 {
        let server = node(
            &hub.target,
            1_000_000 + 2 * p,
            SetupModule::ALL.to_vec(),
            false,
        );
        let server = Arc::new(server.await?);
        let client = node(
            &hub.target,
            1_000_001 + 2 * p,
            vec![SetupModule::Routed],
            false,
        );
        clients.push(client.await?);
        let accepted_tx = accepted_tx.clone();
        acceptors.push({
            let server = server.clone();
            tokio::spawn(async move {
                while let Ok(s) = server.accept().await {
                    if accepted_tx.send(s).is_err() {
                        return;
                    }
                }
            })
        });
        servers.push(server);
    }
    let mut open = Vec::with_capacity(streams);
    for i in 0..streams {
        let p = i % pairs;
        let target = VirtualAddr::new(servers[p].node_id(), 1);
        open.push(clients[p].connect(&target).await?);
    }
    let mut held = Vec::with_capacity(streams);
    while held.len() < streams {
        held.push(
            tokio::time::timeout(Duration::from_secs(30), accepted.recv())
                .await
                .context("streams not accepted in time")?
                .context("acceptor stopped")?,
        );
    }
    let with_streams = settled_rss(pid).await?;
    let window = reach::proto::link::STREAM_WINDOW as usize;
    let chunk = vec![0xa5u8; window];
    for s in &mut open {
        // The end-to-end records add a little overhead, so somewhat less than
        // a window of payload fits; writes beyond would wait for credit.
        s.write_all(&chunk[..window * 7 / 8]).await?;
    }
    let full = settled_rss(pid).await?;
    let streams_f = streams as f64;

    // Routed throughput beside a direct stream between the same two nodes.
    drop(held);
    drop(open);
    for a in acceptors {
        a.abort();
    }
    drop(clients);
    drop(servers);
    // Throughput as a user gets it: routed, settled on a relay circuit.
    let server = Arc::new(node(&hub.target, 1, SetupModule::ALL.to_vec(), true).await?);
    let client = node(&hub.target, 2, vec![SetupModule::Routed], true).await?;
    let target = VirtualAddr::new(server.node_id(), 1);
    let routed = throughput(&client, &server, &target, mib).await?;
    let direct_client = node(&hub.target, 3, vec![SetupModule::Direct], true).await?;
    let direct = throughput(&direct_client, &server, &server.virtual_addr(1), mib).await?;

    let mib_f = 1024.0 * 1024.0;
    let mut rows = vec![
        row("hub RSS, idle", "MiB", idle / mib_f),
        row(
            &format!("hub RSS, {nodes} nodes attached"),
            "MiB",
            with_nodes / mib_f,
        ),
        row(
            "hub memory per attached node",
            "KiB",
            (with_nodes - idle) / f64::from(nodes.max(1)) / 1024.0,
        ),
        row(
            &format!("hub RSS, +{streams} routed streams open"),
            "MiB",
            with_streams / mib_f,
        ),
        row(
            "hub memory per open routed stream",
            "KiB",
            (with_streams - with_nodes) / streams_f / 1024.0,
        ),
        row(
            &format!("hub RSS, {streams} streams each a window in flight"),
            "MiB",
            full / mib_f,
        ),
        row(
            "hub memory per stream with a full window",
            "KiB",
            (full - with_nodes) / streams_f / 1024.0,
        ),
    ];
    rows.push(Row::new(
        "throughput, routed through the hub",
        "Gbit/s",
        routed,
        Some(("reach direct", direct)),
    ));
    drop(attached);
    Ok(rows)
}

/// Gbit/s of one stream from `client` to `server`'s `target`, `mib` MiB.
async fn throughput(
    client: &Endpoint,
    server: &Arc<Endpoint>,
    target: &VirtualAddr,
    mib: u64,
) -> anyhow::Result<f64> {
    let bytes = mib << 20;
    let srv = {
        let server = server.clone();
        tokio::spawn(async move { anyhow::Ok(drain(server.accept().await?).await?) })
    };
    let c = client.connect(target).await?;
    // Measured where the stream settles (a routed stream moves onto a relay
    // circuit in the background), like the lab's agent.
    tokio::time::timeout(Duration::from_secs(20), c.upgrade_settled())
        .await
        .context("the stream did not settle on a path")?;
    let t = Instant::now();
    pump(c, bytes).await?;
    let got = srv.await??;
    let secs = t.elapsed().as_secs_f64();
    if got != bytes {
        bail!("received {got} of {bytes} bytes");
    }
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}

/// A TCP proxy on loopback that delays every byte by `delay` each way, as a
/// long link would (userspace: this kernel has no netem). Returns its address.
async fn delay_proxy(
    upstream: std::net::SocketAddr,
    delay: Duration,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(delayed_copy(dr, uw, delay));
                tokio::spawn(delayed_copy(ur, dw, delay));
            });
        }
    });
    Ok(addr)
}

/// Copies `r` to `w`, each chunk released `delay` after it was read.
async fn delayed_copy(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0
            || tx
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Routed setup with the module cached and the session up, against the hub
/// path's round trip: both nodes reach the hub through `delay` each way.
pub async fn routed_setup(
    reach: &Path,
    delay: Duration,
    n: u32,
    bulk_mib: u64,
) -> anyhow::Result<Vec<Row>> {
    let hub = start_hub(reach)?;
    let hub_addr: std::net::SocketAddr =
        format!("{}:{}", hub.target.host, hub.target.port).parse()?;
    let proxy = delay_proxy(hub_addr, delay).await?;
    let via_proxy = HubTarget {
        id: hub.target.id,
        host: proxy.ip().to_string(),
        port: proxy.port(),
    };
    let server = Arc::new(node(&via_proxy, 1, SetupModule::ALL.to_vec(), true).await?);
    // On loopback every direct path works; the cache would hold Routed for a
    // target behind a NAT, which is what Routed-only stands in for here.
    let client = node(&via_proxy, 2, vec![SetupModule::Routed], true).await?;
    // The same without relay circuits: the stream stays on the hub links,
    // where the credit window bounds it (a multi-hop path today).
    let links_only = node(&via_proxy, 3, vec![SetupModule::Routed], false).await?;
    let echo = {
        let server = server.clone();
        let mut left = n + 1;
        tokio::spawn(async move {
            while left > 0 {
                let Ok(mut s) = server.accept().await else {
                    return;
                };
                left -= 1;
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    while matches!(s.read(&mut b).await, Ok(1)) {
                        if s.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                });
            }
        })
    };
    // Only the NodeId: no direct address, so the driver goes through the hub;
    // the first connection fills the cache.
    let target = VirtualAddr::new(server.node_id(), 1);
    let first = client.connect(&target).await?;
    anyhow::ensure!(
        first.info().module == SetupModule::Routed,
        "expected a routed stream, got {}",
        first.info().module
    );
    let first_ms = first.info().setup_time.as_secs_f64() * 1e3;
    let mut setups = Vec::new();
    let mut rtts = Vec::new();
    for _ in 0..n {
        let mut s = client.connect(&target).await?;
        setups.push(s.info().setup_time.as_secs_f64() * 1e3);
        let t = Instant::now();
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    echo.abort();
    let (setup, rtt) = (median(setups), median(rtts));
    // Bulk over the same delayed path, beside plain TCP through two chained
    // delay proxies (the same round trip, without reach or the hub).
    // Three rounds, alternating, medians: the delay proxies are userspace
    // copies sharing the machine's cores with everything else.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let leg2 = delay_proxy(sink_addr, delay).await?;
    let leg1 = delay_proxy(leg2, delay).await?;
    let bytes = bulk_mib << 20;
    let (mut routed, mut plain, mut on_links) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        routed.push(throughput(&client, &server, &target, bulk_mib).await? * 1e3);
        on_links.push(throughput(&links_only, &server, &target, bulk_mib).await? * 1e3);
        let tcp = tokio::net::TcpStream::connect(leg1).await?;
        let (accepted, _) = sink.accept().await?;
        let drained = tokio::spawn(drain(accepted));
        let t = Instant::now();
        pump(tcp, bytes).await?;
        let got = drained.await??;
        anyhow::ensure!(got == bytes, "plain TCP: received {got} of {bytes} bytes");
        plain.push(bytes as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6);
    }
    let (routed_mbit, tcp_mbit) = (median(routed), median(plain));
    Ok(vec![
        Row::new(
            format!("routed throughput over a {rtt:.0} ms path"),
            "Mbit/s",
            routed_mbit,
            Some(("plain TCP, same delays", tcp_mbit)),
        ),
        Row::new(
            format!("routed throughput over a {rtt:.0} ms path, hub links only"),
            "Mbit/s",
            median(on_links),
            Some(("plain TCP, same delays", tcp_mbit)),
        ),
        Row::new(
            "routed setup, first connection",
            "ms",
            first_ms,
            Some(("hub path round trip", rtt)),
        ),
        Row::new(
            "routed setup, cached module",
            "ms",
            setup,
            Some(("hub path round trip", rtt)),
        ),
    ])
}
