//! Endpoint behaviour on real loopback sockets.

use std::net::SocketAddr;
use std::time::Duration;

use reach::{
    Cipher, ConnectError, Direction, Endpoint, ListenPorts, SecretKey, SetupModule, StreamMode,
    VirtualAddr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait in these tests is bounded by this.
const DEADLINE: Duration = Duration::from_secs(20);

/// A builder for a loopback-only endpoint: tests never dial this machine's
/// other interface addresses.
fn builder(seed: u8) -> reach::EndpointBuilder {
    Endpoint::builder()
        .secret_key(SecretKey::from_seed([seed; 32]))
        .bind_ip("127.0.0.1".parse().expect("ip"))
}

async fn endpoint(seed: u8) -> Endpoint {
    builder(seed).bind().await.expect("bind")
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("deadline passed")
}

/// Accepts one stream, echoes it back, and returns it after shutdown.
fn echo_once(server: Endpoint) -> tokio::task::JoinHandle<(Endpoint, reach::StreamInfo)> {
    tokio::spawn(async move {
        let mut s = server.accept().await.expect("accept");
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await.expect("write");
        }
        s.shutdown().await.expect("shutdown");
        let info = s.info().clone();
        (server, info)
    })
}

async fn round_trip(
    client: &Endpoint,
    target: &VirtualAddr,
    data: &[u8],
) -> (Vec<u8>, reach::StreamInfo) {
    let s = within(client.connect(target)).await.expect("connect");
    let info = s.info().clone();
    let (mut r, mut w) = tokio::io::split(s);
    let data_owned = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data_owned).await.expect("write");
        w.shutdown().await.expect("shutdown");
    });
    let mut back = Vec::new();
    within(r.read_to_end(&mut back)).await.expect("read");
    writer.await.expect("writer");
    (back, info)
}

#[tokio::test]
async fn encrypted_stream_carries_data_both_ways_and_reports_info() {
    let (server, client) = (endpoint(1).await, endpoint(2).await);
    let target = server.virtual_addr(7);
    let server_id = server.node_id();
    let echo = echo_once(server);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let (back, info) = round_trip(&client, &target, &data).await;
    assert_eq!(back, data);
    assert_eq!(info.peer, server_id);
    assert_eq!(info.virtual_port, 7);
    assert_eq!(info.module, SetupModule::Direct);
    assert_eq!(info.direction, Direction::Outbound);
    assert!(matches!(info.mode, StreamMode::Encrypted(_)));
    assert_eq!(Some(info.remote_addr), target.direct.first().copied());
    let (_, server_info) = within(echo).await.expect("echo");
    assert_eq!(server_info.peer, client.node_id());
    assert_eq!(server_info.direction, Direction::Inbound);
}

#[tokio::test]
async fn both_ciphers_work() {
    for cipher in [Cipher::ChaChaPoly, Cipher::AesGcm] {
        let server = endpoint(3).await;
        let client = builder(4).cipher(cipher).bind().await.expect("bind");
        let target = server.virtual_addr(1);
        let echo = echo_once(server);
        let (back, info) = round_trip(&client, &target, b"cipher check").await;
        assert_eq!(back, b"cipher check");
        assert_eq!(info.mode, StreamMode::Encrypted(cipher));
        within(echo).await.expect("echo");
    }
}

#[tokio::test]
async fn plaintext_is_used_only_when_both_sides_opt_in() {
    for (client_plain, server_plain) in [(true, true), (true, false), (false, true)] {
        let server = builder(5)
            .plaintext(server_plain)
            .bind()
            .await
            .expect("bind");
        let client = builder(6)
            .plaintext(client_plain)
            .bind()
            .await
            .expect("bind");
        let target = server.virtual_addr(1);
        let echo = echo_once(server);
        let (back, info) = round_trip(&client, &target, b"mode check").await;
        assert_eq!(back, b"mode check");
        let want_plain = client_plain && server_plain;
        assert_eq!(info.mode == StreamMode::Plaintext, want_plain);
        within(echo).await.expect("echo");
    }
}

/// A TCP relay in front of `to` that passes everything, except that it
/// holds back the last `hold` bytes the server sends (once past the
/// handshake's first kilobytes, which must flow for the stream to open) and
/// closes towards the client with a FIN without them, as a relay or
/// middlebox that cuts a stream just before its end would.
async fn relay_holding_back(to: SocketAddr, hold: usize) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let at = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let (client, _) = l.accept().await.expect("accept");
        let server = TcpStream::connect(to).await.expect("connect");
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
        let (mut held, mut seen) = (Vec::new(), 0);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = sr.read(&mut buf).await.expect("read server");
            if n == 0 {
                break;
            }
            seen += n;
            held.extend_from_slice(&buf[..n]);
            let pass = if seen < 10_000 {
                held.len()
            } else {
                held.len().saturating_sub(hold)
            };
            cw.write_all(&held[..pass]).await.expect("write client");
            held.drain(..pass);
        }
        cw.shutdown().await.expect("fin");
    });
    at
}

#[tokio::test]
async fn a_plaintext_stream_cut_before_its_end_is_truncation_not_end_of_file() {
    // hold 0: the relay passes everything and the end is clean; 28: the end
    // mark is withheld and the client must not take the FIN for the end.
    for (hold, clean) in [(0, true), (28, false)] {
        let server = builder(31).plaintext(true).bind().await.expect("bind");
        let client = builder(32).plaintext(true).bind().await.expect("bind");
        let relay = relay_holding_back(server.advertised()[0], hold).await;
        let target = VirtualAddr::new(server.node_id(), 1).with_direct(vec![relay]);
        let serve = tokio::spawn(async move {
            let mut s = server.accept().await.expect("accept");
            s.write_all(&vec![7u8; 100_000]).await.expect("write");
            s.shutdown().await.expect("shutdown");
            server
        });
        let mut s = within(client.connect(&target)).await.expect("connect");
        assert_eq!(s.info().mode, StreamMode::Plaintext);
        let mut got = Vec::new();
        let end = within(s.read_to_end(&mut got)).await;
        assert_eq!(got.len(), 100_000, "every data byte arrives either way");
        if clean {
            end.expect("clean end");
        } else {
            let err = end.expect_err("a cut end");
            assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
            assert!(
                err.to_string().contains("without the peer's end mark"),
                "{err}"
            );
        }
        within(serve).await.expect("server");
    }
}

#[tokio::test]
async fn a_node_does_not_tell_a_wrong_hello_who_it_is() {
    let (server, client) = (endpoint(7).await, endpoint(8).await);
    let impostor_target = VirtualAddr::new(SecretKey::from_seed([99; 32]).node_id(), 1)
        .with_direct(server.advertised().to_vec());
    let err = within(client.connect_timeout(&impostor_target, Duration::from_secs(15)))
        .await
        .expect_err("must fail");
    assert!(
        matches!(err, ConnectError::Failed { .. }),
        "failed, not timed out: {err}"
    );
    assert!(
        err.to_string().contains("not the node the address names"),
        "{err}"
    );
    assert!(
        !err.to_string().contains(&server.node_id().to_string()),
        "the listener's identity leaked: {err}"
    );
}

#[tokio::test]
async fn wrong_node_id_fails_fast_naming_the_identity_mismatch() {
    // A node that reveals itself (as hubs do) names who it is.
    let server = builder(7).reveal_identity(true).bind().await.expect("bind");
    let client = endpoint(8).await;
    let impostor_target = VirtualAddr::new(SecretKey::from_seed([99; 32]).node_id(), 1)
        .with_direct(server.advertised().to_vec());
    let err = within(client.connect_timeout(&impostor_target, Duration::from_secs(15)))
        .await
        .expect_err("must fail");
    assert!(err.is_identity_mismatch(), "{err}");
    assert!(
        matches!(err, ConnectError::Failed { .. }),
        "failed, not timed out: {err}"
    );
    assert!(err.to_string().contains("identity mismatch"), "{err}");
    assert!(
        err.to_string().contains(&server.node_id().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn a_wrong_node_on_the_first_address_moves_the_race_on() {
    // The overlapping-private-range case: the first advertised address now leads
    // to another reach node; the second is the right one.
    let (wrong, right, client) = (endpoint(9).await, endpoint(10).await, endpoint(11).await);
    let mut direct = wrong.advertised().to_vec();
    direct.extend_from_slice(&right.advertised());
    let target = VirtualAddr::new(right.node_id(), 3).with_direct(direct);
    let right_addr = right.advertised()[0];
    let echo = echo_once(right);
    let (back, info) = round_trip(&client, &target, b"right one").await;
    assert_eq!(back, b"right one");
    assert_eq!(info.remote_addr, right_addr);
    within(echo).await.expect("echo");
    drop(wrong);
}

#[tokio::test]
async fn garbage_and_truncated_clients_do_not_stop_the_listener() {
    let (server, client) = (endpoint(12).await, endpoint(13).await);
    let addr = server.advertised()[0];
    // Garbage bytes: not a reach hello.
    let mut junk = TcpStream::connect(addr).await.expect("connect");
    junk.write_all(&[0x42; 100]).await.expect("write");
    let mut sink = Vec::new();
    // The listener closes on us: a clean close, or a reset since it left our
    // unread bytes behind. Either way it does not hang.
    match within(junk.read_to_end(&mut sink)).await {
        Ok(_) => assert!(sink.is_empty(), "no reply to non-reach bytes"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    // A truncated hello: right magic and version, then the connection ends.
    let mut short = TcpStream::connect(addr).await.expect("connect");
    short.write_all(b"rch\x01\x00").await.expect("write");
    short.shutdown().await.expect("shutdown");
    // A client that connects and says nothing stays pending without blocking others.
    let _idle = TcpStream::connect(addr).await.expect("connect");
    let target = server.virtual_addr(5);
    let echo = echo_once(server);
    let (back, _) = round_trip(&client, &target, b"still serving").await;
    assert_eq!(back, b"still serving");
    within(echo).await.expect("echo");
}

#[tokio::test]
async fn a_port_nobody_accepts_is_refused_by_the_node() {
    let server = builder(14)
        .accept_ports(vec![80])
        .bind()
        .await
        .expect("bind");
    let client = endpoint(15).await;
    let err = within(client.connect(&server.virtual_addr(81)))
        .await
        .expect_err("refused");
    assert!(matches!(err, ConnectError::Refused { .. }), "{err}");
    assert!(
        err.to_string().contains("no service on that virtual port"),
        "{err}"
    );
}

#[tokio::test]
async fn a_silent_listener_times_out_within_the_connect_timeout() {
    // A TCP listener that completes the TCP handshake (kernel backlog) but never
    // answers the reach hello.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = endpoint(16).await;
    let target = VirtualAddr::new(SecretKey::from_seed([17; 32]).node_id(), 1)
        .with_direct(vec![silent.local_addr().expect("addr")]);
    let err = within(client.connect_timeout(&target, Duration::from_millis(300)))
        .await
        .expect_err("timeout");
    assert!(matches!(err, ConnectError::TimedOut { .. }), "{err}");
}

#[tokio::test]
async fn closed_ports_fail_with_the_os_error_for_each_address() {
    let client = endpoint(18).await;
    let closed: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let target =
        VirtualAddr::new(SecretKey::from_seed([19; 32]).node_id(), 1).with_direct(vec![closed]);
    let err = within(client.connect(&target)).await.expect_err("refused");
    assert!(matches!(err, ConnectError::Failed { .. }), "{err}");
    assert!(err.to_string().contains(&closed.to_string()), "{err}");
    let no_hints = VirtualAddr::new(SecretKey::from_seed([19; 32]).node_id(), 1);
    assert!(matches!(
        client.connect(&no_hints).await,
        Err(ConnectError::NoAddresses { .. })
    ));
}

#[tokio::test]
async fn port_range_takes_the_first_free_port() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = probe.local_addr().expect("addr").port();
    drop(probe);
    // Hold `base` so the endpoint must move on to a later port in the range.
    let holder = std::net::TcpListener::bind(("127.0.0.1", base)).ok();
    let ep = builder(20)
        .listen_ports(ListenPorts::Range(base, base.saturating_add(20)))
        .bind()
        .await
        .expect("bind in range");
    let port = ep.local_addr().port();
    assert!((base..=base.saturating_add(20)).contains(&port));
    if holder.is_some() {
        assert_ne!(port, base);
    }
    let bad = builder(20)
        .listen_ports(ListenPorts::Range(10, 5))
        .bind()
        .await;
    assert!(matches!(
        bad,
        Err(reach::EndpointError::BadPortRange(10, 5))
    ));
}

#[tokio::test]
async fn the_address_that_answered_last_time_goes_first() {
    // The target advertises a silent address first (it accepts TCP but never
    // answers the hello, like a path a firewall half-blocks), then its real one.
    // The first connection waits out the attempt delay on the silent one;
    // the second goes straight to the address that answered.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let knocks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let held = {
        let knocks = knocks.clone();
        tokio::spawn(async move {
            let mut keep = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                knocks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                keep.push(s);
            }
        })
    };
    let server = endpoint(40).await;
    let real = server.local_addr();
    let target = VirtualAddr::new(server.node_id(), 1).with_direct(vec![silent_addr, real]);
    let server = std::sync::Arc::new(server);
    let serving = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut streams = Vec::new();
            while let Ok(s) = server.accept().await {
                streams.push(s);
            }
        })
    };
    // The cache lives in the state directory, so a second endpoint (a new
    // process, say) knows what the first learned.
    let state = tempfile::tempdir().expect("tempdir");
    let client = builder(41)
        .state_dir(state.path())
        .attempt_delay(Duration::from_millis(500))
        .bind()
        .await
        .expect("bind");
    let first = within(client.connect(&target)).await.expect("first");
    assert_eq!(first.info().remote_addr, real);
    assert_eq!(
        knocks.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "tried the silent one first"
    );
    // A long attempt delay: the real address must win without the silent
    // one being tried, however loaded the machine.
    let client = builder(41)
        .state_dir(state.path())
        .attempt_delay(Duration::from_secs(10))
        .bind()
        .await
        .expect("bind");
    let second = within(client.connect(&target)).await.expect("second");
    assert_eq!(second.info().remote_addr, real);
    assert_eq!(
        knocks.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the second connection must not knock on the silent address"
    );
    held.abort();
    serving.abort();
}

#[tokio::test]
async fn hub_failures_are_typed_by_cause() {
    use reach::{HubError, HubTarget};
    let a = endpoint(60).await;
    // No hub named, none configured.
    assert!(matches!(a.query_hub(None).await, Err(HubError::NoHub)));
    // Nothing listens there: the hub's identity cannot be learned.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let nowhere = HubTarget {
        id: None,
        host: "127.0.0.1".into(),
        port,
    };
    let err = within(a.dial_hub(&nowhere))
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, HubError::UnknownIdentity { .. }), "{err}");
    // A hub (it reveals itself) that is not the hub named: the key changed.
    let other = builder(61)
        .reveal_identity(true)
        .bind()
        .await
        .expect("bind");
    let impostor = HubTarget {
        id: Some(SecretKey::from_seed([62; 32]).node_id()),
        host: "127.0.0.1".into(),
        port: other.local_addr().port(),
    };
    let err = within(a.dial_hub(&impostor)).await.expect_err("wrong hub");
    assert!(
        matches!(
            err,
            HubError::Connect {
                key_changed: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("the hub's key changed?"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_connect_back_that_never_comes_times_out_as_such() {
    let a = endpoint(63).await;
    let node = SecretKey::from_seed([64; 32]).node_id();
    let wait = a.expect_connect_back(node, 7).expect("not yet awaited");
    assert!(a.expect_connect_back(node, 7).is_none(), "awaited once");
    let err = wait.wait(Duration::from_secs(4)).await.expect_err("nobody");
    assert!(matches!(err, reach::ConnectBackError::TimedOut(d) if d == Duration::from_secs(4)));
}
