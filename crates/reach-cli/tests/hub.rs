//! `reach hub`, `reach status` and nodes attached with `--hub`, on loopback.

mod common;

use std::process::Stdio;

use common::{HubProc, Listener, DEADLINE};

/// Runs `reach` with `args` (stdin empty) and returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = common::reach();
    cmd.args(args).stdin(Stdio::null());
    let started = std::time::Instant::now();
    let out = cmd.output().expect("run reach");
    assert!(started.elapsed() < DEADLINE);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `reach listen` with identity `state` against `hub`, which must refuse it:
/// exit code 1 and the hub's reason. Returns stderr.
fn listen_refused(state: &std::path::Path, hub: &str) -> String {
    let state = state.to_str().expect("utf8");
    let (code, _, err) = run(&[
        "--state-dir",
        state,
        "listen",
        "--bind",
        "127.0.0.1",
        "--hub",
        hub,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("refused this node"), "{err}");
    err
}

#[test]
fn routed_stream_through_a_hub_process_with_only_node_id_and_hub_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = HubProc::start(&dir.path().join("hub"), &[]);
    let up = common::random_file(dir.path(), "up.bin", 2 << 20);
    let down = common::random_file(dir.path(), "down.bin", 1 << 20);
    let listener = Listener::start(None, &dir.path().join("a"), &down, &["--hub", &hub.target]);
    assert!(
        listener
            .vaddr
            .ends_with(&format!("/hub={}", hub.host_port())),
        "the address names the hub: {}",
        listener.vaddr
    );
    // The connector has no hub configured and no direct address: the hint
    // alone must get it there (pinning the hub on first contact).
    let node = listener.vaddr.split_once(':').expect("vaddr").0;
    let vaddr = format!("{node}:0/hub={}", hub.host_port());
    let got = dir.path().join("got.bin");
    let status = common::connect(
        None,
        &dir.path().join("b"),
        &vaddr,
        &up,
        &got,
        &["-v", "--modules", "routed"],
    );
    assert!(status.success());
    let log = std::fs::read_to_string(got.with_extension("err")).expect("log");
    assert!(log.contains("module=routed"), "{log}");
    let received = listener.finish();
    assert_eq!(common::sha256(&received), common::sha256(&up));
    assert_eq!(common::sha256(&got), common::sha256(&down));
    let known = std::fs::read_to_string(dir.path().join("b/known_hubs")).expect("pinned");
    let hub_id = hub.target.split_once('@').expect("id").0;
    assert!(known.contains(hub_id), "{known}");
    assert_eq!(
        hub.terminate().code(),
        Some(0),
        "SIGTERM ends the hub cleanly"
    );
}

#[test]
fn status_lists_attached_nodes_in_text_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = HubProc::start(&dir.path().join("hub"), &["--metrics", "127.0.0.1:0"]);
    let empty = common::random_file(dir.path(), "empty", 0);
    let listener = Listener::start(None, &dir.path().join("a"), &empty, &["--hub", &hub.target]);
    let node = listener.vaddr.split_once(':').expect("vaddr").0.to_string();
    let state = dir.path().join("c");
    let state = state.to_str().expect("utf8");
    let (code, text, err) = run(&["--state-dir", state, "status", "--hub", &hub.target]);
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("attached nodes (1)"), "{text}");
    assert!(text.contains(&node), "{text}");
    let (code, json, err) = run(&[
        "--state-dir",
        state,
        "status",
        "--hub",
        &hub.target,
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(json.contains("\"nodes_attached\": 1"), "{json}");
    listener.kill();
}

#[test]
fn a_hub_that_refuses_the_node_makes_listen_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let someone_else = common::reach_id(&dir.path().join("x"));
    let hub = HubProc::start(&dir.path().join("hub"), &["--allow", &someone_else]);
    let err = listen_refused(&dir.path().join("a"), &hub.target);
    assert!(err.contains("allow list"), "{err}");
    let errors: Vec<_> = err
        .lines()
        .filter(|l| l.starts_with("reach: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert!(errors[0].contains("refused this node"), "{err}");
}

#[test]
fn network_secret_admits_nodes_and_status_queries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "correct horse battery staple\n").expect("secret");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "incorrect horse battery staple\n").expect("secret");
    let short = dir.path().join("short");
    std::fs::write(&short, "abc").expect("secret");
    let secret_arg = secret.to_str().expect("utf8");
    let hub = HubProc::start(
        &dir.path().join("hub"),
        &["--network-secret-file", secret_arg],
    );
    let empty = common::random_file(dir.path(), "empty", 0);
    let listener = Listener::start(
        None,
        &dir.path().join("a"),
        &empty,
        &["--hub", &hub.target, "--network-secret-file", secret_arg],
    );
    assert!(listener.vaddr.contains("/hub="));
    let state = dir.path().join("c");
    let state = state.to_str().expect("utf8");
    let status = |file: &std::path::Path| {
        run(&[
            "--state-dir",
            state,
            "status",
            "--hub",
            &hub.target,
            "--network-secret-file",
            file.to_str().expect("utf8"),
        ])
    };
    let (code, text, err) = status(&secret);
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("attached nodes (1)"), "{text}");
    let (code, _, err) = status(&wrong);
    assert_eq!(code, Some(1));
    assert!(err.contains("refused the status query"), "{err}");
    let (code, _, err) = status(&short);
    assert_eq!(code, Some(1));
    assert!(err.contains("too short"), "{err}");
    listener.kill();
}

#[test]
fn hub_flags_are_checked_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().to_str().expect("utf8");
    for (args, want) in [
        (
            vec!["hub", "--allow", "nonsense"],
            "bad NodeId \"nonsense\" for --allow",
        ),
        (vec!["hub", "--peer", "hub.example"], "has no port"),
        (vec!["hub", "--gossip-interval", "0"], "positive number"),
        (
            vec!["connect", "--modules", "teleport", "x"],
            "unknown setup module",
        ),
    ] {
        let mut full = vec!["--state-dir", state];
        full.extend(args);
        let (code, _, err) = run(&full);
        assert_ne!(code, Some(0), "{full:?} should fail");
        assert!(err.contains(want), "{full:?}: {err}");
    }
}

#[test]
fn after_a_hub_crash_nodes_re_register_and_direct_streams_live_on() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let hub_state = dir.path().join("hub");
    let hub = HubProc::start(&hub_state, &[]);
    let (target, port) = (hub.target.clone(), hub.port());
    let empty = common::random_file(dir.path(), "empty", 0);
    let listener = Listener::start(None, &dir.path().join("a"), &empty, &["--hub", &target]);
    // A direct stream, open across the crash.
    let mut connect = common::reach()
        .arg("--state-dir")
        .arg(dir.path().join("b"))
        .args(["connect", "--hub", &target, "--modules", "direct"])
        .arg(&listener.vaddr)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reach connect");
    let mut input = connect.stdin.take().expect("stdin");
    input.write_all(b"before the crash; ").expect("write");
    input.flush().expect("flush");
    let arrived = |want: &str| {
        common::until(|| {
            let got = std::fs::read_to_string(&listener.out_path).unwrap_or_default();
            got.contains(want).then_some(())
        })
        .is_some()
    };
    assert!(arrived("before the crash; "));
    hub.kill();
    let restarted = std::time::Instant::now();
    let hub = HubProc::start_on(&hub_state, port, &[]);
    assert_eq!(
        hub.target,
        target,
        "same identity, same port: {}",
        hub.stderr()
    );
    let state = dir.path().join("c");
    let state = state.to_str().expect("utf8");
    let node = listener.vaddr.split_once(':').expect("vaddr").0.to_string();
    let mut last = String::new();
    let back = common::until(|| {
        let (_, json, err) = run(&["--state-dir", state, "status", "--json", "--hub", &target]);
        last = format!("{json}{err}");
        json.contains(&node).then_some(())
    });
    let took = restarted.elapsed();
    assert!(
        back.is_some(),
        "the listener never re-registered: {last}\nlistener: {}",
        std::fs::read_to_string(&listener.stderr_path).unwrap_or_default()
    );
    assert!(
        took < std::time::Duration::from_secs(5),
        "re-registered after {took:?}"
    );
    input.write_all(b"after the restart").expect("write after");
    drop(input);
    assert!(arrived("before the crash; after the restart"));
    let status = common::wait_deadline(&mut connect);
    assert!(status.success());
    listener.kill();
}

#[test]
fn a_hub_configured_by_file_admits_only_its_allow_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let allowed = common::reach_id(&dir.path().join("a"));
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[hub_server]\nallow = [\"{allowed}\"]\ngossip_interval = 1\n"),
    )
    .expect("config");
    let config = config.to_str().expect("utf8");
    let hub = HubProc::start(&dir.path().join("hub"), &["--config", config]);
    assert!(
        !hub.stderr().contains("admits every node"),
        "an allow list closes the hub: {}",
        hub.stderr()
    );
    let empty = common::random_file(dir.path(), "empty", 0);
    let listener = Listener::start(None, &dir.path().join("a"), &empty, &["--hub", &hub.target]);
    assert!(listener.vaddr.contains("/hub="));
    listen_refused(&dir.path().join("s"), &hub.target);
    listener.kill();
}

#[test]
fn a_hub_echoes_addresses_on_the_ports_given_and_nodes_splice_through_it() {
    use std::io::Read;
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    };
    let (e1, e2) = (free(), free());
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = HubProc::start(
        &dir.path().join("hub"),
        &[
            "--echo-port",
            &e1.to_string(),
            "--echo-port",
            &e2.to_string(),
        ],
    );
    for port in [e1, e2] {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("echo");
        tcp.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let local = tcp.local_addr().expect("local");
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).expect("answer");
        assert_eq!(answer, format!("reach-echo {local}\n"));
    }
    let up = common::random_file(dir.path(), "up.bin", 1 << 20);
    let empty = common::random_file(dir.path(), "empty", 0);
    let listener = Listener::start(None, &dir.path().join("a"), &empty, &["--hub", &hub.target]);
    let got = dir.path().join("got.bin");
    let status = common::connect(
        None,
        &dir.path().join("b"),
        &listener.vaddr,
        &up,
        &got,
        &["-v", "--hub", &hub.target, "--modules", "splice"],
    );
    let log = std::fs::read_to_string(got.with_extension("err")).expect("log");
    assert!(status.success(), "{log}");
    assert!(log.contains("module=splice"), "{log}");
    assert_eq!(common::sha256(&listener.finish()), common::sha256(&up));
    let (code, _, err) = run(&["hub", "--echo-port", "1", "--no-echo"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}
