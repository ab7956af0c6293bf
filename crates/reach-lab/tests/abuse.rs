//! The abuse suite: each attack of step 8 tried against real `reach`
//! processes in network namespaces, and failing for the attacker. Run all
//! of it with `cargo nextest run -p reach-lab --test abuse`. Needs root,
//! iproute2, nftables, socat, python3 and the `reach` binary.
//!
//! docs/security.md lists each threat with its defence and the test here
//! (or at the library level) that shows it.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reach_lab::lab::Process;
use reach_lab::{Lab, Topology};

const TOPOLOGY: &str = r#"
name = "abuse"

[[site]]
name = "hub"
gateway = "open"
[[site.host]]
name = "hub"

[[site]]
name = "srv"
gateway = "open"
[[site.host]]
name = "server"

[[site]]
name = "home"
gateway = "nat"
[[site.host]]
name = "client"

[[site]]
name = "evil"
gateway = "open"
[[site.host]]
name = "attacker"
"#;

/// Bound on every wait that is not itself under test.
const DEADLINE: Duration = Duration::from_secs(20);

struct Suite {
    lab: Lab,
    reach: PathBuf,
    state: tempfile::TempDir,
}

impl Suite {
    fn up() -> Self {
        let t = Topology::from_toml(TOPOLOGY).expect("topology");
        let lab = Lab::up(&t).expect("lab up");
        Suite {
            lab,
            reach: common::tools_with_reach().join("reach"),
            state: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.state.path().join(name)
    }

    /// `reach --state-dir DIR ARGS...` in `host`.
    fn reach(&self, host: &str, state: &str, args: &[&str]) -> Command {
        let mut c = self.lab.command(host, &self.reach);
        c.arg("--state-dir").arg(self.dir(state)).args(args);
        c
    }

    /// The NodeId of state directory `state` (created if need be).
    fn node_id(&self, state: &str) -> String {
        let out = Command::new(&self.reach)
            .arg("--state-dir")
            .arg(self.dir(state))
            .arg("id")
            .output()
            .expect("reach id");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// The IP of the first direct address in a virtual address
/// (`NODE:PORT/a=IP:PORT,...`) or of a hub address (`NODE@IP:PORT`).
fn ip_of(addr: &str) -> String {
    let rest = match addr.split_once("/a=") {
        Some((_, hints)) => hints.split([',', '/']).next().unwrap_or(""),
        None => addr.split_once('@').map_or(addr, |(_, a)| a),
    };
    let sock: std::net::SocketAddr = rest.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
    sock.ip().to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A TCP echo on 127.0.0.1:`port` of `host`.
fn echo_service(s: &Suite, host: &str, port: u16) -> Process {
    let mut c = s.lab.command(host, "socat");
    c.args([
        &format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
        "EXEC:cat",
    ]);
    Process::new(c.stdin(Stdio::null()).spawn().expect("socat"))
}

/// An echo on the server host exposed through `hub` for the node of state
/// `friend` only (log in `expose.log`): the echo, the exposer and the
/// virtual address.
fn echo_for_the_friend(s: &Suite, hub: &str) -> (Process, Process, String) {
    let echo = echo_service(s, "server", 8080);
    let friend = s.node_id("friend");
    let addr_file = s.dir("exposed.txt");
    let mut expose = s.reach(
        "server",
        "server",
        &[
            "-v",
            "expose",
            "127.0.0.1:8080",
            "--allow",
            &friend,
            "--hub",
            hub,
        ],
    );
    expose.arg("--addr-file").arg(&addr_file);
    let expose = common::spawn_until(expose, &s.dir("expose.log"), "exposing");
    let vaddr = reach_lab::wait::for_file(&addr_file, DEADLINE).expect("vaddr");
    (echo, expose, vaddr)
}

/// Sends `data` through the TCP service at 127.0.0.1:`port` of `host`,
/// half-closes, and returns what came back before the end (or the error).
fn through(s: &Suite, host: &str, port: u16, data: &str) -> Result<String, String> {
    let out = s
        .lab
        .command(host, "socat")
        .args(["-T", "10", "-", &format!("TCP:127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(data.as_bytes())?;
            c.wait_with_output()
        })
        .expect("run socat");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_node_outside_the_policy_cannot_reach_an_exposed_service() {
    let s = Suite::up();
    let (_hub, hub) = common::hub(&s.lab, "hub", &s.dir("hub"), &[]);
    let (_echo, _expose, vaddr) = echo_for_the_friend(&s, &hub);
    let expose_log = s.dir("expose.log");
    // The friend and a stranger, both behind the client's NAT.
    for (state, port) in [("friend", 9001), ("stranger", 9002)] {
        let listen = format!("127.0.0.1:{port}");
        let forward = s.reach(
            "client",
            state,
            &["-v", "forward", &listen, &vaddr, "--hub", &hub],
        );
        let log = s.dir(&format!("{state}.log"));
        let _f = common::spawn_until(forward, &log, "forwarding");
        let got = through(&s, "client", port, "knock knock\n");
        if state == "friend" {
            assert_eq!(got.as_deref(), Ok("knock knock\n"), "{}", read(&log));
        } else {
            assert_ne!(
                got.as_deref(),
                Ok("knock knock\n"),
                "a stranger got through"
            );
            let said = reach_lab::wait::until(DEADLINE, || {
                read(&log).contains("does not admit").then_some(())
            });
            assert!(said.is_some(), "the stranger's forward: {}", read(&log));
        }
    }
    let stranger = s.node_id("stranger");
    let logged = read(&expose_log);
    assert!(
        logged.contains(&stranger) && logged.contains("access policy does not admit"),
        "{logged}"
    );
}

#[test]
fn a_replayed_hello_yields_no_stream_even_in_plaintext() {
    let s = Suite::up();
    let out = s.dir("received");
    let listen_log = s.dir("listen.log");
    let addr_file = s.dir("addr.txt");
    let mut listen = s.reach(
        "server",
        "server",
        &[
            "-v",
            "listen",
            "--plaintext",
            "--keep",
            "--open",
            "--tcp-port",
            "7000",
        ],
    );
    listen.arg("--addr-file").arg(&addr_file);
    let file = std::fs::File::create(&out).expect("out");
    let log = std::fs::File::create(&listen_log).expect("log");
    let _listen = Process::new(
        listen
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(log)
            .spawn()
            .expect("listen"),
    );
    let vaddr = reach_lab::wait::for_file(&addr_file, DEADLINE).expect("vaddr");
    let node = vaddr.split(':').next().expect("node id").to_string();
    let server = ip_of(&vaddr);
    // An on-path recorder: socat between the client and the listener
    // writes every byte the client sends to a file.
    let record = s.dir("recorded");
    let mut relay = s.lab.command("client", "socat");
    relay.arg("-r").arg(&record).args([
        "TCP-LISTEN:7001,bind=127.0.0.1,reuseaddr",
        &format!("TCP:{server}:7000"),
    ]);
    let _relay = Process::new(relay.stdin(Stdio::null()).spawn().expect("relay"));
    let via = format!("{node}:0/a=127.0.0.1:7001");
    let sent = reach_lab::wait::until(DEADLINE, || {
        let mut c = s.reach("client", "client", &["connect", "--plaintext", &via]);
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        child
            .stdin
            .take()?
            .write_all(b"the secret payload\n")
            .ok()?;
        child
            .wait_with_output()
            .ok()?
            .status
            .success()
            .then_some(())
    });
    assert!(sent.is_some(), "the original stream: {}", read(&listen_log));
    let original = reach_lab::wait::until(DEADLINE, || {
        (read(&out) == "the secret payload\n").then_some(())
    });
    assert!(original.is_some(), "received: {:?}", read(&out));
    // The replay: everything the client sent, hello, confirmation and
    // payload, sent again straight to the listener.
    let replay = s
        .lab
        .command("attacker", "socat")
        .args(["-u", "-T", "5"])
        .arg(format!("OPEN:{}", record.display()))
        .arg(format!("TCP:{server}:7000"))
        .output()
        .expect("replay");
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let refused = reach_lab::wait::until(DEADLINE, || {
        read(&listen_log)
            .contains("did not confirm the session keys")
            .then_some(())
    });
    assert!(refused.is_some(), "listener: {}", read(&listen_log));
    assert_eq!(
        read(&out),
        "the secret payload\n",
        "the replay was accepted"
    );
}

#[test]
fn a_thousand_idle_connections_to_a_hub_do_not_keep_a_new_node_out() {
    let s = Suite::up();
    let (_hub, hub) = common::hub(&s.lab, "hub", &s.dir("hub"), &[]);
    let hub_ip = ip_of(&hub);
    // The attacker opens 1000 TCP connections to the hub and sends nothing.
    let script = format!(
        "import socket,sys,time\n\
         held=[]\n\
         for i in range(1000):\n\
         \x20   c=socket.create_connection(('{hub_ip}',7700))\n\
         \x20   held.append(c)\n\
         print('holding',len(held),flush=True)\n\
         time.sleep(120)\n"
    );
    let flood_log = s.dir("flood.log");
    let mut flood = s.lab.command("attacker", "python3");
    flood.args(["-c", &script]);
    let _flood = common::spawn_until(flood, &flood_log, "holding 1000");
    // A new node attaches within 2 s.
    let log = s.dir("listen.log");
    let mut listen = s.reach("client", "newcomer", &["listen", "--open", "--hub", &hub]);
    let started = Instant::now();
    let file = std::fs::File::create(&log).expect("log");
    let _listen = Process::new(
        listen
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("listen"),
    );
    let attached = reach_lab::wait::until(Duration::from_secs(2), || {
        read(&log).contains("listening on").then_some(())
    });
    assert!(
        attached.is_some(),
        "not attached after {:?}: {}\nhub: {}",
        started.elapsed(),
        read(&log),
        read(&s.dir("hub").join("hub.log"))
    );
    let hub_log = read(&s.dir("hub").join("hub.log"));
    assert!(hub_log.contains("handshake limit"), "{hub_log}");
}

#[test]
fn a_peer_that_vanishes_is_detected_within_the_liveness_bound() {
    let s = Suite::up();
    let listen_log = s.dir("listen.log");
    let addr_file = s.dir("addr.txt");
    let mut listen = s.reach("server", "server", &["listen", "--open"]);
    listen.arg("--addr-file").arg(&addr_file);
    let _listen = Process::new(
        listen
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&listen_log).expect("log"))
            .spawn()
            .expect("listen"),
    );
    let vaddr = reach_lab::wait::for_file(&addr_file, DEADLINE).expect("vaddr");
    // The client connects and then sends nothing: an idle stream.
    let connect_log = s.dir("connect.log");
    let mut connect = s
        .reach("client", "client", &["-v", "connect", &vaddr])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&connect_log).expect("log"))
        .spawn()
        .expect("connect");
    let up = reach_lab::wait::until(DEADLINE, || {
        read(&connect_log).contains("connected").then_some(())
    });
    assert!(up.is_some(), "{}", read(&connect_log));
    // The server's host vanishes: every packet in and out is dropped.
    let rules =
        "table inet vanish {\n chain in {\n type filter hook input priority -300;\n drop\n }\n \
                 chain out {\n type filter hook output priority -300;\n drop\n }\n}\n";
    reach_lab::apply::run(
        s.lab.command("server", "nft").args(["-f", "-"]),
        Some(rules),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let vanished = Instant::now();
    let bound = reach::LIVENESS + Duration::from_secs(10);
    let status = reach_lab::wait::until(bound, || connect.try_wait().ok().flatten());
    let _ = connect.kill();
    let status = status.unwrap_or_else(|| {
        panic!(
            "the client still waits {:?} after the peer vanished: {}",
            vanished.elapsed(),
            read(&connect_log)
        )
    });
    assert_eq!(
        status.code(),
        Some(1),
        "an error, not a clean end: {}",
        read(&connect_log)
    );
}

/// The NodeId part of `NODEID@IP:PORT` or `NODEID:PORT/...`.
fn id_of(addr: &str) -> &str {
    addr.split(['@', ':']).next().expect("an id")
}

/// `hub`'s counter `name`, from its status report.
fn hub_counter(s: &Suite, host: &str, hub: &str, name: &str) -> Option<u64> {
    let out = s
        .reach(host, "status-asker", &["status", "--json", "--hub", hub])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["hub"]["counters"][name].as_u64()
}

#[test]
fn a_linked_hub_with_forged_gossip_takes_no_route_and_no_node() {
    let s = Suite::up();
    let secret = s.dir("hub.secret");
    std::fs::write(&secret, "the abuse suite's hub secret\n").expect("secret");
    let secret = secret.to_str().expect("utf-8 path");
    let (_a, hub_a) = common::hub(
        &s.lab,
        "hub",
        &s.dir("hub-a"),
        &["--hub-secret-file", secret],
    );
    let (_b, hub_b) = common::hub(
        &s.lab,
        "server",
        &s.dir("hub-b"),
        &["--hub-secret-file", secret, "--peer", &hub_a],
    );
    // The victim node: an echo exposed through hub B, for a friend that
    // reaches it through hub A, routed (so through A's directory).
    let (_echo, _expose, vaddr) = echo_for_the_friend(&s, &hub_b);
    let forward = s.reach(
        "client",
        "friend",
        &[
            "-v",
            "forward",
            "127.0.0.1:9001",
            &vaddr,
            "--hub",
            &hub_a,
            "--modules",
            "routed",
        ],
    );
    let forward_log = s.dir("forward.log");
    let _f = common::spawn_until(forward, &forward_log, "forwarding");
    let reached = reach_lab::wait::until(DEADLINE, || {
        through(&s, "client", 9001, "before\n")
            .ok()
            .filter(|g| g == "before\n")
    });
    assert!(
        reached.is_some(),
        "routed through A to B: {}",
        read(&forward_log)
    );

    // The rogue: a hub of the federation (it has the secret) in another site.
    let rogue_log = s.dir("rogue.log");
    let mut rogue = s.lab.command("attacker", common::tools().join("reach-lab"));
    rogue.args([
        "probe",
        "rogue-hub",
        "--hub",
        &hub_a,
        "--hub-secret-file",
        secret,
        "--victim-hub",
        id_of(&hub_b),
        "--victim-node",
        id_of(&vaddr),
        "--hold",
        "6",
    ]);
    let mut rogue = common::spawn_until(rogue, &rogue_log, "flooded twice");
    // While the rogue lists the node as its own, the friend still gets
    // through, every time.
    for i in 0..3 {
        let data = format!("during {i}\n");
        assert_eq!(
            through(&s, "client", 9001, &data).as_deref(),
            Ok(data.as_str()),
            "the rogue took the node: {}",
            read(&rogue_log)
        );
    }
    let done = rogue.wait_timeout(DEADLINE).expect("the rogue ends");
    assert!(done.success(), "{}", read(&rogue_log));
    let lines: Vec<serde_json::Value> = read(&rogue_log)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let outcome = |attack: &str| {
        lines
            .iter()
            .rev()
            .find(|v| v["attack"] == attack && v.get("cut").is_some())
            .unwrap_or_else(|| panic!("no outcome for {attack}: {}", read(&rogue_log)))
            .clone()
    };
    // Outsiders were refused with the hub's reason, before any gossip.
    for attack in [
        "no credential",
        "another secret",
        "node proof from the hub secret",
    ] {
        let v = lines
            .iter()
            .find(|v| v["attack"] == attack)
            .unwrap_or_else(|| panic!("no outcome for {attack}: {}", read(&rogue_log)));
        assert_eq!(v["refused"], true, "{v}");
        let reason = v["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("hub secret"), "{attack}: {v}");
    }
    assert!(hub_counter(&s, "client", &hub_a, "refused") >= Some(3));
    assert_eq!(outcome("newer route state")["cut"], true);
    assert_eq!(outcome("forged route anchor")["cut"], true);
    let claim = outcome("claim node");
    assert!(claim["questions_answered"].as_u64() >= Some(1), "{claim}");
    // Hub A counted the two forgeries and still routes to B.
    assert_eq!(hub_counter(&s, "client", &hub_a, "gossip_forged"), Some(2));
    assert_eq!(
        through(&s, "client", 9001, "after\n").as_deref(),
        Ok("after\n")
    );
}
