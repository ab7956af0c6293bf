//! `reach-bench lab`: reach between network namespaces, beside plain TCP,
//! socat and rathole on the same paths, in one run.
//!
//! ```text
//!   a ---------------------------------------------- b      direct
//!   a ---- hub1 ------------------------------------ b      routed, 1 hub / socat / rathole
//!   a ---- hub1 ------- hub2 ====== hub3 ========== c      routed, 3 hubs / 3 socats
//! ```
//! `a`, `b` and `hub1` are each on a site of their own behind a plain
//! router. hub2 is the multi-homed front-end of a site whose LAN (`===`,
//! 10.3.0.0/24) holds hub3 and `c`, both non-routed: hub1 and hub3 cannot
//! reach each other, so they cannot shortcut the chain with a direct link.
//! The links are veth pairs without rate limits, so every figure is bounded
//! by CPU, and all processes share this machine's cores. The measuring agent (`reach-bench
//! agent`, [`crate::agent`]) runs in `a` and `b`; each figure is the median
//! of its rounds, and rounds go through the variants in turn, so a noisy
//! neighbour hits all of them alike. Relay CPU is read from `/proc` before
//! and after each routed bulk transfer.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use reach_lab::lab::Process;
use reach_lab::rathole::{self, Rathole, Transport};
use reach_lab::{Lab, Topology};

use crate::agent::Measured;
use crate::Row;

/// The bench's topology (shared with the lab test of circuits across hubs).
const TOPOLOGY: &str = include_str!("../../../lab/topologies/hub-chain.toml");

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    /// Seconds per bulk transfer.
    pub secs: f64,
    /// Round trips per latency figure, connections per setup figure.
    pub count: u32,
    /// Rounds per figure (the median is reported).
    pub rounds: usize,
}

/// Agent ports: the server on `b` attached to hub1 and the one on `c`
/// attached to hub3, each with a plain TCP port and a reach port.
const B1_TCP: u16 = 5301;
const B1_REACH: u16 = 5302;
const B3_TCP: u16 = 5311;
const B3_REACH: u16 = 5312;
/// Relay ports on the hub hosts.
const SOCAT_PORT: u16 = 6001;
const SOCAT3_PORT: u16 = 6003;
const RATHOLE_PORTS: [(Transport, u16, u16); 2] =
    [(Transport::Tcp, 2333, 6011), (Transport::Noise, 2334, 6012)];
/// rathole between `a` and `b`: control port in `a`, local port in `a`.
const RATHOLE_DIRECT: (u16, u16) = (2335, 6013);
/// socat's buffer, as in the issue's reference runs.
const SOCAT_BUF: &str = "262144";
/// How long a server has to come up.
const READY: Duration = Duration::from_secs(20);

/// The routed paths and the relays beside them, by name.
const SOCAT_1: &str = "socat relay on hub1";
/// hub1's kernel forwarding a port to `b` (nftables DNAT and masquerade):
/// no relay process at all, the floor of any relay through hub1 here.
const KERNEL_1: &str = "kernel forward through hub1";
/// The port hub1's kernel forwards.
const FORWARD_PORT: u16 = 6020;
const ROUTED_1: &str = "reach routed, 1 hub";
/// The same, kept on hub links (no relay circuit): the step 8 data path.
const ROUTED_1_LINKS: &str = "reach routed, 1 hub, hub links only";
const SOCAT_3: &str = "socat relays on hub1, hub2, hub3";
const ROUTED_3: &str = "reach routed, 3 hubs";

/// A lab host's address as other sites reach it.
fn ip(lab: &Lab, host: &str) -> Ipv4Addr {
    let h = lab.host(host);
    h.public.unwrap_or(h.lan)
}

/// A named way to run the agent in `a`: its name and arguments.
type Variant = (String, Vec<String>);

/// One measured path: how the agent in `a` is run, and which process (if
/// any) relays it.
struct Path1 {
    name: String,
    args: Vec<String>,
    relays: Vec<u32>,
}

/// The running lab and everything in it.
struct Bench {
    lab: Lab,
    exe: PathBuf,
    dir: PathBuf,
    hubs: reach_lab::hubs::HubSet,
    /// The virtual address of the agent server on `b` (attached to hub1).
    b1: String,
    /// The agent servers' pids (pinned for the placed round trips).
    servers: Vec<u32>,
    _procs: Vec<Process>,
    _ratholes: Vec<Rathole>,
    _tunnel: Option<reach_lab::boringtun::Tunnel>,
}

impl Bench {
    /// Brings up the lab of `topology` (TOML) and starts its hubs.
    fn start(topology: &str, dir: &Path) -> anyhow::Result<Bench> {
        let t = Topology::from_toml(topology).context("bench topology")?;
        let lab = Lab::up(&t).context("cannot build the lab (needs root)")?;
        let exe = std::env::current_exe()?;
        let tools = crate::tools_dir(&["reach"])?;
        let hub_conf = t.hubs.as_ref().context("[hubs]")?;
        let hubs = reach_lab::hubs::start(&lab, &t, hub_conf, &tools, dir)?;
        Ok(Bench {
            lab,
            exe,
            dir: dir.to_path_buf(),
            hubs,
            b1: String::new(),
            servers: Vec::new(),
            _procs: Vec::new(),
            _ratholes: Vec::new(),
            _tunnel: None,
        })
    }

    fn up(dir: &Path) -> anyhow::Result<(Bench, Vec<Path1>, Vec<Variant>)> {
        let mut b = Bench::start(TOPOLOGY, dir)?;
        let tools = crate::tools_dir(&["reach"])?;
        b.b1 = b.agent_server("b", "b1", B1_TCP, B1_REACH, "hub1")?;
        let b3 = b.agent_server("c", "b3", B3_TCP, B3_REACH, "hub3")?;
        // Every hub knows both servers (and `a`'s attach is moot: it only
        // connects) before anything is routed to them.
        b.hubs.wait_converged(&b.lab, &tools, 2, READY)?;
        let paths = b.paths(&b3)?;
        let tunnels = b.tunnels()?;
        Ok((b, paths, tunnels))
    }

    /// Starts an agent server in `host` attached to `hub`; returns its
    /// virtual address.
    fn agent_server(
        &mut self,
        host: &str,
        name: &str,
        tcp: u16,
        reach: u16,
        hub: &str,
    ) -> anyhow::Result<String> {
        let target = self
            .hubs
            .target(&self.lab, host, hub)
            .context("hub target")?;
        let addr_file = self.dir.join(format!("{name}.addr"));
        let server = Lab::spawn_logged(
            self.lab
                .command(host, &self.exe)
                .args(["agent", "serve", "--tcp", &format!("0.0.0.0:{tcp}")])
                .args(["--reach", &format!("0.0.0.0:{reach}"), "--hub", &target])
                .arg("--state-dir")
                .arg(self.dir.join(name))
                .arg("--addr-file")
                .arg(&addr_file),
            &self.dir.join(format!("{name}.log")),
        )?;
        self.servers.push(server.id());
        self._procs.push(server);
        if reach_lab::wait::for_file(&addr_file, READY).is_none() {
            bail!(
                "the agent server {name} did not start: {}",
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
            );
        }
        Ok(std::fs::read_to_string(&addr_file)?.trim().to_string())
    }

    /// Runs `socat` in `host`, relaying `port` to `to`; returns its pid.
    fn socat(&mut self, host: &str, port: u16, to: SocketAddr) -> anyhow::Result<u32> {
        let p = Lab::spawn_logged(
            self.lab
                .command(host, "socat")
                .args(["-b", SOCAT_BUF])
                .arg(format!("TCP-LISTEN:{port},fork,reuseaddr"))
                .arg(format!("TCP:{to}")),
            &self.dir.join(format!("socat-{host}-{port}.log")),
        )
        .context("cannot run socat (apt-get install socat)")?;
        let pid = p.id();
        self._procs.push(p);
        self.wait_listening(host, port)?;
        Ok(pid)
    }

    /// Makes `host`'s kernel forward TCP `port` to `to` (DNAT, and
    /// masquerade so that the replies come back through it); the lab's
    /// namespaces go with their rules.
    fn kernel_forward(&self, host: &str, port: u16, to: SocketAddr) -> anyhow::Result<()> {
        let (ip, to_port) = (to.ip(), to.port());
        let rules = format!(
            "table ip reach_bench_forward {{\n\
             chain pre {{ type nat hook prerouting priority dstnat; tcp dport {port} dnat to {to}; }}\n\
             chain post {{ type nat hook postrouting priority srcnat; ip daddr {ip} tcp dport {to_port} masquerade; }}\n\
             }}\n"
        );
        let sysctl = self
            .lab
            .command(host, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .status()?;
        if !sysctl.success() {
            bail!("cannot enable forwarding in {host}");
        }
        let mut nft = self
            .lab
            .command(host, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft (apt-get install nftables)")?;
        if let Some(mut stdin) = nft.stdin.take() {
            use std::io::Write;
            stdin.write_all(rules.as_bytes())?;
        }
        let out = nft.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {host}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Waits until something listens on TCP `port` in `host`.
    fn wait_listening(&self, host: &str, port: u16) -> anyhow::Result<()> {
        let up = reach_lab::wait::until(READY, || {
            let out = self
                .lab
                .command(host, "ss")
                .args(["-Hltn", &format!("sport = :{port}")])
                .output()
                .ok()?;
            (!out.stdout.is_empty()).then_some(())
        });
        up.with_context(|| format!("nothing listens on port {port} in {host}"))
    }

    /// Encrypted tunnels from `a` to `b` as people build them today, for
    /// the direct encrypted figures: rathole's Noise transport (its server
    /// in `a`, its client beside the service in `b`) and a boringtun
    /// WireGuard tunnel. Returns (name, agent arguments) of each.
    fn tunnels(&mut self) -> anyhow::Result<Vec<Variant>> {
        let (a, b) = (ip(&self.lab, "a"), ip(&self.lab, "b"));
        let setup = rathole::Setup {
            server_host: "a",
            control: (a, RATHOLE_DIRECT.0).into(),
            public: ([127, 0, 0, 1], RATHOLE_DIRECT.1).into(),
            client_host: "b",
            service: ([127, 0, 0, 1], B1_TCP).into(),
        };
        let r = Rathole::start(
            &self.lab,
            &setup,
            Transport::Noise,
            &self.dir.join("rathole-direct"),
        )?;
        self._ratholes.push(r);
        let tag = format!("{}", std::process::id() % 100_000);
        let tunnel = reach_lab::boringtun::Tunnel::start(
            &self.lab,
            ("a", a),
            ("b", b),
            &tag,
            &self.dir.join("boringtun"),
        )?;
        self._tunnel = Some(tunnel);
        Ok(vec![
            (
                "rathole noise, a to b".into(),
                vec!["--tcp".into(), format!("127.0.0.1:{}", RATHOLE_DIRECT.1)],
            ),
            (
                "boringtun (WireGuard), a to b".into(),
                vec![
                    "--tcp".into(),
                    format!("{}:{B1_TCP}", reach_lab::boringtun::INNER_B),
                ],
            ),
        ])
    }

    /// Every path measured, relays started.
    fn paths(&mut self, b3: &str) -> anyhow::Result<Vec<Path1>> {
        let lab_b = ip(&self.lab, "b");
        let hub = |n: &str| ip(&self.lab, n);
        let (h1, h2) = (hub("hub1"), hub("hub2"));
        let mut paths = vec![Path1 {
            name: "plain TCP, direct".into(),
            args: vec!["--tcp".into(), format!("{lab_b}:{B1_TCP}")],
            relays: vec![],
        }];
        self.kernel_forward("hub1", FORWARD_PORT, (lab_b, B1_TCP).into())?;
        paths.push(Path1 {
            name: KERNEL_1.into(),
            args: vec!["--tcp".into(), format!("{h1}:{FORWARD_PORT}")],
            relays: vec![],
        });
        let socat = self.socat("hub1", SOCAT_PORT, (lab_b, B1_TCP).into())?;
        paths.push(Path1 {
            name: SOCAT_1.into(),
            args: vec!["--tcp".into(), format!("{h1}:{SOCAT_PORT}")],
            relays: vec![socat],
        });
        for (transport, control, public) in RATHOLE_PORTS {
            let setup = rathole::Setup {
                server_host: "hub1",
                control: (h1, control).into(),
                public: (h1, public).into(),
                client_host: "b",
                service: ([127, 0, 0, 1], B1_TCP).into(),
            };
            let r = Rathole::start(&self.lab, &setup, transport, &self.dir.join("rathole"))?;
            paths.push(Path1 {
                name: format!("rathole {} on hub1", transport.name()),
                args: vec!["--tcp".into(), format!("{h1}:{public}")],
                relays: vec![r.server_pid()],
            });
            self._ratholes.push(r);
        }
        let hub1 = self.hubs.target(&self.lab, "a", "hub1").context("hub1")?;
        let hub_pids = ["hub1", "hub2", "hub3"]
            .map(|h| self.hubs.pid(h).with_context(|| format!("no {h} process")));
        let [p1, p2, p3] = hub_pids;
        let (p1, p2, p3) = (p1?, p2?, p3?);
        paths.push(Path1 {
            name: ROUTED_1.into(),
            args: reach_args(&self.b1, "routed", Some(&hub1)),
            relays: vec![p1],
        });
        let mut links_only = reach_args(&self.b1, "routed", Some(&hub1));
        links_only.push("--no-circuits".into());
        paths.push(Path1 {
            name: ROUTED_1_LINKS.into(),
            args: links_only,
            relays: vec![p1],
        });
        // Three hubs: socat chained through the same hosts, and reach routed
        // from a node on hub1 to one on hub3.
        let c = self.lab.host("c").lan;
        let s3 = self.socat("hub3", SOCAT3_PORT, (c, B3_TCP).into())?;
        let s2 = self.socat(
            "hub2",
            SOCAT3_PORT,
            (self.lab.host("hub3").lan, SOCAT3_PORT).into(),
        )?;
        let s1 = self.socat("hub1", SOCAT3_PORT, (h2, SOCAT3_PORT).into())?;
        paths.push(Path1 {
            name: SOCAT_3.into(),
            args: vec!["--tcp".into(), format!("{h1}:{SOCAT3_PORT}")],
            relays: vec![s1, s2, s3],
        });
        paths.push(Path1 {
            name: ROUTED_3.into(),
            args: reach_args(b3, "routed", Some(&hub1)),
            relays: vec![p1, p2, p3],
        });
        Ok(paths)
    }

    /// Each variant's median over `rounds` rounds of the agent run with its
    /// arguments and `extra`.
    fn figures(
        &self,
        rounds: usize,
        variants: &[Variant],
        extra: &[String],
    ) -> anyhow::Result<Vec<f64>> {
        self::rounds(rounds, variants, |_, args| {
            Ok(self.measure(&[args, extra].concat())?.value)
        })
    }

    /// Runs the agent in `a` with `args`; returns what it measured.
    fn measure(&self, args: &[String]) -> anyhow::Result<Measured> {
        self.measure_on(None, args)
    }

    /// Runs the agent in `a` with `args`, on CPU `cpu` if given; returns
    /// what it measured.
    fn measure_on(&self, cpu: Option<usize>, args: &[String]) -> anyhow::Result<Measured> {
        // One client identity per module list: its module cache must not
        // carry a choice from one kind of path into another.
        let modules = args
            .iter()
            .position(|a| a == "--modules")
            .and_then(|i| args.get(i + 1))
            .map_or("tcp", String::as_str);
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = self.lab.command("a", "taskset");
                c.args(["-c", &cpu.to_string()]).arg(&self.exe);
                c
            }
            None => self.lab.command("a", &self.exe),
        };
        let out = cmd
            .args(["agent", "run", "--state-dir"])
            .arg(self.dir.join(format!("a-{modules}")))
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "agent run {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("agent output")
    }
}

fn reach_args(vaddr: &str, modules: &str, hub: Option<&str>) -> Vec<String> {
    let mut v = vec![
        "--vaddr".to_string(),
        vaddr.to_string(),
        "--modules".into(),
        modules.into(),
    ];
    if let Some(h) = hub {
        v.extend(["--hub".into(), h.into()]);
    }
    v
}

/// Sets the CPUs (a `taskset` list, "0" or "0-1") of every thread of each
/// of `pids`; threads and processes they start later inherit it.
fn pin(pids: &[u32], cpus: &str) -> anyhow::Result<()> {
    for pid in pids {
        let status = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .context("cannot run taskset (apt-get install util-linux)")?;
        if !status.success() {
            bail!("taskset -a -p -c {cpus} {pid} failed");
        }
    }
    Ok(())
}

/// CPU seconds `pid` and its reaped children have used.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the command name, which may hold spaces: ") S ppid ...".
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    // utime, stime, cutime, cstime: fields 14 to 17, in clock ticks.
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(str::parse::<u64>)
        .sum::<Result<u64, _>>()
        .with_context(|| format!("odd /proc/{pid}/stat: {stat}"))?;
    Ok(ticks as f64 / clock_ticks())
}

/// The kernel's clock ticks per second (USER_HZ), asked once.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds the processes `pids` have used, once each has reaped its
/// forked children (socat's connection processes), so theirs count too.
pub(crate) fn cpu_of(pids: &[u32]) -> anyhow::Result<f64> {
    for pid in pids {
        let path = format!("/proc/{pid}/task/{pid}/children");
        reach_lab::wait::until(READY, || {
            let c = std::fs::read_to_string(&path).ok()?;
            c.trim().is_empty().then_some(())
        })
        .with_context(|| format!("process {pid} kept its children for {READY:?}"))?;
    }
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

/// The directory a benchmark keeps its logs and state in: `keep` (kept), or
/// a temporary one named for `what`, removed when the returned guard drops.
pub(crate) fn work_dir(
    keep: Option<PathBuf>,
    what: &str,
) -> anyhow::Result<(PathBuf, Option<crate::TempDir>)> {
    match keep {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            Ok((d, None))
        }
        None => {
            let tmp = crate::TempDir::new(what)?;
            Ok((tmp.0.clone(), Some(tmp)))
        }
    }
}

/// Runs the lab benchmarks, with logs and state in `keep` (kept) or in a
/// temporary directory.
pub fn run(size: Size, keep: Option<&Path>) -> anyhow::Result<Vec<Row>> {
    let (dir, _tmp) = work_dir(keep.map(Path::to_path_buf), "lab")?;
    let (bench, paths, tunnels) = Bench::up(&dir)?;
    let secs = size.secs.to_string();
    let count = size.count.to_string();
    let op = |op: &str| vec!["--op".to_string(), op.to_string()];
    let bulk = |streams: usize| {
        let mut v = op("throughput");
        v.extend([
            "--streams".into(),
            streams.to_string(),
            "--secs".into(),
            secs.clone(),
        ]);
        v
    };
    let counted = |o: &str| {
        let mut v = op(o);
        v.extend(["--count".into(), count.clone()]);
        v
    };
    let tcp = vec![
        "--tcp".to_string(),
        format!("{}:{B1_TCP}", ip(&bench.lab, "b")),
    ];
    let direct = |plain: bool| {
        let mut v = reach_args(&bench.b1, "direct", None);
        if plain {
            v.push("--plaintext".into());
        }
        v
    };
    let mut rows = Vec::new();

    // 1. Direct against plain TCP.
    let mut variants: Vec<Variant> = vec![
        ("plain TCP".into(), tcp.clone()),
        ("reach direct, plaintext".into(), direct(true)),
        ("reach direct, encrypted".into(), direct(false)),
    ];
    variants.extend(tunnels);
    for streams in [1usize, 4] {
        let figures = bench.figures(size.rounds, &variants, &bulk(streams))?;
        let tcp_rate = figures[0];
        let s = if streams > 1 { "s" } else { "" };
        for (i, (name, _)) in variants.iter().enumerate().skip(1) {
            rows.push(Row::new(
                format!("throughput, {name}, {streams} stream{s}"),
                "Gbit/s",
                figures[i],
                Some((&format!("plain TCP, {streams} stream{s}"), tcp_rate)),
            ));
        }
        for (i, (name, _)) in variants.iter().enumerate().skip(3) {
            rows.push(Row::new(
                format!("throughput, reach direct, encrypted, {streams} stream{s}"),
                "Gbit/s",
                figures[2],
                Some((&format!("{name}, {streams} stream{s}"), figures[i])),
            ));
        }
    }
    let pair = [variants[0].clone(), variants[2].clone()];
    let rtt = bench.figures(size.rounds, &pair, &counted("latency"))?;
    rows.push(Row::new(
        "round trip, reach direct (1-byte ping-pong)",
        "us",
        rtt[1],
        Some(("plain TCP", rtt[0])),
    ));
    // Sequential connections from one process: after the first, each
    // handshake resumes; the same with resumption off, for first contact.
    let mut full = direct(false);
    full.push("--no-resumption".into());
    let triple = [
        variants[0].clone(),
        variants[2].clone(),
        ("reach direct, full handshakes".into(), full),
    ];
    let setup = bench.figures(size.rounds, &triple, &counted("setup"))?;
    rows.push(Row::new(
        "setup, reach direct (resumed)",
        "ms",
        setup[1],
        Some(("plain TCP connect", setup[0])),
    ));
    let tcp_rtt = setup[0] + rtt[0] / 1e3;
    rows.push(Row::new(
        "setup, reach direct (resumed)",
        "ms",
        setup[1],
        Some(("TCP connect + 1 round trip", tcp_rtt)),
    ));
    rows.push(Row::new(
        "setup, reach direct, full handshakes (first contact)",
        "ms",
        setup[2],
        Some(("TCP connect + 1 round trip", tcp_rtt)),
    ));

    // 2. Routed through hubs against relays on the same hosts.
    let relayed: Vec<Variant> = paths
        .iter()
        .map(|p| (p.name.clone(), p.args.clone()))
        .collect();
    let mut cpu = vec![Vec::new(); paths.len()];
    let rates = rounds(size.rounds, &relayed, |i, args| {
        let p = &paths[i];
        let before = cpu_of(&p.relays)?;
        let m = bench.measure(&[args, &bulk(1)].concat())?;
        let used = cpu_of(&p.relays)? - before;
        if !p.relays.is_empty() && m.bytes > 0 {
            cpu[i].push(used / (m.bytes as f64 / 1e9));
        }
        Ok(m.value)
    })?;
    let rtts = bench.figures(size.rounds, &relayed, &counted("latency"))?;
    let direct_rate = rates[0];
    let direct_rtt = rtts[0];
    for (i, p) in paths.iter().enumerate().skip(1) {
        rows.push(Row::new(
            format!("throughput, {}", p.name),
            "Gbit/s",
            rates[i],
            Some(("plain TCP, direct", direct_rate)),
        ));
        rows.push(Row::new(
            format!("added round trip, {}", p.name),
            "us",
            rtts[i] - direct_rtt,
            Some(("plain TCP round trip", direct_rtt)),
        ));
        if !cpu[i].is_empty() {
            rows.push(Row::new(
                format!("relay CPU per GB, {}", p.name),
                "s/GB",
                crate::median(cpu[i].clone()),
                None,
            ));
        }
    }
    rows.extend(placed_round_trips(
        &bench,
        &paths,
        size.rounds,
        &counted("latency"),
    )?);
    // Four streams at once through one hub, against socat.
    let four: Vec<Variant> = paths
        .iter()
        .filter(|p| p.name == SOCAT_1 || p.name == ROUTED_1)
        .map(|p| (p.name.clone(), p.args.clone()))
        .collect();
    let agg = bench.figures(size.rounds, &four, &bulk(4))?;
    if let [socat4, reach4] = agg[..] {
        rows.push(Row::new(
            "aggregate throughput, reach routed, 1 hub, 4 streams",
            "Gbit/s",
            reach4,
            Some(("socat relay on hub1, 4 streams", socat4)),
        ));
    }
    // reach against each relay, side by side.
    let by_name = |n: &str| paths.iter().position(|p| p.name == n);
    let cpu_of_path = |i: usize| crate::median(cpu[i].clone());
    for (reach_path, others) in [
        (
            ROUTED_1,
            &[
                KERNEL_1,
                SOCAT_1,
                "rathole tcp on hub1",
                "rathole noise on hub1",
                ROUTED_1_LINKS,
            ][..],
        ),
        (ROUTED_3, &[SOCAT_3][..]),
    ] {
        let Some(r) = by_name(reach_path) else {
            continue;
        };
        for other in others {
            let Some(o) = by_name(other) else { continue };
            rows.push(Row::new(
                format!("throughput, {reach_path}"),
                "Gbit/s",
                rates[r],
                Some((other, rates[o])),
            ));
            // The kernel's forward has no process to measure.
            if !cpu[o].is_empty() {
                rows.push(Row::new(
                    format!("relay CPU per GB, {reach_path}"),
                    "s/GB",
                    cpu_of_path(r),
                    Some((other, cpu_of_path(o))),
                ));
            }
        }
    }
    drop(bench);
    Ok(rows)
}

/// The added round trip through reach's hubs and through socat with the
/// processes placed the same way for both: on this machine the scheduler's
/// placement moves a relayed round trip between about 20 and 150 us (each
/// wake-up of an idle virtual CPU costs tens of microseconds), more than
/// any relay's own work, so unplaced figures compare placements as much as
/// relays. Two placements: everything on CPU 0, and the relays on CPU 1
/// with the ends on CPU 0 (four cross-CPU wake-ups per round trip).
fn placed_round_trips(
    bench: &Bench,
    paths: &[Path1],
    rounds_n: usize,
    latency: &[String],
) -> anyhow::Result<Vec<Row>> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all = format!("0-{}", cpus - 1);
    let by_name = |n: &str| paths.iter().position(|p| p.name == n);
    let pairs: Vec<(usize, usize)> = [
        (ROUTED_1, SOCAT_1),
        (ROUTED_1_LINKS, SOCAT_1),
        (ROUTED_3, SOCAT_3),
    ]
    .iter()
    .filter_map(|(r, s)| Some((by_name(r)?, by_name(s)?)))
    .collect();
    let mut chosen = vec![0usize];
    for (r, s) in &pairs {
        for i in [*s, *r] {
            if !chosen.contains(&i) {
                chosen.push(i);
            }
        }
    }
    let variants: Vec<Variant> = chosen
        .iter()
        .map(|&i| (paths[i].name.clone(), paths[i].args.clone()))
        .collect();
    let relays: Vec<u32> = paths.iter().flat_map(|p| p.relays.clone()).collect();
    let mut rows = Vec::new();
    let placements: &[(&str, usize)] = if cpus >= 2 {
        &[("all on one CPU", 0), ("relays on another CPU", 1)]
    } else {
        &[("all on one CPU", 0)]
    };
    for &(label, relay_cpu) in placements {
        pin(&bench.servers, "0")?;
        let measured = rounds(rounds_n, &variants, |i, args| {
            pin(&paths[chosen[i]].relays, &relay_cpu.to_string())?;
            Ok(bench.measure_on(Some(0), &[args, latency].concat())?.value)
        });
        // Back to every CPU whatever happened, for the measurements after.
        pin(&bench.servers, &all)?;
        pin(&relays, &all)?;
        let measured = measured?;
        let at = |path: usize| {
            let k = chosen.iter().position(|&c| c == path).unwrap_or(0);
            measured[k] - measured[0]
        };
        for &(r, s) in &pairs {
            rows.push(Row::new(
                format!("added round trip, {}, {label}", paths[r].name),
                "us",
                at(r),
                Some((&format!("{}, {label}", paths[s].name), at(s))),
            ));
        }
    }
    Ok(rows)
}

/// Bulk throughput over a link that loses 1% of its frames each way and
/// adds a 2 ms round trip (`lab/topologies/lossy.toml`): reach direct,
/// encrypted, beside plain TCP on the same link. Loss recovery is TCP's
/// under both; what reach could add is delay (its records) before the
/// receiver can use a byte.
pub fn lossy(size: Size, keep: Option<&Path>) -> anyhow::Result<Vec<Row>> {
    let (dir, _tmp) = work_dir(keep.map(|d| d.join("lossy")), "lossy")?;
    let mut bench = Bench::start(include_str!("../../../lab/topologies/lossy.toml"), &dir)?;
    bench.b1 = bench.agent_server("b", "b1", B1_TCP, B1_REACH, "hub")?;
    let bulk = [
        "--op".to_string(),
        "throughput".into(),
        "--streams".into(),
        "1".into(),
        "--secs".into(),
        size.secs.to_string(),
    ];
    let variants: Vec<Variant> = vec![
        (
            "plain TCP over 1% loss".into(),
            vec!["--tcp".into(), format!("{}:{B1_TCP}", ip(&bench.lab, "b"))],
        ),
        (
            "reach direct, encrypted, over 1% loss".into(),
            reach_args(&bench.b1, "direct", None),
        ),
    ];
    let f = bench.figures(size.rounds, &variants, &bulk)?;
    Ok(vec![Row::new(
        "throughput, reach direct, encrypted, 1 stream, 1% loss each way",
        "Gbit/s",
        f[1],
        Some(("plain TCP on the same link", f[0])),
    )])
}

/// Measures every variant `rounds` times, going through the variants in
/// turn each round; returns each variant's median.
fn rounds(
    rounds: usize,
    variants: &[Variant],
    mut f: impl FnMut(usize, &[String]) -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<f64>> {
    let mut got = vec![Vec::new(); variants.len()];
    for _ in 0..rounds.max(1) {
        for (i, (name, args)) in variants.iter().enumerate() {
            let v = f(i, args).with_context(|| format!("measuring {name}"))?;
            got[i].push(v);
        }
    }
    Ok(got.into_iter().map(crate::median).collect())
}

/// Setup time per module in the SmartSockets testbed with the paper's round
/// trips (`lab/topologies/smartsockets-wan.toml`): every ordered pair of its
/// six hosts connects twice, the first time with nothing cached, the second
/// with the module that worked cached (`reach-lab matrix --mode reach`).
pub fn setup_per_module() -> anyhow::Result<Vec<Row>> {
    let text = include_str!("../../../lab/topologies/smartsockets-wan.toml");
    let t = Topology::from_toml(text).context("smartsockets-wan topology")?;
    let tools = crate::tools_dir(&["reach", "reach-lab"])?;
    let lab = Lab::up(&t).context("cannot build the lab (needs root)")?;
    let m = reach_lab::matrix::run(
        &lab,
        &t,
        reach_lab::matrix::Mode::Reach,
        Duration::from_secs(10),
        &tools,
    )?;
    let (ok, all) = m.score();
    anyhow::ensure!(
        ok == all,
        "only {ok} of {all} pairs connected:\n{}",
        m.render()
    );
    let mut by_module: std::collections::BTreeMap<String, (Vec<f64>, Vec<f64>)> =
        Default::default();
    for c in &m.cells {
        // By where the first connection settled (its data may have flowed
        // routed first), against the cached connection to that module.
        let (Some(module), Some(first), Some(cached)) =
            (c.settled_module.clone(), c.setup_ms, c.cached_setup_ms)
        else {
            continue;
        };
        // Only pairs whose second connection settled there too (its first
        // bytes may have gone routed while a Reverse or Splice connected).
        if c.cached_settled_module.as_deref() != Some(module.as_str()) {
            continue;
        }
        let e = by_module.entry(module).or_default();
        e.0.push(first);
        e.1.push(cached);
    }
    let mut rows = Vec::new();
    for (module, (first, cached)) in &by_module {
        let (f, c) = (crate::median(first.clone()), crate::median(cached.clone()));
        rows.push(Row::new(
            format!("setup, {module}, first connection ({} pairs)", first.len()),
            "ms",
            f,
            Some((&format!("{module}, module cached"), c)),
        ));
        if module == "routed" {
            rows.push(Row::new(
                "routed setup speedup, cached over uncached",
                "x",
                f / c,
                Some(("SmartSockets paper", 102.0)),
            ));
        }
    }
    Ok(rows)
}
