//! The `reach` binary on loopback: piping, errors, exit codes.

mod common;

use std::process::Stdio;

use common::{sha256, Listener, Side, DEADLINE};

#[test]
fn id_is_stable_and_key_is_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id1 = common::reach_id(dir.path());
    let id2 = common::reach_id(dir.path());
    assert_eq!(id1, id2);
    assert_eq!(id1.len(), 52);
    use std::os::unix::fs::PermissionsExt;
    let key = dir.path().join("identity.key");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let out = common::reach()
        .arg("--state-dir")
        .arg(dir.path())
        .arg("id")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable by others") && err.contains("chmod 600"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn ten_megabytes_cross_both_ways_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let here = || Side {
        netns: None,
        args: &[],
    };
    common::exchange(dir.path(), here(), here(), 10 << 20, 7 << 20);
}

#[test]
fn plaintext_flag_on_both_ends_still_delivers_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = Side {
        netns: None,
        args: &["--plaintext"],
    };
    let connect = Side {
        netns: None,
        args: &["--plaintext", "-v"],
    };
    common::exchange(dir.path(), listen, connect, 2 << 20, 1 << 20);
}

#[test]
fn wrong_node_id_exits_nonzero_without_learning_the_listeners_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = common::random_file(dir.path(), "empty", 0);
    let listener = Listener::start(None, &dir.path().join("a"), &empty, &["--keep"]);
    let other = common::reach_id(&dir.path().join("c"));
    let hints = listener.vaddr.split_once(':').expect("vaddr").1;
    let wrong = format!("{other}:{hints}");
    let started = std::time::Instant::now();
    let out = common::reach()
        .args(["--state-dir"])
        .arg(dir.path().join("b"))
        .args(["connect", "--timeout", "5", &wrong])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(started.elapsed() < DEADLINE);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not the node the address names"), "{err}");
    assert!(
        !err.contains(listener.vaddr.split_once(':').expect("vaddr").0),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    listener.kill();
}

#[test]
fn bad_input_gets_one_clear_line_and_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&[&str], &str)] = &[
        (&["connect", "nonsense"], "bad virtual address"),
        (
            &["connect", "nonsense:1"],
            "node id must be 52 base32 characters",
        ),
        (&["listen", "--port-range", "9-1"], "exceeds"),
        (
            &["--config", "/nonexistent/reach.toml", "id"],
            "cannot read config file",
        ),
    ];
    for (args, want) in cases {
        let out = common::reach()
            .arg("--state-dir")
            .arg(dir.path())
            .args(*args)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "plaintxt = true\n").expect("write");
    let out = common::reach()
        .arg("--config")
        .arg(&cfg)
        .arg("id")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown field"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn listener_logs_garbage_and_keeps_serving() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let down = common::random_file(dir.path(), "down.bin", 1000);
    let listener = Listener::start(None, &dir.path().join("a"), &down, &[]);
    let addr = listener.first_direct();
    let mut junk = std::net::TcpStream::connect(addr).expect("connect");
    junk.set_read_timeout(Some(DEADLINE)).expect("timeout");
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789abcdef")
        .expect("write");
    let mut sink = Vec::new();
    let _ = junk.read_to_end(&mut sink); // closed or reset: either ends the read
    let up = common::random_file(dir.path(), "up.bin", 1000);
    let got_down = dir.path().join("got_down.bin");
    let status = common::connect(
        None,
        &dir.path().join("b"),
        &listener.vaddr,
        &up,
        &got_down,
        &[],
    );
    assert!(status.success());
    let stderr = listener.stderr_path.clone();
    assert_eq!(sha256(&listener.finish()), sha256(&up));
    let log = std::fs::read_to_string(stderr).expect("log");
    assert!(
        log.contains("rejected connection") && log.contains("not a reach handshake"),
        "{log}"
    );
}

#[test]
fn keep_serves_one_stream_after_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = common::random_file(dir.path(), "empty", 0);
    let listener = Listener::start(None, &dir.path().join("a"), &empty, &["--keep"]);
    let mut sent = Vec::new();
    for name in ["first.bin", "second.bin"] {
        let data = common::random_file(dir.path(), name, 100_000);
        let out = dir.path().join(format!("{name}.out"));
        let status = common::connect(
            None,
            &dir.path().join("b"),
            &listener.vaddr,
            &data,
            &out,
            &[],
        );
        assert!(status.success(), "{name}");
        sent.extend(std::fs::read(&data).expect("read"));
    }
    let received_path = listener.out_path.clone();
    listener.kill();
    assert_eq!(std::fs::read(received_path).expect("read"), sent);
}
