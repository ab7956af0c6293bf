//! Hubs in the lab beyond the matrix: LAN discovery by multicast between two
//! hubs of one site. Needs root, iproute2, nftables and the `reach` binary
//! built beside `reach-lab`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use reach_lab::lab::Process;
use reach_lab::{Lab, Topology};

/// The hub links `reach status` reports for the hub at `target`, asked from `host`.
fn hub_links(lab: &Lab, host: &str, dir: &Path, target: &str) -> Option<Vec<String>> {
    let out = lab
        .command(host, common::tools_with_reach().join("reach"))
        .arg("--state-dir")
        .arg(dir.join("status"))
        .args(["status", "--json", "--hub", target])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v["hub"]["hub_links"]
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
    let secret = state.path().join("hub.secret");
    std::fs::write(&secret, "the lab federation's hub secret\n").expect("secret");
    let secret = secret.to_str().expect("utf-8 path");
    let lan = [
        "--lan-discovery",
        "--no-learned-links",
        "--hub-secret-file",
        secret,
    ];
    let (_a, a) = common::hub(&lab, "hub-a", &state.path().join("a"), &lan);
    let (_b, b) = common::hub(&lab, "hub-b", &state.path().join("b"), &lan);
    // A hub without discovery stays out of it.
    let (_q, q) = common::hub(&lab, "quiet", &state.path().join("q"), &[]);
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

/// `reach connect` from `host` to `vaddr` through `hub`, sending `token`;
/// returns the module or the error line.
fn connect(
    lab: &Lab,
    host: &str,
    dir: &Path,
    hub: &str,
    vaddr: &str,
    token: &str,
) -> Result<String, String> {
    use std::io::Write;
    let mut child = lab
        .command(host, common::tools_with_reach().join("reach"))
        .arg("--state-dir")
        .arg(dir)
        .args(["-v", "connect", "--timeout", "10", "--hub", hub, vaddr])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(token.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(log.lines().last().unwrap_or("failed").to_string());
    }
    log.split_whitespace()
        .find_map(|w| w.strip_prefix("module="))
        .map(str::to_string)
        .ok_or(log)
}

#[test]
fn a_crashed_hub_is_routed_around_and_its_nodes_come_back() {
    let t = common::topology("smartsockets");
    let lab = Lab::up(&t).expect("lab up");
    let state = tempfile::tempdir().expect("tempdir");
    let mut hubs = reach_lab::hubs::start(
        &lab,
        &t,
        t.hubs.as_ref().expect("[hubs]"),
        &common::tools_with_reach(),
        state.path(),
    )
    .expect("hubs");
    // A listener in grid5000 (reached only through hubs) and the desktop
    // (attached to das3-v's hub, the one that will crash).
    let mut listeners = Vec::new();
    let mut vaddrs = std::collections::BTreeMap::new();
    for host in ["g5k-node", "desktop"] {
        let dir = state.path().join(host);
        std::fs::create_dir_all(&dir).expect("dir");
        let child = lab
            .command(host, common::tools_with_reach().join("reach"))
            .arg("--state-dir")
            .arg(&dir)
            .args([
                "-v",
                "listen",
                "--keep",
                "--hub",
                &hubs.attach[host],
                "--addr-file",
            ])
            .arg(dir.join("addr.txt"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("received")).expect("out"))
            .stderr(std::fs::File::create(dir.join("listen.log")).expect("log"))
            .spawn()
            .expect("listen");
        listeners.push(Process::new(child));
        let vaddr = reach_lab::wait::for_file(&dir.join("addr.txt"), Duration::from_secs(20))
            .expect("listener address");
        vaddrs.insert(host, vaddr);
    }
    hubs.wait_converged(
        &lab,
        &common::tools_with_reach(),
        2,
        Duration::from_secs(30),
    )
    .expect("hubs converged");
    let from = state.path().join("rockstar-node");
    let hub = hubs.attach["rockstar-node"].clone();
    let module = connect(
        &lab,
        "rockstar-node",
        &from,
        &hub,
        &vaddrs["g5k-node"],
        "one\n",
    )
    .expect("routed before the crash");
    assert_eq!(module, "routed");

    // das3-v's hub dies. rockstar and grid5000 are also linked through das3-d:
    // new routed streams take that path once the routes have moved.
    hubs.kill("das3-v-fe");
    let mut last = String::new();
    let rerouted = reach_lab::wait::until(Duration::from_secs(30), || {
        let target = &vaddrs["g5k-node"];
        match connect(&lab, "rockstar-node", &from, &hub, target, "two\n") {
            Ok(m) => Some(m),
            Err(e) => {
                last = e;
                None
            }
        }
    });
    assert_eq!(
        rerouted.as_deref(),
        Some("routed"),
        "no route around the dead hub: {last}; rockstar's hub: {:?}",
        hubs.status(&lab, &common::tools_with_reach(), "rockstar-fe")
    );

    // Back up: the desktop re-registers. How soon is protocol timing,
    // bounded in virtual time by reach-sim's node_session tests; here the
    // real processes only have to get there.
    hubs.restart(&lab, &common::tools_with_reach(), "das3-v-fe")
        .expect("restart");
    let back = reach_lab::wait::until(Duration::from_secs(20), || {
        let s = hubs
            .status(&lab, &common::tools_with_reach(), "das3-v-fe")
            .ok()?;
        let attached = s["nodes"].as_array()?.iter().any(|n| {
            n["node"]
                .as_str()
                .is_some_and(|id| vaddrs["desktop"].starts_with(id))
        });
        attached.then_some(())
    });
    back.expect("the desktop never re-registered");
    let received =
        std::fs::read_to_string(state.path().join("g5k-node/received")).unwrap_or_default();
    assert!(
        received.contains("one\n") && received.contains("two\n"),
        "{received:?}"
    );
}
