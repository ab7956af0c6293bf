//! The `reach-sim` command as a user runs it.

use std::process::{Command, Output};

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_reach-sim"))
}

/// The report a successful run printed.
fn report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn federation_prints_and_writes_the_report_with_every_documented_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.json");
    let out = sim()
        .args([
            "federation",
            "--hubs",
            "5",
            "--nodes",
            "50",
            "--seed",
            "3",
            "--json",
        ])
        .arg(&path)
        .output()
        .expect("runs");
    let printed = report(&out);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("written")).expect("JSON");
    for key in [
        "hubs",
        "nodes",
        "seed",
        "converged",
        "rounds_to_converge",
        "virtual_ms_to_converge",
        "messages",
        "bytes",
        "max_route_bytes_per_hub",
        "max_directory_bytes_per_hub",
        "wall_ms",
    ] {
        assert!(printed.get(key).is_some(), "{key} missing: {printed}");
    }
    assert_eq!(printed["converged"], true);
    assert_eq!(
        (printed["hubs"].as_u64(), printed["nodes"].as_u64()),
        (Some(5), Some(50))
    );
    assert_eq!(printed["messages"], written["messages"]);
}

#[test]
fn a_federation_that_cannot_converge_fails_with_one_line_saying_so() {
    // A ring of 40 hubs has paths of 20 hops, beyond the route table's 16.
    let out = sim()
        .args([
            "federation",
            "--hubs",
            "40",
            "--nodes",
            "40",
            "--topology",
            "ring",
        ])
        .args(["--limit-secs", "10"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "reach-sim: error: the federation did not converge within 10 virtual seconds"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a report still");
    assert!(
        report["shortfall"]["missing_routes"].as_u64() > Some(0),
        "{report}"
    );
}

#[test]
fn bad_values_are_refused_with_the_reason() {
    let out = sim()
        .args(["federation", "--kill", "2"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the share must be between 0 and 1"), "{err}");
}

#[test]
fn partition_secs_cuts_the_federation_and_reports_the_heal() {
    let out = sim()
        .args(["federation", "--hubs", "8", "--nodes", "40", "--seed", "2"])
        .args(["--partition-secs", "5"])
        .output()
        .expect("runs");
    let r = report(&out);
    let c = &r["partition"];
    assert_eq!(c["cut_off"], 4, "{c}");
    assert_eq!(c["cut_ms"], 5000, "{c}");
    assert_eq!(c["healed"], true, "{c}");
    assert!(c["heal_ms"].as_u64().is_some(), "{c}");
}
