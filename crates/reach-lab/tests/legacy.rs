//! Unmodified programs through reach: the OpenSSH client logs into an sshd
//! behind a random-port symmetric NAT (no splice possible there, so the
//! stream is routed) through `reach expose` and `reach forward`; curl fetches
//! a page from a web server behind a dropping firewall through `reach socks`.
//! iperf3 runs through `forward` and through a hub proxy port beside a
//! direct run on the same path, and beside rathole publishing the same
//! service from the same host through the same hub host. Needs root,
//! iproute2, nftables, openssh, curl, python3 (the web server), iperf3,
//! rathole (`cargo install rathole`) and the `reach` binary.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use reach_lab::lab::Process;
use reach_lab::rathole::{self, Rathole, Transport};
use reach_lab::{Lab, Topology};

const TOPOLOGY: &str = r#"
name = "legacy"
matrix = ["client", "server", "web"]

[[site]]
name = "hub"
gateway = "open"
[[site.host]]
name = "hub"
multi_homed = true

[[site]]
name = "rand"
gateway = "nat"
mapping = "address-and-port-dependent"
allocation = "random"
[[site.host]]
name = "server"
sshd = true

[[site]]
name = "home"
gateway = "nat"
[[site.host]]
name = "client"

[[site]]
name = "open"
gateway = "open"
[[site.host]]
name = "open"

[[site]]
name = "fw"
gateway = "firewall"
inbound = "drop"
[[site.host]]
name = "web"

[hubs]
hosts = ["hub"]

[hubs.attach]
client = "hub"
server = "hub"
web = "hub"
"#;

/// The lab of these tests with its hub running.
struct Legacy {
    lab: Lab,
    reach: std::path::PathBuf,
    state: tempfile::TempDir,
    hubs: reach_lab::hubs::HubSet,
}

impl Legacy {
    fn up() -> Self {
        let t = Topology::from_toml(TOPOLOGY).expect("topology");
        let lab = Lab::up(&t).expect("lab up");
        let tools = common::tools_with_reach();
        let state = tempfile::tempdir().expect("tempdir");
        let hubs = t.hubs.as_ref().expect("[hubs]");
        let hubs = reach_lab::hubs::start(&lab, &t, hubs, &tools, state.path()).expect("hub");
        Legacy {
            lab,
            reach: tools.join("reach"),
            state,
            hubs,
        }
    }
}

/// A NodeId nobody in the lab holds: an access policy that admits it
/// admits no lab node (only the hub's proxy-port clients get through).
fn nobody() -> String {
    reach_proto::SecretKey::from_seed([77; 32])
        .node_id()
        .to_string()
}

#[test]
fn ssh_logs_into_sshd_behind_a_random_port_nat_through_expose_and_forward() {
    let Legacy {
        lab,
        reach,
        state,
        hubs,
    } = Legacy::up();
    let addr_file = state.path().join("exposed.txt");
    let mut expose = lab.command("server", &reach);
    expose
        .arg("--state-dir")
        .arg(state.path().join("server"))
        .args(["-v", "expose", "127.0.0.1:22", "--port", "22", "--hub"])
        .arg(&hubs.attach["server"])
        .args(["--allow", &node_id(&reach, &state.path().join("client"))])
        .arg("--addr-file")
        .arg(&addr_file);
    let expose_log = state.path().join("expose.log");
    let _expose = common::spawn_until(expose, &expose_log, "exposing");
    let vaddr = reach_lab::wait::for_file(&addr_file, Duration::from_secs(5)).expect("vaddr");
    let mut forward = lab.command("client", &reach);
    forward
        .arg("--state-dir")
        .arg(state.path().join("client"))
        .args(["-v", "forward", "127.0.0.1:2222", &vaddr, "--hub"])
        .arg(&hubs.attach["client"]);
    let _forward = common::spawn_until(forward, &state.path().join("forward.log"), "forwarding");
    let out = lab
        .record()
        .ssh("client")
        .expect("client host")
        .args(["-p", "2222", "root@127.0.0.1", "echo", "reach-ssh-ok"])
        .output()
        .expect("run ssh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("reach-ssh-ok"),
        "ssh: {stdout:?} {:?}\nforward: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(state.path().join("forward.log")).unwrap_or_default()
    );
    // Random ports on the server's NAT: no direct path, so the hub routed it.
    let log = std::fs::read_to_string(&expose_log).unwrap_or_default();
    assert!(
        log.contains("connection exposed") && log.contains("module=routed"),
        "{log}"
    );
}

#[test]
fn curl_fetches_a_page_behind_a_firewall_through_reach_socks() {
    let Legacy {
        lab,
        reach,
        state,
        hubs,
    } = Legacy::up();
    // The page, served on the web host's loopback only.
    let site = state.path().join("site");
    std::fs::create_dir_all(&site).expect("site dir");
    std::fs::write(site.join("page.txt"), "served behind a firewall\n").expect("page");
    let mut web = lab.command("web", "python3");
    web.args([
        "-u",
        "-m",
        "http.server",
        "8080",
        "--bind",
        "127.0.0.1",
        "--directory",
    ])
    .arg(&site);
    let _web = common::spawn_until(web, &state.path().join("web.log"), "Serving HTTP");
    let addr_file = state.path().join("exposed.txt");
    let mut expose = lab.command("web", &reach);
    expose
        .arg("--state-dir")
        .arg(state.path().join("web"))
        .args(["-v", "expose", "127.0.0.1:8080", "--port", "80", "--hub"])
        .arg(&hubs.attach["web"])
        .args(["--allow", &node_id(&reach, &state.path().join("client"))])
        .arg("--addr-file")
        .arg(&addr_file);
    let _expose = common::spawn_until(expose, &state.path().join("expose.log"), "exposing");
    let vaddr = reach_lab::wait::for_file(&addr_file, Duration::from_secs(5)).expect("vaddr");
    let node = vaddr.split(':').next().expect("node id");
    let mut socks = lab.command("client", &reach);
    socks
        .arg("--state-dir")
        .arg(state.path().join("client"))
        .args(["-v", "socks", "--listen", "127.0.0.1:1080", "--hub"])
        .arg(&hubs.attach["client"])
        .args(["--alias", &format!("web.example={node}")]);
    let socks_log = state.path().join("socks.log");
    let _socks = common::spawn_until(socks, &socks_log, "SOCKS5 proxy on");
    let curl = |url: &str| {
        lab.command("client", "curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "--socks5-hostname",
                "127.0.0.1:1080",
                url,
            ])
            .output()
            .expect("run curl")
    };
    for url in [
        format!("http://{node}.reach/page.txt"),
        "http://web.example/page.txt".to_string(),
    ] {
        let out = curl(&url);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "served behind a firewall\n",
            "{url}: {}\nproxy: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&socks_log).unwrap_or_default()
        );
    }
    // Names that are not reach names are refused: no pass-through by default.
    let out = curl("http://192.0.2.1/");
    assert!(!out.status.success(), "a non-reach address went through");
    let log = std::fs::read_to_string(&socks_log).unwrap_or_default();
    assert!(log.contains("pass-through is off"), "{log}");
}

/// Starts `reach hub` with proxy ports 40000-40010 (and `extra` flags) in
/// the hub host; returns it and NODEID@PUBLIC_IP:7700.
fn proxy_hub(lab: &Lab, dir: &Path, extra: &[&str]) -> (Process, String) {
    let flags: Vec<&str> = ["--proxy-ports", "40000-40010"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let (proc, addr) = common::hub(lab, "hub", dir, &flags);
    let id = addr.split('@').next().expect("hub id");
    let ip = lab.host("hub").public.expect("multi-homed hub");
    (proc, format!("{id}@{ip}:7700"))
}

/// A `reach expose` published on a hub's proxy port.
struct Exposed {
    _proc: Process,
    /// Its virtual address.
    vaddr: String,
    /// The hub's proxy port for it.
    port: u16,
    /// Its log (stdout and stderr).
    log: std::path::PathBuf,
}

/// Runs `reach -v expose SERVICE --hub HUB EXTRA...` in `host` with state
/// in DIR/NAME and log in DIR/NAME.log; waits until the hub publishes it.
fn expose_on_hub(lab: &Lab, host: &str, dir: &Path, name: &str, args: &[&str]) -> Exposed {
    let mut expose = lab.command(host, common::tools_with_reach().join("reach"));
    expose
        .arg("--state-dir")
        .arg(dir.join(name))
        .args(["-v", "expose"])
        .args(args)
        .args(["--allow", &nobody()]);
    let log = dir.join(format!("{name}.log"));
    let proc = common::spawn_until(expose, &log, "exposed at");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
    };
    let vaddr = line("listening on ").expect("virtual address");
    let port = line("exposed at ")
        .and_then(|a| a.rsplit(':').next()?.parse().ok())
        .expect("proxy port");
    Exposed {
        _proc: proc,
        vaddr,
        port,
        log,
    }
}

/// The OpenSSH client in `from` runs `echo WORD` as root at `ip:port`.
fn ssh_echo(
    lab: &Lab,
    from: &str,
    ip: std::net::Ipv4Addr,
    port: &str,
    word: &str,
) -> std::process::Output {
    lab.record()
        .ssh(from)
        .expect("host")
        .args(["-p", port, &format!("root@{ip}"), "echo", word])
        .output()
        .expect("run ssh")
}

/// `reach id` for a state directory (the identity is created if need be).
fn node_id(reach: &Path, state: &Path) -> String {
    let out = Command::new(reach)
        .arg("--state-dir")
        .arg(state)
        .arg("id")
        .output()
        .expect("reach id");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn unmodified_ssh_reaches_sshd_behind_a_random_port_nat_through_a_hub_proxy_port() {
    let t = Topology::from_toml(TOPOLOGY).expect("topology");
    let lab = Lab::up(&t).expect("lab up");
    let tools = common::tools_with_reach();
    let reach = tools.join("reach");
    let state = tempfile::tempdir().expect("tempdir");
    let server_state = state.path().join("server");
    let server_id = node_id(&reach, &server_state);
    // The hub publishes services of the server only, on ports 40000-40010.
    let hub_dir = state.path().join("hub");
    let only_server = ["--allow-expose", server_id.as_str()];
    let (hub, hub_target) = proxy_hub(&lab, &hub_dir, &only_server);
    let hub_ip = lab.host("hub").public.expect("multi-homed hub");
    // Only the client's site (its NAT's public address) may use the port.
    let client_site = lab.host("client").gateway;
    let allow = format!("{client_site}/32");
    let exposed = expose_on_hub(
        &lab,
        "server",
        state.path(),
        "server",
        &[
            "127.0.0.1:22",
            "--port",
            "22",
            "--hub",
            &hub_target,
            "--allow-from",
            &allow,
        ],
    );
    let port = exposed.port.to_string();
    assert!((40000..=40010).contains(&exposed.port), "{port}");
    let ssh = |from: &str| ssh_echo(&lab, from, hub_ip, &port, "reach-proxy-ok");
    let out = ssh("client");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reach-proxy-ok"),
        "ssh through the proxy port: {:?}\nhub: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(hub_dir.join("hub.log")).unwrap_or_default()
    );
    // A client outside the exposure's ranges is refused.
    let out = ssh("web");
    assert!(
        !out.status.success(),
        "a client outside the access list got in"
    );
    let hub_log = std::fs::read_to_string(hub_dir.join("hub.log")).unwrap_or_default();
    assert!(
        hub_log.contains("outside the exposure's ranges"),
        "{hub_log}"
    );
    // The hub restarts: the node re-registers and gets its port back.
    drop(hub);
    // The restarted hub logs to a fresh hub.log.
    let restarted_log = hub_dir.join("hub.log");
    let _hub = proxy_hub(&lab, &hub_dir, &only_server);
    let again = reach_lab::wait::until(Duration::from_secs(15), || {
        let log = std::fs::read_to_string(&restarted_log).unwrap_or_default();
        log.lines()
            .find(|l| l.contains("service exposed"))
            .map(str::to_string)
    })
    .expect("the node publishes its service again");
    assert!(again.contains(&format!("port={port}")), "{again}");
    let out = ssh("client");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reach-proxy-ok"),
        "ssh after the hub restart: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A node the hub's policy does not allow to expose gets a clear error.
    let out = lab
        .command("web", &reach)
        .arg("--state-dir")
        .arg(state.path().join("web"))
        .args(["expose", "127.0.0.1:8080", "--open", "--hub", &hub_target])
        .output()
        .expect("run reach expose");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("may not expose services on this hub"), "{err}");
}

/// iperf3 from `client` to `host:port` for `secs`: received Mbit/s.
fn iperf(lab: &Lab, client: &str, host: &str, port: u16, secs: u32) -> f64 {
    let out = lab
        .command(client, "iperf3")
        .args([
            "-J",
            "-c",
            host,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
        ])
        .output()
        .expect("run iperf3 (apt-get install iperf3)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 to {host}:{port}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
    bps.unwrap_or_else(|| panic!("iperf3 to {host}:{port} failed: {v}")) / 1e6
}

#[test]
fn iperf3_runs_through_forward_and_a_hub_proxy_port_beside_direct() {
    let t = Topology::from_toml(TOPOLOGY).expect("topology");
    let lab = Lab::up(&t).expect("lab up");
    let reach = common::tools_with_reach().join("reach");
    let state = tempfile::tempdir().expect("tempdir");
    let (_hub, hub_target) = proxy_hub(&lab, &state.path().join("hub"), &[]);
    let hub_ip = lab.host("hub").public.expect("multi-homed hub");
    // iperf3 on the open host: reachable directly, for the baseline.
    let mut server = lab.command("open", "iperf3");
    server.args(["-s", "-p", "5201", "--forceflush"]);
    let _server = common::spawn_until(server, &state.path().join("iperf3.log"), "Server listening");
    let client = node_id(&reach, &state.path().join("client"));
    let exposed = expose_on_hub(
        &lab,
        "open",
        state.path(),
        "open",
        &[
            "127.0.0.1:5201",
            "--port",
            "5201",
            "--hub",
            &hub_target,
            "--allow",
            &client,
        ],
    );
    let (vaddr, proxy_port) = (exposed.vaddr.clone(), exposed.port);
    let mut forward = lab.command("client", &reach);
    forward
        .arg("--state-dir")
        .arg(state.path().join("client"))
        .args([
            "-v",
            "forward",
            "127.0.0.1:5202",
            &vaddr,
            "--hub",
            &hub_target,
        ]);
    let _forward = common::spawn_until(forward, &state.path().join("forward.log"), "forwarding");
    // rathole publishing the same service through the same hub host, as
    // the baseline for the proxy port: plain TCP (its default) and Noise.
    let ratholes: Vec<_> = [
        (Transport::Tcp, 2333, 40100),
        (Transport::Noise, 2334, 40101),
    ]
    .into_iter()
    .map(|(transport, control, public)| {
        let setup = rathole::Setup {
            server_host: "hub",
            control: (hub_ip, control).into(),
            public: (hub_ip, public).into(),
            client_host: "open",
            service: ([127, 0, 0, 1], 5201).into(),
        };
        let r = Rathole::start(&lab, &setup, transport, &state.path().join("rathole"))
            .unwrap_or_else(|e| panic!("rathole ({}): {e}", transport.name()));
        (transport, r)
    })
    .collect();
    let open_ip = lab.host("open").lan.to_string();
    let direct = iperf(&lab, "client", &open_ip, 5201, 2);
    let forwarded = iperf(&lab, "client", "127.0.0.1", 5202, 2);
    let proxied = iperf(&lab, "client", &hub_ip.to_string(), proxy_port, 2);
    let rathole: Vec<(Transport, f64)> = ratholes
        .iter()
        .map(|(t, r)| {
            let mbit = iperf(
                &lab,
                "client",
                &r.public.ip().to_string(),
                r.public.port(),
                2,
            );
            (*t, mbit)
        })
        .collect();
    let rathole_text: Vec<String> = rathole
        .iter()
        .map(|(t, m)| format!("rathole {} {m:.0} ({:.2}x)", t.name(), m / direct))
        .collect();
    println!(
        "iperf3 client -> open, 2 s each (Mbit/s): direct {direct:.0}, \
         reach forward {forwarded:.0} ({:.2}x), hub proxy port {proxied:.0} ({:.2}x), {}",
        forwarded / direct,
        proxied / direct,
        rathole_text.join(", ")
    );
    for (what, mbit) in [
        ("direct", direct),
        ("forward", forwarded),
        ("proxy port", proxied),
    ]
    .into_iter()
    .chain(rathole.iter().map(|(t, m)| (t.name(), *m)))
    {
        assert!(mbit > 0.0, "iperf3 {what} moved nothing");
    }
}

#[test]
fn a_node_that_cannot_connect_back_serves_proxy_port_clients_over_its_session() {
    let t = Topology::from_toml(TOPOLOGY).expect("topology");
    let lab = Lab::up(&t).expect("lab up");
    let state = tempfile::tempdir().expect("tempdir");
    let hub_dir = state.path().join("hub");
    let (_hub, hub_target) = proxy_hub(&lab, &hub_dir, &[]);
    let hub_ip = lab.host("hub").public.expect("multi-homed hub");
    let exposed = expose_on_hub(
        &lab,
        "server",
        state.path(),
        "server",
        &["127.0.0.1:22", "--hub", &hub_target],
    );
    let port = exposed.port.to_string();
    // From now on the server's host may not open new connections to the
    // hub: its session stays up, but it cannot connect back.
    let rules = "table inet reach_test {\n chain out {\n type filter hook output priority 0;\n \
                 tcp dport 7700 ct state new drop\n }\n}\n";
    reach_lab::apply::run(lab.command("server", "nft").args(["-f", "-"]), Some(rules))
        .unwrap_or_else(|e| panic!("{e}"));
    let ssh = || ssh_echo(&lab, "client", hub_ip, &port, "reach-session-ok");
    let hub_log = || std::fs::read_to_string(hub_dir.join("hub.log")).unwrap_or_default();
    // The first client waits out the connect-back, then goes over the
    // session; the next goes over the session at once.
    for round in 0..2 {
        let out = ssh();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("reach-session-ok"),
            "ssh {round} through the proxy port: {}\nhub: {}",
            String::from_utf8_lossy(&out.stderr),
            hub_log()
        );
    }
    let carried = hub_log().matches("carried over the node's session").count();
    assert_eq!(
        carried,
        2,
        "{}\nexpose: {}",
        hub_log(),
        std::fs::read_to_string(&exposed.log).unwrap_or_default()
    );
}
