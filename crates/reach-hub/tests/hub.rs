//! Hubs and nodes on loopback: attach, directory, the Reverse and Routed
//! modules, the setup driver's cache, federation, restarts and admission.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach::{
    keystore, ConnectError, Endpoint, EndpointBuilder, HubTarget, ModuleError, ReachStream,
    SetupModule, VirtualAddr,
};
use reach_hub::{Hub, HubConfig, Peer, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LOOPBACK: &str = "127.0.0.1";
const DEADLINE: Duration = Duration::from_secs(20);

fn builder() -> EndpointBuilder {
    Endpoint::builder()
        .secret_key(keystore::generate().expect("key"))
        .bind_ip(LOOPBACK.parse().expect("ip"))
}

async fn hub_with(config: HubConfig) -> Hub {
    Hub::start(builder(), config).await.expect("hub")
}

async fn hub() -> Hub {
    hub_with(HubConfig::default()).await
}

/// A hub of a test federation: open to nodes, linking with hubs that prove
/// the federation's hub secret.
fn federated() -> HubConfig {
    HubConfig {
        policy: Policy {
            open: true,
            hub_secret: Some(b"the test federation's hub secret".to_vec()),
            ..Policy::default()
        },
        ..HubConfig::default()
    }
}

/// An address that accepts TCP connections and never answers on them (the
/// connections are held until the test's runtime ends).
async fn tarpit() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            held.push(c);
        }
    });
    (addr, task)
}

fn target_of(hub: &Hub) -> HubTarget {
    hub.target(hub.local_addr())
}

/// A node attached to `hub`, registered.
async fn node(hub: &HubTarget, b: EndpointBuilder) -> Endpoint {
    let ep = b.hub(hub.clone()).bind().await.expect("node");
    ep.wait_hub(DEADLINE).await.expect("registered");
    ep
}

/// Serves an echo on every accepted stream: reads to the end, writes it back.
fn echo(ep: Arc<Endpoint>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(mut s) = ep.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    })
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn round_trip(s: &mut ReachStream, data: &[u8]) {
    round_trip_rest(s, data, data).await;
}

/// A loopback address nobody listens on (connections are refused at once).
async fn dead_port() -> SocketAddr {
    let closed = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    closed.local_addr().expect("addr")
}

/// Where `s` settles: the module whose connection it moved onto in the
/// background (a cached Reverse or Splice may carry the first bytes routed
/// while it connects), else the one that made it.
async fn settled(s: &ReachStream) -> SetupModule {
    let moved = tokio::time::timeout(DEADLINE, s.upgrade_learned())
        .await
        .expect("the stream settles in time");
    moved.map_or(s.info().module, |u| u.module)
}

/// Only the NodeId and port: the hub's directory supplies the rest.
fn by_id(ep: &Endpoint, port: u16) -> VirtualAddr {
    VirtualAddr::new(ep.node_id(), port)
}

#[tokio::test]
async fn a_routed_stream_carries_data_both_ways() {
    let hub = hub().await;
    let t = target_of(&hub);
    let b = Arc::new(node(&t, builder()).await);
    let _echo = echo(b.clone());
    // Through the hub's core all the way: no circuit.
    let a = node(
        &t,
        builder().modules(vec![SetupModule::Routed]).circuits(false),
    )
    .await;
    let mut s = a.connect(&by_id(&b, 7)).await.expect("routed connect");
    assert_eq!(s.info().module, SetupModule::Routed);
    assert_eq!(s.peer(), b.node_id());
    round_trip(&mut s, &pattern(3 << 20, 1)).await;
    assert_eq!(a.cached_module(&b.node_id()), Some(SetupModule::Routed));
    let status = hub.status();
    assert_eq!(status.nodes.len(), 2);
    assert!(status.counters.bytes_relayed >= 6 << 20);
}

#[tokio::test]
async fn reverse_connects_back_and_both_sides_say_so() {
    let hub = hub().await;
    let t = target_of(&hub);
    let b = node(&t, builder()).await;
    let a = node(&t, builder().modules(vec![SetupModule::Reverse])).await;
    let target = by_id(&b, 9);
    let (client, server) = tokio::join!(a.connect(&target), b.accept());
    let (mut client, mut server) = (client.expect("reverse"), server.expect("accept"));
    assert_eq!(client.info().module, SetupModule::Reverse);
    assert_eq!(server.info().module, SetupModule::Reverse);
    assert_eq!(client.info().virtual_port, 9);
    assert_eq!(server.info().virtual_port, 9);
    assert_eq!(server.peer(), a.node_id());
    assert_eq!(client.info().direction, reach::Direction::Outbound);
    assert_eq!(server.info().direction, reach::Direction::Inbound);
    client.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn the_driver_falls_back_and_caches_the_module_that_worked() {
    // B advertises a port nobody listens on: Direct fails at once (refused),
    // Reverse works; the next connection goes straight to Reverse.
    let dead = dead_port().await;
    let hub = hub().await;
    let t = target_of(&hub);
    let b = Arc::new(node(&t, builder().advertise(vec![dead])).await);
    let _echo = echo(b.clone());
    let a = node(&t, builder()).await;
    let mut s = a.connect(&by_id(&b, 1)).await.expect("connect");
    assert_eq!(s.info().module, SetupModule::Reverse);
    round_trip(&mut s, b"first").await;
    assert_eq!(a.cached_module(&b.node_id()), Some(SetupModule::Reverse));
    let mut s = a.connect(&by_id(&b, 1)).await.expect("connect again");
    assert_eq!(settled(&s).await, SetupModule::Reverse);
    assert!(s.info().failed_before.is_empty(), "{:?}", s.info());
    round_trip(&mut s, b"second").await;
}

#[tokio::test]
async fn splice_connects_a_connect_only_node_and_both_sides_say_so() {
    let hub = hub().await;
    let t = target_of(&hub);
    let b = node(&t, builder()).await;
    // Connect-only, so not in the directory: the answer finds its way back
    // by the path the offer took.
    let a = node(
        &t,
        builder()
            .accept_ports(vec![])
            .modules(vec![SetupModule::Splice]),
    )
    .await;
    let target = by_id(&b, 5);
    let (client, server) = tokio::join!(a.connect(&target), b.accept());
    let (mut client, mut server) = (client.expect("splice"), server.expect("accept"));
    for s in [&client, &server] {
        assert_eq!(s.info().module, SetupModule::Splice);
        assert_eq!(s.info().virtual_port, 5);
        assert!(s.info().remote_addr.ip().is_loopback());
    }
    assert_eq!(server.peer(), a.node_id());
    assert_eq!(client.info().direction, reach::Direction::Outbound);
    assert_eq!(server.info().direction, reach::Direction::Inbound);
    client.write_all(b"spliced").await.expect("write");
    let mut buf = [0u8; 7];
    server.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"spliced");
    assert_eq!(a.cached_module(&b.node_id()), Some(SetupModule::Splice));
    assert_eq!(hub.status().counters.relayed_messages, 2);
}

#[tokio::test]
async fn splice_to_a_port_not_served_or_without_echoes_fails_fast_with_the_reason() {
    let hub = hub().await;
    let t = target_of(&hub);
    let b = node(&t, builder().accept_ports(vec![1])).await;
    let a = node(&t, builder().modules(vec![SetupModule::Splice])).await;
    let started = Instant::now();
    let err = a
        .connect(&by_id(&b, 2))
        .await
        .expect_err("port 2 is not served");
    match only_module_error(&err) {
        ModuleError::Declined(reason) => {
            assert_eq!(reason, "no service on virtual port 2")
        }
        other => panic!("expected the node's refusal, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1), "{err}");
    let quiet = hub_with(HubConfig {
        echo_ports: vec![],
        ..HubConfig::default()
    })
    .await;
    let t = target_of(&quiet);
    let b = node(&t, builder()).await;
    let a = node(&t, builder().modules(vec![SetupModule::Splice])).await;
    let err = a.connect(&by_id(&b, 1)).await.expect_err("no echo");
    assert!(
        matches!(
            only_module_error(&err),
            ModuleError::Echo(reach::EchoError::NoEcho)
        ),
        "{err}"
    );
}

/// The error of the one module a connect ran.
fn only_module_error(err: &ConnectError) -> &ModuleError {
    match err {
        ConnectError::Unreachable { modules, .. } if modules.len() == 1 => &modules[0].error,
        other => panic!("expected one failed module, got {other:?}"),
    }
}

/// Writes `data` in two halves, waiting between them until the background
/// upgrade settles (moved, when `expect_move`), then reads the echo back.
async fn echo_across_a_move(s: &mut ReachStream, data: &[u8], expect_move: bool) {
    let (first, second) = data.split_at(data.len() / 2);
    s.write_all(first).await.expect("write first half");
    s.flush().await.expect("flush");
    let moved = tokio::time::timeout(DEADLINE, s.upgrade_settled())
        .await
        .expect("the upgrade settles in time");
    assert_eq!(moved.is_some(), expect_move, "{moved:?}");
    round_trip_rest(s, second, data).await;
}

/// Writes `rest`, ends the stream and checks that `all` comes back.
async fn round_trip_rest(s: &mut ReachStream, rest: &[u8], all: &[u8]) {
    s.write_all(rest).await.expect("write");
    s.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    assert!(
        back == all,
        "echo differs ({} vs {} bytes)",
        back.len(),
        all.len()
    );
}

#[tokio::test]
async fn a_routed_stream_moves_to_a_direct_reverse_or_spliced_connection_mid_stream_in_order() {
    for module in [
        SetupModule::Direct,
        SetupModule::Reverse,
        SetupModule::Splice,
    ] {
        let hub = hub().await;
        let t = target_of(&hub);
        let b = Arc::new(node(&t, builder()).await);
        let _echo = echo(b.clone());
        let a = node(&t, builder().modules(vec![SetupModule::Routed, module])).await;
        let mut s = a.connect(&by_id(&b, 3)).await.expect("connect");
        assert_eq!(s.info().module, SetupModule::Routed);
        // The endpoint lists the stream: routed through its hub, for now.
        let live = a.streams();
        assert_eq!(live.len(), 1, "{live:?}");
        assert_eq!(live[0].info.module, SetupModule::Routed);
        assert_eq!(live[0].via, vec![s.info().remote_addr], "its hub");
        let data = pattern(8 << 20, 5);
        echo_across_a_move(&mut s, &data, true).await;
        let moved = s.upgraded().expect("moved");
        assert_eq!(moved.module, module);
        assert!(moved.remote_addr.ip().is_loopback());
        // Listed now as moved, with the hub its routed path crossed, the
        // kernel's round trip on the new connection and every byte both
        // ways.
        let live = a.streams();
        assert_eq!(live.len(), 1, "{live:?}");
        let l = &live[0];
        assert_eq!(l.info.module, SetupModule::Routed, "first module kept");
        assert_eq!(l.moved.as_ref().map(|m| m.module), Some(module));
        assert_eq!(
            l.via,
            vec![s.info().remote_addr],
            "its hub, before the move"
        );
        assert!(l.rtt.is_some_and(|r| r < DEADLINE), "{:?}", l.rtt);
        assert_eq!(
            (l.bytes_out, l.bytes_in),
            (data.len() as u64, data.len() as u64)
        );
        drop(s);
        assert!(a.streams().is_empty(), "an ended stream leaves the list");
        // The second half went the new way: the hub relayed less than all.
        let sent = moved.sent_routed.expect("the write direction moved");
        assert!(sent < data.len() as u64, "{module}: {sent}");
        assert!(hub.status().counters.bytes_relayed < 2 * data.len() as u64);
    }
}

#[tokio::test]
async fn a_routed_stream_from_the_cache_is_offered_an_upgrade_and_the_cache_learns() {
    let hub = hub().await;
    let t = target_of(&hub);
    let b = Arc::new(node(&t, builder()).await);
    let _echo = echo(b.clone());
    // An earlier run of this node cached Routed for b (its direct path was
    // down then, say); the default module order has Direct and Splice first.
    let state = tempfile::tempdir().expect("tempdir");
    let modules = state.path().join("modules");
    std::fs::create_dir_all(&modules).expect("dir");
    std::fs::write(modules.join(b.node_id().to_string()), "routed -\n").expect("seed");
    let a = node(&t, builder().state_dir(state.path())).await;
    let mut s = a.connect(&by_id(&b, 3)).await.expect("connect");
    assert_eq!(s.info().module, SetupModule::Routed, "the cache goes first");
    let data = pattern(2 << 20, 3);
    echo_across_a_move(&mut s, &data, true).await;
    let moved = s.upgraded().expect("moved").module;
    assert_eq!(
        a.cached_module(&b.node_id()),
        Some(moved),
        "next time: {moved}"
    );
    let mut again = a.connect(&by_id(&b, 3)).await.expect("connect again");
    assert_eq!(settled(&again).await, moved);
    round_trip(&mut again, b"straight there").await;
}

#[tokio::test]
async fn a_first_connection_flows_routed_at_once_and_settles_on_the_better_path() {
    // B advertises an address that takes TCP connections and never answers
    // a handshake, so Direct waits out its whole budget there; Reverse
    // works. The sequential driver took the budget before Reverse.
    let (tarpit_addr, _held) = tarpit().await;
    let hub = hub().await;
    let t = target_of(&hub);
    let b = Arc::new(node(&t, builder().advertise(vec![tarpit_addr])).await);
    let _echo = echo(b.clone());
    // The default order: Direct, Reverse, Splice, Routed; nothing cached.
    let a = node(&t, builder()).await;
    let mut s = a.connect(&by_id(&b, 3)).await.expect("connect");
    assert_eq!(
        s.info().module,
        SetupModule::Routed,
        "data flows routed first"
    );
    assert!(
        s.info().setup_time < reach::DEFAULT_DIRECT_BUDGET,
        "Direct's budget was waited out: {:?}",
        s.info().setup_time
    );
    assert_eq!(
        a.cached_module(&b.node_id()),
        None,
        "the cache waits for where the stream settles"
    );
    let data = pattern(4 << 20, 11);
    echo_across_a_move(&mut s, &data, true).await;
    assert_eq!(s.upgraded().expect("moved").module, SetupModule::Reverse);
    assert_eq!(a.cached_module(&b.node_id()), Some(SetupModule::Reverse));
    // The next connection goes there at once.
    let mut again = a.connect(&by_id(&b, 3)).await.expect("connect again");
    assert_eq!(settled(&again).await, SetupModule::Reverse);
    round_trip(&mut again, b"straight there").await;
}

#[tokio::test]
async fn a_routed_stream_moves_onto_a_relay_circuit_that_the_hub_splices() {
    let hub = hub().await;
    let t = target_of(&hub);
    let b = Arc::new(node(&t, builder()).await);
    let _echo = echo(b.clone());
    // Routed only: no direct path is tried, the circuit is the upgrade.
    let a = node(&t, builder().modules(vec![SetupModule::Routed])).await;
    let mut s = a.connect(&by_id(&b, 3)).await.expect("connect");
    assert_eq!(s.info().module, SetupModule::Routed);
    let data = pattern(16 << 20, 7);
    echo_across_a_move(&mut s, &data, true).await;
    let moved = s.upgraded().expect("moved");
    assert_eq!(moved.module, SetupModule::Routed, "still through the hub");
    assert_eq!(moved.remote_addr, hub.local_addr());
    let live = a.streams();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(
        live[0].moved.as_ref().map(|m| m.remote_addr),
        Some(hub.local_addr())
    );
    assert_eq!(
        live[0].via,
        vec![hub.local_addr()],
        "routed through it first"
    );
    let sent = moved.sent_routed.expect("the write direction moved");
    assert!(sent < data.len() as u64, "{sent}");
    let status = hub.status();
    assert_eq!(status.circuits.counters.paired, 1);
    assert_eq!(status.circuits.counters.refused, 0);
    // The second half and the echo went through the circuit, not the core.
    assert!(status.counters.bytes_relayed < data.len() as u64 * 3 / 2);
    drop(s);
    let released = async {
        while hub.status().circuits.active > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, released)
        .await
        .expect("the circuit ends with the stream");
}

#[tokio::test]
async fn without_circuits_at_the_hub_a_routed_stream_stays_routed_and_intact() {
    let hub = hub_with(HubConfig {
        circuits: None,
        ..HubConfig::default()
    })
    .await;
    let t = target_of(&hub);
    let b = Arc::new(node(&t, builder()).await);
    let _echo = echo(b.clone());
    let a = node(&t, builder().modules(vec![SetupModule::Routed])).await;
    let mut s = a.connect(&by_id(&b, 3)).await.expect("connect");
    let data = pattern(2 << 20, 4);
    echo_across_a_move(&mut s, &data, false).await;
    assert_eq!(hub.status().circuits.counters.paired, 0);
    assert!(hub.status().counters.bytes_relayed >= 2 * data.len() as u64);
}

#[tokio::test]
async fn a_stream_whose_upgrade_fails_stays_routed_and_intact() {
    let dead = dead_port().await;
    // No circuit either: this is about a failed upgrade.
    let hub = hub_with(HubConfig {
        circuits: None,
        ..HubConfig::default()
    })
    .await;
    let t = target_of(&hub);
    let b = Arc::new(node(&t, builder().advertise(vec![dead])).await);
    let _echo = echo(b.clone());
    let a = node(
        &t,
        builder().modules(vec![SetupModule::Routed, SetupModule::Direct]),
    )
    .await;
    let mut s = a.connect(&by_id(&b, 3)).await.expect("connect");
    let data = pattern(2 << 20, 9);
    echo_across_a_move(&mut s, &data, false).await;
    assert!(s.upgraded().is_none());
    assert!(hub.status().counters.bytes_relayed >= 2 * data.len() as u64);
}

#[tokio::test]
async fn an_unknown_node_fails_with_every_module_named() {
    let hub = hub().await;
    let t = target_of(&hub);
    let a = node(&t, builder()).await;
    let nobody = keystore::generate().expect("key").node_id();
    let err = a
        .connect(&VirtualAddr::new(nobody, 1))
        .await
        .expect_err("nobody is there");
    let ConnectError::Unreachable { modules, .. } = &err else {
        panic!("expected every module to fail, got {err:?}");
    };
    let got: Vec<_> = modules.iter().map(|f| (f.module, &f.error)).collect();
    assert!(
        matches!(
            got.as_slice(),
            [
                (
                    SetupModule::Direct,
                    ModuleError::Skipped(reach::proto::setup_plan::Skip::NoDirectAddress)
                ),
                (
                    SetupModule::Reverse,
                    ModuleError::ConnectBack(reach::ConnectBackError::NotDelivered(_))
                ),
                (SetupModule::Splice, ModuleError::Undeliverable(_)),
                (SetupModule::Routed, ModuleError::Handshake(_)),
            ]
        ),
        "{got:?}"
    );
    // One line naming each module.
    let text = err.to_string();
    for module in ["direct:", "reverse:", "splice:", "routed:"] {
        assert!(text.contains(module), "{module:?} missing from: {text}");
    }
    assert!(!text.contains('\n'), "{text}");
}

/// Copies bytes between a client and `to`, recording what the client sends.
async fn sniffer(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let Ok(server) = TcpStream::connect(to).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    record.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
                let _ = sw.shutdown().await;
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_hub_relays_only_ciphertext() {
    // The A-hub link runs in plaintext (both opt in), so a sniffer on it sees
    // the link frames themselves; the A-B stream stays end-to-end encrypted
    // because B does not opt in. The application's bytes must not appear.
    let hub = Hub::start(builder().plaintext(true), HubConfig::default())
        .await
        .expect("hub");
    let (via, seen) = sniffer(hub.local_addr()).await;
    let b = Arc::new(node(&target_of(&hub), builder()).await);
    let _echo = echo(b.clone());
    let a = node(
        &hub.target(via),
        builder().plaintext(true).modules(vec![SetupModule::Routed]),
    )
    .await;
    let secret = b"THE-APPLICATION-PLAINTEXT-MARKER".repeat(2000);
    let mut s = a.connect(&by_id(&b, 5)).await.expect("routed");
    assert!(matches!(s.info().mode, reach::StreamMode::Encrypted(_)));
    round_trip(&mut s, &secret).await;
    let seen = seen.lock().expect("lock").clone();
    assert!(seen.len() > secret.len(), "the sniffer saw the transfer");
    // The link is readable: the Open frame names B in the clear.
    let b_id = b.node_id();
    assert!(
        seen.windows(32).any(|w| w == b_id.as_bytes()),
        "link frames are in the clear"
    );
    assert!(
        !seen
            .windows(26)
            .any(|w| w == b"THE-APPLICATION-PLAINTEXT".as_slice()),
        "application bytes crossed the hub in the clear"
    );
}

#[tokio::test]
async fn hubs_federate_and_route_over_several_hops() {
    // h1 <- h2 <- h3: each hub dials the previous one; A on h1, B on h3.
    // h1 and h3 do not link directly, as if they could not reach each other.
    let no_learning = HubConfig {
        link_learned: false,
        ..federated()
    };
    let h1 = hub_with(no_learning.clone()).await;
    let h2 = hub_with(HubConfig {
        peers: vec![Peer {
            target: target_of(&h1),
            ssh: None,
        }],
        ..no_learning.clone()
    })
    .await;
    let h3 = hub_with(HubConfig {
        peers: vec![Peer {
            target: target_of(&h2),
            ssh: None,
        }],
        ..no_learning
    })
    .await;
    let b = Arc::new(node(&target_of(&h3), builder()).await);
    let _echo = echo(b.clone());
    let a = node(
        &target_of(&h1),
        builder().modules(vec![SetupModule::Routed]),
    )
    .await;
    // Gossip takes a moment: wait until h1 routes to h3 and knows B.
    let start = Instant::now();
    let mut s = loop {
        match a.connect(&by_id(&b, 3)).await {
            Ok(s) => break s,
            Err(e) if start.elapsed() < DEADLINE => {
                tracing::debug!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no route after {DEADLINE:?}: {e}"),
        }
    };
    round_trip(&mut s, &pattern(1 << 20, 3)).await;
    let routes = h1.status().core.routes;
    assert!(routes
        .iter()
        .any(|r| r.hub == h3.id() && r.hops == 2 && r.next_hop == h2.id()));
}

#[tokio::test]
async fn hubs_link_directly_to_hubs_they_learn_about() {
    // h1 <- h2 <- h3 as configured; h3 learns h1's addresses by gossip and
    // dials it, so h1 ends up with a one-hop route to h3.
    let config = HubConfig {
        gossip_interval: Duration::from_millis(200),
        ..federated()
    };
    let h1 = hub_with(config.clone()).await;
    let peer = |h: &Hub| Peer {
        target: target_of(h),
        ssh: None,
    };
    let h2 = hub_with(HubConfig {
        peers: vec![peer(&h1)],
        ..config.clone()
    })
    .await;
    let h3 = hub_with(HubConfig {
        peers: vec![peer(&h2)],
        ..config
    })
    .await;
    let linked = async {
        loop {
            let s = h1.status();
            if s.hubs.iter().any(|l| l.hub == h3.id())
                && s.routes.iter().any(|r| r.hub == h3.id() && r.hops == 1)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(DEADLINE, linked)
        .await
        .expect("h1 and h3 linked directly");
    drop(h2);
}

#[tokio::test]
async fn nodes_re_register_after_a_hub_restart() {
    let key = keystore::generate().expect("key");
    let hub_builder = || {
        Endpoint::builder()
            .secret_key(key.clone())
            .bind_ip(LOOPBACK.parse().expect("ip"))
    };
    let first = Hub::start(hub_builder(), HubConfig::default())
        .await
        .expect("hub");
    let port = first.local_addr().port();
    let t = target_of(&first);
    let b = Arc::new(node(&t, builder()).await);
    let _echo = echo(b.clone());
    let a = node(&t, builder().modules(vec![SetupModule::Routed])).await;
    let mut live = a.connect(&by_id(&b, 1)).await.expect("routed");
    live.write_all(b"before").await.expect("write");
    // A direct stream does not depend on the hub at all.
    let c = node(&t, builder().modules(vec![SetupModule::Direct])).await;
    let mut direct = c.connect(&b.virtual_addr(1)).await.expect("direct");
    assert_eq!(direct.info().module, SetupModule::Direct);
    direct
        .write_all(b"before the restart, ")
        .await
        .expect("write");
    drop(first);
    // The routed stream over the dead hub ends with an error, not a hang.
    let mut buf = Vec::new();
    let ended = tokio::time::timeout(DEADLINE, live.read_to_end(&mut buf))
        .await
        .expect("the stream must not hang");
    assert!(ended.is_err(), "a lost hub is an error, not a clean end");
    let restarted = Instant::now();
    let second = Hub::start(
        hub_builder().listen_ports(reach::ListenPorts::Fixed(port)),
        HubConfig::default(),
    )
    .await
    .expect("hub again");
    for ep in [&a, &*b, &c] {
        ep.wait_hub(Duration::from_secs(5))
            .await
            .expect("re-registered within 5 s");
    }
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "re-registration took {took:?}"
    );
    assert_eq!(second.status().nodes.len(), 3);
    let mut s = a.connect(&by_id(&b, 1)).await.expect("routed again");
    round_trip(&mut s, b"after").await;
    // The direct stream lived on through the hub's death and restart.
    direct.write_all(b"and after").await.expect("write");
    direct.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    tokio::time::timeout(DEADLINE, direct.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(back, b"before the restart, and after");
}

#[tokio::test]
async fn a_node_moves_to_its_fallback_hub_when_its_hub_goes_and_stays_reachable() {
    // h2 links to h1. B attaches to h1 with h2 as its fallback; A is on h2.
    let h1 = hub_with(federated()).await;
    let h2 = hub_with(HubConfig {
        peers: vec![Peer {
            target: target_of(&h1),
            ssh: None,
        }],
        ..federated()
    })
    .await;
    let b = Arc::new(node(&target_of(&h1), builder().fallback_hub(target_of(&h2))).await);
    assert_eq!(b.hub_status().map(|s| s.hub), Some(h1.id()));
    let _echo = echo(b.clone());
    let a = node(
        &target_of(&h2),
        builder().modules(vec![SetupModule::Routed]),
    )
    .await;
    let connect = |why: &'static str| {
        let (a, vaddr) = (&a, by_id(&b, 5));
        async move {
            let start = Instant::now();
            loop {
                match a.connect(&vaddr).await {
                    Ok(s) => return s,
                    Err(e) if start.elapsed() < DEADLINE => {
                        tracing::debug!("not yet: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("{why}: no stream after {DEADLINE:?}: {e}"),
                }
            }
        }
    };
    // Through h2 and h1, once the hubs have gossiped.
    round_trip(&mut connect("across both hubs").await, b"one").await;
    drop(h1);
    let gone = Instant::now();
    let moved = async {
        loop {
            if b.hub_status().is_some_and(|s| s.hub == h2.id()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, moved)
        .await
        .expect("B attached to its fallback hub");
    let took = gone.elapsed();
    assert!(took < Duration::from_secs(5), "the move took {took:?}");
    // Found again by NodeId alone, now through h2.
    round_trip(&mut connect("after the move").await, b"two").await;
}

#[tokio::test]
async fn a_node_whose_first_hub_is_out_of_reach_attaches_to_the_next() {
    let h = hub().await;
    let dead = HubTarget {
        id: None,
        host: LOOPBACK.into(),
        port: dead_port().await.port(),
    };
    let ep = builder()
        .hub(dead)
        .fallback_hub(target_of(&h))
        .bind()
        .await
        .expect("node");
    let status = ep.wait_hub(DEADLINE).await.expect("registered");
    assert_eq!(status.hub, h.id());
}

/// Streams through one hub at the same time.
const CONCURRENT_STREAMS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_routed_streams_through_one_hub() {
    let hub = hub().await;
    let t = target_of(&hub);
    let b = Arc::new(node(&t, builder()).await);
    let _echo = echo(b.clone());
    let a = Arc::new(node(&t, builder().modules(vec![SetupModule::Routed])).await);
    // Every stream opens first; only when all are open does data flow, so
    // all of them are relayed at once.
    let opened = Arc::new(tokio::sync::Barrier::new(CONCURRENT_STREAMS + 1));
    let go = Arc::new(tokio::sync::Barrier::new(CONCURRENT_STREAMS + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONCURRENT_STREAMS {
        let (a, opened, go, target) = (a.clone(), opened.clone(), go.clone(), by_id(&b, 3));
        tasks.spawn(async move {
            let mut s = a.connect(&target).await.expect("routed connect");
            opened.wait().await;
            go.wait().await;
            round_trip(&mut s, &pattern(8 << 10, i as u8)).await;
        });
    }
    tokio::time::timeout(Duration::from_secs(120), opened.wait())
        .await
        .expect("every stream opened");
    let status = hub.status();
    assert_eq!(status.streams, CONCURRENT_STREAMS, "all relayed at once");
    go.wait().await;
    let done = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(r) = tasks.join_next().await {
            r.expect("stream task");
        }
    });
    done.await.expect("every echo within the deadline");
    assert!(hub.status().counters.bytes_relayed >= 2 * CONCURRENT_STREAMS as u64 * (8 << 10));
}

#[tokio::test]
async fn a_slow_reader_does_not_stall_other_streams() {
    let hub = hub().await;
    let t = target_of(&hub);
    let b = Arc::new(node(&t, builder().plaintext(true)).await);
    let a = node(
        &t,
        builder().plaintext(true).modules(vec![SetupModule::Routed]),
    )
    .await;
    // Stream 1: B accepts but never reads.
    let first = by_id(&b, 1);
    let (stuck, stuck_srv) = tokio::join!(a.connect(&first), b.accept());
    let (mut stuck, _held) = (stuck.expect("connect"), stuck_srv.expect("accept"));
    let filler = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        // Writes stop once the window is used up; bounded either way.
        while sent < (64 << 20) {
            match tokio::time::timeout(Duration::from_millis(500), stuck.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break,
            }
        }
        (sent, stuck)
    });
    // Stream 2 moves 8 MiB meanwhile.
    let _echo = echo(b.clone());
    let mut s = a.connect(&by_id(&b, 2)).await.expect("second stream");
    round_trip(&mut s, &pattern(8 << 20, 9)).await;
    let (sent, _stuck) = filler.await.expect("join");
    assert!(
        sent <= 2 << 20,
        "the stuck stream was not held back by its window: {sent} bytes sent"
    );
    // The hub holds at most a window per direction of the stuck stream.
    assert!(hub.status().streams >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delivers_every_routed_byte_before_the_endpoint_goes() {
    let hub = hub().await;
    let t = target_of(&hub);
    let b = node(&t, builder()).await;
    let data = pattern(16 << 20, 5);
    let expected = data.clone();
    let a = node(&t, builder().modules(vec![SetupModule::Routed])).await;
    let target = by_id(&b, 1);
    let (s, accepted) = tokio::join!(a.connect(&target), b.accept());
    let (mut s, mut accepted) = (s.expect("connect"), accepted.expect("accept"));
    let received = tokio::spawn(async move {
        let mut got = Vec::new();
        accepted.read_to_end(&mut got).await.map(|_| got)
    });
    s.write_all(&data).await.expect("write");
    s.shutdown().await.expect("shutdown");
    // What a process does before it exits: close, then drop the endpoint at
    // once (its tasks are aborted). The receiver must still get every byte
    // and then the end, not a reset.
    let a_id = a.node_id();
    a.close(DEADLINE).await;
    // close returns once the hub has read everything and closed its side,
    // so the hub has let the node go by then (over a slow link, exiting any
    // earlier leaves bytes in flight that the hub's kernel drops when this
    // process's socket resets).
    assert!(
        !hub.status().nodes.iter().any(|n| n.node == a_id),
        "close returned before the hub closed the link"
    );
    drop(s);
    drop(a);
    let got = tokio::time::timeout(DEADLINE, received)
        .await
        .expect("the receiver did not finish")
        .expect("join")
        .expect("the stream ended with an error instead of its end");
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the bytes differ");
}

#[tokio::test]
async fn a_dropped_endpoint_leaves_its_hub() {
    let hub = hub_with(HubConfig::default()).await;
    let t = target_of(&hub);
    let kept = node(&t, builder()).await;
    let dropped = node(&t, builder()).await;
    let gone = dropped.node_id();
    assert_eq!(hub.status().nodes.len(), 2);
    drop(dropped);
    // The hub sees the link close and forgets the node; the other stays.
    let left = async {
        while hub.status().nodes.iter().any(|n| n.node == gone) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, left)
        .await
        .expect("the dropped endpoint's hub link stayed open");
    assert_eq!(hub.status().nodes.len(), 1);
    assert_eq!(hub.status().nodes[0].node, kept.node_id());
}

#[tokio::test]
async fn admission_refuses_strangers_and_admits_by_key_or_secret() {
    let friend = keystore::generate().expect("key");
    let hub = hub_with(HubConfig {
        policy: Policy {
            allowed: vec![friend.node_id()],
            network_secret: Some(b"cluster-secret".to_vec()),
            ..Policy::default()
        },
        ..HubConfig::default()
    })
    .await;
    let t = target_of(&hub);
    let _admitted = [
        node(&t, builder().secret_key(friend)).await,
        node(&t, builder().network_secret("cluster-secret")).await,
    ];
    for stranger in [builder(), builder().network_secret("wrong")] {
        let ep = stranger.hub(t.clone()).bind().await.expect("bind");
        let err = ep
            .wait_hub(Duration::from_secs(3))
            .await
            .expect_err("must be refused");
        assert!(err.to_string().contains("refused"), "unclear error: {err}");
    }
    assert_eq!(hub.status().nodes.len(), 2);
    assert!(hub.status().counters.refused >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connect_backs_is_bounded_and_answered_at_once() {
    // A advertises an address that accepts TCP but never answers, so every
    // connect-back B starts hangs until its timeout: B runs a bounded number
    // and refuses the rest at once.
    let (silent_addr, _hold) = tarpit().await;
    let hub = hub().await;
    let t = target_of(&hub);
    let b = node(&t, builder()).await;
    let a = Arc::new(
        node(
            &t,
            builder()
                .advertise(vec![silent_addr])
                .modules(vec![SetupModule::Reverse]),
        )
        .await,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (a, target) = (a.clone(), by_id(&b, 1));
        tasks.spawn(async move { a.connect_timeout(&target, Duration::from_secs(15)).await });
    }
    let mut busy = 0;
    while let Some(r) = tokio::time::timeout(DEADLINE, tasks.join_next())
        .await
        .expect("every request answered")
    {
        let err = r.expect("task").expect_err("nothing can connect back");
        if err.to_string().contains("busy") {
            busy += 1;
        }
    }
    assert_eq!(
        busy, 8,
        "32 connect-backs run at once, the other 8 are refused"
    );
}

#[tokio::test]
async fn the_access_policy_holds_on_every_path_a_stream_can_take() {
    let hub = hub().await;
    let t = target_of(&hub);
    let friend_key = keystore::generate().expect("key");
    let friend_id = friend_key.node_id();
    let b = Arc::new(
        node(
            &t,
            builder().policy(reach::AccessPolicy::nobody().allow(friend_id)),
        )
        .await,
    );
    let _echo = echo(b.clone());
    // Connect-only, so several processes of one identity can attach.
    let with = |module| builder().accept_ports(vec![]).modules(vec![module]);
    let modules = [
        SetupModule::Direct,
        SetupModule::Reverse,
        SetupModule::Splice,
        SetupModule::Routed,
    ];
    for (i, module) in modules.into_iter().enumerate() {
        let stranger = node(&t, with(module)).await;
        let err = stranger
            .connect(&by_id(&b, 1))
            .await
            .expect_err("a stranger is refused");
        assert!(
            err.to_string().contains("does not admit"),
            "{module}: {err}"
        );
        assert_eq!(b.counters().refused_by_policy, i as u64 + 1, "{module}");
        let friend = node(&t, with(module).secret_key(friend_key.clone())).await;
        let mut s = friend
            .connect(&by_id(&b, 1))
            .await
            .unwrap_or_else(|e| panic!("{module}: the friend is admitted: {e}"));
        assert_eq!(s.info().module, module);
        round_trip(&mut s, &pattern(1000, i as u8)).await;
    }
}

#[tokio::test]
async fn links_that_do_not_register_are_bounded_per_source_and_cut_at_their_deadline() {
    let hub = hub_with(HubConfig {
        limits: reach_hub::Limits {
            unregistered_per_source: 2,
            register_within: Duration::from_millis(500),
            ..reach_hub::Limits::default()
        },
        ..HubConfig::default()
    })
    .await;
    let t = target_of(&hub);
    let prober = builder().bind().await.expect("bind");
    // Authenticated links that never register: the stream a hub link is.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(prober.dial_hub(&t).await.expect("handshake"));
    }
    // Each ends: the third at once (its address holds two), the others at
    // the registration deadline.
    for link in &mut idle {
        let mut buf = [0u8; 64];
        let ended = tokio::time::timeout(DEADLINE, async {
            loop {
                match link.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "an unregistered link outlived its deadline");
    }
    assert_eq!(hub.status().counters.links_unregistered_cut, 3);
    // Registered nodes are not affected.
    let a = node(&t, builder()).await;
    assert!(a.hub_status().is_some());
}

#[tokio::test]
async fn the_address_echoes_answer_udp_with_the_source_and_never_more_than_asked() {
    let hub = hub().await;
    let n = node(&target_of(&hub), builder()).await;
    let echoes = n.hub_status().expect("registered").echo;
    assert_eq!(echoes.len(), 2, "two echo ports");
    let socket = tokio::net::UdpSocket::bind((LOOPBACK, 0))
        .await
        .expect("bind");
    let me = socket.local_addr().expect("addr");
    let short = tokio::net::UdpSocket::bind((LOOPBACK, 0))
        .await
        .expect("bind");
    for echo in &echoes {
        // A short request (from another socket, sent first) is not
        // answered; a full one is, with our address.
        short.send_to(b"reach-echo?", echo).await.expect("send");
        let request = reach::proto::nat::udp_echo_request();
        socket.send_to(&request, echo).await.expect("send");
        let mut buf = [0u8; 512];
        let (len, from) = tokio::time::timeout(DEADLINE, socket.recv_from(&mut buf))
            .await
            .expect("an answer in time")
            .expect("recv");
        assert_eq!(from, *echo);
        assert!(
            len <= request.len(),
            "the answer is no larger than the request"
        );
        assert_eq!(reach::proto::nat::decode_echo(&buf[..len]), Ok(me));
        // The echo handles datagrams in order and loopback delivers at
        // once: an answer to the short request would be queued by now.
        assert!(
            short.try_recv_from(&mut buf).is_err(),
            "a short request was answered"
        );
    }
}
