//! The shipped NAT zoo, built for real, behaves as its topology declares.
//! Needs root, iproute2 and nftables (scripts/test.sh installs them).

use std::net::SocketAddr;
use std::time::Duration;

use reach_lab::probe::{self, Outcome};
use reach_lab::{apply, verify, Lab, Topology};

mod common;

fn serve(lab: &Lab, host: &str, ports: &[u16]) -> reach_lab::lab::Process {
    probe::spawn_server(lab, &common::tools(), host, ports).expect("probe server")
}

fn probe(lab: &Lab, from: &str, to: SocketAddr, bind_port: Option<u16>) -> Outcome {
    probe::connect_from(
        lab,
        &common::tools(),
        from,
        to,
        Duration::from_secs(1),
        bind_port,
    )
}

fn addr(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn kernel_gateways_behave_as_declared() {
    let lab = Lab::up(&common::topology("nat-zoo")).expect("lab up");
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
        let lab = Lab::up(&common::topology("nat-zoo")).expect("lab up");
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

#[test]
fn verify_passes_for_the_shipped_zoo() {
    let topology = common::topology("nat-zoo");
    let lab = Lab::up(&topology).expect("lab up");
    let checks =
        verify::run(&lab, &topology, &common::tools(), Duration::from_secs(1)).expect("verify");
    let failed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
    assert!(failed.is_empty(), "{}", verify::render(&checks));
    assert!(
        checks.len() >= 9 * 3,
        "every host gets outbound, mapping and inbound checks"
    );
}

#[test]
fn verify_catches_a_gateway_that_differs_from_its_declaration() {
    // Build the zoo, then verify it against a topology that claims the
    // random-port NAT maps endpoint-independently.
    let built = common::topology("nat-zoo");
    let lab = Lab::up(&built).expect("lab up");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../lab/topologies/nat-zoo.toml"
    ))
    .expect("read");
    let claimed = Topology::from_toml(&text.replace(
        "mapping = \"address-and-port-dependent\"\nallocation = \"random\"",
        "mapping = \"endpoint-independent\"",
    ))
    .expect("valid");
    assert_ne!(claimed, built, "the claim differs from what was built");
    let checks =
        verify::run(&lab, &claimed, &common::tools(), Duration::from_secs(1)).expect("verify");
    let failed: Vec<_> = checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| (c.host.as_str(), c.what.as_str()))
        .collect();
    assert_eq!(
        failed,
        vec![("nat-apdm-rand", "mapping")],
        "{}",
        verify::render(&checks)
    );
}
