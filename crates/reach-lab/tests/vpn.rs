//! reach vpn in the lab: every matrix host joins one virtual IP network
//! (`reach vpn up`), and every ordered pair reaches the other by its
//! virtual address with unmodified `ping`, a TCP connection to a server
//! that names itself, and a transfer checked by sha256. Needs root,
//! iproute2, nftables, iputils-ping, /dev/net/tun and the `reach` binary
//! built beside `reach-lab`.

use std::path::PathBuf;
use std::time::Duration;

use reach_lab::matrix::{self, Mode};
use reach_lab::Lab;

mod common;

/// Every pair connected, over a named module, with a round trip measured.
fn assert_every_pair(m: &matrix::Matrix, hosts: usize) {
    let bad: Vec<String> = m
        .cells
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{} -> {}: {:?}", c.from_host, c.to_host, c.error))
        .collect();
    assert!(bad.is_empty(), "{}\n{}", bad.join("\n"), m.render());
    assert_eq!(m.score(), (hosts * (hosts - 1), hosts * (hosts - 1)));
    for c in &m.cells {
        let module = c.module.as_deref().unwrap_or_default();
        let settled = c.settled_module.as_deref().unwrap_or_default();
        assert!(
            ["direct", "reverse", "splice", "routed"].contains(&module)
                && [
                    "direct",
                    "reverse",
                    "splice",
                    "routed",
                    "udp-direct",
                    "udp-punched"
                ]
                .contains(&settled),
            "{} -> {}: the vpn log names no module: {c:?}",
            c.from_host,
            c.to_host
        );
        assert!(c.rtt_ms.is_some_and(|ms| ms > 0.0), "{c:?}");
        assert!(c.setup_ms.is_some_and(|ms| ms > 0.0), "{c:?}");
    }
}

/// The vpn matrix of topology `name`, every pair checked.
fn vpn_matrix(name: &str, hosts: usize) -> matrix::Matrix {
    let t = common::topology(name);
    let lab = Lab::up(&t).expect("lab up");
    let m = matrix::run(
        &lab,
        &t,
        Mode::Vpn,
        Duration::from_secs(20),
        &common::tools_with_reach(),
    )
    .expect("matrix");
    // A failed pair is shown with what both members logged, while the lab
    // (and with it their logs) is still there.
    for c in m.cells.iter().filter(|c| !c.ok) {
        for host in [&c.from_host, &c.to_host] {
            let log = reach_lab::matrix::reach_state(&lab)
                .join(host)
                .join("vpn.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- {} -> {} failed; {host}'s vpn log, last {} lines:\n{}",
                c.from_host,
                c.to_host,
                tail.len(),
                tail.join("\n")
            );
        }
    }
    assert_every_pair(&m, hosts);
    m
}

#[test]
fn every_smartsockets_pair_reaches_the_other_by_virtual_address() {
    let m = vpn_matrix("smartsockets", 6);
    let json = serde_json::to_value(&m).expect("json");
    assert_eq!(json["mode"], "vpn");
    assert!(json["pairs"][0].get("rtt_ms").is_some());
}

#[test]
fn every_nat_zoo_pair_reaches_the_other_by_virtual_address_random_ports_included() {
    let m = vpn_matrix("nat-zoo", 11);
    assert!(
        m.cells
            .iter()
            .any(|c| c.to_host == "nat-apdm-rand" && c.from_host == "nat-apdm-seq" && c.ok),
        "{}",
        m.render()
    );
}

/// Runs `program args` in `host` and returns its stdout, or panics with
/// what went wrong.
fn run_in(lab: &Lab, host: &str, program: &str, args: &[&str]) -> String {
    reach_lab::apply::run(lab.command(host, program).args(args), None)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A lab of topology `name` with its hubs running, the reach tools and the
/// lab's reach state directory.
fn lab_with_hubs(name: &str) -> (Lab, reach_lab::hubs::HubSet, PathBuf, PathBuf) {
    let t = common::topology(name);
    let lab = Lab::up(&t).expect("lab up");
    let tools = common::tools_with_reach();
    let state = reach_lab::matrix::reach_state(&lab);
    let hubs = reach_lab::hubs::start(&lab, &t, t.hubs.as_ref().expect("hubs"), &tools, &state)
        .expect("hubs");
    (lab, hubs, tools, state)
}

/// The vpn's entry in `host`'s `reach status --json`.
fn vpn_status(lab: &Lab, host: &str) -> Option<serde_json::Value> {
    reach_lab::vpn::status(lab, &common::tools_with_reach(), host)
}

/// Whether `command` runs and succeeds (its output dropped).
fn succeeds(command: &mut std::process::Command) -> bool {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `host` has the vpn device.
fn has_device(lab: &Lab, host: &str) -> bool {
    succeeds(
        lab.command(host, "ip")
            .args(["link", "show", reach_lab::vpn::DEVICE]),
    )
}

#[test]
fn unmodified_ssh_curl_and_iperf3_cross_nats_over_the_vpn_and_the_device_goes_with_the_member() {
    let (lab, hubs, tools, state) = lab_with_hubs("smartsockets");
    // A home desktop behind a NAT and a cluster node without a route out.
    let (a, b) = ("desktop", "hiroshi-node");
    let member = |h: &str| {
        reach_lab::vpn::start_member(&lab, &tools, h, hubs.attach.get(h).map(String::as_str))
            .expect("vpn up")
    };
    let (ma, mb) = (member(a), member(b));
    let (ipa, ipb) = (ma.ip.to_string(), mb.ip.to_string());
    hubs.wait_converged(&lab, &tools, 2, Duration::from_secs(30))
        .expect("hubs converge");

    // ssh, to an sshd started in b, logs in over the vpn: the server sees
    // the connection between the two virtual addresses.
    let ssh_dir = lab.record().state_dir().join("ssh");
    reach_lab::sshd::prepare(&ssh_dir).expect("ssh keys");
    reach_lab::sshd::start(&ssh_dir, &lab.record().host_ns(lab.host(b)), b).expect("sshd");
    let mut ssh_args = reach_lab::sshd::client_args(&ssh_dir);
    ssh_args.extend([format!("root@{ipb}"), "echo $SSH_CONNECTION".into()]);
    let args: Vec<&str> = ssh_args.iter().map(String::as_str).collect();
    let seen = run_in(&lab, a, "ssh", &args);
    let words: Vec<&str> = seen.split_whitespace().collect();
    assert_eq!(words.first(), Some(&ipa.as_str()), "{seen}");
    assert_eq!(words.get(2), Some(&ipb.as_str()), "{seen}");

    // curl fetches from a web server bound to b's virtual address only.
    let dir = state.join("www");
    std::fs::create_dir_all(&dir).expect("www");
    std::fs::write(dir.join("hello.txt"), "served over reach vpn\n").expect("file");
    let _web = common::spawn_until(
        {
            let mut c = lab.command(b, "python3");
            c.args([
                "-u",
                "-m",
                "http.server",
                "8000",
                "--bind",
                &ipb,
                "--directory",
            ])
            .arg(&dir);
            c
        },
        &state.join("web.log"),
        "Serving HTTP",
    );
    let page = run_in(
        &lab,
        a,
        "curl",
        &[
            "-sS",
            "--max-time",
            "20",
            &format!("http://{ipb}:8000/hello.txt"),
        ],
    );
    assert_eq!(page, "served over reach vpn\n");

    // iperf3 between the virtual addresses, a short bounded run.
    let _server = common::spawn_until(
        {
            let mut c = lab.command(b, "iperf3");
            c.args(["-s", "-1", "--forceflush", "-B", &ipb]);
            c
        },
        &state.join("iperf3-server.log"),
        "Server listening",
    );
    let json = run_in(
        &lab,
        a,
        "iperf3",
        &["-c", &ipb, "-t", "2", "-J", "--connect-timeout", "10000"],
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("iperf3 JSON");
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(bps > 0.0, "iperf3 moved nothing: {json}");

    // reach status in a lists b as a peer, with the path its packets take.
    let vpn = vpn_status(&lab, a).expect("a vpn in a's status");
    let status = vpn.to_string();
    let peer = vpn["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["ip"] == ipb.as_str()))
        .unwrap_or_else(|| panic!("no peer {ipb} in {status}"));
    let path = peer["path"].as_str().unwrap_or("");
    assert!(
        ["direct", "reverse", "splice", "routed"].contains(&path)
            || path.starts_with("udp-direct ")
            || path.starts_with("udp-punched "),
        "{peer}"
    );
    assert!(peer["bytes_out"].as_u64().unwrap_or(0) > 0, "{peer}");

    // vpn down ends a's member and its device with it.
    assert!(has_device(&lab, a));
    let down = lab
        .command(a, tools.join("reach"))
        .arg("--state-dir")
        .arg(state.join(a))
        .args(["vpn", "down"])
        .output()
        .expect("vpn down");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!has_device(&lab, a), "vpn down left the device");
    // A second down says nothing runs, and fails.
    let again = lab
        .command(a, tools.join("reach"))
        .arg("--state-dir")
        .arg(state.join(a))
        .args(["vpn", "down"])
        .output()
        .expect("vpn down");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no reach vpn runs here"));

    // kill -9 of b's member: the kernel removes the device with the
    // process, and a new member comes up on the same device name.
    assert!(has_device(&lab, b));
    drop(mb);
    let gone = reach_lab::wait::until(Duration::from_secs(10), || {
        (!has_device(&lab, b)).then_some(())
    });
    assert!(gone.is_some(), "the device outlived its killed process");
    let mb = member(b);
    assert!(has_device(&lab, b));
    assert_eq!(
        mb.ip.to_string(),
        ipb,
        "the derived address is the same again"
    );
}

/// Runs `nft` in `host` with `script` on stdin.
fn nft(lab: &Lab, host: &str, script: &str) {
    reach_lab::apply::run(lab.command(host, "nft").args(["-f", "-"]), Some(script))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_relayed_pair_moves_to_a_udp_path_within_five_seconds_of_the_block_lifted_and_tcp_survives() {
    let (lab, hubs, tools, state) = lab_with_hubs("hub-chain");
    // UDP out of `a` is blocked (a firewall rule), and streams are kept on
    // the hubs (routed only), so the pair starts relayed.
    nft(
        &lab,
        "a",
        "table inet vpnblock { chain out { type filter hook output priority 0; meta l4proto udp drop; }; }\n",
    );
    // Each on its own hub, so that the relay crosses both.
    let member = |h: &str, hub: &str| {
        let hub = hubs.target(&lab, h, hub);
        {
            let options = reach_lab::vpn::Options {
                extra: &["--modules", "routed"],
                ..reach_lab::vpn::Options::default()
            };
            reach_lab::vpn::start_with(&lab, &tools, h, hub.as_deref(), &options).expect("vpn up")
        }
    };
    let (ma, mb) = (member("a", "hub1"), member("b", "hub2"));
    hubs.wait_converged(&lab, &tools, 2, Duration::from_secs(30))
        .expect("hubs converge");
    let ipb = mb.ip.to_string();
    // A long TCP connection over the vpn, paced so that it outlasts the
    // move: 15 s at 20 Mbit/s.
    let _server = common::spawn_until(
        {
            let mut c = lab.command("b", "iperf3");
            c.args(["-s", "-1", "--forceflush", "-B", &ipb]);
            c
        },
        &state.join("iperf3-server.log"),
        "Server listening",
    );
    let client_log = state.join("iperf3-client.json");
    let mut client = Lab::spawn_logged(
        lab.command("a", "iperf3").args([
            "-c",
            &ipb,
            "-t",
            "15",
            "-b",
            "20M",
            "-J",
            "--connect-timeout",
            "10000",
        ]),
        &client_log,
    )
    .expect("iperf3 client");
    let log = || std::fs::read_to_string(&ma.log).unwrap_or_default();
    let moved = || {
        log()
            .lines()
            .any(|l| l.contains("vpn peer path moved") && l.contains("module=udp"))
    };
    // Packets flow relayed, and a punching round has tried UDP and been
    // dropped by the rule (a's status counts the datagrams it could not
    // send), without a move.
    let blocked_tries = || {
        let dropped = udp_counters(&lab, "a")?.1;
        (dropped >= 10).then_some(dropped)
    };
    let tried = reach_lab::wait::until(Duration::from_secs(15), blocked_tries);
    assert!(tried.is_some(), "no blocked UDP tries: {}", log());
    assert!(log().contains("vpn peer up"), "{}", log());
    assert!(!moved(), "moved to UDP while UDP was blocked: {}", log());
    // a's status names the hubs that relay b's stream (its own, then
    // b's) and its round trip (pinged as soon as the stream is up).
    let ipb_text = ipb.clone();
    let relayed = reach_lab::wait::until(Duration::from_secs(10), || {
        let vpn = vpn_status(&lab, "a")?;
        let peer = vpn["peers"]
            .as_array()?
            .iter()
            .find(|p| p["ip"] == ipb_text.as_str())?
            .clone();
        peer["stream_rtt_us"].as_u64()?;
        // b told a its hub when the stream came up.
        (peer["via"].as_array()?.len() == 2).then_some(peer)
    });
    let relayed = relayed.unwrap_or_else(|| panic!("a's status: {:?}", vpn_status(&lab, "a")));
    assert_eq!(relayed["path"], "routed", "{relayed}");
    let via = |i: usize| relayed["via"][i].as_str().unwrap_or_default().to_string();
    for (i, host, hub) in [(0, "a", "hub1"), (1, "b", "hub2")] {
        assert!(
            hubs.target(&lab, host, hub)
                .is_some_and(|t| t.ends_with(&format!("@{}", via(i)))),
            "relayed via {:?}, not {hub} as {host} dials it: {relayed}\n{}",
            relayed["via"],
            log()
        );
    }
    // Lift the block: the UDP path is found within 5 s.
    nft(&lab, "a", "delete table inet vpnblock\n");
    let lifted = std::time::Instant::now();
    let found = reach_lab::wait::until(Duration::from_secs(10), || moved().then_some(()));
    let took = lifted.elapsed();
    assert!(found.is_some(), "no UDP path within 10 s: {}", log());
    eprintln!("relayed to UDP path {took:?} after the block was lifted");
    assert!(took <= Duration::from_secs(5), "the move took {took:?}");
    // The TCP connection carried on across the move and ended cleanly.
    let status = client
        .wait_timeout(Duration::from_secs(30))
        .expect("iperf3 ended");
    let report = std::fs::read_to_string(&client_log).unwrap_or_default();
    assert!(status.success(), "iperf3 failed: {report}");
    let v: serde_json::Value = serde_json::from_str(&report).expect("iperf3 JSON");
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(
        bytes > 15.0 * 20e6 / 8.0 * 0.8,
        "iperf3 moved {bytes} bytes: {report}"
    );
    // And b's status shows a on the UDP path, which no NAT translates
    // (both have public addresses).
    let ipa = ma.ip.to_string();
    let b_on_udp = reach_lab::wait::until(Duration::from_secs(10), || {
        let vpn = vpn_status(&lab, "b")?;
        let peers = vpn["peers"].as_array()?.clone();
        let peer = peers.iter().find(|p| p["ip"] == ipa.as_str())?;
        peer["path"]
            .as_str()?
            .starts_with("udp-direct ")
            .then_some(())
    });
    assert!(
        b_on_udp.is_some(),
        "b's status: {:?}",
        vpn_status(&lab, "b")
    );
    drop(mb);
}

/// The UDP counters in a member's `reach status --json`: (port, dropped).
fn udp_counters(lab: &Lab, host: &str) -> Option<(u16, u64)> {
    let udp = vpn_status(lab, host)?["udp"].clone();
    let port = u16::try_from(udp["port"].as_u64()?).ok()?;
    Some((port, udp["dropped"].as_u64()?))
}

#[test]
fn junk_on_the_udp_port_is_dropped_and_counted_and_the_member_carries_on() {
    let (lab, hubs, tools, _) = lab_with_hubs("hub-chain");
    let member = |h: &str| {
        let hub = hubs.target(&lab, h, "hub1");
        reach_lab::vpn::start_member(&lab, &tools, h, hub.as_deref()).expect("vpn up")
    };
    let (_ma, mb) = (member("a"), member("b"));
    hubs.wait_converged(&lab, &tools, 2, Duration::from_secs(30))
        .expect("hubs converge");
    let ipb = mb.ip.to_string();
    run_in(&lab, "a", "ping", &["-n", "-c", "2", "-w", "20", &ipb]);
    let (port, before) =
        reach_lab::wait::until(Duration::from_secs(10), || udp_counters(&lab, "b"))
            .expect("b's UDP counters");
    // From a third host: random bytes, truncated headers, a datagram with
    // every header field plausible but a made-up session, and one for a
    // session index that exists nowhere, each kind many times.
    let b_addr = lab
        .host("b")
        .public
        .unwrap_or(lab.host("b").lan)
        .to_string();
    let script = format!(
        "import os, socket, struct\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         to = ('{b_addr}', {port})\n\
         for i in range(200):\n\
         \x20   s.sendto(os.urandom(i % 90), to)\n\
         \x20   s.sendto(struct.pack('>BIQ', 1 + i % 3, i, i) + os.urandom(40), to)\n\
         \x20   s.sendto(b'reach-echo 1.2.3.4:5\\n', to)\n"
    );
    run_in(&lab, "hub1", "python3", &["-c", &script]);
    let counted = reach_lab::wait::until(Duration::from_secs(10), || {
        let (_, now) = udp_counters(&lab, "b")?;
        (now >= before + 400).then_some(now)
    });
    assert!(
        counted.is_some(),
        "junk not counted as dropped: {:?}",
        udp_counters(&lab, "b")
    );
    // The member still carries packets.
    run_in(&lab, "a", "ping", &["-n", "-c", "3", "-w", "20", &ipb]);
    let log = std::fs::read_to_string(&mb.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

/// A host behind a random-port NAT and one behind a port-restricted NAT
/// (endpoint-independent mapping, address-and-port-dependent filtering:
/// the kernel's masquerade) get a UDP path only by many-port punching:
/// the first has spare sockets, the second sprays. Each time both move
/// to fresh sockets (`reach vpn rebind`) they punch through again.
#[test]
fn a_random_port_nat_and_a_port_restricted_one_punch_with_many_ports_each_time_both_move() {
    let (lab, hubs, tools, _) = lab_with_hubs("nat-zoo");
    let options = reach_lab::vpn::Options {
        servers: false,
        ..Default::default()
    };
    let member = |h: &str| {
        let hub = hubs.attach.get(h).map(String::as_str);
        reach_lab::vpn::start_with(&lab, &tools, h, hub, &options).expect("member up")
    };
    let (easy, hard) = ("nat-eim", "nat-apdm-rand");
    let (me, mh) = (member(easy), member(hard));
    let rate = reach_lab::punch::pair(&lab, &tools, (easy, &me), (hard, &mh), 3);
    assert_eq!(rate.punched, 3, "{rate:?}");
    assert!(
        rate.max_ms
            .is_some_and(|ms| ms < reach_lab::punch::ATTEMPT_WINDOW.as_secs_f64() * 1000.0),
        "{rate:?}"
    );
    let udp = vpn_status(&lab, hard).expect("the hard side's status")["udp"].clone();
    assert_eq!(udp["rebinds"], 3, "{udp}");
    // Every attempt: a spray hit a spare socket.
    assert!(udp["birthday_hits"].as_u64() >= Some(3), "{udp}");
    let peer = reach_lab::vpn::peer_status(&lab, &tools, hard, me.ip).expect("peer listed");
    assert!(peer["udp_path"].is_string(), "{peer}");
    assert_eq!(peer["udp_kind"], "udp-punched", "{peer}");
    // Packets cross (over the stream or the UDP path).
    run_in(
        &lab,
        hard,
        "ping",
        &["-n", "-c", "2", "-w", "10", &me.ip.to_string()],
    );
}

#[test]
fn udp_session_keys_are_renewed_while_packets_flow_and_none_is_lost() {
    let (lab, hubs, tools, _) = lab_with_hubs("hub-chain");
    // Keys renewed every second (120 s by default), packets on the UDP
    // path whenever it is up.
    let options = reach_lab::vpn::Options {
        extra: &["--udp-first", "--rekey-every", "1"],
        ..reach_lab::vpn::Options::default()
    };
    let member = |h: &str| {
        let hub = hubs.target(&lab, h, "hub1");
        reach_lab::vpn::start_with(&lab, &tools, h, hub.as_deref(), &options).expect("vpn up")
    };
    let (ma, mb) = (member("a"), member("b"));
    hubs.wait_converged(&lab, &tools, 2, Duration::from_secs(30))
        .expect("hubs converge");
    let ipb = mb.ip.to_string();
    run_in(&lab, "a", "ping", &["-n", "-c", "2", "-w", "20", &ipb]);
    let on_udp = reach_lab::wait::until(Duration::from_secs(10), || {
        let p = reach_lab::vpn::peer_status(&lab, &tools, "a", mb.ip)?;
        p["path"].as_str()?.starts_with("udp-").then_some(())
    });
    assert!(on_udp.is_some(), "no UDP path: {:?}", vpn_status(&lab, "a"));
    let udp = |host: &str| vpn_status(&lab, host).map(|v| v["udp"].clone());
    let before = udp("b").expect("b's UDP status");
    // 60 pings over 6 s cross five or more renewals at each end.
    let out = run_in(
        &lab,
        "a",
        "ping",
        &["-n", "-q", "-c", "60", "-i", "0.1", "-W", "2", &ipb],
    );
    assert!(
        out.contains("60 received"),
        "pings lost across renewals: {out}"
    );
    let (a, b) = (udp("a").expect("a's UDP"), udp("b").expect("b's UDP"));
    for (host, u) in [("a", &a), ("b", &b)] {
        assert!(u["rekeys"].as_u64().unwrap_or(0) >= 4, "{host}: {u}");
    }
    // The pings took the UDP path, and nothing was refused as forged or
    // retired on the way.
    let got = b["received"].as_u64().unwrap_or(0) - before["received"].as_u64().unwrap_or(0);
    assert!(got >= 60, "b took {got} datagrams: {b}");
    assert_eq!(b["dropped"], before["dropped"], "{before} -> {b}");
    drop(ma);
}

/// Whether one `ping` from `from` to `to` is answered (within 2 s).
fn pings(lab: &Lab, from: &str, to: std::net::IpAddr) -> bool {
    succeeds(
        lab.command(from, "ping")
            .args(["-n", "-c", "1", "-w", "2"])
            .arg(to.to_string()),
    )
}

#[test]
fn members_with_public_addresses_serve_as_the_hubs_of_a_network_without_one() {
    // No dedicated hub runs: `open` and the public host `hub` are members
    // that serve the network as hubs too (linked by a hub secret), and
    // members behind NATs attach to one or the other, with the other as
    // their fallback.
    let t = common::topology("nat-zoo");
    let lab = Lab::up(&t).expect("lab up");
    let tools = common::tools_with_reach();
    let state = reach_lab::matrix::reach_state(&lab);
    std::fs::create_dir_all(&state).expect("state dir");
    let hub_secret = state.join("hub.secret");
    std::fs::write(&hub_secret, "a hub secret for this test only\n").expect("hub secret");
    let serving = |host: &str, link_to: Option<&str>| {
        let addr_file = state.join(format!("{host}.hub"));
        let args = [
            "--serve-hub",
            "7700",
            "--hub-secret-file",
            hub_secret.to_str().expect("utf-8 path"),
            "--hub-addr-file",
            addr_file.to_str().expect("utf-8 path"),
        ];
        let options = reach_lab::vpn::Options {
            extra: &args,
            ..reach_lab::vpn::Options::default()
        };
        let member =
            reach_lab::vpn::start_with(&lab, &tools, host, link_to, &options).expect("vpn up");
        let target = std::fs::read_to_string(&addr_file).expect("hub address file");
        (member, target.trim().to_string())
    };
    let (open, open_hub) = serving("open", None);
    let (public, public_hub) = serving("hub", Some(&open_hub));
    assert_ne!(open_hub, public_hub);
    let fallback = ["--hub", public_hub.as_str()];
    let eim = reach_lab::vpn::start_with(
        &lab,
        &tools,
        "nat-eim",
        Some(&open_hub),
        &reach_lab::vpn::Options {
            extra: &fallback,
            ..reach_lab::vpn::Options::default()
        },
    )
    .expect("nat-eim up");
    let rand = reach_lab::vpn::start_member(&lab, &tools, "nat-apdm-rand", Some(&public_hub))
        .expect("nat-apdm-rand up");
    // Every member reaches every other by virtual address: across the NATs,
    // and between members of the two member hubs (found through their link).
    let members = [
        ("open", &open),
        ("hub", &public),
        ("nat-eim", &eim),
        ("nat-apdm-rand", &rand),
    ];
    for (from, _) in &members {
        for (to, m) in &members {
            if from == to {
                continue;
            }
            let ok = reach_lab::wait::until(Duration::from_secs(30), || {
                pings(&lab, from, m.ip).then_some(())
            });
            assert!(
                ok.is_some(),
                "{from} cannot ping {to} ({}):\n{}",
                m.ip,
                std::fs::read_to_string(
                    &members.iter().find(|x| x.0 == *from).expect("member").1.log
                )
                .unwrap_or_default()
            );
        }
    }
    // A member hub admits only the network's members: a node without the
    // network secret is refused.
    let outsider = lab
        .command("nat-eif", tools.join("reach"))
        .arg("--state-dir")
        .arg(state.join("outsider"))
        .args(["listen", "--port", "9", "--hub", &open_hub])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("reach listen");
    let said = String::from_utf8_lossy(&outsider.stderr);
    assert!(!outsider.status.success(), "an outsider attached: {said}");
    assert!(said.contains("cannot attach to the hub"), "{said}");
    // The member serving nat-eim's hub goes: nat-eim attaches to its
    // fallback, the other member hub, and reaches the members left.
    drop(open);
    for (to, m) in [("hub", &public), ("nat-apdm-rand", &rand)] {
        let ok = reach_lab::wait::until(Duration::from_secs(30), || {
            pings(&lab, "nat-eim", m.ip).then_some(())
        });
        let log = std::fs::read_to_string(&eim.log).unwrap_or_default();
        assert!(
            ok.is_some(),
            "nat-eim cannot ping {to} after its hub went:\n{log}"
        );
    }
    let log = std::fs::read_to_string(&eim.log).unwrap_or_default();
    assert!(
        log.contains("trying the next hub"),
        "nat-eim did not move to its fallback hub:\n{log}"
    );
    // A member that joins now finds nat-eim through the hub it moved to
    // (the directory there holds its claim), and nat-eim finds it.
    let eif = reach_lab::vpn::start_member(&lab, &tools, "nat-eif", Some(&public_hub))
        .expect("nat-eif up");
    for (from, to, ip) in [
        ("nat-eif", "nat-eim", eim.ip),
        ("nat-eim", "nat-eif", eif.ip),
    ] {
        let ok = reach_lab::wait::until(Duration::from_secs(30), || {
            pings(&lab, from, ip).then_some(())
        });
        assert!(
            ok.is_some(),
            "{from} cannot ping {to} after the move:\n{}\n{}",
            std::fs::read_to_string(&eim.log).unwrap_or_default(),
            std::fs::read_to_string(&eif.log).unwrap_or_default()
        );
    }
}
