//! `reach expose` and `reach forward` on loopback: unmodified TCP clients
//! reach a TCP service through reach streams.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Stdio};

use common::{HubProc, Listener, DEADLINE};

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

/// Starts `reach expose SERVICE FLAGS...` with state in `state` (stdin
/// empty) and waits for the virtual address it serves.
fn expose(state: &std::path::Path, service: impl std::fmt::Display, flags: &[&str]) -> Listener {
    let parent = state.parent().expect("a state dir inside the test's dir");
    let empty = common::random_file(parent, "empty", 0);
    let service = service.to_string();
    Listener::start_with(None, state, &empty, &["expose", &service], flags)
}

/// A running `reach forward`, killed when the test ends, however it ends.
struct Forwarder {
    child: Child,
    /// Its stderr.
    err_path: std::path::PathBuf,
}

impl Forwarder {
    /// Runs `reach --state-dir STATE forward ARGS...` with stderr in
    /// STATE.err; waits until it says it is forwarding.
    fn start(state: &std::path::Path, args: &[&str]) -> Forwarder {
        let err_path = state.with_extension("err");
        let child = common::reach()
            .arg("--state-dir")
            .arg(state)
            .arg("forward")
            .args(args)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&err_path).expect("err"))
            .spawn()
            .expect("spawn reach forward");
        let f = Forwarder { child, err_path };
        common::until(|| f.stderr().contains("forwarding").then_some(()))
            .unwrap_or_else(|| panic!("forward did not start: {}", f.stderr()));
        f
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err_path).unwrap_or_default()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A range of proxy ports starting at a port free now: (first, "A-B").
fn proxy_range() -> (u16, String) {
    let free: u16 = free_addr()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    (free, format!("{free}-{}", free.saturating_add(40)))
}

/// A free loopback TCP address.
fn free_addr() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    format!("127.0.0.1:{port}")
}

#[test]
fn tcp_clients_reach_an_exposed_service_through_forward_and_strangers_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = echo_service();
    let friend = common::reach_id(&dir.path().join("b"));
    let exposed = expose(
        &dir.path().join("a"),
        service,
        &["--port", "7", "--allow", &friend],
    );
    assert!(exposed.vaddr.contains(":7/"), "{}", exposed.vaddr);
    let listen = free_addr();
    let forwarder = Forwarder::start(&dir.path().join("b"), &[&listen, &exposed.vaddr]);
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
    let err = forwarder.stderr();
    assert!(!err.contains("cannot reach"), "{err}");
    // A node outside the policy: its forward cannot open a stream, so its
    // client gets nothing from the service, and the exposer names it.
    let stranger = common::reach_id(&dir.path().join("c"));
    let listen = free_addr();
    let refused = Forwarder::start(&dir.path().join("c"), &[&listen, &exposed.vaddr]);
    let mut c = TcpStream::connect(&listen).expect("connect to forward");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    c.write_all(b"let me in").expect("send");
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    let _ = c.read_to_end(&mut back);
    assert!(back.is_empty(), "the service answered a stranger");
    common::until(|| refused.stderr().contains("does not admit").then_some(()))
        .unwrap_or_else(|| panic!("the forward did not say why: {}", refused.stderr()));
    let logged = std::fs::read_to_string(&exposed.stderr_path).unwrap_or_default();
    assert!(
        logged.contains(&stranger) && logged.contains("access policy does not admit"),
        "{logged}"
    );
}

#[test]
fn expose_refuses_to_start_without_an_access_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = common::reach()
        .arg("--state-dir")
        .arg(dir.path().join("a"))
        .args(["expose", "127.0.0.1:22"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--allow NODEID") && err.contains("--open"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
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
    let exposed = expose(
        &dir.path().join("a"),
        service,
        &["-v", "--udp", "--open", "--port", "53"],
    );
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let forwarder = Forwarder::start(
        &dir.path().join("b"),
        &["-v", &listen, &exposed.vaddr, "--udp", "--idle", "0.5"],
    );
    let log = || forwarder.stderr();
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

/// `reach --state-dir STATE ARGS...`: (success, stdout, stderr).
fn reach_at(state: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = common::reach()
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run reach");
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// `reach --state-dir STATE status --json [--hub HUB]`, parsed.
fn status_json(state: &std::path::Path, hub: Option<&str>) -> serde_json::Value {
    let mut args = vec!["status", "--json"];
    args.extend(hub.iter().flat_map(|h| ["--hub", h]));
    let (ok, out, err) = reach_at(state, &args);
    assert!(ok, "reach status failed: {err}");
    serde_json::from_str(&out).expect("status JSON")
}

/// Sends `len` bytes to `addr` and checks the echo; the connection then ends.
fn echo_through(addr: &str, len: usize) {
    let data: Vec<u8> = (0..len).map(|j| (j % 251) as u8).collect();
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    c.write_all(&data).expect("send");
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    c.read_to_end(&mut back).expect("receive");
    assert!(back == data, "the echo came back intact");
}

#[test]
fn status_lists_proxies_and_proxy_ports_with_bytes_and_stop_removes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = echo_service();
    let (_, range) = proxy_range();
    let hub = common::HubProc::start(&dir.path().join("hub"), &["--proxy-ports", &range]);
    let a_state = dir.path().join("a");
    let exposed = expose(
        &a_state,
        service,
        &[
            "--name",
            "echo",
            "--open",
            "--port",
            "7",
            "--hub",
            &hub.target,
        ],
    );
    let public = common::until(|| {
        let err = std::fs::read_to_string(&exposed.stderr_path).unwrap_or_default();
        let line = err.lines().find(|l| l.starts_with("exposed at "))?;
        Some(line["exposed at ".len()..].split(' ').next()?.to_string())
    })
    .expect("the hub gives a proxy port");
    let listen = free_addr();
    let b_state = dir.path().join("b");
    let mut forwarder = Forwarder::start(&b_state, &[&listen, &exposed.vaddr]);

    echo_through(&listen, 300_000);
    echo_through(&public, 1000);

    // The forwarder lists itself, with the bytes it carried both ways.
    let b = status_json(&b_state, None);
    let proxies = b["proxies"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 1, "{b}");
    let f = &proxies[0];
    assert_eq!(f["kind"], "forward", "{f}");
    assert_eq!(f["local"], listen.as_str(), "{f}");
    assert_eq!(f["counters"]["connections"], 1, "{f}");
    assert_eq!(f["counters"]["bytes_to_reach"], 300_000, "{f}");
    assert_eq!(f["counters"]["bytes_from_reach"], 300_000, "{f}");
    assert!(b["hub"].is_null(), "no hub was asked: {b}");

    // The exposure lists its proxy port and both clients (the forwarded one
    // and the hub's); the hub lists the port with its client's bytes.
    let a = status_json(&a_state, Some(&hub.target));
    let e = &a["proxies"][0];
    assert_eq!(e["kind"], "expose", "{a}");
    assert_eq!(e["name"], "echo", "{a}");
    assert_eq!(e["public"], public.as_str(), "{a}");
    assert_eq!(e["counters"]["connections"], 2, "{a}");
    assert_eq!(e["counters"]["bytes_to_reach"], 301_000, "{a}");
    let ports = a["hub"]["exposures"].as_array().expect("exposures");
    assert_eq!(ports.len(), 1, "{a}");
    assert_eq!(public, format!("127.0.0.1:{}", ports[0]["port"]), "{a}");
    assert_eq!(ports[0]["vport"], 7, "{a}");
    assert_eq!(ports[0]["connections"], 1, "{a}");
    assert_eq!(ports[0]["bytes_in"], 1000, "{a}");
    assert_eq!(ports[0]["bytes_out"], 1000, "{a}");
    let (_, text, _) = reach_at(&a_state, &["status", "--hub", &hub.target]);
    for want in [
        "(echo)  expose",
        &format!("hub proxy port: {public}"),
        "proxy ports (1):",
    ] {
        assert!(text.contains(want), "{want:?} missing from\n{text}");
    }

    // Removing: by id, and by name. Each process ends cleanly, and the hub
    // frees the proxy port with the exposing node's session.
    let id = f["id"].as_u64().expect("id").to_string();
    let (ok, out, err) = reach_at(&b_state, &["stop", &id]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("stopped {id}"));
    assert!(
        common::wait_deadline(&mut forwarder.child).success(),
        "forward exits cleanly"
    );
    let (ok, _, err) = reach_at(&a_state, &["stop", "echo"]);
    assert!(ok, "{err}");
    exposed.finish();
    let freed = common::until(|| {
        let a = status_json(&a_state, Some(&hub.target));
        let empty =
            a["proxies"].as_array()?.is_empty() && a["hub"]["exposures"].as_array()?.is_empty();
        empty.then_some(())
    });
    assert!(freed.is_some(), "the proxy port is freed");
    let (ok, _, err) = reach_at(&a_state, &["stop", "echo"]);
    assert!(!ok && err.contains("no running proxy"), "{err}");
}

#[test]
fn a_cut_stream_reaches_the_tcp_client_as_a_reset_not_an_end_of_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A service that greets and then keeps the connection open.
    let service = TcpListener::bind("127.0.0.1:0").expect("bind");
    let service_addr = service.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut c in service.incoming().flatten() {
            let _ = c.write_all(b"hello");
            held.push(c);
        }
    });
    let exposed = expose(&dir.path().join("a"), service_addr, &["--open"]);
    let listen = free_addr();
    let _forwarder = Forwarder::start(&dir.path().join("b"), &[&listen, &exposed.vaddr]);
    let mut c = TcpStream::connect(&listen).expect("connect to forward");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut hello = [0u8; 5];
    c.read_exact(&mut hello).expect("greeting");
    assert_eq!(&hello, b"hello");
    // The serving side dies: its stream ends without the authenticated end
    // record, and the client must see that as a reset.
    exposed.kill();
    let mut rest = Vec::new();
    let err = c
        .read_to_end(&mut rest)
        .expect_err("an abnormal end, not end of file");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// The hub proxy port an `expose` process says it got.
fn proxy_port_of(exposed: &Listener) -> u16 {
    common::until(|| {
        let err = std::fs::read_to_string(&exposed.stderr_path).unwrap_or_default();
        let line = err.lines().find(|l| l.starts_with("exposed at "))?;
        let addr = line["exposed at ".len()..].split(' ').next()?;
        addr.rsplit(':').next()?.parse().ok()
    })
    .expect("the hub gives a proxy port")
}

#[test]
fn a_second_node_cannot_take_a_first_nodes_proxy_port_across_a_hub_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = echo_service();
    let (free, range) = proxy_range();
    let hub_state = dir.path().join("hub");
    let hub = common::HubProc::start(&hub_state, &["--proxy-ports", &range]);
    let hub_port = hub.port();
    let expose_as = |state: &str, hub: &str| {
        expose(&dir.path().join(state), service, &["--open", "--hub", hub])
    };
    let victim = expose_as("victim", &hub.target);
    let port = proxy_port_of(&victim);
    // The lowest free port of the range, the one a hub that forgot the
    // victim would hand the next node: `free`, unless another process took
    // it since it was probed (tests run in parallel), then a later one.
    assert!(
        (free..=free.saturating_add(40)).contains(&port),
        "{port} outside the range from {free}"
    );
    // The hub restarts while the victim is away (the test fails with
    // --proxy-port-hold 0 on the restarted hub).
    victim.kill();
    hub.kill();
    let hub = common::HubProc::start_on(&hub_state, hub_port, &["--proxy-ports", &range]);
    let thief = expose_as("thief", &hub.target);
    let other = proxy_port_of(&thief);
    assert_ne!(other, port, "another node took the victim's port");
    // The victim comes back and gets its port again.
    let victim = expose_as("victim", &hub.target);
    assert_eq!(proxy_port_of(&victim), port);
    echo_through(&format!("127.0.0.1:{port}"), 1000);
}

#[test]
fn proxy_port_clients_are_capped_per_source_and_a_silent_one_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = echo_service();
    let (_, range) = proxy_range();
    let hub = common::HubProc::start(
        &dir.path().join("hub"),
        &[
            "--proxy-ports",
            &range,
            "--max-proxy-clients-per-source",
            "1",
            "--proxy-first-byte",
            "1",
        ],
    );
    let exposed = expose(
        &dir.path().join("a"),
        service,
        &["--open", "--hub", &hub.target],
    );
    let port = proxy_port_of(&exposed);
    // The first client connects and sends nothing: it holds its address's
    // one slot until the first-byte deadline cuts it.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    silent.set_read_timeout(Some(DEADLINE)).expect("timeout");
    // A second client from the same address is refused at once.
    let mut second = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    second.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut buf = Vec::new();
    let _ = second.read_to_end(&mut buf);
    assert!(buf.is_empty());
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the silent client got data");
    let status = status_json(&dir.path().join("b"), Some(&hub.target));
    let refused = status["hub"]["exposures"][0]["refused"].as_u64();
    assert_eq!(refused, Some(1), "{status}");
    // With the slot free again, a client that talks is served.
    echo_through(&format!("127.0.0.1:{port}"), 1000);
}

#[test]
fn one_peer_cannot_take_more_than_its_share_of_an_exposed_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = echo_service();
    let exposed = expose(
        &dir.path().join("a"),
        service,
        &["-v", "--open", "--max-per-peer", "1"],
    );
    let listen = free_addr();
    let _forwarder = Forwarder::start(&dir.path().join("b"), &[&listen, &exposed.vaddr]);
    // The first connection holds the peer's one place (it has not finished
    // sending, so the echo has not answered).
    let mut first = TcpStream::connect(&listen).expect("connect");
    first.set_read_timeout(Some(DEADLINE)).expect("timeout");
    first.write_all(b"first").expect("send");
    let log = || std::fs::read_to_string(&exposed.stderr_path).unwrap_or_default();
    common::until(|| log().contains("connection exposed").then_some(()))
        .unwrap_or_else(|| panic!("the first connection never reached the service: {}", log()));
    // A second one from the same peer is refused.
    let mut second = TcpStream::connect(&listen).expect("connect");
    second.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let _ = second.write_all(b"second");
    let _ = second.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let _ = second.read_to_end(&mut got);
    assert!(got.is_empty(), "the second connection was served");
    assert!(log().contains("per-peer limit"), "{}", log());
    // The first is still served, and its place frees on its end.
    first.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    first.read_to_end(&mut back).expect("receive");
    assert_eq!(back, b"first");
    echo_through(&listen, 100);
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Sends `signal` (STOP, CONT) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

/// What a hub may hold for one node that stops reading: its link's queue
/// (`reach::link::LINK_QUEUE_LIMIT`), plus room for the allocator and the
/// frames in flight around it.
const NON_READER_BOUND: u64 = (reach::link::LINK_QUEUE_LIMIT as u64) + (32 << 20);

#[test]
fn a_node_that_stops_reading_costs_its_hub_at_most_its_link_queue() {
    // 600 routed streams of 256 KiB credit each: 150 MiB the hub would
    // queue for the node without the bound.
    const STREAMS: usize = 600;
    let dir = tempfile::tempdir().expect("tempdir");
    // Hub links only: on relay circuits the kernel's TCP flow control holds
    // a non-reader back, and no hub queue comes into play.
    let hub = HubProc::start(&dir.path().join("hub"), &["--no-circuits"]);
    // A service that sends 4 MiB on every connection once told to.
    let go = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let service = TcpListener::bind("127.0.0.1:0").expect("bind");
    let service_addr = service.local_addr().expect("addr");
    {
        let (go, accepted) = (go.clone(), accepted.clone());
        std::thread::spawn(move || {
            for mut c in service.incoming().flatten() {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let go = go.clone();
                std::thread::spawn(move || {
                    let (lock, cv) = &*go;
                    let started = cv
                        .wait_timeout_while(lock.lock().expect("lock"), DEADLINE, |g| !*g)
                        .map(|(g, _)| *g)
                        .unwrap_or(false);
                    let chunk = vec![7u8; 64 * 1024];
                    for _ in 0..64 {
                        if !started || c.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    let exposed = expose(
        &dir.path().join("a"),
        service_addr,
        &["--open", "--max-per-peer", "1000", "--hub", &hub.target],
    );
    let listen = free_addr();
    let forwarder = Forwarder::start(
        &dir.path().join("b"),
        &[
            &listen,
            &exposed.vaddr,
            "--hub",
            &hub.target,
            "--modules",
            "routed",
        ],
    );
    // The clients connect and never read; once the service has them all,
    // every stream is set up end to end through the hub.
    let _clients: Vec<TcpStream> = (0..STREAMS)
        .map(|_| TcpStream::connect(&listen).expect("connect to forward"))
        .collect();
    common::until(|| (accepted.load(std::sync::atomic::Ordering::SeqCst) == STREAMS).then_some(()))
        .unwrap_or_else(|| panic!("streams not set up: {}", forwarder.stderr()));
    let base = rss(hub.pid()).expect("hub rss");
    // The forwarding node stops reading its hub link; the service sends.
    let fpid = forwarder.child.id();
    signal(fpid, "STOP");
    {
        let (lock, cv) = &*go;
        *lock.lock().expect("lock") = true;
        cv.notify_all();
    }
    // The service pushes every stream's whole credit at the hub (150 MiB):
    // sample the hub's memory until the node's link ends for its queue.
    let credit = (STREAMS as u64) * u64::from(reach::proto::link::STREAM_WINDOW);
    let mut peak = base;
    // Normally the queue overflows first; on a machine loaded enough that
    // the hub's queue fills slower than the 30 s write stall, the stall
    // ends the link, or the kernel does, at the same time (the socket's
    // 30 s TCP_USER_TIMEOUT counts a zero window too: the hub then reads
    // the connection's end, "stream truncated"), and slower still the
    // link's 45 s of silence (the stopped node sends no pings) may end it
    // first. Each is a defence, and the hub logs each as a warning ("link
    // closed: why"); memory is checked below. The wait covers the stall's
    // 30 s after the queue stopped moving, twice.
    let cut = common::until_within(std::time::Duration::from_secs(120), || {
        peak = peak.max(rss(hub.pid()).unwrap_or(0));
        let log = hub.stderr();
        let line = log.lines().find(|l| l.contains("link closed: "))?;
        Some(
            line.split_once("link closed: ")
                .map_or(String::new(), |(_, why)| why.to_string()),
        )
    });
    peak = peak.max(rss(hub.pid()).unwrap_or(0));
    signal(fpid, "CONT");
    assert!(
        cut.is_some(),
        "the hub kept the link: {}\ncounters: {}\nexpose: {}\nforward: {}",
        hub.stderr(),
        status_json(&dir.path().join("asker"), Some(&hub.target))["hub"]["counters"],
        std::fs::read_to_string(&exposed.stderr_path).unwrap_or_default(),
        forwarder.stderr()
    );
    // It was pushed (past the queue limit, when that is what cut the link),
    // and held no more than the limit.
    let status = status_json(&dir.path().join("asker"), Some(&hub.target));
    let relayed = status["hub"]["counters"]["bytes_relayed"].as_u64();
    let pushed = match &cut {
        Some(why) if why.contains("queued for the peer") => reach::link::LINK_QUEUE_LIMIT as u64,
        _ => 1,
    };
    assert!(relayed >= Some(pushed), "{relayed:?} relayed, cut: {cut:?}");
    let grew = peak.saturating_sub(base);
    eprintln!(
        "hub rss {} MiB before, {} MiB at most while the node did not read ({} MiB of credit, {} MiB relayed; the link was cut for: {})",
        base >> 20,
        peak >> 20,
        credit >> 20,
        relayed.unwrap_or(0) >> 20,
        cut.as_deref().unwrap_or("?")
    );
    assert!(
        grew <= NON_READER_BOUND,
        "the hub grew by {} MiB (bound {} MiB)",
        grew >> 20,
        NON_READER_BOUND >> 20
    );
    // The hub goes on serving.
    let status = status_json(&dir.path().join("asker"), Some(&hub.target));
    assert!(status["hub"].is_object(), "{status}");
}

/// A TCP service that echoes every byte as it arrives.
fn streaming_echo_service() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                if let Ok(mut back) = c.try_clone() {
                    let mut c = c;
                    let _ = std::io::copy(&mut c, &mut back);
                }
            });
        }
    });
    addr
}

/// Sends `len` bytes on `c` and reads their echo.
fn echo_on(c: &mut TcpStream, len: usize) {
    let data: Vec<u8> = (0..len).map(|j| (j % 253) as u8).collect();
    c.write_all(&data).expect("send");
    let mut back = vec![0; len];
    c.read_exact(&mut back).expect("echo");
    assert!(back == data, "the echo came back intact");
}

#[test]
fn status_shows_a_stream_that_started_routed_and_moved_direct_with_its_hub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = streaming_echo_service();
    let hub = common::HubProc::start(&dir.path().join("hub"), &[]);
    let a_state = dir.path().join("a");
    let exposed = expose(
        &a_state,
        service,
        &["--open", "--port", "7", "--hub", &hub.target],
    );
    let listen = free_addr();
    let b_state = dir.path().join("b");
    let _forwarder = Forwarder::start(
        &b_state,
        &[
            &listen,
            &exposed.vaddr,
            "--hub",
            &hub.target,
            "--modules",
            "routed,direct",
        ],
    );
    let mut c = TcpStream::connect(&listen).expect("connect");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    echo_on(&mut c, 1000);

    // The forwarder's stream opened routed through the hub, then moved onto
    // a direct connection; status names both modules and the hub.
    let moved = |state: &std::path::Path| {
        common::until(|| {
            let s = status_json(state, None);
            let st = s["proxies"][0]["streams"][0].clone();
            (st["module"] == "direct").then_some(st)
        })
    };
    let st = moved(&b_state).expect("the forwarded stream moves direct");
    assert_eq!(st["first_module"], "routed", "{st}");
    assert_eq!(st["direction"], "out", "{st}");
    assert_eq!(st["port"], 7, "{st}");
    assert_eq!(st["via"], serde_json::json!([hub.host_port()]), "{st}");
    assert!(st["moved_after_ms"].is_u64(), "{st}");
    assert!(
        st["rtt_us"].is_u64(),
        "the direct connection's round trip: {st}"
    );
    // Bytes count on both paths: what went routed and what went direct.
    echo_on(&mut c, 5000);
    let counted = common::until(|| {
        let st = status_json(&b_state, None)["proxies"][0]["streams"][0].clone();
        (st["bytes_out"] == 6000 && st["bytes_in"] == 6000).then_some(())
    });
    assert!(counted.is_some(), "6000 bytes each way are counted");

    // The exposing side lists the same stream as inbound, moved too.
    let st = moved(&a_state).expect("the exposed side's stream moved");
    assert_eq!(st["first_module"], "routed", "{st}");
    assert_eq!(st["direction"], "in", "{st}");

    let (ok, text, err) = reach_at(&b_state, &["status"]);
    assert!(ok, "{err}");
    let want = format!("routed via {} -> direct", hub.host_port());
    assert!(text.contains(&want), "{want:?} missing from\n{text}");
    drop(c);
    exposed.kill();
}

#[test]
fn status_watch_refreshes_the_given_number_of_times_as_json_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("a");
    let (ok, out, err) = reach_at(
        &state,
        &[
            "status",
            "--watch",
            "--json",
            "--interval",
            "0.1",
            "--count",
            "3",
        ],
    );
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines.iter().all(|l| l["proxies"].is_array()), "{out}");
    let (ok, _, err) = reach_at(&state, &["status", "--interval", "0.1"]);
    assert!(
        !ok && err.contains("--watch"),
        "--interval needs --watch: {err}"
    );
    let (ok, _, err) = reach_at(&state, &["status", "--watch", "--interval", "0"]);
    assert!(!ok && err.contains("between 0.1 and 3600"), "{err}");
}
