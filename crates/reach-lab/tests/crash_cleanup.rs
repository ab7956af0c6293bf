//! After a lab's owner is killed with SIGKILL (no destructor runs), `reach-lab
//! down --all` leaves no namespace, process, link or nftables table behind.
//!
//! `down --all` removes every lab on the machine, so this test lives alone in
//! its own binary and nextest runs it with no other test at the same time.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_reach-lab");

fn output(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&cmd.output().expect("run").stdout).into_owned()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Command lines of every process on the machine.
fn command_lines() -> Vec<String> {
    std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .collect()
}

#[test]
fn down_all_after_kill_9_leaves_nothing_behind() {
    let topology = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../lab/topologies/smartsockets-wan.toml"
    ));
    let mut owner = Command::new(BIN)
        .args(["matrix", "--mode", "plain", "--timeout", "5"])
        .arg(&topology)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start reach-lab matrix");
    // Wait until its lab runs delay hops, sshd and probe servers.
    let mut prefix = String::new();
    wait_until("the lab and its processes", || {
        let list = output(Command::new("ip").args(["netns", "list"]));
        let Some(ns) = list
            .lines()
            .find(|l| l.starts_with("rl") && l.contains("-h-desktop"))
        else {
            return false;
        };
        prefix = ns.split('-').next().unwrap_or_default().to_string();
        let pids =
            output(Command::new("ip").args(["netns", "pids", &format!("{prefix}-h-desktop")]));
        let hops = command_lines()
            .iter()
            .filter(|c| c.contains("reach-lab hop"))
            .count();
        !pids.trim().is_empty() && hops > 0
    });
    owner.kill().expect("SIGKILL the lab's owner");
    owner.wait().expect("reap");
    assert!(
        command_lines().iter().any(|c| c.contains("reach-lab hop")),
        "the lab outlived its owner"
    );

    let down = Command::new(BIN)
        .args(["down", "--all"])
        .output()
        .expect("down --all");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );

    let namespaces = output(Command::new("ip").args(["netns", "list"]));
    assert!(
        !namespaces.contains(&prefix),
        "namespaces left: {namespaces}"
    );
    let leftovers: Vec<String> = command_lines()
        .into_iter()
        .filter(|c| {
            c.contains("reach-lab hop")
                || c.contains("reach-lab probe serve")
                || c.contains(&prefix)
        })
        .collect();
    assert!(leftovers.is_empty(), "processes left: {leftovers:?}");
    let registry = std::fs::read_dir("/run/reach-lab")
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(registry, 0, "registry entries left");
    // Links and nftables tables live inside the lab's namespaces; none may
    // appear in this one.
    let links = output(Command::new("ip").args(["-o", "link", "show"]));
    for name in ["wan:", "lan:", "pub:", "x0", "x1", "t0:", "t1:"] {
        assert!(
            !links.contains(name),
            "link {name} in the root namespace: {links}"
        );
    }
    let tables = output(Command::new("nft").args(["list", "tables"]));
    assert!(
        !tables.contains(" lab") && !tables.contains("labnat"),
        "tables: {tables}"
    );
}
