//! Unmodified programs through reach: the OpenSSH client logs into an sshd
//! behind a random-port symmetric NAT (no splice possible there, so the
//! stream is routed) through `reach expose` and `reach forward`.
//! Needs root, iproute2, nftables, openssh and the `reach` binary.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use reach_lab::lab::Process;
use reach_lab::{Lab, Topology};

const TOPOLOGY: &str = r#"
name = "legacy"
matrix = ["client", "server"]

[[site]]
name = "hub"
gateway = "open"
[[site.host]]
name = "hub"
multi_homed = true

[[site]]
name = "rand"
gateway = "nat"
mapping = "address-and-port-dependent"
allocation = "random"
[[site.host]]
name = "server"
sshd = true

[[site]]
name = "home"
gateway = "nat"
[[site.host]]
name = "client"

[hubs]
hosts = ["hub"]

[hubs.attach]
client = "hub"
server = "hub"
"#;

/// Spawns `cmd` with stderr to `log`, and waits until the log holds `ready`.
fn spawn_until(mut cmd: Command, log: &Path, ready: &str) -> Process {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn");
    let proc = Process::new(child);
    let ok = reach_lab::wait::until(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.contains(ready).then_some(())
    });
    assert!(
        ok.is_some(),
        "{ready:?} never came: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    proc
}

#[test]
fn ssh_logs_into_sshd_behind_a_random_port_nat_through_expose_and_forward() {
    let t = Topology::from_toml(TOPOLOGY).expect("topology");
    let lab = Lab::up(&t).expect("lab up");
    let tools = common::tools_with_reach();
    let reach = tools.join("reach");
    let state = tempfile::tempdir().expect("tempdir");
    let hubs = reach_lab::hubs::start(
        &lab,
        &t,
        t.hubs.as_ref().expect("[hubs]"),
        &tools,
        state.path(),
    )
    .expect("hub");
    let addr_file = state.path().join("exposed.txt");
    let mut expose = lab.command("server", &reach);
    expose
        .arg("--state-dir")
        .arg(state.path().join("server"))
        .args(["-v", "expose", "127.0.0.1:22", "--port", "22", "--hub"])
        .arg(&hubs.attach["server"])
        .arg("--addr-file")
        .arg(&addr_file);
    let expose_log = state.path().join("expose.log");
    let _expose = spawn_until(expose, &expose_log, "exposing");
    let vaddr = reach_lab::wait::for_file(&addr_file, Duration::from_secs(5)).expect("vaddr");
    let mut forward = lab.command("client", &reach);
    forward
        .arg("--state-dir")
        .arg(state.path().join("client"))
        .args(["-v", "forward", "127.0.0.1:2222", &vaddr, "--hub"])
        .arg(&hubs.attach["client"]);
    let _forward = spawn_until(forward, &state.path().join("forward.log"), "forwarding");
    let out = lab
        .record()
        .ssh("client")
        .expect("client host")
        .args(["-p", "2222", "root@127.0.0.1", "echo", "reach-ssh-ok"])
        .output()
        .expect("run ssh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("reach-ssh-ok"),
        "ssh: {stdout:?} {:?}\nforward: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(state.path().join("forward.log")).unwrap_or_default()
    );
    // Random ports on the server's NAT: no direct path, so the hub routed it.
    let log = std::fs::read_to_string(&expose_log).unwrap_or_default();
    assert!(
        log.contains("connection exposed") && log.contains("module=routed"),
        "{log}"
    );
}
