//! `reach-bench hub`: what a hub costs in memory per attached node and per
//! routed stream, and routed throughput beside a direct stream.
//!
//! The hub is the real `reach hub` binary (built beside this one), so its
//! resident set size is its own: read from `/proc/PID/status` while it is
//! idle, after `nodes` sessions attached, with `streams` routed streams open,
//! and after every stream moved a full credit window towards a reader that
//! does not read (the worst case of buffering on the path).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reach::{Endpoint, HubTarget, ReachStream, SecretKey, SetupModule, VirtualAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Row;

/// The hub process, killed when dropped.
struct HubProcess {
    child: Child,
    target: HubTarget,
    _dir: TempDir,
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_hub(reach: &Path) -> anyhow::Result<HubProcess> {
    let dir = std::env::temp_dir().join(format!("reach-bench-hub-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dir = TempDir(dir);
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

async fn node(hub: &HubTarget, seed: u32, modules: Vec<SetupModule>) -> anyhow::Result<Endpoint> {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&seed.to_le_bytes());
    key[4] = 0xbe;
    let ep = Endpoint::builder()
        .secret_key(SecretKey::from_seed(key))
        .bind_ip([127, 0, 0, 1].into())
        .hub(hub.clone())
        .modules(modules)
        .bind()
        .await?;
    ep.wait_hub(Duration::from_secs(30)).await?;
    Ok(ep)
}

fn row(name: &str, unit: &str, value: f64) -> Row {
    Row {
        name: name.into(),
        unit: unit.into(),
        value,
        baseline_name: String::new(),
        baseline: f64::NAN,
        ratio: f64::NAN,
    }
}

/// Runs the hub measurements.
pub async fn run(reach: &Path, nodes: u32, streams: usize, mib: u64) -> anyhow::Result<Vec<Row>> {
    let hub = start_hub(reach)?;
    let pid = hub.child.id();
    let idle = settled_rss(pid).await?;

    // Sessions: `nodes` endpoints attached to the hub at once.
    let mut attached = Vec::with_capacity(nodes as usize);
    for i in 0..nodes {
        attached.push(node(&hub.target, i + 10, vec![SetupModule::Routed]).await?);
    }
    let with_nodes = settled_rss(pid).await?;

    // Routed streams: all open at once between two nodes, then each moves a
    // whole window towards a reader that does not read yet.
    let server = Arc::new(node(&hub.target, 1, SetupModule::ALL.to_vec()).await?);
    let client = node(&hub.target, 2, vec![SetupModule::Routed]).await?;
    let target = VirtualAddr::new(server.node_id(), 1);
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel::<ReachStream>();
    let acceptor = {
        let server = server.clone();
        tokio::spawn(async move {
            while let Ok(s) = server.accept().await {
                if accepted_tx.send(s).is_err() {
                    return;
                }
            }
        })
    };
    let mut open = Vec::with_capacity(streams);
    for _ in 0..streams {
        open.push(client.connect(&target).await?);
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
    acceptor.abort();
    let routed = throughput(&client, &server, &target, mib).await?;
    let direct_client = node(&hub.target, 3, vec![SetupModule::Direct]).await?;
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
    rows.push(Row {
        name: "throughput, routed through the hub".into(),
        unit: "Gbit/s".into(),
        value: routed,
        baseline_name: "reach direct".into(),
        baseline: direct,
        ratio: routed / direct,
    });
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
        tokio::spawn(async move {
            let mut s = server.accept().await?;
            let mut buf = vec![0u8; 256 << 10];
            let mut n = 0u64;
            loop {
                let got = s.read(&mut buf).await?;
                if got == 0 {
                    return anyhow::Ok(n);
                }
                n += got as u64;
            }
        })
    };
    let mut c = client.connect(target).await?;
    let t = Instant::now();
    let buf = vec![0x5au8; 256 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        c.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    c.shutdown().await?;
    let got = srv.await??;
    let secs = t.elapsed().as_secs_f64();
    if got != bytes {
        bail!("received {got} of {bytes} bytes");
    }
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}
