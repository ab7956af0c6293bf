//! Two minutes of the soak (`reach-lab soak`), as CI runs it: streams
//! through two federated `reach hub` processes that are killed and
//! restarted at random, every byte checked, nothing lost or leaked.

mod common;

use std::process::Command;

#[test]
fn two_minutes_of_streams_through_dying_hubs_lose_and_leak_nothing() {
    let tools = common::tools_with_reach();
    let json = tempfile::NamedTempFile::new().expect("tempfile");
    let out = Command::new(tools.join("reach-lab"))
        .args(["soak", "--minutes", "2", "--workers", "6", "--json"])
        .arg(json.path())
        .output()
        .expect("run reach-lab soak");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json.path()).expect("report")).expect("json");
    assert_eq!(report["lost"], 0, "{text}");
    assert!(report["intact"].as_u64() > Some(500), "{text}");
    assert!(report["faults"].as_u64() >= Some(4), "{text}");
    assert_eq!(report["leaks"], serde_json::json!([]), "{text}");
    // Every test binary prints its report for the log.
    println!("{text}");
}
