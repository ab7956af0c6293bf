//! The wild lab (`lab/topologies/wild.toml`): one site of each harsh kind
//! (NATs that forget, symmetric and full-cone NATs, a campus firewall that
//! lets UDP out to port 53 only, a cafe that lets only TCP 443 out, a home
//! NAT behind a carrier-grade NAT, a far site losing 1% of its frames, a
//! dual-stack home with an IPv6-only host).
//! `verify` checks each by observation, and reach connects every pair with
//! the module each needs. Needs root, iproute2, nftables, iputils-ping and
//! the `reach` binary built beside `reach-lab`.

use std::time::Duration;

use reach_lab::Lab;

mod common;

/// The module each pair settles on, from the setup driver's order (direct,
/// reverse, splice, routed).
fn expected_modules(from: &str, to: &str) -> &'static [&'static str] {
    let v6 = |h: &str| ["pub", "dual", "v6only"].contains(&h);
    if from == "guest" || to == "guest" {
        // Only TCP 443 leaves the cafe: the hub listens there.
        &["routed"]
    } else if (from == "v6only" || to == "v6only") && !(v6(from) && v6(to)) {
        // No address family in common: only through the dual-stack hub.
        &["routed"]
    } else if (from, to) == ("dual", "v6only") || (from, to) == ("v6only", "dual") {
        // The same LAN, over IPv6.
        &["direct"]
    } else if to == "pub" {
        &["direct"]
    } else if from == "pub" {
        &["reverse"]
    } else if from == "phone" || to == "phone" {
        // A symmetric NAT's random ports cannot be predicted.
        &["routed"]
    } else if from == "remote" || to == "remote" {
        // Over a lossy link a lost SYN can fail a simultaneous open.
        &["splice", "routed"]
    } else {
        // Both behind NATs or firewalls that keep ports, double NAT included.
        &["splice"]
    }
}

#[test]
fn the_wild_lab_is_what_it_declares_and_reach_connects_every_pair() {
    let t = common::topology("wild");
    let lab = Lab::up(&t).expect("lab up");
    let checks =
        reach_lab::verify::run(&lab, &t, &common::tools(), Duration::from_secs(5)).expect("verify");
    let failed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
    assert!(failed.is_empty(), "{}", reach_lab::verify::render(&checks));
    // Each new kind of check ran.
    for what in [
        "UDP out",
        "UDP mapping idle",
        "loss",
        "first translation",
        "round trip",
        "IPv6 outbound",
        "IPv6 inbound",
        "IPv6 only",
    ] {
        assert!(
            checks.iter().any(|c| c.what.starts_with(what)),
            "no {what} check\n{}",
            reach_lab::verify::render(&checks)
        );
    }
    let m = common::reach_matrix(&lab, &t, expected_modules);
    assert_eq!(m.hosts.len(), 10, "\n{}", m.render());
}
