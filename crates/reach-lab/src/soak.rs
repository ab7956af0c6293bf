//! The soak: thousands of short and long streams through two federated hubs,
//! with the hubs killed and restarted at random, every byte checked.
//!
//! ```text
//!  workers --TCP--> reach forward --routed--> hub B === hub A --> reach expose --TCP--> echo
//!                   (attached to B)            ^ killed and restarted at random ^
//! ```
//! Every process is a real `reach` process on loopback. A worker sends a
//! seeded random payload (mostly small, sometimes megabytes), half-closes,
//! and reads the echo back. Each stream ends one of three ways: intact
//! (every byte back, in order), cut (an error: a reset or timeout, which a
//! hub killed under it must cause), or lost (a clean end with bytes missing
//! or wrong, which must never happen). At the end the long-lived processes
//! (expose, forward) are compared with themselves after warm-up: open file
//! descriptors, threads and resident memory, after every stream has ended.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reach_proto::rng::Rng;

/// How the soak runs.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// How long streams are started.
    pub duration: Duration,
    /// Streams in flight at once.
    pub workers: usize,
    /// The `reach` binary.
    pub reach: PathBuf,
    /// Seed of the payloads and of the fault schedule.
    pub seed: u64,
    /// Where the processes keep their state and logs.
    pub dir: PathBuf,
}

/// What a process looked like at one moment.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, PartialEq, Eq)]
pub struct Footprint {
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
    /// Resident memory, KiB.
    pub rss_kib: u64,
}

/// What the soak saw.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SoakReport {
    /// Seconds streams were started for.
    pub seconds: f64,
    /// Streams that came back intact.
    pub intact: u64,
    /// Streams cut by an error (expected when a hub dies under them).
    pub cut: u64,
    /// Streams that ended cleanly with bytes missing or wrong (must be 0).
    pub lost: u64,
    /// Bytes sent and checked on intact streams.
    pub bytes: u64,
    /// Hub kills (each followed by a restart).
    pub faults: u64,
    /// `reach expose` after warm-up, and at the end.
    pub expose: (Footprint, Footprint),
    /// `reach forward` after warm-up, and at the end.
    pub forward: (Footprint, Footprint),
    /// Leaks found (file descriptors or threads that stayed), in words.
    pub leaks: Vec<String>,
    /// The first few lost streams, in words.
    pub lost_examples: Vec<String>,
}

impl SoakReport {
    /// Whether the soak passed: nothing lost, nothing leaked, streams moved.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.leaks.is_empty() && self.intact > 0
    }
}

/// The footprint of process `pid`, from /proc.
fn footprint(pid: u32) -> Footprint {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Footprint {
        fds,
        threads: field("Threads:"),
        rss_kib: field("VmRSS:"),
    }
}

/// A child process, killed when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let file = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        Ok(Proc { child })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for `path` to hold a line, within `limit`.
fn wait_for_line(path: &Path, limit: Duration) -> anyhow::Result<String> {
    crate::wait::for_file(path, limit).with_context(|| format!("{} never appeared", path.display()))
}

/// A free loopback TCP port.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The echo service: answers each connection with what it sent, once it
/// has finished sending.
fn echo_service(stop: Arc<AtomicBool>) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if c.read_to_end(&mut buf).is_ok() {
                    let _ = c.write_all(&buf);
                }
            });
        }
    });
    Ok(addr)
}

/// What the workers count as streams end.
#[derive(Default)]
struct Tally {
    intact: AtomicU64,
    cut: AtomicU64,
    lost: AtomicU64,
    bytes: AtomicU64,
}

/// How one stream ended.
enum Outcome {
    Intact(u64),
    Cut,
    /// What was wrong, in words.
    Lost(String),
}

/// One stream through `forward`: sends `len` seeded bytes, half-closes,
/// reads the echo and compares it.
fn one_stream(forward: SocketAddr, len: usize, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
    let Ok(mut c) = TcpStream::connect(forward) else {
        return Outcome::Cut;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = c.set_write_timeout(Some(Duration::from_secs(60)));
    let Ok(mut reader) = c.try_clone() else {
        return Outcome::Cut;
    };
    let expected = data.clone();
    let read = std::thread::spawn(move || {
        let mut back = Vec::with_capacity(expected.len());
        match reader.read_to_end(&mut back) {
            Ok(_) if back == expected => Outcome::Intact(back.len() as u64),
            Ok(_) => {
                let same = back
                    .iter()
                    .zip(&expected)
                    .take_while(|(a, b)| a == b)
                    .count();
                Outcome::Lost(format!(
                    "{} of {} bytes back, the first {same} right",
                    back.len(),
                    expected.len()
                ))
            }
            Err(_) => Outcome::Cut,
        }
    });
    let sent = c
        .write_all(&data)
        .and_then(|()| c.shutdown(Shutdown::Write));
    // A send that failed saw the reset; the kernel reports it once, so the
    // reader may then see a plain end of file: that stream was cut, not
    // lost. Lost means everything was sent and the answer ended cleanly
    // but wrong or short.
    match (sent, read.join()) {
        (Ok(()), Ok(o)) => o,
        _ => Outcome::Cut,
    }
}

/// Runs the soak.
pub fn run(opts: &SoakOptions) -> anyhow::Result<SoakReport> {
    let dir = &opts.dir;
    std::fs::create_dir_all(dir)?;
    let reach = |state: &str| {
        let mut c = Command::new(&opts.reach);
        c.arg("--state-dir").arg(dir.join(state));
        c
    };
    let id_of = |state: &str| -> anyhow::Result<String> {
        let out = reach(state).arg("id").output()?;
        if !out.status.success() {
            bail!("reach id: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let b_id = id_of("hub-b")?;
    let (port_a, port_b) = (free_port()?, free_port()?);
    let hub_args = |state: &str, port: u16, extra: Vec<String>| {
        let mut args: Vec<String> = ["hub", "--bind", "127.0.0.1", "--tcp-port"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(port.to_string());
        args.push("--addr-file".into());
        args.push(dir.join(state).join("hub.txt").display().to_string());
        args.extend(extra);
        args
    };
    let a_args = hub_args("hub-a", port_a, vec!["--allow-hub".into(), b_id]);
    let start_hub = |state: &str, args: &[String]| -> anyhow::Result<(Proc, String)> {
        let _ = std::fs::remove_file(dir.join(state).join("hub.txt"));
        let proc = Proc::spawn(reach(state).args(args), &dir.join(format!("{state}.log")))?;
        let target = wait_for_line(&dir.join(state).join("hub.txt"), Duration::from_secs(20))?;
        Ok((proc, target))
    };
    let (hub_a, a_target) = start_hub("hub-a", &a_args)?;
    let b_args = hub_args("hub-b", port_b, vec!["--peer".into(), a_target.clone()]);
    let (hub_b, b_target) = start_hub("hub-b", &b_args)?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = echo_service(stop.clone())?;
    let addr_file = dir.join("expose.addr");
    let mut expose_cmd = reach("expose");
    expose_cmd.args([
        "expose",
        &echo.to_string(),
        "--open",
        "--virtual-only",
        "--max-connections",
        "100000",
        "--max-per-peer",
        "100000",
        "--hub",
        &a_target,
        "--addr-file",
    ]);
    expose_cmd.arg(&addr_file);
    let expose = Proc::spawn(&mut expose_cmd, &dir.join("expose.log"))?;
    let vaddr = wait_for_line(&addr_file, Duration::from_secs(20))?;
    let forward_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let forward = Proc::spawn(
        reach("forward").args([
            "forward",
            &forward_addr.to_string(),
            &vaddr,
            "--hub",
            &b_target,
            "--modules",
            "routed",
        ]),
        &dir.join("forward.log"),
    )?;
    // Warm up: one stream must get through before anything is measured.
    let warm = crate::wait::until(Duration::from_secs(30), || {
        matches!(one_stream(forward_addr, 1000, 7), Outcome::Intact(_)).then_some(())
    });
    if warm.is_none() {
        bail!(
            "no stream got through the hubs; see the logs in {}",
            dir.display()
        );
    }
    let expose_pid = expose.child.id();
    let forward_pid = forward.child.id();
    let before = (footprint(expose_pid), footprint(forward_pid));
    let examples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let counters = Arc::new(Tally::default());
    let started = Instant::now();
    let deadline = started + opts.duration;
    let workers: Vec<_> = (0..opts.workers.max(1))
        .map(|w| {
            let counters = counters.clone();
            let examples = examples.clone();
            let mut rng = Rng::new(opts.seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    // Nine in ten short (up to 64 KiB), one in ten long (up to 8 MiB).
                    let len = if rng.below(10) == 0 {
                        1 + rng.below(8 << 20) as usize
                    } else {
                        1 + rng.below(64 << 10) as usize
                    };
                    match one_stream(forward_addr, len, rng.next_u64()) {
                        Outcome::Intact(n) => {
                            counters.intact.fetch_add(1, Ordering::Relaxed);
                            counters.bytes.fetch_add(n, Ordering::Relaxed);
                        }
                        Outcome::Cut => {
                            counters.cut.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::Lost(why) => {
                            counters.lost.fetch_add(1, Ordering::Relaxed);
                            let mut e = examples.lock().unwrap_or_else(|p| p.into_inner());
                            if e.len() < 10 {
                                e.push(why);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    // Faults: every 5 to 15 s one hub is killed, and restarted 0.5 to 2 s later.
    let mut rng = Rng::new(opts.seed.wrapping_add(0x5eed));
    let mut hubs = [(hub_a, a_args, "hub-a"), (hub_b, b_args, "hub-b")];
    let mut faults = 0u64;
    loop {
        let next = Instant::now() + Duration::from_millis(5000 + rng.below(10_000));
        if next + Duration::from_secs(3) >= deadline {
            break;
        }
        std::thread::sleep(next - Instant::now());
        let which = rng.below(2) as usize;
        let (proc, args, state) = &mut hubs[which];
        proc.kill();
        faults += 1;
        std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
        *proc = start_hub(state, args)?.0;
    }
    for w in workers {
        let _ = w.join();
    }
    // Every stream has ended; give the processes their keepalive and close
    // times to drop what those streams held.
    let _ = crate::wait::until(Duration::from_secs(30), || {
        let now = (footprint(expose_pid), footprint(forward_pid));
        (now.0.fds <= before.0.fds && now.1.fds <= before.1.fds).then_some(())
    });
    let after = (footprint(expose_pid), footprint(forward_pid));
    let mut leaks = Vec::new();
    for (name, pid, b, a) in [
        ("expose", expose_pid, before.0, after.0),
        ("forward", forward_pid, before.1, after.1),
    ] {
        if a.fds > b.fds {
            leaks.push(format!(
                "{name}: {} file descriptors after, {} before ({})",
                a.fds,
                b.fds,
                describe_fds(pid)
            ));
        }
        // The runtime may start blocking threads on demand; a few more is not a leak.
        if a.threads > b.threads + 8 {
            leaks.push(format!(
                "{name}: {} threads after, {} before",
                a.threads, b.threads
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let lost_examples = examples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(SoakReport {
        seconds: started.elapsed().as_secs_f64(),
        intact: counters.intact.load(Ordering::Relaxed),
        cut: counters.cut.load(Ordering::Relaxed),
        lost: counters.lost.load(Ordering::Relaxed),
        bytes: counters.bytes.load(Ordering::Relaxed),
        faults,
        expose: (before.0, after.0),
        forward: (before.1, after.1),
        leaks,
        lost_examples,
    })
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "soak: {:.0} s of streams through two hubs", self.seconds)?;
        writeln!(
            f,
            "  streams: {} intact, {} cut by faults, {} lost",
            self.intact, self.cut, self.lost
        )?;
        writeln!(
            f,
            "  bytes checked: {:.1} MiB",
            self.bytes as f64 / f64::from(1 << 20)
        )?;
        writeln!(f, "  faults: {} hub kills and restarts", self.faults)?;
        for (name, (b, a)) in [("expose", self.expose), ("forward", self.forward)] {
            writeln!(
                f,
                "  {name}: fds {} -> {}, threads {} -> {}, RSS {} -> {} KiB",
                b.fds, a.fds, b.threads, a.threads, b.rss_kib, a.rss_kib
            )?;
        }
        for e in &self.lost_examples {
            writeln!(f, "  lost: {e}")?;
        }
        if self.leaks.is_empty() {
            writeln!(f, "  leaks: none")
        } else {
            writeln!(f, "  leaks: {}", self.leaks.join("; "))
        }
    }
}

/// What `pid`'s file descriptors are, for a leak report: counts by kind,
/// and each TCP socket's local and remote port and state (from
/// `/proc/net/tcp*`, matched by inode).
fn describe_fds(pid: u32) -> String {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return "process gone".into();
    };
    let targets: Vec<String> = dir
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    let mut tcp = std::collections::HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        // The process's own network namespace's table.
        let table = table.replacen("/proc", &format!("/proc/{pid}"), 1);
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 {
                let port = |a: &str| {
                    a.rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        .unwrap_or(0)
                };
                tcp.insert(
                    f[9].to_string(),
                    format!("tcp {}->{} st{}", port(f[1]), port(f[2]), f[3]),
                );
            }
        }
    }
    let mut kinds: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for t in &targets {
        let kind = match t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            Some(inode) => tcp
                .get(inode)
                .cloned()
                .unwrap_or_else(|| "socket (not tcp)".into()),
            None => t.split('[').next().unwrap_or(t).to_string(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
        .iter()
        .map(|(k, n)| format!("{n}x {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}
