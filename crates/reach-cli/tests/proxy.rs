//! `reach expose` and `reach forward` on loopback: unmodified TCP clients
//! reach a TCP service through reach streams.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Stdio};

use common::{Listener, DEADLINE};

/// A TCP service that answers each connection with what it received, once
/// the client has finished sending.
fn echo_service() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = Vec::new();
                if c.read_to_end(&mut buf).is_ok() {
                    let _ = c.write_all(&buf);
                }
            });
        }
    });
    addr
}

/// Kills the forwarder when the test ends, however it ends.
struct Forwarder(Child);

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tcp_clients_reach_an_exposed_service_through_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = echo_service();
    let empty = common::random_file(dir.path(), "empty", 0);
    let exposed = Listener::start_with(
        None,
        &dir.path().join("a"),
        &empty,
        &["expose", &service.to_string()],
        &["--port", "7"],
    );
    assert!(exposed.vaddr.contains(":7/"), "{}", exposed.vaddr);
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let err_path = dir.path().join("forward.err");
    let b_state = dir.path().join("b");
    let child = common::reach()
        .arg("--state-dir")
        .arg(&b_state)
        .args(["forward", &listen, &exposed.vaddr])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&err_path).expect("err"))
        .spawn()
        .expect("spawn reach forward");
    let _forwarder = Forwarder(child);
    common::until(|| {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        err.contains("forwarding").then_some(())
    })
    .expect("forward starts");
    // Two clients at once, each with its own stream.
    let clients: Vec<_> = (0..2u8)
        .map(|i| {
            let listen = listen.clone();
            std::thread::spawn(move || {
                let data: Vec<u8> = (0..(1u32 << 20)).map(|j| (j as u8) ^ i).collect();
                let mut c = TcpStream::connect(&listen).expect("connect to forward");
                c.set_read_timeout(Some(DEADLINE)).expect("timeout");
                c.write_all(&data).expect("send");
                c.shutdown(Shutdown::Write).expect("half-close");
                let mut back = Vec::new();
                c.read_to_end(&mut back).expect("receive");
                back == data
            })
        })
        .collect();
    for c in clients {
        assert!(c.join().expect("client"), "the echo came back intact");
    }
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(!err.contains("cannot reach"), "{err}");
}

/// A UDP service that answers each datagram with "echo:" and the datagram.
fn udp_echo_service() -> std::net::SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = s.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut answer = b"echo:".to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&answer, from);
        }
    });
    addr
}

#[test]
fn udp_datagrams_reach_an_exposed_service_and_idle_mappings_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = udp_echo_service();
    let empty = common::random_file(dir.path(), "empty", 0);
    let exposed = Listener::start_with(
        None,
        &dir.path().join("a"),
        &empty,
        &["-v", "expose", &service.to_string(), "--udp"],
        &["--port", "53"],
    );
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let err_path = dir.path().join("forward.err");
    let child = common::reach()
        .arg("--state-dir")
        .arg(dir.path().join("b"))
        .args([
            "-v",
            "forward",
            &listen,
            &exposed.vaddr,
            "--udp",
            "--idle",
            "0.5",
        ])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&err_path).expect("err"))
        .spawn()
        .expect("spawn reach forward --udp");
    let _forwarder = Forwarder(child);
    let log = || std::fs::read_to_string(&err_path).unwrap_or_default();
    common::until(|| log().contains("forwarding UDP").then_some(())).expect("forward starts");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
    client
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .expect("timeout");
    // UDP may lose a datagram while the mapping's stream is set up: ask
    // again until the answer comes, within the test's deadline.
    let ask = |what: &[u8]| {
        common::until(|| {
            client.send_to(what, &listen).ok()?;
            let mut buf = [0u8; 2048];
            let (n, _) = client.recv_from(&mut buf).ok()?;
            Some(buf[..n].to_vec())
        })
        .expect("an answer")
    };
    assert_eq!(ask(b"ping 1"), b"echo:ping 1");
    // Nothing for longer than --idle: the mapping closes at both ends...
    common::until(|| log().contains("UDP mapping expired").then_some(())).expect("expiry");
    // ...and the next datagram opens a new one.
    assert_eq!(ask(b"ping 2"), b"echo:ping 2");
    assert_eq!(log().matches("UDP mapping opened").count(), 2, "{}", log());
}
