//! `reach-bench lab --quick` end to end: the benchmark's namespaces, relays,
//! tunnels and agents come up, every variant measures something, and every
//! bulk transfer arrived whole (the agent fails the run otherwise). Needs
//! root, socat, wireguard-tools, rathole and boringtun-cli (scripts/test.sh
//! installs them) and the `reach` binary beside `reach-bench`.

use std::process::Command;

#[test]
fn the_quick_lab_benchmark_measures_every_variant() {
    let exe = env!("CARGO_BIN_EXE_reach-bench");
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("lab.json");
    let out = Command::new(exe)
        .args(["lab", "--quick", "--json"])
        .arg(&json)
        .output()
        .expect("run reach-bench");
    assert!(
        out.status.success(),
        "reach-bench lab --quick failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("json");
    assert!(report["machine"].as_str().is_some_and(|m| !m.is_empty()));
    let rows = report["results"].as_array().expect("results");
    let value = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .and_then(|r| r["value"].as_f64())
            .unwrap_or_else(|| panic!("no figure {name:?} in {report}"))
    };
    for name in [
        "throughput, reach direct, plaintext, 1 stream",
        "throughput, reach direct, encrypted, 4 streams",
        "throughput, rathole noise, a to b, 1 stream",
        "throughput, boringtun (WireGuard), a to b, 1 stream",
        "throughput, socat relay on hub1",
        "throughput, rathole tcp on hub1",
        "throughput, reach routed, 1 hub",
        "throughput, reach routed, 3 hubs",
        "relay CPU per GB, reach routed, 3 hubs",
        "round trip, reach direct (1-byte ping-pong)",
        "aggregate throughput, reach routed, 1 hub, 4 streams",
    ] {
        assert!(value(name) > 0.0, "{name}: {}", value(name));
    }
    for r in rows {
        for key in ["name", "unit", "baseline_name"] {
            assert!(r[key].is_string(), "{r}");
        }
        assert!(r["value"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
}
