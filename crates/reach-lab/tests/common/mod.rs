//! Helpers the lab test binaries share.
#![allow(dead_code)]

use std::path::PathBuf;

use reach_lab::Topology;

/// The directory holding `reach-lab` (and, in a workspace build, `reach`).
pub fn tools() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_reach-lab"))
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

/// [`tools`], checked to hold the `reach` binary too.
pub fn tools_with_reach() -> PathBuf {
    let dir = tools();
    assert!(
        dir.join("reach").exists(),
        "no reach binary in {}: run cargo build -p reach-cli (cargo nextest run --workspace builds it)",
        dir.display()
    );
    dir
}

/// A shipped topology, `lab/topologies/NAME.toml`.
pub fn topology(name: &str) -> Topology {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../lab/topologies")
        .join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    Topology::from_toml(&text).expect("valid topology")
}

/// Starts `reach hub` in `host` with `flags`, state and log (`hub.log`) in
/// `dir`; returns it and its NODEID@IP:PORT once it listens.
pub fn hub(
    lab: &reach_lab::Lab,
    host: &str,
    dir: &std::path::Path,
    flags: &[&str],
) -> (reach_lab::lab::Process, String) {
    std::fs::create_dir_all(dir).expect("dir");
    let addr_file = dir.join("hub.txt");
    // A restart in the same directory must wait for the new hub.
    let _ = std::fs::remove_file(&addr_file);
    let child = lab
        .command(host, tools_with_reach().join("reach"))
        .arg("--state-dir")
        .arg(dir)
        .args(["-v", "hub", "--tcp-port", "7700", "--addr-file"])
        .arg(&addr_file)
        .args(flags)
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("hub.log")).expect("log"))
        .spawn()
        .expect("spawn reach hub");
    let proc = reach_lab::lab::Process::new(child);
    let target = reach_lab::wait::for_file(&addr_file, std::time::Duration::from_secs(20))
        .unwrap_or_else(|| {
            panic!(
                "hub in {host} did not start: {}",
                std::fs::read_to_string(dir.join("hub.log")).unwrap_or_default()
            )
        });
    (proc, target)
}

/// `reach listen --keep --port 7` in `host` attached to `hub` with
/// `flags`, its state, address file and log (`listen.log`) in `dir`; it,
/// its virtual address and the log's path.
pub fn listener(
    lab: &reach_lab::Lab,
    host: &str,
    hub: &str,
    dir: &std::path::Path,
    flags: &[&str],
) -> (reach_lab::lab::Process, String, PathBuf) {
    std::fs::create_dir_all(dir).expect("dir");
    let addr_file = dir.join("vaddr");
    let log = dir.join("listen.log");
    let mut cmd = lab.command(host, tools_with_reach().join("reach"));
    cmd.arg("--state-dir")
        .arg(dir)
        .args([
            "-v",
            "listen",
            "--keep",
            "--port",
            "7",
            "--hub",
            hub,
            "--addr-file",
        ])
        .arg(&addr_file)
        .args(flags);
    let proc = spawn_until(cmd, &log, "listening on");
    // The address file is written before "listening on" is printed.
    let vaddr = std::fs::read_to_string(&addr_file)
        .expect("vaddr")
        .trim()
        .to_string();
    (proc, vaddr, log)
}

/// The shipped topology `name` up, with its `[hubs]` running (state in
/// the returned directory): the topology, the lab, the tools directory,
/// the state and the hubs. Bind them in this order, so the hubs stop
/// before the lab goes.
pub fn lab_with_hubs(
    name: &str,
) -> (
    Topology,
    reach_lab::Lab,
    PathBuf,
    tempfile::TempDir,
    reach_lab::hubs::HubSet,
) {
    let t = topology(name);
    let lab = reach_lab::Lab::up(&t).expect("lab up");
    let tools = tools_with_reach();
    let state = tempfile::tempdir().expect("tempdir");
    let hubs = reach_lab::hubs::start(
        &lab,
        &t,
        t.hubs.as_ref().expect("[hubs]"),
        &tools,
        state.path(),
    )
    .expect("hub");
    (t, lab, tools, state, hubs)
}

/// Spawns `cmd` with stdout and stderr into `log` and waits (20 s at most)
/// until the log holds `ready`.
pub fn spawn_until(
    mut cmd: std::process::Command,
    log: &std::path::Path,
    ready: &str,
) -> reach_lab::lab::Process {
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    let file = std::fs::File::create(log).expect("log");
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("spawn");
    let proc = reach_lab::lab::Process::new(child);
    let ok = reach_lab::wait::until(std::time::Duration::from_secs(20), || {
        read().contains(ready).then_some(())
    });
    assert!(ok.is_some(), "{ready:?} never came: {}", read());
    proc
}

/// Runs the reach matrix of `t` in `lab` and checks that every pair
/// connected and settled where `expected` says it may (data may have flowed
/// routed first while the better path was still being tried).
pub fn reach_matrix(
    lab: &reach_lab::Lab,
    t: &Topology,
    expected: fn(&str, &str) -> &'static [&'static str],
) -> reach_lab::matrix::Matrix {
    let m = reach_lab::matrix::run(
        lab,
        t,
        reach_lab::matrix::Mode::Reach,
        std::time::Duration::from_secs(10),
        &tools_with_reach(),
    )
    .expect("matrix");
    let n = m.hosts.len();
    assert_eq!(m.score(), (n * (n - 1), n * (n - 1)), "\n{}", m.render());
    for c in &m.cells {
        let pair = (c.from_host.as_str(), c.to_host.as_str());
        let module = c.settled_module.as_deref().unwrap_or_default();
        assert!(
            expected(pair.0, pair.1).contains(&module),
            "{pair:?} settled on {module}\n{}",
            m.render()
        );
    }
    m
}
