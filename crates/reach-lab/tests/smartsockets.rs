//! The SmartSockets testbed (Table 2 of the paper) as a lab.
//! Needs root, iproute2, nftables and openssh-server.

use std::collections::BTreeSet;
use std::time::Duration;

use reach_lab::matrix::{self, Mode};
use reach_lab::{probe, verify, Lab};

mod common;

#[test]
fn every_site_behaves_as_table_2_says() {
    let t = common::topology("smartsockets");
    let lab = Lab::up(&t).expect("lab up");
    let checks = verify::run(&lab, &t, &common::tools(), Duration::from_secs(1)).expect("verify");
    assert!(checks.iter().all(|c| c.pass), "{}", verify::render(&checks));
}

#[test]
fn plain_tcp_connects_the_same_six_of_thirty_pairs_as_the_paper() {
    let t = common::topology("smartsockets");
    let lab = Lab::up(&t).expect("lab up");
    let m = matrix::run(
        &lab,
        &t,
        Mode::Plain,
        Duration::from_secs(1),
        &common::tools_with_reach(),
    )
    .expect("matrix");
    let connected: BTreeSet<(&str, &str)> = m
        .cells
        .iter()
        .filter(|c| c.ok)
        .map(|c| (c.from_host.as_str(), c.to_host.as_str()))
        .collect();
    let expected: BTreeSet<(&str, &str)> = [
        ("das3-v-node", "das3-d-node"),
        ("das3-d-node", "das3-v-node"),
        ("rockstar-node", "das3-v-node"),
        ("rockstar-node", "das3-d-node"),
        ("desktop", "das3-v-node"),
        ("desktop", "das3-d-node"),
    ]
    .into_iter()
    .collect();
    assert_eq!(connected, expected, "\n{}", m.render());
    // Every failure says why.
    for c in m.cells.iter().filter(|c| !c.ok) {
        let why = c.error.as_deref().unwrap_or_default();
        assert!(
            ["refused", "timeout", "unreachable"]
                .iter()
                .any(|w| why.contains(w)),
            "{} -> {}: {why:?}",
            c.from_host,
            c.to_host
        );
    }
    // das3-v and das3-d share a private range: the identity check keeps a
    // connection to the overlapping private address from counting.
    let cell = m.cell("das3-v-node", "das3-d-node").expect("cell");
    assert!(
        cell.via
            .as_deref()
            .is_some_and(|v| v.starts_with("203.0.113.")),
        "{cell:?}"
    );
}

/// The pairs plain TCP connects: reach takes them directly.
const DIRECT: [(&str, &str); 6] = [
    ("das3-v-node", "das3-d-node"),
    ("das3-d-node", "das3-v-node"),
    ("rockstar-node", "das3-v-node"),
    ("rockstar-node", "das3-d-node"),
    ("desktop", "das3-v-node"),
    ("desktop", "das3-d-node"),
];

/// Open sites towards targets that can connect out but not be connected to.
const REVERSE: [(&str, &str); 4] = [
    ("das3-v-node", "rockstar-node"),
    ("das3-d-node", "rockstar-node"),
    ("das3-v-node", "desktop"),
    ("das3-d-node", "desktop"),
];

/// Behind a NAT and behind a dropping firewall: neither can be connected to,
/// both connect out, so they splice (the paper's Splice case).
const SPLICE: [(&str, &str); 2] = [("desktop", "rockstar-node"), ("rockstar-node", "desktop")];

#[test]
fn reach_connects_all_thirty_pairs_with_the_module_each_needs() {
    let t = common::topology("smartsockets");
    let lab = Lab::up(&t).expect("lab up");
    let m = matrix::run(
        &lab,
        &t,
        Mode::Reach,
        Duration::from_secs(10),
        &common::tools_with_reach(),
    )
    .expect("matrix");
    let failures: Vec<String> = m
        .cells
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{} -> {}: {:?}", c.from_host, c.to_host, c.error))
        .collect();
    assert_eq!(m.score(), (30, 30), "\n{}{failures:#?}", m.render());
    for c in &m.cells {
        let pair = (c.from_host.as_str(), c.to_host.as_str());
        let want: &[&str] = if DIRECT.contains(&pair) {
            &["direct"]
        } else if REVERSE.contains(&pair) {
            &["reverse"]
        } else if SPLICE.contains(&pair) {
            &["splice"]
        } else {
            &["routed"]
        };
        // Where the first connection settled; data may have flowed routed
        // first while the better path was still being tried.
        let module = c.settled_module.as_deref().unwrap_or_default();
        assert!(
            want.contains(&module),
            "{pair:?} settled on {module}\n{}",
            m.render()
        );
        let first = c.module.as_deref().unwrap_or_default();
        assert!(first == module || first == "routed", "{pair:?}: {c:?}");
        // The second connection goes straight to the cached module: nothing
        // fails first, so a dropping firewall costs no timeout again. A
        // cached Reverse or Splice may carry the first bytes routed while
        // it connects.
        let cached = c.cached_settled_module.as_deref().unwrap_or_default();
        assert_eq!(cached, module, "{pair:?}: {c:?}");
        let cached_first = c.cached_module.as_deref().unwrap_or_default();
        assert!(
            cached_first == module || cached_first == "routed",
            "{pair:?}: {c:?}"
        );
        assert!(c.cached_failed_before.is_empty(), "{pair:?}: {c:?}");
    }
}

#[test]
fn non_routed_nodes_are_reached_through_their_front_ends_sshd() {
    let lab = Lab::up(&common::topology("smartsockets")).expect("lab up");
    for (site_node, front_end_addr) in [
        // hiroshi: only ssh comes in, through the NAT's port forward.
        ("hiroshi-node", lab.host("hiroshi-fe").gateway),
        // grid5000: its firewall admits ssh to the front-end's public address.
        (
            "g5k-node",
            lab.host("g5k-fe").public.expect("multi-homed front-end"),
        ),
    ] {
        let _server = probe::spawn_server(&lab, &common::tools_with_reach(), site_node, &[7000])
            .expect("probe server");
        let node = lab.host(site_node).lan;
        let out = lab
            .record()
            .ssh("das3-v-fe")
            .expect("host")
            .args([
                "-W",
                &format!("{node}:7000"),
                &format!("root@{front_end_addr}"),
            ])
            .output()
            .expect("run ssh");
        let greeting = String::from_utf8_lossy(&out.stdout);
        assert!(
            greeting.starts_with(&format!("reach-lab-probe {site_node} ")),
            "ssh -W through {front_end_addr} to {node}: stdout {greeting:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_wan_variant_is_the_same_testbed_with_the_papers_delays() {
    let mut wan = common::topology("smartsockets-wan");
    let delays: Vec<(String, Option<u32>)> = wan
        .sites
        .iter()
        .map(|s| (s.name.clone(), s.delay_ms))
        .collect();
    assert!(delays.iter().all(|(_, d)| d.is_some()), "{delays:?}");
    for site in &mut wan.sites {
        site.delay_ms = None;
    }
    wan.name = "smartsockets".into();
    assert_eq!(wan, common::topology("smartsockets"));
}

#[test]
fn the_wan_testbed_verifies_with_every_delay_measured() {
    let t = common::topology("smartsockets-wan");
    let lab = Lab::up(&t).expect("lab up");
    let checks = verify::run(&lab, &t, &common::tools(), Duration::from_secs(2)).expect("verify");
    assert!(checks.iter().all(|c| c.pass), "{}", verify::render(&checks));
    let measured: BTreeSet<&str> = checks
        .iter()
        .filter(|c| c.what.starts_with("round trip"))
        .filter_map(|c| {
            t.hosts()
                .find(|(_, h)| h.name == c.host)
                .map(|(s, _)| s.name.as_str())
        })
        .collect();
    assert_eq!(
        measured.len(),
        t.sites.len(),
        "a delay measured at every site: {measured:?}"
    );
}
