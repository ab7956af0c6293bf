//! reach gateway in the lab: the daemon runs in a NAT gateway's namespace,
//! real NAT-PMP clients (`natpmpc`, libnatpmp's) on its LAN ask it for
//! port forwards, and a host on the internet connects through them. Needs
//! root, iproute2, nftables, natpmpc, socat and the `reach` binary built
//! beside `reach-lab`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reach_lab::lab::Process;
use reach_lab::Lab;

mod common;

/// What the client's server says to every connection.
const GREETING: &str = "hello from behind the gateway";

/// Starts `reach gateway` in site `site`'s gateway with `flags`; its state
/// and log (`gateway.log`) in `dir`.
fn start_gateway(lab: &Lab, site: &str, dir: &Path, flags: &[&str]) -> Process {
    let mut all = vec!["--ports", "40000-40999"];
    all.extend_from_slice(flags);
    reach_lab::gateway::start_at(lab, site, &common::tools_with_reach(), dir, &all)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A TCP server on `port` in `host` that greets every connection.
fn greeter(lab: &Lab, host: &str, port: u16, log: &Path) -> Process {
    let mut cmd = lab.command(host, "socat");
    cmd.args([
        "-d",
        "-d",
        &format!("TCP-LISTEN:{port},fork,reuseaddr"),
        &format!("SYSTEM:echo {GREETING}"),
    ]);
    common::spawn_until(cmd, log, "listening on")
}

/// What a connection from `host` to `ip:port` reads (None: it could not
/// connect within 3 s, or read nothing).
fn fetch(lab: &Lab, host: &str, ip: &str, port: u16) -> Option<String> {
    let out = lab
        .command(host, "socat")
        .args([
            "-T",
            "3",
            "-",
            &format!("TCP:{ip}:{port},connect-timeout=3"),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Runs natpmpc in `host` with `args`; its output, or a panic that shows it.
fn natpmpc(lab: &Lab, host: &str, args: &[&str]) -> String {
    let (ok, text) = client(lab, host, "natpmpc", args);
    assert!(ok, "natpmpc {args:?} failed:\n{text}");
    text
}

/// Runs `program args` (a port-mapping client) in `host`: whether it
/// succeeded, and its stdout and stderr.
fn client(lab: &Lab, host: &str, program: &str, args: &[&str]) -> (bool, String) {
    let out = lab
        .command(host, program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} does not run (install it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The rules of the gateway's nftables table, as `nft list` prints them.
fn gateway_rules(lab: &Lab, site: &str) -> String {
    let out = lab
        .gateway_command(site, "nft")
        .args(["list", "table", "ip", "reach_gateway"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The elements of the gateway table's map or set `name` (its forwards:
/// `udp_fwd`, its accepts: `udp_in`), as nft's JSON gives them.
fn elements(lab: &Lab, site: &str, kind: &str, name: &str) -> Vec<serde_json::Value> {
    let out = lab
        .gateway_command(site, "nft")
        .args(["-j", "list", kind, "ip", "reach_gateway", name])
        .output()
        .expect("nft");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|i| i[kind]["elem"].as_array().cloned())
        .unwrap_or_default()
}

fn state(lab: &Lab) -> PathBuf {
    reach_lab::matrix::reach_state(lab)
}

/// The gateway lab with the daemon serving at `home` (state in the
/// returned directory) and the greeter on `client`'s port 8080.
fn gateway_lab() -> (Lab, PathBuf, Process, Process) {
    let t = common::topology("gateway");
    let lab = Lab::up(&t).expect("lab up");
    let dir = state(&lab).join("gateway");
    let gw = start_gateway(&lab, "home", &dir, &[]);
    let server = greeter(&lab, "client", 8080, &state(&lab).join("greeter.log"));
    (lab, dir, gw, server)
}

#[test]
fn natpmpc_maps_a_port_the_internet_reaches_until_it_is_deleted_or_its_lease_ends() {
    let (lab, dir, gw, _server) = gateway_lab();
    let public = lab.host("client").gateway.to_string();
    // Unmapped, the NAT lets nothing in.
    assert_eq!(fetch(&lab, "outside", &public, 40080), None);
    // natpmpc asks its default gateway: the external address first.
    let said = natpmpc(&lab, "client", &[]);
    assert!(
        said.contains(&format!("Public IP address : {public}")),
        "{said}"
    );
    let said = natpmpc(&lab, "client", &["-a", "40080", "8080", "tcp", "3600"]);
    assert!(
        said.contains("Mapped public port 40080 protocol TCP to local port 8080"),
        "{said}"
    );
    assert_eq!(
        fetch(&lab, "outside", &public, 40080).as_deref(),
        Some(GREETING),
        "the mapped port is not reachable:\n{}\n{}",
        gateway_rules(&lab, "home"),
        std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default()
    );
    // Deleted (lifetime 0): unreachable again, and its rules are gone.
    natpmpc(&lab, "client", &["-a", "40080", "8080", "tcp", "0"]);
    assert_eq!(fetch(&lab, "outside", &public, 40080), None);
    assert!(!gateway_rules(&lab, "home").contains("40080"));
    // A lease of 2 s: reachable, then not, without anyone asking.
    natpmpc(&lab, "client", &["-a", "40081", "8080", "tcp", "2"]);
    assert_eq!(
        fetch(&lab, "outside", &public, 40081).as_deref(),
        Some(GREETING)
    );
    let ended = reach_lab::wait::until(Duration::from_secs(10), || {
        (!gateway_rules(&lab, "home").contains("40081")).then_some(())
    });
    assert!(
        ended.is_some(),
        "the lease did not end: {}",
        gateway_rules(&lab, "home")
    );
    assert_eq!(fetch(&lab, "outside", &public, 40081), None);
    drop(gw);
}

/// `reach connect` from `host` to `vaddr` through `hub`: the module it
/// connected by (its log's "connected ... module=X" line), or its error.
fn connect_module(lab: &Lab, host: &str, hub: &str, vaddr: &str) -> Result<String, String> {
    let dir = state(lab).join(format!("{host}-connect"));
    let out = lab
        .command(host, common::tools_with_reach().join("reach"))
        .arg("--state-dir")
        .arg(&dir)
        .args(["-v", "connect", "--timeout", "20", "--hub", hub, vaddr])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        return Err(log);
    }
    log.lines()
        .find(|l| l.split_whitespace().nth(2) == Some("connected"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("module=")))
        .map(str::to_string)
        .ok_or(log)
}

/// `reach listen --keep` in `host` attached to `hub` with `flags`; it,
/// its virtual address and its log.
fn listener(lab: &Lab, host: &str, hub: &str, flags: &[&str]) -> (Process, String, PathBuf) {
    let dir = state(lab).join(format!("{host}-listen"));
    common::listener(lab, host, hub, &dir, flags)
}

/// The gateway lab with the daemon serving at `home` (state in the
/// returned directory) and a hub on the internet: the lab, the gateway's
/// directory, the daemon, the hub and its NODEID@IP:PORT.
fn gateway_lab_with_hub() -> (Lab, PathBuf, Process, Process, String) {
    let t = common::topology("gateway");
    let lab = Lab::up(&t).expect("lab up");
    let (hub_proc, hub) = common::hub(&lab, "hub", &state(&lab).join("hub"), &[]);
    let dir = state(&lab).join("gateway");
    let gw = start_gateway(&lab, "home", &dir, &[]);
    (lab, dir, gw, hub_proc, hub)
}

#[test]
fn a_reach_node_behind_the_gateway_maps_its_port_and_is_reached_direct() {
    let (lab, _dir, _gw, _hub, hub) = gateway_lab_with_hub();
    // Without a mapping the outside host cannot dial in: not Direct.
    let (unmapped, vaddr, _) = listener(&lab, "peer", &hub, &["--no-port-mapping"]);
    let before = connect_module(&lab, "outside", &hub, &vaddr).expect("connects");
    assert_ne!(before, "direct");
    drop(unmapped);
    // With one (the default), it dials the mapped port.
    let (_mapped, vaddr, log) = listener(&lab, "client", &hub, &[]);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let mapped = reach_lab::wait::until(Duration::from_secs(20), || {
        read().contains("port mapped by the gateway").then_some(())
    });
    assert!(mapped.is_some(), "no mapping:\n{}", read());
    let public = lab.host("client").gateway.to_string();
    assert!(
        read().contains(&format!("external={public}:")),
        "{}",
        read()
    );
    let after = connect_module(&lab, "outside", &hub, &vaddr).expect("connects");
    assert_eq!(
        after,
        "direct",
        "{}\n{}",
        read(),
        gateway_rules(&lab, "home")
    );
}

#[test]
fn reach_doctor_behind_the_gateway_finds_its_port_mapping_and_leaves_none_behind() {
    let (lab, _dir, _gw, _hub, hub) = gateway_lab_with_hub();
    let out = lab
        .command("client", common::tools_with_reach().join("reach"))
        .arg("--state-dir")
        .arg(state(&lab).join("client-doctor"))
        .args(["doctor", "--json", "--hub", &hub])
        .output()
        .expect("run reach doctor");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let pm = &r["port_mapping"];
    println!("port mapping: {pm}");
    assert_eq!(pm["available"], true, "{r}");
    // PCP is asked first, and reach gateway answers it.
    assert_eq!(pm["protocol"], "pcp", "{r}");
    let public = lab.host("client").gateway.to_string();
    assert!(
        pm["external"]
            .as_str()
            .is_some_and(|e| e.starts_with(&format!("{public}:"))),
        "the gateway's public address: {r}"
    );
    // The probe's mapping was deleted again: no forward stays behind.
    for map in ["tcp_fwd", "udp_fwd"] {
        let left = elements(&lab, "home", "map", map);
        assert!(
            left.is_empty(),
            "{map}: {left:?}\n{}",
            gateway_rules(&lab, "home")
        );
    }
    // Behind this kernel NAT, inbound from another port is kept out.
    assert_eq!(
        r["filtering"]["filtering"], "address-and-port-dependent",
        "{r}"
    );
}

/// `reach connect` from `host` to `vaddr` through `hub` with `flags`:
/// the module it connected by and the address it connected to (its log's
/// "connected" line, also printed), or its error.
fn connect_with(
    lab: &Lab,
    host: &str,
    hub: &str,
    vaddr: &str,
    flags: &[&str],
) -> Result<(String, String), String> {
    // A state directory of its own: no module cached by an earlier run.
    let dir = state(lab).join(format!("{host}-connect{}", flags.join("")));
    let out = lab
        .command(host, common::tools_with_reach().join("reach"))
        .arg("--state-dir")
        .arg(&dir)
        .args(["-v", "connect", "--timeout", "20", "--hub", hub])
        .args(flags)
        .arg(vaddr)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        return Err(log);
    }
    let line = log
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("connected"))
        .ok_or_else(|| log.clone())?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_string)
    };
    eprintln!("{host} {flags:?}: {line}");
    match (field("module="), field("to=")) {
        (Some(m), Some(r)) => Ok((m, r)),
        _ => Err(log),
    }
}

#[test]
fn a_peer_behind_the_same_gateway_is_reached_on_the_lan_by_the_gateways_answer() {
    let (lab, dir, _gw, _hub, hub) = gateway_lab_with_hub();
    let (_listener, vaddr, log) = listener(&lab, "client", &hub, &[]);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    // The public endpoint the gateway mapped for it.
    let external = reach_lab::wait::until(Duration::from_secs(20), || {
        read()
            .lines()
            .find(|l| l.contains("port mapped by the gateway"))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("external="))
                    .map(str::to_string)
            })
    })
    .unwrap_or_else(|| panic!("no mapping:\n{}", read()));
    // The peer knows only that public endpoint (DPF's case: a node
    // published its mapped address), and the NAT does not hairpin.
    let node = vaddr.split('/').next().expect("node part");
    let public_only = format!("{node}/a={external}");
    let lan = format!("{}:", lab.host("client").lan);
    let (module, remote) = connect_with(&lab, "peer", &hub, &public_only, &["--no-gateway-query"])
        .expect("connects without the query");
    assert!(
        module != "direct" || !remote.starts_with(&lan),
        "without the query: {module} to {remote}"
    );
    // Asked, the gateway names the internal endpoint: Direct on the LAN
    // (the public endpoint was the only address given).
    let (module, remote) =
        connect_with(&lab, "peer", &hub, &public_only, &[]).expect("connects with the query");
    assert_eq!(
        (module.as_str(), remote.starts_with(&lan)),
        ("direct", true),
        "with the query: {module} to {remote}\n{}",
        std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default()
    );
}

/// Runs upnpc in `host` with `args`; its output and whether it succeeded.
/// With `-i`: the lab's public addresses are documentation ranges, which
/// miniupnpc counts as reserved, and it declines an IGD whose external
/// address is reserved ("not connected?") unless told to go on.
fn upnpc(lab: &Lab, host: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["-i"];
    all.extend_from_slice(args);
    client(lab, host, "upnpc", &all)
}

#[test]
fn upnpc_adds_lists_and_deletes_a_mapping_the_internet_reaches() {
    let (lab, dir, _gw, _server) = gateway_lab();
    let public = lab.host("client").gateway.to_string();
    let lan = lab.host("client").lan.to_string();
    let log = || std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
    // Discovery (SSDP), the description, then AddPortMapping.
    let (ok, said) = upnpc(
        &lab,
        "client",
        &["-a", &lan, "8080", "40090", "tcp", "3600"],
    );
    assert!(
        ok && said.contains("is redirected to internal"),
        "{said}\n{}",
        log()
    );
    assert_eq!(
        fetch(&lab, "outside", &public, 40090).as_deref(),
        Some(GREETING),
        "{}",
        gateway_rules(&lab, "home")
    );
    // GetGenericPortMappingEntry lists it; GetExternalIPAddress names the WAN.
    let (ok, said) = upnpc(&lab, "client", &["-l"]);
    assert!(ok, "{said}");
    assert!(said.contains(&format!("40090->{lan}:8080")), "{said}");
    assert!(
        said.contains(&format!("ExternalIPAddress = {public}")),
        "{said}"
    );
    // Another host cannot take the port or delete the mapping.
    let peer = lab.host("peer").lan.to_string();
    let (_, said) = upnpc(&lab, "peer", &["-a", &peer, "8080", "40090", "tcp", "3600"]);
    assert!(said.contains("718"), "{said}");
    let (_, said) = upnpc(&lab, "peer", &["-d", "40090", "tcp"]);
    assert!(said.contains("606"), "{said}");
    assert_eq!(
        fetch(&lab, "outside", &public, 40090).as_deref(),
        Some(GREETING)
    );
    // DeletePortMapping: closed again, rules gone.
    let (ok, said) = upnpc(&lab, "client", &["-d", "40090", "tcp"]);
    assert!(ok, "{said}");
    assert_eq!(fetch(&lab, "outside", &public, 40090), None);
    assert!(!gateway_rules(&lab, "home").contains("40090"));
}

#[test]
fn refusals_come_with_natpmp_codes_and_leave_nothing_behind() {
    let t = common::topology("gateway");
    let lab = Lab::up(&t).expect("lab up");
    let dir = state(&lab).join("gateway");
    // Only `peer`'s address may be mapped, two mappings each.
    let peer = lab.host("peer").lan.to_string();
    let _gw = start_gateway(
        &lab,
        "home",
        &dir,
        &[
            "--allow-internal",
            &format!("{peer}/32"),
            "--max-per-client",
            "2",
        ],
    );
    // client is outside the allowed ranges: its requests are dropped, so
    // natpmpc gets no answer (it gives up after its retries).
    let (ok, said) = client(
        &lab,
        "client",
        "timeout",
        &["5", "natpmpc", "-a", "40001", "1", "tcp", "60"],
    );
    assert!(!ok, "{said}");
    // peer gets two, and the third is refused: out of resources (4),
    // which libnatpmp reports as its error -53.
    for port in ["1", "2"] {
        natpmpc(&lab, "peer", &["-a", "0", port, "udp", "60"]);
    }
    let (ok, said) = client(&lab, "peer", "natpmpc", &["-a", "0", "3", "udp", "60"]);
    assert!(!ok, "{said}");
    // libnatpmp's NATPMP_ERR_OUTOFRESOURCES for result code 4.
    assert!(said.contains("returned -53"), "{said}");
    assert_eq!(
        elements(&lab, "home", "map", "udp_fwd").len(),
        2,
        "{}",
        gateway_rules(&lab, "home")
    );
}

#[test]
fn the_probe_ends_the_mappings_of_programs_and_hosts_that_are_gone_before_their_lease() {
    let t = common::topology("gateway");
    let lab = Lab::up(&t).expect("lab up");
    let dir = state(&lab).join("gateway");
    let _gw = start_gateway(
        &lab,
        "home",
        &dir,
        &["--probe-interval", "1", "--probe-misses", "2"],
    );
    let _client_server = greeter(&lab, "client", 8080, &state(&lab).join("client.log"));
    let _peer_server = greeter(&lab, "peer", 8080, &state(&lab).join("peer.log"));
    // An hour's leases: a program that listens, one that does not (its
    // port refuses), and a host that goes silent.
    natpmpc(&lab, "client", &["-a", "40080", "8080", "tcp", "3600"]);
    natpmpc(&lab, "client", &["-a", "40081", "8081", "tcp", "3600"]);
    natpmpc(&lab, "peer", &["-a", "40082", "8080", "tcp", "3600"]);
    let silence = "add table inet gone\n\
        add chain inet gone input { type filter hook input priority -10; policy drop; }\n";
    let mut nft = lab.command("peer", "nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().expect("nft");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(silence.as_bytes())
        .expect("nft input");
    assert!(child.wait().expect("nft").success());
    let log = || std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
    // The log line comes once table, kernel and journal have changed.
    let ended = reach_lab::wait::until(Duration::from_secs(20), || {
        (log().matches("its client is gone").count() == 2).then_some(())
    });
    assert!(
        ended.is_some(),
        "the probe did not end them:\n{}\n{}",
        gateway_rules(&lab, "home"),
        log()
    );
    let rules = gateway_rules(&lab, "home");
    assert!(
        !rules.contains("40081") && !rules.contains("40082"),
        "{rules}"
    );
    // The listening program keeps its mapping, reachable from outside.
    assert!(gateway_rules(&lab, "home").contains("40080"));
    let public = lab.host("client").gateway.to_string();
    // One fetch can miss on a loaded machine (its own short deadline): retry
    // within a bound, as a client would.
    let reached = reach_lab::wait::until(Duration::from_secs(15), || {
        fetch(&lab, "outside", &public, 40080).filter(|g| g == GREETING)
    });
    assert_eq!(reached.as_deref(), Some(GREETING));
}

#[test]
fn a_gateway_killed_holding_500_mappings_restarts_with_the_kernel_equal_to_its_journal() {
    let t = common::topology("gateway");
    let lab = Lab::up(&t).expect("lab up");
    let dir = state(&lab).join("gateway");
    let flags = ["--max-per-client", "1000"];
    let gw = start_gateway(&lab, "home", &dir, &flags);
    // A rule of someone else's, in a table of theirs.
    let foreign = "table ip admin {\n chain prerouting {\n type nat hook prerouting priority -110; policy accept;\n iifname \"wan\" tcp dport 2222 dnat to 10.1.0.2:22\n }\n}\n";
    let mut nft = lab.gateway_command("home", "nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().expect("nft");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), foreign.as_bytes())
        .expect("write");
    assert!(child.wait().expect("nft").success());
    let admin_before = {
        let out = lab
            .gateway_command("home", "nft")
            .args(["list", "table", "ip", "admin"])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // 500 mappings by 500 natpmpc requests (ports 41..540 to 40041..).
    let script =
        "for p in $(seq 41 540); do natpmpc -a $((40000+p)) $p udp 3600 >/dev/null || exit 1; done";
    let out = lab
        .command("client", "sh")
        .args(["-c", script])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let forwards = || elements(&lab, "home", "map", "udp_fwd");
    assert_eq!(forwards().len(), 500);
    // kill -9, and the kernel table lost (as after a reboot).
    drop(gw);
    let deleted = lab
        .gateway_command("home", "nft")
        .args(["delete", "table", "ip", "reach_gateway"])
        .status()
        .expect("nft");
    assert!(deleted.success());
    let _again = start_gateway(&lab, "home", &dir, &flags);
    // Each mapping's forward and accept once (a map has one element per
    // external port), each to its own internal port.
    let mut ports: Vec<u64> = forwards()
        .iter()
        .filter_map(|e| e[1]["concat"][1].as_u64())
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, (41..=540).collect::<Vec<u64>>());
    assert_eq!(elements(&lab, "home", "set", "udp_in").len(), 500);
    let journal =
        std::fs::read_to_string(dir.join("gateway").join("mappings.journal")).expect("journal");
    assert_eq!(journal.lines().count(), 500);
    let admin_after = {
        let out = lab
            .gateway_command("home", "nft")
            .args(["list", "table", "ip", "admin"])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(admin_before, admin_after);
}

/// The reach matrix of topology `name`: its cells and how many settled
/// Direct.
fn reach_matrix(name: &str) -> reach_lab::matrix::Matrix {
    let t = common::topology(name);
    let lab = Lab::up(&t).expect("lab up");
    reach_lab::matrix::run(
        &lab,
        &t,
        reach_lab::matrix::Mode::Reach,
        Duration::from_secs(20),
        &common::tools_with_reach(),
    )
    .expect("matrix")
}

fn settled(c: &reach_lab::matrix::Cell) -> &str {
    c.settled_module
        .as_deref()
        .or(c.module.as_deref())
        .unwrap_or_default()
}

#[test]
fn gateways_on_the_smartsockets_nat_sites_turn_connections_to_the_desktop_direct() {
    let plain = reach_matrix("smartsockets");
    let mapped = reach_matrix("smartsockets-gateways");
    assert_eq!(mapped.score(), (30, 30), "{}", mapped.render());
    let direct =
        |m: &reach_lab::matrix::Matrix| m.cells.iter().filter(|c| settled(c) == "direct").count();
    // The desktop (an endpoint-independent NAT, now with a daemon) is
    // dialled at its mapped port by every node that can reach the
    // internet: the open sites' and rockstar's.
    for from in ["das3-v-node", "das3-d-node", "rockstar-node"] {
        let cell = mapped
            .cells
            .iter()
            .find(|c| c.from_host == from && c.to_host == "desktop")
            .expect("cell");
        assert_eq!(
            settled(cell),
            "direct",
            "{from} -> desktop\n{}",
            mapped.render()
        );
    }
    assert!(
        direct(&mapped) >= direct(&plain) + 3,
        "direct pairs {} with gateways, {} without:\n{}\n{}",
        direct(&mapped),
        direct(&plain),
        mapped.render(),
        plain.render()
    );
}
