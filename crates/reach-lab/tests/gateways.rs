//! The shipped NAT zoo, built for real, behaves as its topology declares.
//! Needs root, iproute2 and nftables (scripts/test.sh installs them).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};

use reach_lab::probe::Outcome;
use reach_lab::{apply, Lab, Topology};

const PROBE: &str = env!("CARGO_BIN_EXE_reach-lab");

fn zoo() -> Topology {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../lab/topologies/nat-zoo.toml"
    );
    let text = std::fs::read_to_string(path).expect("read nat-zoo.toml");
    Topology::from_toml(&text).expect("valid topology")
}

/// A probe server inside a host, killed on drop (the lab kills it too).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(lab: &Lab, host: &str, ports: &[u16]) -> Server {
    let mut cmd = lab.command(host, PROBE);
    cmd.args(["probe", "serve", "--name", host]);
    for p in ports {
        cmd.arg("--port").arg(p.to_string());
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn probe server");
    let mut line = String::new();
    // The server prints "ready" once bound, or exits (closing stdout) on error.
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "ready", "probe server in {host} did not start");
    Server(child)
}

fn probe(lab: &Lab, from: &str, to: SocketAddr, bind_port: Option<u16>) -> Outcome {
    let mut cmd = lab.command(from, PROBE);
    cmd.args(["probe", "connect", &to.to_string(), "--timeout", "1"]);
    if let Some(p) = bind_port {
        cmd.args(["--bind-port", &p.to_string()]);
    }
    let out = cmd.output().expect("run probe");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad probe output {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn addr(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn kernel_gateways_behave_as_declared() {
    let lab = Lab::up(&zoo()).expect("lab up");
    let _open = serve(&lab, "open", &[7000, 7001]);
    let _drop = serve(&lab, "fw-drop", &[7000]);
    let _reject = serve(&lab, "fw-reject", &[7000]);
    let _nat = serve(&lab, "nat-eim", &[7000]);
    let open = lab.host("open").lan;

    // Endpoint-independent mapping: one external port, preserved, for two
    // destinations; the external address is the gateway's.
    let eim_gw = lab.host("nat-eim").gateway;
    for port in [7000, 7001] {
        match probe(&lab, "nat-eim", addr(open, port), Some(40000)) {
            Outcome::Ok {
                seen_as, server, ..
            } => {
                assert_eq!(server, "open");
                assert_eq!(seen_as, addr(eim_gw, 40000), "EIM with port preservation");
            }
            other => panic!("nat-eim to open: {other:?}"),
        }
    }
    // Address-and-port-dependent mapping with random ports: a new external
    // port per destination.
    let seen: Vec<SocketAddr> = [7000, 7001]
        .iter()
        .map(
            |&port| match probe(&lab, "nat-apdm-rand", addr(open, port), Some(40000)) {
                Outcome::Ok { seen_as, .. } => seen_as,
                other => panic!("nat-apdm-rand to open: {other:?}"),
            },
        )
        .collect();
    assert_ne!(
        seen[0].port(),
        seen[1].port(),
        "APDM: one mapping per destination"
    );

    // Filtering: inbound new connections are dropped, rejected, or have nowhere to go.
    let to = |h: &str| addr(lab.host(h).lan, 7000);
    assert_eq!(probe(&lab, "open", to("fw-drop"), None), Outcome::Timeout);
    assert_eq!(probe(&lab, "open", to("fw-reject"), None), Outcome::Refused);
    assert_eq!(
        probe(&lab, "open", addr(eim_gw, 7000), None),
        Outcome::Timeout
    );
    // Outbound from behind a firewall works.
    assert!(matches!(
        probe(&lab, "fw-drop", addr(open, 7000), None),
        Outcome::Ok { .. }
    ));
}

#[test]
fn non_routed_and_multi_homed_hosts_and_host_firewalls() {
    let text = r#"
        name = "mh"
        [[site]]
        name = "pub"
        gateway = "open"
        [[site.host]]
        name = "web"
        [[site]]
        name = "uni"
        gateway = "firewall"
        inbound = "reject"
        allow_in = [7001]
        [[site.host]]
        name = "fe"
        multi_homed = true
        [[site.host]]
        name = "node"
        routed = false
    "#;
    let lab = Lab::up(&Topology::from_toml(text).expect("topology")).expect("lab up");
    let _web = serve(&lab, "web", &[7000]);
    let _fe = serve(&lab, "fe", &[7000, 7001]);
    let _node = serve(&lab, "node", &[7000]);
    let web = addr(lab.host("web").lan, 7000);
    let fe_pub = lab.host("fe").public.expect("multi-homed");
    // The non-routed node reaches nothing outside its LAN, but its front-end
    // reaches it over the LAN.
    assert_eq!(probe(&lab, "node", web, None), Outcome::Unreachable);
    let node = addr(lab.host("node").lan, 7000);
    assert!(
        matches!(probe(&lab, "fe", node, None), Outcome::Ok { ref server, .. } if server == "node")
    );
    // The front-end's own firewall admits only the listed port, and rejects.
    assert_eq!(
        probe(&lab, "web", addr(fe_pub, 7000), None),
        Outcome::Refused
    );
    assert!(matches!(
        probe(&lab, "web", addr(fe_pub, 7001), None),
        Outcome::Ok { .. }
    ));
    assert!(matches!(probe(&lab, "fe", web, None), Outcome::Ok { .. }));
}

#[test]
fn dropping_a_lab_removes_everything_even_after_a_panic() {
    let prefix = std::panic::catch_unwind(|| {
        let lab = Lab::up(&zoo()).expect("lab up");
        let prefix = lab.record().prefix.clone();
        assert!(!apply::namespaces_with_prefix(&prefix).is_empty());
        // A process inside a namespace must not keep it alive.
        let _server = serve(&lab, "open", &[7000]);
        std::panic::panic_any(prefix);
    })
    .expect_err("the closure panics")
    .downcast::<String>()
    .expect("prefix");
    assert_eq!(apply::namespaces_with_prefix(&prefix), Vec::<String>::new());
    let recorded = reach_lab::LabRecord::all()
        .into_iter()
        .any(|l| &l.prefix == prefix.as_ref());
    assert!(!recorded, "registry entry removed");
}
