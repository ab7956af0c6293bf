//! Link properties of a site, measured through them: the userspace delay hop
//! adds the declared delay to every round trip, and a bandwidth limit caps
//! what crosses. Needs root, iproute2, nftables and tc.

use std::net::SocketAddr;
use std::time::Duration;

use reach_lab::probe::{self, Bulk, Outcome};
use reach_lab::{Lab, Topology};

mod common;

/// A NAT site with `link` (a `delay_ms` or `rate_mbit` line) and an open site.
fn two_sites(link: &str) -> Lab {
    Lab::up(&topology_with(link)).expect("lab up")
}

/// The topology of [`two_sites`].
fn topology_with(link: &str) -> Topology {
    let text = format!(
        r#"
        name = "link"
        [[site]]
        name = "far"
        gateway = "nat"
        {link}
        [[site.host]]
        name = "h"
        [[site]]
        name = "near"
        gateway = "open"
        [[site.host]]
        name = "web"
    "#
    );
    Topology::from_toml(&text).expect("topology")
}

#[test]
fn a_delayed_site_adds_its_delay_to_every_round_trip() {
    let lab = two_sites("delay_ms = 20");
    let _web = probe::spawn_server(&lab, &common::tools(), "web", &[7000]).expect("server");
    let web = SocketAddr::from((lab.host("web").lan, 7000));
    // A probe takes two round trips (connect, then the greeting), each of which
    // crosses the 20 ms hop twice: at least 80 ms. The delay can only add time,
    // so this lower bound holds however loaded the machine is.
    for _ in 0..3 {
        match probe::connect_from(
            &lab,
            &common::tools(),
            "h",
            web,
            Duration::from_secs(5),
            None,
        ) {
            Outcome::Ok { ms, .. } => {
                assert!(ms >= 78.0, "{ms} ms is less than two delayed round trips")
            }
            other => panic!("probe through the delayed link: {other:?}"),
        }
    }
}

#[test]
fn a_rate_limited_site_sends_no_faster_than_its_limit() {
    let lab = two_sites("rate_mbit = 20");
    let _sink = probe::spawn_sink(&lab, &common::tools(), "web", 7100).expect("sink");
    let to = format!("{}:7100", lab.host("web").lan);
    let out = lab
        .command("h", common::tools().join("reach-lab"))
        .args(["probe", "send", &to, "--bytes", &(4u64 << 20).to_string()])
        .output()
        .expect("send");
    let bulk: Bulk = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(bulk.bytes, 4 << 20);
    // The token bucket can only slow the transfer down; its initial burst (one
    // bucket, 5 ms worth) allows a little over the rate on a short transfer.
    assert!(bulk.mbit_s <= 22.0, "{bulk:?} exceeds the 20 Mbit/s limit");
}

/// The checks of `verify` against `declared` on `lab` whose name starts
/// with `what` (probes waiting `timeout` for an answer: a drop costs it).
fn checks_of(
    lab: &Lab,
    declared: &Topology,
    what: &str,
    timeout: Duration,
) -> Vec<reach_lab::Check> {
    reach_lab::verify::run(lab, declared, &common::tools(), timeout)
        .expect("verify")
        .into_iter()
        .filter(|c| c.what.starts_with(what))
        .collect()
}

#[test]
fn verify_measures_a_sites_loss_and_fails_a_lab_that_loses_more_than_declared() {
    // Declared 2%: four in a hundred pings get no answer (each crosses the
    // lossy link twice).
    let declared = topology_with("loss_percent = 2.0");
    let lab = Lab::up(&declared).expect("lab up");
    let loss = checks_of(&lab, &declared, "loss", Duration::from_secs(5));
    assert_eq!(loss.len(), 1, "{loss:?}");
    assert!(loss[0].pass, "{:?}", loss[0]);
    // The same lab checked against a declaration of 0.5%: it loses more.
    let loss = checks_of(
        &lab,
        &topology_with("loss_percent = 0.5"),
        "loss",
        Duration::from_secs(5),
    );
    assert_eq!(loss.len(), 1, "{loss:?}");
    assert!(
        !loss[0].pass,
        "verify passed a lab that loses 2% as 0.5%: {:?}",
        loss[0]
    );
}

#[test]
fn verify_checks_a_sites_udp_limit_and_fails_a_lab_that_lets_less_out_than_declared() {
    let lab = two_sites("udp_out = [53]");
    let udp_checks = |declared: &str| {
        checks_of(
            &lab,
            &topology_with(declared),
            "UDP out",
            Duration::from_secs(2),
        )
    };
    // As declared: the test port is dropped, port 53 answers.
    let own = udp_checks("udp_out = [53]");
    assert_eq!(own.len(), 2, "{own:?}");
    assert!(own.iter().all(|c| c.pass), "{own:?}");
    // Declared to let the test port out, which the lab drops: verify fails.
    let claimed = udp_checks("udp_out = [7000]");
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert!(
        !claimed[0].pass,
        "verify passed UDP the lab drops: {claimed:?}"
    );
}

#[test]
fn verify_sees_a_nat_forget_idle_udp_mappings_and_fails_one_that_does_not() {
    let expiry_checks = |lab: &Lab| {
        checks_of(
            lab,
            &topology_with("udp_timeout_s = 4"),
            "UDP mapping idle",
            Duration::from_secs(2),
        )
    };
    // A NAT that forgets after 4 s: the answer 2 s later gets in, the one
    // 7 s later does not.
    let forgets = two_sites("udp_timeout_s = 4");
    let own = expiry_checks(&forgets);
    assert_eq!(own.len(), 2, "{own:?}");
    assert!(own.iter().all(|c| c.pass), "{own:?}");
    drop(forgets);
    // A NAT that keeps its mappings (the kernel's default here: 30 s, and
    // 120 s once answered) checked against that declaration: it fails.
    let keeps = two_sites("");
    let claimed = expiry_checks(&keeps);
    assert!(
        claimed.iter().any(|c| !c.pass),
        "verify passed a NAT that keeps idle UDP mappings as one that forgets them: {claimed:?}"
    );
}
