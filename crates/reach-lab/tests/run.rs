//! `reach run` across the lab's NATs: unmodified programs, started under
//! the shim, serve and reach each other by `.reach` names with no change
//! to them and no root for them: python3's http.server behind a
//! random-port symmetric NAT is fetched by curl under `reach run` from
//! another NATed host and by plain curl through the hub's proxy port; a
//! forking server (OpenSSH's sshd) under `reach run` takes an ssh login
//! from ssh under `reach run`. Needs root (namespaces), python3, curl,
//! openssh, and the `reach` binary and the shim built
//! (`cargo build -p reach-cli -p reach-shim`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use reach_lab::lab::Process;
use reach_lab::Lab;

const PAGE: &str = "served under reach run";

/// The shim beside the `reach` binary.
fn shim() -> PathBuf {
    let shim = common::tools_with_reach().join("libreach_shim.so");
    assert!(
        shim.is_file(),
        "{} is missing: build it with `cargo build -p reach-shim` (scripts/test.sh does)",
        shim.display()
    );
    shim
}

/// `reach --state-dir DIR -v run --shim SHIM FLAGS -- PROGRAM...` in
/// `host`.
fn reach_run(
    lab: &Lab,
    host: &str,
    dir: &Path,
    flags: &[&str],
    program: &[&str],
) -> std::process::Command {
    let mut cmd = lab.command(host, common::tools_with_reach().join("reach"));
    cmd.arg("--state-dir")
        .arg(dir)
        .args(["-v", "run", "--shim"])
        .arg(shim())
        .args(flags)
        .arg("--")
        .args(program);
    cmd
}

/// The lab with its hub (proxy ports 40000-40010) running: the lab, the
/// state directory, the hub and NODEID@PUBLIC_IP:7700.
fn run_lab() -> (Lab, tempfile::TempDir, Process, String) {
    let t = common::topology("run");
    let lab = Lab::up(&t).expect("lab up");
    let state = tempfile::tempdir().expect("tempdir");
    let (hub, addr) = common::hub(
        &lab,
        "hub",
        &state.path().join("hub"),
        &["--proxy-ports", "40000-40010"],
    );
    let id = addr.split('@').next().expect("hub id").to_string();
    let ip = lab.host("hub").public.expect("multi-homed hub");
    (lab, state, hub, format!("{id}@{ip}:7700"))
}

/// `reach id` for a state directory.
fn node_id(dir: &Path) -> String {
    let out = std::process::Command::new(common::tools_with_reach().join("reach"))
        .arg("--state-dir")
        .arg(dir)
        .arg("id")
        .output()
        .expect("reach id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `cmd` to its end (it carries its own timeouts): success, stdout
/// and stderr.
fn output(mut cmd: std::process::Command) -> (bool, String, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_web_server_behind_a_random_port_nat_is_fetched_by_name_and_through_the_hub() {
    let (lab, state, _hub, hub) = run_lab();
    let site = state.path().join("site");
    std::fs::create_dir_all(&site).expect("site");
    std::fs::write(site.join("page.txt"), PAGE).expect("page");
    let server_dir = state.path().join("server");
    let site_arg = site.to_string_lossy().to_string();
    let server = reach_run(
        &lab,
        "server",
        &server_dir,
        &["--open", "--hub", &hub],
        &[
            "python3",
            "-m",
            "http.server",
            "8000",
            "--directory",
            &site_arg,
        ],
    );
    let log = state.path().join("server.log");
    let _server = common::spawn_until(server, &log, "exposed at");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let proxy_port = text
        .lines()
        .find_map(|l| l.split("exposed at ").nth(1))
        .and_then(|a| a.split(' ').next()?.rsplit(':').next()?.parse::<u16>().ok())
        .expect("the hub's proxy port");
    let node = node_id(&server_dir);
    // From another NAT, curl under reach run, by name.
    let url = format!("http://{node}.reach:8000/page.txt");
    let client = reach_run(
        &lab,
        "client",
        &state.path().join("client"),
        &["--hub", &hub],
        &["curl", "-sS", "-m", "30", &url],
    );
    let (ok, out, err) = output(client);
    assert!(
        ok && out == PAGE,
        "curl under reach run: {out:?}\n{err}\nserver:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // From the internet, plain curl through the hub's proxy port.
    let hub_ip = lab.host("hub").public.expect("multi-homed hub");
    let mut plain = lab.command("outside", "curl");
    plain.args([
        "-sS",
        "-m",
        "30",
        &format!("http://{hub_ip}:{proxy_port}/page.txt"),
    ]);
    let (ok, out, err) = output(plain);
    assert!(ok && out == PAGE, "plain curl: {out:?}\n{err}");
}

#[test]
fn ssh_under_reach_run_logs_into_a_forking_sshd_under_reach_run_across_nats() {
    let (lab, state, _hub, hub) = run_lab();
    let ssh_dir = lab.record().state_dir().join("ssh");
    let client_dir = state.path().join("client");
    let client_id = node_id(&client_dir);
    // sshd with the lab's keys and configuration on port 2222, in the
    // foreground; it forks (and re-executes itself) for every login.
    let pid = state.path().join("sshd.pid");
    let config = ssh_dir.join("sshd_config");
    let sshd_args: Vec<String> = [
        reach_lab::sshd::SSHD.to_string(),
        "-D".into(),
        "-e".into(),
        "-f".into(),
        config.display().to_string(),
        "-o".into(),
        "Port=2222".into(),
        "-o".into(),
        format!("PidFile={}", pid.display()),
    ]
    .into();
    let sshd_args: Vec<&str> = sshd_args.iter().map(String::as_str).collect();
    let server_dir = state.path().join("server");
    let server = reach_run(
        &lab,
        "server",
        &server_dir,
        &["--allow", &client_id, "--virtual-only", "--hub", &hub],
        &sshd_args,
    );
    let log = state.path().join("sshd.log");
    let _server = common::spawn_until(server, &log, "port 2222 served at");
    let node = node_id(&server_dir);
    let mut program = vec!["ssh".to_string()];
    program.extend(reach_lab::sshd::client_args(&ssh_dir));
    program.extend(["-p".into(), "2222".into(), format!("root@{node}.reach")]);
    program.extend(["echo".into(), "reach-run-ssh-ok".into()]);
    let program: Vec<&str> = program.iter().map(String::as_str).collect();
    // Twice: the second login is served by another forked child.
    for _ in 0..2 {
        let client = reach_run(&lab, "client", &client_dir, &["--hub", &hub], &program);
        let (ok, out, err) = output(client);
        assert!(
            ok && out.contains("reach-run-ssh-ok"),
            "ssh under reach run: {out:?}\n{err}\nsshd:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let served = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        served.matches("connection to the program").count(),
        2,
        "{served}"
    );
}

#[test]
fn an_epoll_server_and_plain_programs_work_under_reach_run() {
    let (lab, state, _hub, hub) = run_lab();
    let client_dir = state.path().join("client");
    let client_id = node_id(&client_dir);
    // A tokio (epoll) echo server under reach run behind the random-port
    // NAT.
    let server_dir = state.path().join("server");
    let lab_bin = common::tools().join("reach-lab");
    let lab_bin = lab_bin.to_string_lossy().to_string();
    let server = reach_run(
        &lab,
        "server",
        &server_dir,
        &["--allow", &client_id, "--virtual-only", "--hub", &hub],
        &[&lab_bin, "probe", "echo", "--port", "9000"],
    );
    let log = state.path().join("echo.log");
    let _server = common::spawn_until(server, &log, "port 9000 served at");
    let node = node_id(&server_dir);
    let words = "echoed through reach run";
    let script = format!(
        "import socket\n\
         s = socket.create_connection(('{node}.reach', 9000), timeout=30)\n\
         s.sendall(b'{words}')\n\
         s.shutdown(socket.SHUT_WR)\n\
         got = b''\n\
         while True:\n    b = s.recv(4096)\n    if not b: break\n    got += b\n\
         print(got.decode())\n"
    );
    let client = reach_run(
        &lab,
        "client",
        &client_dir,
        &["--hub", &hub],
        &["python3", "-c", &script],
    );
    let (ok, out, err) = output(client);
    assert!(
        ok && out.trim() == words,
        "echo: {out:?}\n{err}\nserver:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // A program that never touches a .reach name: curl under reach run
    // fetches a page from a host on the internet by its lab address,
    // byte for byte as curl without the shim.
    let site = state.path().join("plain");
    std::fs::create_dir_all(&site).expect("site");
    std::fs::write(site.join("page.txt"), PAGE).expect("page");
    let mut web = lab.command("outside", "python3");
    web.args(["-u", "-m", "http.server", "8080", "--directory"])
        .arg(&site);
    let _web = common::spawn_until(web, &state.path().join("web.log"), "Serving HTTP");
    let url = format!("http://{}:8080/page.txt", lab.host("outside").lan);
    let mut plain = lab.command("client", "curl");
    plain.args(["-sS", "-m", "30", &url]);
    let without = output(plain);
    let shimmed = output(reach_run(
        &lab,
        "client",
        &client_dir,
        &["--hub", &hub],
        &["curl", "-sS", "-m", "30", &url],
    ));
    assert!(without.0 && shimmed.0, "{without:?}\n{shimmed:?}");
    assert_eq!(shimmed.1, without.1);
    assert_eq!(shimmed.1, PAGE);
}

#[test]
fn iperf3_over_udp_runs_under_reach_run_across_nats() {
    let (lab, state, _hub, hub) = run_lab();
    let client_dir = state.path().join("client");
    let client_id = node_id(&client_dir);
    // iperf3 -u: a TCP control connection and UDP data to the same port
    // number, both brokered.
    let server_dir = state.path().join("server");
    let server = reach_run(
        &lab,
        "server",
        &server_dir,
        &["--allow", &client_id, "--virtual-only", "--hub", &hub],
        &["iperf3", "-s", "-p", "5202", "--forceflush"],
    );
    let log = state.path().join("iperf3.log");
    let _server = common::spawn_until(server, &log, "port 5202 served at");
    let node = node_id(&server_dir);
    let to = format!("{node}.reach");
    let client = reach_run(
        &lab,
        "client",
        &client_dir,
        &["--hub", &hub],
        &[
            "iperf3", "-c", &to, "-p", "5202", "-u", "-b", "20M", "-t", "2", "-J",
        ],
    );
    let (ok, out, err) = output(client);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_u64().unwrap_or(0);
    let lost = sum["lost_packets"].as_u64().unwrap_or(u64::MAX);
    assert!(
        ok && packets > 0 && lost < packets,
        "iperf3 -u under reach run: {out}\n{err}\nserver:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let served = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(served.contains("UDP mapping opened"), "{served}");
}
