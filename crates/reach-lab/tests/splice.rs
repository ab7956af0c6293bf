//! Splice success rates across the NAT zoo, against the targets.
//! Needs root, iproute2, nftables, and the `reach` binary beside `reach-lab`.
//! `reach-lab splice` runs the same with 50 attempts per pair for the docs.

use std::time::Duration;

use reach_lab::splice::{self, PairRate};
use reach_lab::Lab;

mod common;

/// Attempts per ordered pair here (110 pairs, a few ms each).
const ATTEMPTS: u32 = 10;

fn involves(p: &PairRate, host: &str) -> bool {
    p.from == host || p.to == host
}

/// Either side is behind one of the zoo's two sequential symmetric NATs.
fn sequential(p: &PairRate) -> bool {
    p.from.starts_with("nat-apdm-seq") || p.to.starts_with("nat-apdm-seq")
}

#[test]
fn splice_success_rates_per_nat_pair_meet_the_targets() {
    let t = common::topology("nat-zoo");
    let lab = Lab::up(&t).expect("lab up");
    let table = splice::run(
        &lab,
        &t,
        &common::tools_with_reach(),
        ATTEMPTS,
        Duration::from_secs(5),
    )
    .expect("splice table");
    let report = format!("\n{}\n{:#?}", table.render(), table.pairs);
    assert_eq!(table.pairs.len(), 110, "{report}");
    // Endpoint-independent and address-dependent NATs, full cones, hairpins,
    // stateful firewalls and the open host, in any combination: >= 99%.
    let (ok, all) = table.total(|p| !involves(p, "nat-apdm-rand") && !sequential(p));
    assert!(ok * 100 >= all * 99, "{ok} of {all} spliced{report}");
    // The sequential symmetric NATs, with port prediction, facing any of
    // those and each other: >= 80%.
    let (ok, all) = table.total(|p| sequential(p) && !involves(p, "nat-apdm-rand"));
    assert!(ok * 100 >= all * 80, "{ok} of {all} spliced{report}");
    let (ok, all) =
        table.total(|p| p.from.starts_with("nat-apdm-seq") && p.to.starts_with("nat-apdm-seq"));
    assert!(ok * 100 >= all * 80, "{ok} of {all} spliced{report}");
    // The random-port symmetric NAT: never spliced, and Splice declines
    // within a second by reach's own account (not waiting out its budget),
    // so the driver moves on to Routed at once. The whole process's time is
    // reported beside it; a loaded machine stretches its start-up.
    for p in table.pairs.iter().filter(|p| involves(p, "nat-apdm-rand")) {
        assert_eq!(p.spliced, 0, "{p:?}");
        assert!(p.max_decline_ms.is_some_and(|ms| ms < 1000.0), "{p:?}");
        let why = p.last_error.as_deref().unwrap_or_default();
        assert!(why.contains("random ports"), "{p:?}");
    }
    let md = table.markdown();
    assert!(md.contains("| **nat-eim** |"), "{md}");
}

#[test]
fn a_200_mb_transfer_arrives_intact_routed_spliced_and_moving_mid_transfer() {
    let t = common::topology("nat-zoo");
    let lab = Lab::up(&t).expect("lab up");
    let tools = common::tools_with_reach();
    // The move waits 200 ms (a few MB routed): on this fast path it can
    // otherwise finish before the connector's first write.
    let bench = reach_lab::transfer::Bench::start(&lab, &t, &tools, 200 << 20)
        .expect("hubs")
        .upgrade_after(Duration::from_millis(200));
    let timeout = Duration::from_secs(120);
    let hosts = ("nat-eim-2", "nat-eim");
    let moved = bench
        .run(&lab, &tools, hosts, "routed,splice", timeout)
        .expect("routed, then splice");
    // The same data straight over a splice, for the rate after the move.
    let spliced = bench
        .run(&lab, &tools, hosts, "splice", timeout)
        .expect("splice");
    // And only through the hub, whose link is slower (400 Mbit/s): the
    // sender exits right after its last byte, with bytes still in flight to
    // the hub, so this shows that closing waits for them.
    let routed_only = bench
        .run(&lab, &tools, hosts, "routed", timeout)
        .expect("routed");
    let report =
        reach_lab::transfer::render(&[moved.clone(), spliced.clone(), routed_only.clone()]);
    println!("{report}");
    assert!(
        moved.intact && spliced.intact && routed_only.intact,
        "{report}"
    );
    assert_eq!(routed_only.module, "routed", "{report}");
    assert_eq!(moved.module, "routed", "{report}");
    assert_eq!(moved.upgraded.as_deref(), Some("splice"), "{report}");
    // Mid-transfer: some bytes went through the hub, most did not.
    let routed = moved.sent_routed.expect("bytes before the move");
    assert!(routed > 0 && routed < moved.bytes / 2, "{report}");
    assert_eq!(spliced.module, "splice", "{report}");
}

#[test]
fn reach_nat_names_the_behaviour_of_every_gateway_of_the_zoo() {
    let (_t, lab, tools, state, hubs) = common::lab_with_hubs("nat-zoo");
    for host in &lab.record().matrix {
        let out = lab
            .command(host, tools.join("reach"))
            .arg("--state-dir")
            .arg(state.path().join(host))
            .args(["nat", "--json", "--hub"])
            .arg(&hubs.attach[host])
            .output()
            .expect("run reach nat");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let mapping = v["profile"]["mapping"].as_str().unwrap_or_default();
        let allocation = &v["profile"]["allocation"];
        let candidates = v["candidates"].as_array().map_or(0, Vec::len);
        match host.as_str() {
            "open" | "fw-drop" | "fw-reject" => {
                assert_eq!(mapping, "no-nat", "{host}: {text}");
                assert_eq!(candidates, 1, "{host}: {text}");
            }
            // One hub address: an address-dependent mapping looks
            // endpoint-independent from there (hence a window of ports).
            "nat-eim" | "nat-eim-2" | "nat-adm" | "nat-eif" | "nat-hairpin" => {
                assert_eq!(mapping, "endpoint-independent", "{host}: {text}");
                assert_eq!(allocation, "preserved", "{host}: {text}");
                assert_eq!(candidates, 5, "{host}: {text}");
            }
            "nat-apdm-seq" | "nat-apdm-seq-2" => {
                assert_eq!(mapping, "dependent", "{host}: {text}");
                assert_eq!(allocation["sequential"]["step"], 1, "{host}: {text}");
                assert_eq!(candidates, 6, "{host}: {text}");
            }
            "nat-apdm-rand" => {
                assert_eq!(mapping, "dependent", "{host}: {text}");
                assert_eq!(allocation, "random", "{host}: {text}");
                assert_eq!(candidates, 0, "{host}: {text}");
            }
            other => panic!("a zoo host this test does not know: {other}"),
        }
    }
}
