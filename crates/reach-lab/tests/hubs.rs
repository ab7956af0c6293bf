//! Hubs in the lab beyond the matrix: LAN discovery by multicast between two
//! hubs of one site. Needs root, iproute2, nftables and the `reach` binary
//! built beside `reach-lab`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reach_lab::lab::Process;
use reach_lab::{Lab, Topology};

fn tools() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_reach-lab"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    assert!(
        dir.join("reach").exists(),
        "no reach binary in {}: run cargo build -p reach-cli (cargo nextest run --workspace builds it)",
        dir.display()
    );
    dir
}

/// Starts `reach hub` in `host` with `flags`; returns it and its NODEID@IP:PORT.
fn hub(lab: &Lab, host: &str, dir: &Path, flags: &[&str]) -> (Process, String) {
    std::fs::create_dir_all(dir).expect("dir");
    let addr_file = dir.join("hub.txt");
    let child = lab
        .command(host, tools().join("reach"))
        .arg("--state-dir")
        .arg(dir)
        .args(["-v", "hub", "--tcp-port", "7700", "--addr-file"])
        .arg(&addr_file)
        .args(flags)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("hub.log")).expect("log"))
        .spawn()
        .expect("spawn reach hub");
    let proc = Process::new(child);
    let target =
        reach_lab::wait::for_file(&addr_file, Duration::from_secs(20)).unwrap_or_else(|| {
            panic!(
                "hub in {host} did not start: {}",
                std::fs::read_to_string(dir.join("hub.log")).unwrap_or_default()
            )
        });
    (proc, target)
}

/// The hub links `reach status` reports for the hub at `target`, asked from `host`.
fn hub_links(lab: &Lab, host: &str, dir: &Path, target: &str) -> Option<Vec<String>> {
    let out = lab
        .command(host, tools().join("reach"))
        .arg("--state-dir")
        .arg(dir.join("status"))
        .args(["status", "--json", "--hub", target])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v["hub_links"]
            .as_array()?
            .iter()
            .filter_map(|l| l["hub"].as_str().map(str::to_string))
            .collect(),
    )
}

#[test]
fn hubs_on_one_lan_find_each_other_by_multicast() {
    let t = Topology::from_toml(
        r#"
        name = "lan-hubs"
        [[site]]
        name = "campus"
        gateway = "open"
        [[site.host]]
        name = "hub-a"
        [[site.host]]
        name = "hub-b"
        [[site.host]]
        name = "quiet"
        "#,
    )
    .expect("topology");
    let lab = Lab::up(&t).expect("lab up");
    let state = tempfile::tempdir().expect("tempdir");
    let lan = ["--lan-discovery", "--no-learned-links"];
    let (_a, a) = hub(&lab, "hub-a", &state.path().join("a"), &lan);
    let (_b, b) = hub(&lab, "hub-b", &state.path().join("b"), &lan);
    // A hub without discovery stays out of it.
    let (_q, q) = hub(&lab, "quiet", &state.path().join("q"), &[]);
    let id = |t: &str| t.split_once('@').expect("NODEID@").0.to_string();
    let linked = reach_lab::wait::until(Duration::from_secs(30), || {
        let links = hub_links(&lab, "hub-a", &state.path().join("a"), &a)?;
        links.contains(&id(&b)).then_some(links)
    });
    let links = linked.unwrap_or_else(|| {
        panic!(
            "hub-a never linked to hub-b; hub-a log: {}",
            std::fs::read_to_string(state.path().join("a/hub.log")).unwrap_or_default()
        )
    });
    assert_eq!(links, vec![id(&b)], "one link, to hub-b only");
    let b_links = hub_links(&lab, "hub-b", &state.path().join("b"), &b).expect("status of b");
    assert_eq!(b_links, vec![id(&a)]);
    let q_links = hub_links(&lab, "quiet", &state.path().join("q"), &q).expect("status of q");
    assert!(q_links.is_empty(), "{q_links:?}");
}
