//! Trust on real loopback sockets: the access policy, key confirmation
//! against replayed hellos, and what a stranger learns.

use std::time::Duration;

use reach::proto::handshake::{
    Initiator, InitiatorOptions, ReplyHeader, ReplyKind, CONFIRM_LEN, REPLY_HEADER_LEN,
};
use reach::{AccessPolicy, Endpoint, HubError, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A hand-made initiator's options: encrypted, no network secret.
const OPTS: InitiatorOptions = InitiatorOptions::ENCRYPTED;

/// Every wait in these tests is bounded by this.
const DEADLINE: Duration = Duration::from_secs(20);

fn builder(seed: u8) -> reach::EndpointBuilder {
    Endpoint::builder()
        .secret_key(SecretKey::from_seed([seed; 32]))
        .bind_ip("127.0.0.1".parse().expect("ip"))
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("deadline passed")
}

#[tokio::test]
async fn only_allowed_nodes_and_members_open_streams_and_refusals_are_counted() {
    let friend = builder(2).bind().await.expect("bind");
    let server = builder(1)
        .policy(
            AccessPolicy::nobody()
                .allow(friend.node_id())
                .allow_members(true),
        )
        .network_secret(b"sesame".to_vec())
        .bind()
        .await
        .expect("bind");
    let stranger = builder(3).bind().await.expect("bind");
    let member = builder(4)
        .network_secret(b"sesame".to_vec())
        .bind()
        .await
        .expect("bind");
    let wrong_secret = builder(5)
        .network_secret(b"guess".to_vec())
        .bind()
        .await
        .expect("bind");
    let target = server.virtual_addr(1);
    for (who, admitted) in [
        (&friend, true),
        (&stranger, false),
        (&member, true),
        (&wrong_secret, false),
    ] {
        let got = within(who.connect(&target)).await;
        match (got, admitted) {
            (Ok(mut s), true) => {
                s.write_all(b"hi").await.expect("write");
                let mut inbound = within(server.accept()).await.expect("accept");
                assert_eq!(inbound.peer(), who.node_id());
                assert_eq!(
                    inbound.info().peer_member,
                    who.node_id() == member.node_id()
                );
                let mut buf = [0u8; 2];
                inbound.read_exact(&mut buf).await.expect("read");
            }
            (Err(e), false) => {
                assert!(e.to_string().contains("policy does not admit"), "{e}")
            }
            (got, _) => panic!("{}: admitted {admitted}, got {got:?}", who.node_id()),
        }
    }
    assert_eq!(server.counters().refused_by_policy, 2);
}

/// Reads a whole handshake reply (header and body) from `tcp`.
async fn read_reply(tcp: &mut TcpStream) -> (ReplyHeader, Vec<u8>) {
    let mut h = [0u8; REPLY_HEADER_LEN];
    tcp.read_exact(&mut h).await.expect("reply header");
    let header = ReplyHeader::decode(&h).expect("decodes");
    let mut body = vec![0u8; header.len];
    tcp.read_exact(&mut body).await.expect("reply body");
    (header, body)
}

#[tokio::test]
async fn a_replayed_hello_yields_no_stream() {
    let server = builder(10).bind().await.expect("bind");
    let client = SecretKey::from_seed([11; 32]);
    let addr = server.local_addr();
    let opts = OPTS;
    // A whole handshake by hand: returns what went on the wire.
    let (key, server_id) = (&client, server.node_id());
    let handshake = move |port: u16, seed: u8| async move {
        let (init, hello) = Initiator::new(key, server_id, port, opts, [seed; 32]).expect("init");
        let mut tcp = within(TcpStream::connect(addr)).await.expect("connect");
        tcp.write_all(&hello).await.expect("hello");
        let (header, body) = within(read_reply(&mut tcp)).await;
        let (_, confirmation) = init.handle_reply(header, &body).expect("established");
        tcp.write_all(&confirmation).await.expect("confirm");
        (tcp, hello, confirmation)
    };
    // The original stream, recorded as an on-path attacker sees it.
    let (_tcp, hello, confirmation) = handshake(1, 7).await;
    let first = within(server.accept()).await.expect("the real stream");
    assert_eq!(first.peer(), client.node_id());
    // The replay: the same hello and the confirmation seen on the wire.
    let mut replay = within(TcpStream::connect(addr)).await.expect("connect");
    replay.write_all(&hello).await.expect("hello");
    let (header, _) = within(read_reply(&mut replay)).await;
    assert_eq!(
        header.kind,
        ReplyKind::Accept,
        "msg1 alone checks out again"
    );
    replay.write_all(&confirmation).await.expect("confirm");
    let mut rest = Vec::new();
    let n = within(replay.read_to_end(&mut rest)).await.unwrap_or(0);
    assert_eq!(n, 0, "the listener closes the replayed connection");
    assert_eq!(server.counters().not_confirmed, 1);
    // The accept queue is in order: had the replay made a stream, it would
    // come before this one.
    let (_tcp, _, confirmation) = handshake(3, 8).await;
    let next = within(server.accept()).await.expect("the next stream");
    assert_eq!(next.info().virtual_port, 3);
    assert_eq!(confirmation.len(), CONFIRM_LEN);
}

#[tokio::test]
async fn a_hello_for_another_node_learns_nothing_but_a_hub_tells_who_it_is() {
    let node = builder(20).bind().await.expect("bind");
    let probe = SecretKey::from_seed([21; 32]);
    let hello_to = |target| {
        Initiator::new(&probe, target, 0, OPTS, [9; 32])
            .expect("init")
            .1
    };
    let mut tcp = within(TcpStream::connect(node.local_addr()))
        .await
        .expect("connect");
    tcp.write_all(&hello_to(probe.node_id()))
        .await
        .expect("hello");
    let (header, body) = within(read_reply(&mut tcp)).await;
    assert_eq!(header.kind, ReplyKind::Failed);
    assert!(body.is_empty());
    // The hub path: a node learns a hub's identity on first contact.
    let hub = builder(22)
        .reveal_identity(true)
        .bind()
        .await
        .expect("bind");
    let target = reach::HubTarget {
        id: None,
        host: "127.0.0.1".into(),
        port: hub.local_addr().port(),
    };
    let asker = builder(23).bind().await.expect("bind");
    let link = within(asker.dial_hub(&target)).await.expect("learned");
    assert_eq!(link.peer(), hub.node_id());
    let hidden = reach::HubTarget {
        port: node.local_addr().port(),
        ..target
    };
    let err = within(asker.dial_hub(&hidden)).await.expect_err("hidden");
    assert!(matches!(err, HubError::UnknownIdentity { .. }), "{err}");
}

/// A TCP connection from `source` to `to` that sends nothing.
async fn idle_from(source: &str, to: std::net::SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{source}:0").parse().expect("addr"))
        .expect("bind");
    sock.connect(to).await.expect("connect")
}

/// Waits until `f` holds, checking after each scheduler turn; panics at the
/// deadline.
async fn until(mut f: impl FnMut() -> bool) {
    within(async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_thousand_idle_connections_do_not_keep_a_real_peer_out() {
    let server = builder(30).bind().await.expect("bind");
    let to = server.local_addr();
    let mut idle = Vec::new();
    // One host: it gets its share of handshake slots, the rest is closed.
    for _ in 0..500 {
        idle.push(idle_from("127.0.0.2", to).await);
    }
    // Fifty hosts, each within its share: together they overflow the
    // table, and the oldest unfinished handshakes are cut.
    for i in 0..500 {
        idle.push(idle_from(&format!("127.0.1.{}", 1 + i % 50), to).await);
    }
    let per_source = reach::DEFAULT_MAX_HANDSHAKES_PER_SOURCE as u64;
    let total = reach::DEFAULT_MAX_HANDSHAKES as u64;
    let refused = 500 - per_source;
    let evicted = per_source + 500 - total;
    until(|| {
        let c = server.counters();
        c.handshakes_refused_per_source == refused && c.handshakes_evicted == evicted
    })
    .await;
    // A real peer, from another address, connects within 2 s.
    let client = builder(31).bind().await.expect("bind");
    let mut s = within(client.connect_timeout(&server.virtual_addr(1), Duration::from_secs(2)))
        .await
        .expect("a real peer gets in");
    s.write_all(b"in").await.expect("write");
    let inbound = within(server.accept()).await.expect("accept");
    assert_eq!(inbound.peer(), client.node_id());
    assert_eq!(server.counters().handshakes_evicted, evicted + 1);
    drop(idle);
}

/// Opens a stream from `client` to `server` and returns how each side saw
/// it: (resumed at the client, resumed at the server, members).
async fn resumed_both_sides(client: &Endpoint, server: &Endpoint) -> (bool, bool, bool) {
    let target = server.virtual_addr(1);
    let (out, inn) = within(async { tokio::join!(client.connect(&target), server.accept()) }).await;
    let (mut out, mut inn) = (out.expect("connect"), inn.expect("accept"));
    // The stream works whichever handshake made it.
    out.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    within(inn.read_exact(&mut b)).await.expect("read");
    assert_eq!(&b, b"ping");
    (
        out.info().resumed,
        inn.info().resumed,
        out.info().peer_member && inn.info().peer_member,
    )
}

#[tokio::test]
async fn nodes_that_met_resume_and_a_restarted_peer_makes_them_start_over() {
    let net = b"sesame".to_vec();
    let server = builder(1)
        .network_secret(net.clone())
        .bind()
        .await
        .expect("bind");
    let client = builder(2)
        .network_secret(net.clone())
        .bind()
        .await
        .expect("bind");
    // First contact: a full handshake, which leaves the client a ticket.
    assert_eq!(
        resumed_both_sides(&client, &server).await,
        (false, false, true)
    );
    // From then on: resumed, and membership carries over.
    for _ in 0..3 {
        assert_eq!(
            resumed_both_sides(&client, &server).await,
            (true, true, true)
        );
    }
    assert_eq!(server.counters().tickets_refused, 0);
    // The server restarts (same identity, new ticket key): the ticket is
    // refused, the handshake falls back to a full one on the same
    // connection, and the next one resumes again.
    server.close(DEADLINE).await;
    drop(server);
    let server = builder(1).network_secret(net).bind().await.expect("rebind");
    assert_eq!(
        resumed_both_sides(&client, &server).await,
        (false, false, true)
    );
    assert_eq!(server.counters().tickets_refused, 1);
    assert_eq!(
        resumed_both_sides(&client, &server).await,
        (true, true, true)
    );
}

#[tokio::test]
async fn a_resumed_handshake_is_admitted_afresh_and_resumption_can_be_off() {
    let client = builder(2).bind().await.expect("bind");
    // A server that admits the client issues it a ticket...
    let open = builder(1).bind().await.expect("bind");
    assert_eq!(
        resumed_both_sides(&client, &open).await,
        (false, false, false)
    );
    assert_eq!(
        resumed_both_sides(&client, &open).await,
        (true, true, false)
    );
    // ...and one that does not resume issues none: every handshake is full.
    let strict = builder(3).resumption(false).bind().await.expect("bind");
    for _ in 0..2 {
        assert_eq!(
            resumed_both_sides(&client, &strict).await,
            (false, false, false)
        );
    }
    // A client that does not resume never offers a ticket.
    let fresh = builder(4).resumption(false).bind().await.expect("bind");
    for _ in 0..2 {
        assert_eq!(
            resumed_both_sides(&fresh, &open).await,
            (false, false, false)
        );
    }
}

#[tokio::test]
async fn a_later_process_with_the_same_state_dir_resumes_where_an_earlier_one_left() {
    let state = tempfile::tempdir().expect("tempdir");
    let server = builder(1).bind().await.expect("bind");
    let process = || async {
        Endpoint::builder()
            .state_dir(state.path())
            .bind_ip("127.0.0.1".parse().expect("ip"))
            .bind()
            .await
            .expect("bind")
    };
    // A first process meets the server: a full handshake; the ticket goes
    // to STATE_DIR/tickets, readable by its owner only.
    let first = process().await;
    assert_eq!(
        resumed_both_sides(&first, &server).await,
        (false, false, false)
    );
    first.close(DEADLINE).await;
    drop(first);
    let file = state
        .path()
        .join("tickets")
        .join(server.node_id().to_string());
    let mode = std::fs::metadata(&file).expect("ticket file").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // The next process (same identity, from the state directory) resumes.
    let second = process().await;
    assert_eq!(
        resumed_both_sides(&second, &server).await,
        (true, true, false)
    );
    // A ticket file that is not one is nothing held, and goes.
    std::fs::write(&file, "garbage").expect("write");
    let third = process().await;
    assert_eq!(
        resumed_both_sides(&third, &server).await,
        (false, false, false)
    );
    assert!(std::fs::read_to_string(&file)
        .expect("rewritten")
        .starts_with("reach-ticket-v1 "));
}
