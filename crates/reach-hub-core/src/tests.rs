//! Deterministic tests of the hub core: frames in, frames out, no I/O, time
//! passed in.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reach_proto::link::{
    admission_proof, decode_frame, ConnectBack, Control, Frame, HomeClaim, Rendezvous, ResetCode,
    MAX_STREAM_WINDOW, STREAM_WINDOW,
};
use reach_proto::routes::Advert;
use reach_proto::{NodeId, SecretKey};

use super::*;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn id(n: u8) -> NodeId {
    key(n).node_id()
}

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, last], 40000))
}

fn open_hub() -> HubCore {
    hub_with(Policy {
        open: true,
        ..Policy::default()
    })
}

fn hub_with(policy: Policy) -> HubCore {
    HubCore::new(&key(1), policy, vec![addr(1)], Duration::from_secs(10), 1)
}

/// The frames the core queued, decoded, by link.
fn out(core: &mut HubCore) -> Vec<(LinkId, Frame<'static>)> {
    core.poll_transmits()
        .into_iter()
        .map(|(link, bytes)| {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            let (frame, used) = decode_frame(bytes).expect("valid").expect("whole frame");
            assert_eq!(used, bytes.len(), "one frame per outbox entry");
            (link, frame)
        })
        .collect()
}

fn control(core: &mut HubCore, link: LinkId, msg: Control) -> Verdict {
    core.handle_frame(link, Frame::Control(msg), Instant::now())
}

/// A node attached with `accepts`; returns its link.
fn attach(core: &mut HubCore, node: NodeId, accepts: bool) -> LinkId {
    let link = core.handle_link_up(node, addr(9), false, None);
    let v = control(
        core,
        link,
        Control::Register {
            addrs: vec![addr(2)],
            proof: None,
            accepts,
            home: None,
            vpn: None,
        },
    );
    assert_eq!(v, Verdict::Continue);
    let frames = out(core);
    assert!(
        frames.iter().any(|(l, f)| *l == link
            && matches!(f, Frame::Control(Control::Registered { observed, .. }) if *observed == addr(9))),
        "{frames:?}"
    );
    link
}

#[test]
fn a_registered_node_is_in_the_directory_and_a_connect_only_one_is_not() {
    let mut core = open_hub();
    let (a, b) = (id(10), id(11));
    attach(&mut core, a, true);
    let b_link = attach(&mut core, b, false);
    let status = core.status();
    assert_eq!(status.nodes.len(), 1);
    assert_eq!(status.nodes[0].node, a);
    control(&mut core, b_link, Control::Lookup { req: 7, node: a });
    let found = out(&mut core);
    assert!(matches!(
        &found[..],
        [(l, Frame::Control(Control::Found { req: 7, entry: Some(e), .. }))]
            if *l == b_link && e.node == a && e.addrs == vec![addr(2)]
    ));
}

#[test]
fn admission_by_key_and_by_secret_and_refusal_with_a_reason() {
    let secret = b"a network secret of some length".to_vec();
    let (listed, prover, stranger) = (id(20), id(21), id(22));
    let mut core = hub_with(Policy {
        allowed: vec![listed],
        network_secret: Some(secret.clone()),
        ..Policy::default()
    });
    let register = |proof| Control::Register {
        addrs: vec![],
        proof,
        accepts: true,
        home: None,
        vpn: None,
    };
    let l = core.handle_link_up(listed, addr(3), false, None);
    assert_eq!(control(&mut core, l, register(None)), Verdict::Continue);
    let l = core.handle_link_up(prover, addr(4), false, None);
    let proof = admission_proof(&secret, &prover, &id(1));
    assert_eq!(
        control(&mut core, l, register(Some(proof))),
        Verdict::Continue
    );
    out(&mut core);
    let l = core.handle_link_up(stranger, addr(5), false, None);
    let wrong = admission_proof(b"another secret entirely!", &stranger, &id(1));
    assert!(matches!(
        control(&mut core, l, register(Some(wrong))),
        Verdict::Close(_)
    ));
    let refused = out(&mut core);
    assert!(matches!(
        &refused[..],
        [(_, Frame::Control(Control::Refused { reason }))] if reason.contains("wrong network secret")
    ));
    // A proof made for another node does not admit this one.
    let l = core.handle_link_up(stranger, addr(5), false, None);
    let borrowed = admission_proof(&secret, &prover, &id(1));
    assert!(matches!(
        control(&mut core, l, register(Some(borrowed))),
        Verdict::Close(_)
    ));
    assert_eq!(core.status().nodes.len(), 2);
    assert_eq!(core.counters.refused, 2);
}

/// Two attached nodes and a stream opened from `a` to `b`; returns the links
/// and the stream id on `b`'s link.
fn relayed_stream(core: &mut HubCore) -> (LinkId, LinkId, u32) {
    let (a, b) = (id(30), id(31));
    let a_link = attach(core, a, true);
    let b_link = attach(core, b, true);
    let v = core.handle_frame(
        a_link,
        Frame::Open {
            stream: 1,
            dst: b,
            // A node cannot speak for someone else: the hub uses the session's id.
            src: id(99),
        },
        Instant::now(),
    );
    assert_eq!(v, Verdict::Continue);
    let frames = out(core);
    let [(l, Frame::Open { stream, dst, src })] = &frames[..] else {
        panic!("expected one Open, got {frames:?}");
    };
    assert_eq!((*l, *dst, *src), (b_link, b, a));
    (a_link, b_link, *stream)
}

fn data(core: &mut HubCore, link: LinkId, stream: u32, data: &[u8]) -> Verdict {
    core.handle_frame(link, Frame::Data { stream, data }, Instant::now())
}

#[test]
fn streams_are_relayed_with_credit_and_a_flow_violation_resets_both_ends() {
    let mut core = open_hub();
    let (a_link, b_link, b_stream) = relayed_stream(&mut core);
    let now = Instant::now();
    let chunk = vec![7u8; 32 << 10];
    data(&mut core, a_link, 1, &chunk);
    let frames = out(&mut core);
    assert!(matches!(
        &frames[..],
        [(l, Frame::Data { stream, data })] if *l == b_link && *stream == b_stream && data.len() == chunk.len()
    ));
    core.handle_frame(
        b_link,
        Frame::Credit {
            stream: b_stream,
            bytes: 1000,
        },
        now,
    );
    assert!(matches!(
        &out(&mut core)[..],
        [(l, Frame::Credit { stream: 1, bytes: 1000 })] if *l == a_link
    ));
    // A sender that ignores its window is cut off, and so is its peer.
    let windows = STREAM_WINDOW as usize / chunk.len() + 2;
    for _ in 0..windows {
        data(&mut core, a_link, 1, &chunk);
    }
    let mut resets: Vec<_> = out(&mut core)
        .into_iter()
        .filter_map(|(l, f)| match f {
            Frame::Reset { code, .. } => Some((l, code == ResetCode::FlowViolation)),
            _ => None,
        })
        .collect();
    resets.sort();
    let mut want = vec![(a_link, true), (b_link, true)];
    want.sort();
    assert_eq!(resets, want);
    assert_eq!(core.status().streams, 0);
}

#[test]
fn readers_cannot_make_the_hub_hold_more_than_the_caps() {
    let mut core = open_hub();
    let (a, b) = (id(32), id(33));
    let a_link = attach(&mut core, a, true);
    let b_link = attach(&mut core, b, true);
    let now = Instant::now();
    // Twenty streams from a to b; b grants absurd credit on each.
    let mut passed = 0u64;
    for i in 0..20u32 {
        let stream = 2 * i + 1;
        core.handle_frame(
            a_link,
            Frame::Open {
                stream,
                dst: b,
                src: a,
            },
            now,
        );
        let opened = out(&mut core);
        let [(_, Frame::Open { stream: on_b, .. })] = &opened[..] else {
            panic!("{opened:?}");
        };
        core.handle_frame(
            b_link,
            Frame::Credit {
                stream: *on_b,
                bytes: u32::MAX,
            },
            now,
        );
        for (l, f) in out(&mut core) {
            if let (true, Frame::Credit { bytes, .. }) = (l == a_link, f) {
                assert!(
                    bytes <= MAX_STREAM_WINDOW - STREAM_WINDOW,
                    "one stream's cap"
                );
                passed += u64::from(bytes);
            }
        }
    }
    assert_eq!(
        passed, LINK_WINDOW_GROWTH,
        "the link's cap, not 20 x 32 MiB"
    );
    indexes_agree(&core);
    // Closing streams returns their growth to the link's budget.
    for i in 0..10u32 {
        core.handle_frame(
            a_link,
            Frame::Reset {
                stream: 2 * i + 1,
                code: ResetCode::Cancelled,
                reason: String::new(),
            },
            now,
        );
    }
    indexes_agree(&core);
    core.handle_link_down(b_link, now);
    indexes_agree(&core);
    assert!(core.relay.is_empty() && core.grown_toward.is_empty() && core.relayed_at.is_empty());
}

/// The hub's running indexes of its relays match a scan of them: the
/// streams entering at each link, and the growth of windows towards it.
fn indexes_agree(core: &HubCore) {
    let mut at: HashMap<LinkId, HashSet<u32>> = HashMap::new();
    let mut grown: HashMap<LinkId, u64> = HashMap::new();
    for (&(link, stream), r) in &core.relay {
        at.entry(link).or_default().insert(stream);
        let g = r.window.limit() - u64::from(STREAM_WINDOW);
        if g > 0 {
            *grown.entry(r.to_link).or_default() += g;
        }
    }
    assert_eq!(core.relayed_at, at);
    assert_eq!(core.grown_toward, grown);
}

#[test]
fn a_lost_link_resets_the_streams_that_crossed_it() {
    let mut core = open_hub();
    let (a_link, b_link, _) = relayed_stream(&mut core);
    core.handle_link_down(b_link, Instant::now());
    let frames = out(&mut core);
    assert!(matches!(
        &frames[..],
        [(l, Frame::Reset { stream: 1, code: ResetCode::LinkLost, .. })] if *l == a_link
    ));
    assert_eq!(core.status().nodes.len(), 1);
}

#[test]
fn a_stream_to_an_unknown_node_is_reset_with_no_route() {
    let mut core = open_hub();
    let a_link = attach(&mut core, id(40), true);
    core.handle_frame(
        a_link,
        Frame::Open {
            stream: 3,
            dst: id(41),
            src: id(40),
        },
        Instant::now(),
    );
    assert!(matches!(
        &out(&mut core)[..],
        [(l, Frame::Reset { stream: 3, code: ResetCode::NoRoute, .. })] if *l == a_link
    ));
}

#[test]
fn a_connect_back_failure_retraces_the_request_and_cannot_be_forged() {
    let mut core = open_hub();
    let (asker, target, other) = (id(50), id(51), id(52));
    let asker_link = attach(&mut core, asker, false);
    let target_link = attach(&mut core, target, true);
    let other_link = attach(&mut core, other, true);
    let cb = ConnectBack {
        from: id(99), // replaced by the session's id
        target,
        token: 4242,
        vport: 1,
        addrs: vec![addr(7)],
        upgrade: None,
    };
    control(&mut core, asker_link, Control::ConnectBack(cb));
    assert!(matches!(
        &out(&mut core)[..],
        [(l, Frame::Control(Control::ConnectBack(c)))] if *l == target_link && c.from == asker
    ));
    let failed = |target| Control::ConnectBackFailed {
        requester: asker,
        target,
        token: 4242,
        reason: "no route back".into(),
    };
    // Another node cannot report the target's failure.
    control(&mut core, other_link, failed(target));
    assert!(out(&mut core).is_empty());
    control(&mut core, target_link, failed(target));
    assert!(matches!(
        &out(&mut core)[..],
        [(l, Frame::Control(Control::ConnectBackFailed { token: 4242, .. }))] if *l == asker_link
    ));
    // Reported once; the memory of the request is gone.
    control(&mut core, target_link, failed(target));
    assert!(out(&mut core).is_empty());
}

#[test]
fn a_connect_back_to_an_unknown_node_fails_at_once() {
    let mut core = open_hub();
    let asker_link = attach(&mut core, id(60), false);
    let cb = ConnectBack {
        from: id(60),
        target: id(61),
        token: 1,
        vport: 1,
        addrs: vec![],
        upgrade: None,
    };
    control(&mut core, asker_link, Control::ConnectBack(cb));
    assert!(matches!(
        &out(&mut core)[..],
        [(l, Frame::Control(Control::ConnectBackFailed { reason, .. }))]
            if *l == asker_link && reason.contains("no hub knows")
    ));
}

#[test]
fn relayed_messages_carry_the_authenticated_sender_and_bounce_when_undeliverable() {
    let mut core = open_hub();
    core.set_echo_ports(vec![7701, 7702]);
    let (asker, target) = (id(10), id(11));
    let asker_link = attach(&mut core, asker, true);
    let target_link = attach(&mut core, target, true);
    let offer = Rendezvous::SpliceOffer {
        token: 7,
        vport: 1,
        candidates: vec![addr(2)],
        upgrade: false,
    };
    // A forged sender is replaced by the session's identity.
    let relay = Control::Relay {
        from: id(99),
        to: target,
        msg: offer.clone(),
    };
    control(&mut core, asker_link, relay);
    let frames = out(&mut core);
    assert!(
        matches!(&frames[..], [(l, Frame::Control(Control::Relay { from, msg, .. }))]
            if *l == target_link && *from == asker && *msg == offer),
        "{frames:?}"
    );
    // The answer retraces the offer's path: to the connect-only process
    // that asked, not to the listener sharing its NodeId.
    let asking_process = attach(&mut core, asker, false);
    let offer = Rendezvous::SpliceOffer {
        token: 8,
        vport: 1,
        candidates: vec![],
        upgrade: false,
    };
    let relay = Control::Relay {
        from: asker,
        to: target,
        msg: offer,
    };
    control(&mut core, asking_process, relay);
    out(&mut core);
    let answer = Rendezvous::SpliceAnswer {
        token: 8,
        candidates: vec![addr(3)],
    };
    let relay = Control::Relay {
        from: target,
        to: asker,
        msg: answer,
    };
    control(&mut core, target_link, relay);
    let frames = out(&mut core);
    assert!(
        matches!(&frames[..], [(l, Frame::Control(Control::Relay { msg, .. }))]
            if *l == asking_process && msg.token() == 8),
        "{frames:?}"
    );
    let offer = Rendezvous::SpliceOffer {
        token: 7,
        vport: 1,
        candidates: vec![addr(2)],
        upgrade: false,
    };
    let stray = Control::Relay {
        from: asker,
        to: id(50),
        msg: offer,
    };
    control(&mut core, asker_link, stray);
    let frames = out(&mut core);
    assert!(
        matches!(&frames[..], [(l, Frame::Control(Control::Undeliverable { to, msg, .. }))]
            if *l == asker_link && *to == id(50) && msg.token() == 7),
        "{frames:?}"
    );
    assert_eq!(core.status().counters.relayed_messages, 3);
}

#[test]
fn expose_requests_and_ended_links_become_events_for_the_driver() {
    let mut core = open_hub();
    let node = id(10);
    let link = attach(&mut core, node, true);
    let allow = vec![("192.0.2.0".parse().unwrap(), 24)];
    control(
        &mut core,
        link,
        Control::Expose {
            vport: 22,
            want_port: Some(40001),
            allow_from: allow.clone(),
        },
    );
    assert_eq!(
        core.poll_events(),
        vec![crate::Event::Expose(crate::ExposeRequest {
            link,
            node,
            vport: 22,
            want_port: Some(40001),
            allow_from: allow,
        })]
    );
    core.handle_link_down(link, Instant::now());
    assert_eq!(core.poll_events(), vec![crate::Event::LinkGone { link }]);
    assert!(core.poll_events().is_empty());
}

#[test]
fn registered_nodes_learn_the_echo_ports() {
    let mut core = open_hub();
    core.set_echo_ports(vec![7701, 7702]);
    let link = core.handle_link_up(id(10), addr(9), false, None);
    control(
        &mut core,
        link,
        Control::Register {
            addrs: vec![],
            proof: None,
            accepts: true,
            home: None,
            vpn: None,
        },
    );
    let frames = out(&mut core);
    assert!(
        frames.iter().any(|(_, f)| matches!(f,
            Frame::Control(Control::Registered { echo, .. }) if *echo == vec![7701, 7702])),
        "{frames:?}"
    );
}

#[test]
fn stream_frames_before_registration_close_the_link() {
    let mut core = open_hub();
    let link = core.handle_link_up(id(70), addr(8), false, None);
    let v = core.handle_frame(link, Frame::Fin { stream: 1 }, Instant::now());
    assert!(matches!(v, Verdict::Close(why) if why.contains("before registration")));
}

proptest::proptest! {
    /// Whatever a peer sends, decoded or not, the core answers without
    /// panicking, on a fresh link and on a registered one.
    #[test]
    fn arbitrary_frames_never_panic_the_core(
        chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..24)
    ) {
        let mut core = open_hub();
        let registered = attach(&mut core, id(80), true);
        let fresh = core.handle_link_up(id(81), addr(6), false, None);
        let now = Instant::now();
        for (i, bytes) in chunks.iter().enumerate() {
            if let Ok(Some((frame, _))) = decode_frame(bytes) {
                let link = if i % 2 == 0 { registered } else { fresh };
                let _ = core.handle_frame(link, frame, now);
                let _ = core.poll_transmits();
            }
        }
        core.handle_tick(now + Duration::from_secs(60));
        let _ = core.status();
    }
}

/// Two open hubs `a` and `b` linked to each other (a dialled); returns
/// (a, b, a's link to b, b's link to a) with the link greetings exchanged.
/// The policy of a hub in a test federation: open to nodes, linking with
/// hubs that prove the federation's hub secret.
fn hub_policy() -> Policy {
    Policy {
        open: true,
        hub_secret: Some(b"the test federation's hub secret".to_vec()),
        ..Policy::default()
    }
}

fn two_hubs(now: Instant) -> (HubCore, HubCore, LinkId, LinkId) {
    let policy = hub_policy();
    let mut a = HubCore::new(
        &key(1),
        policy.clone(),
        vec![addr(1)],
        Duration::from_secs(10),
        1,
    );
    let mut b = HubCore::new(&key(2), policy, vec![addr(2)], Duration::from_secs(10), 1);
    let ab = a.handle_link_up(id(2), addr(2), true, a.hub_proof(&id(2)));
    let ba = b.handle_link_up(id(1), addr(1), false, None);
    pump(&mut a, &mut b, ab, ba, now);
    assert!(a.has_hub_link(&id(2)) && b.has_hub_link(&id(1)));
    (a, b, ab, ba)
}

/// Frames a core queued, by link.
type Outbox = Vec<(LinkId, Vec<u8>)>;

/// Moves frames between `a` and `b` until neither has any for the other;
/// returns what each queued for its other links.
fn pump(
    a: &mut HubCore,
    b: &mut HubCore,
    ab: LinkId,
    ba: LinkId,
    now: Instant,
) -> (Outbox, Outbox) {
    let (mut rest_a, mut rest_b) = (Vec::new(), Vec::new());
    loop {
        let (from_a, from_b) = (a.poll_transmits(), b.poll_transmits());
        if from_a.iter().all(|(l, _)| *l != ab) && from_b.iter().all(|(l, _)| *l != ba) {
            rest_a.extend(from_a);
            rest_b.extend(from_b);
            return (rest_a, rest_b);
        }
        for (l, f) in from_a {
            if l == ab {
                let (frame, _) = decode_frame(&f).expect("valid").expect("whole");
                assert_eq!(b.handle_frame(ba, frame, now), Verdict::Continue);
            } else {
                rest_a.push((l, f));
            }
        }
        for (l, f) in from_b {
            if l == ba {
                let (frame, _) = decode_frame(&f).expect("valid").expect("whole");
                assert_eq!(a.handle_frame(ab, frame, now), Verdict::Continue);
            } else {
                rest_b.push((l, f));
            }
        }
    }
}

/// Node `n` attaches to `core` from `addr(n)`, advertising `addrs`; its
/// link. Unlike [`attach`], what the core queued (its directory flood)
/// stays in the outbox.
fn register(core: &mut HubCore, n: u8, addrs: Vec<SocketAddr>, now: Instant) -> LinkId {
    register_claiming(core, n, addrs, None, now)
}

/// [`register`] with the node's own claim to be at `core`, stamped `stamp`.
fn register_claiming(
    core: &mut HubCore,
    n: u8,
    addrs: Vec<SocketAddr>,
    stamp: Option<u64>,
    now: Instant,
) -> LinkId {
    let link = core.handle_link_up(id(n), addr(n), false, None);
    let register = Control::Register {
        addrs,
        proof: None,
        accepts: true,
        home: stamp.map(|t| Box::new(HomeClaim::new(&key(n), &core.id(), t))),
        vpn: None,
    };
    assert_eq!(
        core.handle_frame(link, Frame::Control(register), now),
        Verdict::Continue
    );
    link
}

fn found(frames: &[(LinkId, Vec<u8>)], link: LinkId) -> Option<Option<DirEntry>> {
    frames
        .iter()
        .filter(|(l, _)| *l == link)
        .find_map(|(_, f)| match decode_frame(f).ok().flatten() {
            Some((Frame::Control(Control::Found { entry, .. }), _)) => Some(entry),
            _ => None,
        })
}

fn vip_found(frames: &[(LinkId, Vec<u8>)], link: LinkId, want: u32) -> Option<Vec<NodeId>> {
    frames
        .iter()
        .filter(|(l, _)| *l == link)
        .find_map(|(_, f)| match decode_frame(f).ok().flatten() {
            Some((Frame::Control(Control::VipFound { req, holders }), _)) if req == want => {
                Some(holders)
            }
            _ => None,
        })
}

#[test]
fn a_vpn_address_claimed_at_one_hub_is_found_at_another_and_goes_with_its_holder() {
    use reach_proto::vpn::{ula, NetworkTag, VpnClaim};
    use std::net::{IpAddr, Ipv4Addr};
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    let network = NetworkTag::of("lab").expect("a good name");
    let claim = VpnClaim {
        network,
        ip: Ipv4Addr::new(10, 77, 0, 9),
    };
    // x registers at a, then claims its address (as `reach vpn up` does
    // once it has checked the address is free).
    let x_link = register(&mut a, 10, vec![addr(11)], now);
    pump(&mut a, &mut b, ab, ba, now);
    a.handle_frame(
        x_link,
        Frame::Control(Control::VpnClaim { claim: Some(claim) }),
        now,
    );
    // It came within the hold time of the registration's flood: it goes
    // out with the held flood.
    assert_eq!(a.poll_timeout(), Some(now + DIRECTORY_HOLD));
    a.handle_timeout(now + DIRECTORY_HOLD);
    pump(&mut a, &mut b, ab, ba, now);
    let y_link = register(&mut b, 20, vec![], now);
    let ask = |b: &mut HubCore, req, ip: IpAddr| {
        let lookup = Control::VipLookup { req, network, ip };
        b.handle_frame(y_link, Frame::Control(lookup), now);
        vip_found(&b.poll_transmits(), y_link, req).expect("an answer at once")
    };
    assert_eq!(ask(&mut b, 1, claim.ip.into()), [id(10)]);
    assert_eq!(ask(&mut b, 2, ula(&network, &id(10)).into()), [id(10)]);
    assert_eq!(ask(&mut b, 3, Ipv4Addr::new(10, 77, 0, 8).into()), []);
    let other = NetworkTag::of("other").expect("a good name");
    let lookup = Control::VipLookup {
        req: 4,
        network: other,
        ip: claim.ip.into(),
    };
    b.handle_frame(y_link, Frame::Control(lookup), now);
    assert_eq!(vip_found(&b.poll_transmits(), y_link, 4), Some(vec![]));
    assert_eq!(b.status().vpn_members, (0, 1));
    // A second member claiming the same address shows as a conflict,
    // the first holder named first.
    let z_link = register(&mut b, 30, vec![], now);
    b.handle_frame(
        z_link,
        Frame::Control(Control::VpnClaim { claim: Some(claim) }),
        now,
    );
    assert_eq!(ask(&mut b, 5, claim.ip.into()), [id(10), id(30)]);
    // x leaves a: a's next list drops it, and b forgets it.
    let later = now + 2 * DIRECTORY_HOLD;
    a.handle_link_down(x_link, later);
    pump(&mut a, &mut b, ab, ba, later);
    assert_eq!(ask(&mut b, 6, claim.ip.into()), [id(30)]);
    assert_eq!(b.status().vpn_members, (1, 0));
    assert_eq!(b.counters.vip_lookups, 6);
}

#[test]
fn a_forged_vpn_member_list_cuts_the_link_that_sent_it() {
    use reach_proto::vpn::{NetworkTag, VpnClaim, VpnMember};
    let now = Instant::now();
    let (_, mut b, _, ba) = two_hubs(now);
    let member = VpnMember {
        node: id(10),
        claim: VpnClaim {
            network: NetworkTag::of("lab").expect("a good name"),
            ip: std::net::Ipv4Addr::new(10, 77, 0, 9),
        },
    };
    // Hub 1's link sends a list "from" hub 3, signed by hub 1.
    let members = vec![member];
    let sig = key(1).sign(&reach_proto::vpn::members_signed_bytes(&id(3), 7, &members));
    let forged = Control::VpnMembers {
        origin: id(3),
        state: 7,
        members,
        sig,
    };
    assert!(matches!(
        b.handle_frame(ba, Frame::Control(forged), now),
        Verdict::Close(_)
    ));
    assert_eq!(b.counters.gossip_forged, 1);
    assert_eq!(b.status().vpn_members, (0, 0));
}

#[test]
fn a_node_that_gains_a_mapped_address_is_found_there_from_another_hub() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    let x_link = register(&mut a, 10, vec![addr(11)], now);
    pump(&mut a, &mut b, ab, ba, now);
    // x's gateway mapped a port: x advertises it beside its own address.
    let mapped: SocketAddr = "192.0.2.9:40001".parse().expect("addr");
    let update = Control::NodeAddrs {
        addrs: vec![addr(11), mapped],
    };
    assert_eq!(
        a.handle_frame(x_link, Frame::Control(update), now),
        Verdict::Continue
    );
    assert_eq!(a.counters.addr_updates, 1);
    // y on b looks x up (b asks a): x's addresses as a holds them.
    let y_link = register(&mut b, 20, vec![], now);
    let addrs_of_x = |a: &mut HubCore, b: &mut HubCore, req| {
        let lookup = Control::Lookup { req, node: id(10) };
        b.handle_frame(y_link, Frame::Control(lookup), now);
        let (_, to_b_nodes) = pump(a, b, ab, ba, now);
        found(&to_b_nodes, y_link)
            .flatten()
            .expect("an entry")
            .addrs
    };
    assert_eq!(addrs_of_x(&mut a, &mut b, 5), vec![addr(11), mapped]);
    // Another node's link cannot change x's entry.
    let z_link = register(&mut a, 30, vec![], now);
    let forged = Control::NodeAddrs {
        addrs: vec![addr(99)],
    };
    a.handle_frame(z_link, Frame::Control(forged), now);
    assert_eq!(a.counters.addr_updates, 2);
    assert_eq!(addrs_of_x(&mut a, &mut b, 6), vec![addr(11), mapped]);
}

#[test]
fn a_lookup_of_a_node_on_another_hub_is_answered_by_its_home_hub() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    // x attaches to a; a floods its index (ids only) to b.
    register(&mut a, 10, vec![addr(11)], now);
    pump(&mut a, &mut b, ab, ba, now);
    assert_eq!(b.home_of(&id(10)), Some(id(1)));
    // y on b looks x up: b asks a, a answers with x's entry, b tells y.
    let y_link = register(&mut b, 20, vec![], now);
    let lookup = Control::Lookup {
        req: 5,
        node: id(10),
    };
    b.handle_frame(y_link, Frame::Control(lookup), now);
    let (_, to_b_nodes) = pump(&mut a, &mut b, ab, ba, now);
    let entry = found(&to_b_nodes, y_link)
        .expect("an answer")
        .expect("an entry");
    assert_eq!((entry.node, entry.hub), (id(10), id(1)));
    assert_eq!(
        (entry.addrs.clone(), entry.observed),
        (vec![addr(11)], addr(10))
    );
    // A node nobody knows is answered at once, without asking anyone.
    let lookup = Control::Lookup {
        req: 6,
        node: id(30),
    };
    b.handle_frame(y_link, Frame::Control(lookup), now);
    assert_eq!(found(&b.poll_transmits(), y_link), Some(None));
}

#[test]
fn directory_changes_within_the_hold_time_go_out_as_one_flood() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    let directories = |frames: &[(LinkId, Vec<u8>)]| {
        frames
            .iter()
            .filter(|(l, f)| {
                *l == ab
                    && matches!(
                        decode_frame(f).ok().flatten(),
                        Some((Frame::Control(Control::Directory { .. }), _))
                    )
            })
            .count()
    };
    let mut floods = 0;
    for n in 0..10u8 {
        register(&mut a, 100 + n, vec![], now);
        floods += directories(&a.poll_transmits());
    }
    assert_eq!(floods, 1, "the first change goes at once, the rest wait");
    let due = a.poll_timeout().expect("a held flood");
    assert_eq!(due, now + DIRECTORY_HOLD);
    a.handle_timeout(due - Duration::from_millis(1));
    assert_eq!(directories(&a.poll_transmits()), 0, "not before its time");
    a.handle_timeout(due);
    let held = a.poll_transmits();
    assert_eq!(directories(&held), 1);
    assert_eq!(a.poll_timeout(), None);
    for (_, f) in held.into_iter().filter(|(l, _)| *l == ab) {
        let (frame, _) = decode_frame(&f).expect("valid").expect("whole");
        b.handle_frame(ba, frame, due);
    }
    assert!((0..10).all(|n| b.home_of(&id(100 + n)) == Some(id(1))));
}

#[test]
fn a_restarted_hub_supersedes_its_earlier_run_and_stale_index_entries_go() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    register(&mut a, 10, vec![], now);
    pump(&mut a, &mut b, ab, ba, now);
    assert_eq!(b.home_of(&id(10)), Some(id(1)));
    // a restarts (a later epoch), and z attaches instead of x.
    b.handle_link_down(ba, now);
    let mut a = HubCore::new(
        &key(1),
        hub_policy(),
        vec![addr(1)],
        Duration::from_secs(10),
        1_000,
    );
    let ab = a.handle_link_up(id(2), addr(2), true, a.hub_proof(&id(2)));
    let ba = b.handle_link_up(id(1), addr(1), false, None);
    register(&mut a, 12, vec![], now);
    pump(&mut a, &mut b, ab, ba, now);
    assert_eq!(
        b.home_of(&id(12)),
        Some(id(1)),
        "the new run's directory is taken"
    );
    assert_eq!(b.home_of(&id(10)), None, "x left with the old run");
    assert_eq!(b.footprint().directory_entries, 1);
}

#[test]
fn a_hub_that_routes_to_a_hub_without_its_directory_asks_for_it() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    // A third hub c behind b: b links to it and learns its directory.
    let mut c = HubCore::new(
        &key(3),
        hub_policy(),
        vec![addr(3)],
        Duration::from_secs(10),
        1,
    );
    let bc = b.handle_link_up(id(3), addr(3), true, b.hub_proof(&id(3)));
    let cb = c.handle_link_up(id(2), addr(2), false, None);
    register(&mut c, 40, vec![], now);
    pump(&mut b, &mut c, bc, cb, now);
    assert_eq!(b.home_of(&id(40)), Some(id(3)));
    // a learns a route to c through b, but (say, after a partition that
    // outlasted the grace) not c's directory; b passes it nothing new.
    for _ in 0..3 {
        b.handle_tick(now);
        pump(&mut b, &mut a, ba, ab, now);
    }
    a.forget_remote(&id(3));
    assert!(a.routes_to(&id(3)));
    assert_eq!(a.home_of(&id(40)), None);
    // After a quarter of the grace time, a's tick asks b, which answers.
    a.handle_tick(now);
    pump(&mut a, &mut b, ab, ba, now);
    assert_eq!(a.home_of(&id(40)), None, "not at once");
    let later = now + Duration::from_secs(10) / 4;
    a.handle_tick(later);
    pump(&mut a, &mut b, ab, ba, later);
    assert_eq!(a.home_of(&id(40)), Some(id(3)));
}

#[test]
fn lookups_waiting_for_home_hubs_are_bounded_and_counted() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    register(&mut a, 10, vec![], now);
    pump(&mut a, &mut b, ab, ba, now);
    let y = register(&mut b, 20, vec![], now);
    b.poll_transmits();
    // a never answers: every lookup waits, up to the bound.
    for req in 0..MAX_LOCATES as u32 {
        let lookup = Control::Lookup { req, node: id(10) };
        b.handle_frame(y, Frame::Control(lookup), now);
    }
    let asked = b.poll_transmits();
    assert_eq!(asked.iter().filter(|(l, _)| *l == ba).count(), MAX_LOCATES);
    assert_eq!(b.counters.locates_dropped, 0);
    let lookup = Control::Lookup {
        req: u32::MAX,
        node: id(10),
    };
    b.handle_frame(y, Frame::Control(lookup), now);
    assert_eq!(
        found(&b.poll_transmits(), y),
        Some(None),
        "answered at once"
    );
    assert_eq!(b.counters.locates_dropped, 1);
    // They expire with connect-back memory, and room is made again.
    b.handle_tick(now + CONNECT_BACK_MEMORY);
    let lookup = Control::Lookup {
        req: 1,
        node: id(10),
    };
    b.handle_frame(y, Frame::Control(lookup), now + CONNECT_BACK_MEMORY);
    assert!(
        b.poll_transmits().iter().any(|(l, _)| *l == ba),
        "asked again"
    );
}

#[test]
fn a_node_cannot_hold_more_streams_than_its_limit_either_way() {
    let mut core = open_hub();
    core.set_limits(Limits {
        streams_per_node: 2,
        ..Limits::default()
    });
    let (a, b, c) = (id(40), id(41), id(42));
    let a_link = attach(&mut core, a, true);
    let b_link = attach(&mut core, b, true);
    let c_link = attach(&mut core, c, true);
    let open = |core: &mut HubCore, link, stream, dst| {
        let v = core.handle_frame(
            link,
            Frame::Open {
                stream,
                dst,
                src: a,
            },
            Instant::now(),
        );
        assert_eq!(v, Verdict::Continue);
        out(core)
    };
    for stream in [1, 3] {
        let frames = open(&mut core, a_link, stream, b);
        assert!(matches!(&frames[..], [(l, Frame::Open { .. })] if *l == b_link));
    }
    // A's third stream: refused at A's limit, with the reason.
    let frames = open(&mut core, a_link, 5, c);
    let [(
        l,
        Frame::Reset {
            stream: 5,
            code: ResetCode::Refused,
            reason,
        },
    )] = &frames[..]
    else {
        panic!("expected a refusal, got {frames:?}");
    };
    assert_eq!(*l, a_link);
    assert!(reason.contains("stream limit (2 per node)"), "{reason}");
    // C towards B: refused at B's limit (B holds two streams).
    let frames = open(&mut core, c_link, 1, b);
    assert!(
        matches!(&frames[..], [(l, Frame::Reset { code: ResetCode::Refused, .. })] if *l == c_link),
        "{frames:?}"
    );
    assert_eq!(core.counters.streams_over_limit, 2);
    // A stream that ends makes room.
    core.handle_frame(
        a_link,
        Frame::Reset {
            stream: 1,
            code: ResetCode::Cancelled,
            reason: String::new(),
        },
        Instant::now(),
    );
    out(&mut core);
    let frames = open(&mut core, a_link, 7, c);
    assert!(
        matches!(&frames[..], [(l, Frame::Open { .. })] if *l == c_link),
        "{frames:?}"
    );
}

#[test]
fn hubs_link_only_by_their_own_credential_checked_both_ways() {
    let now = Instant::now();
    let node_secret = b"the network secret nodes prove".to_vec();
    // An open hub that also has a network secret for nodes.
    let mut h = hub_with(Policy {
        open: true,
        network_secret: Some(node_secret.clone()),
        ..Policy::default()
    });
    // A node's admission proof, or a network-secret proof, does not make a hub.
    for proof in [
        None,
        Some(admission_proof(&node_secret, &id(50), &id(1))),
        Some(reach_proto::link::hub_link_proof(
            &node_secret,
            &id(50),
            &id(1),
        )),
    ] {
        let l = h.handle_link_up(id(50), addr(50), false, None);
        let hello = Control::HubHello {
            addrs: vec![],
            proof,
        };
        assert!(matches!(control(&mut h, l, hello), Verdict::Close(_)));
        assert!(!h.has_hub_link(&id(50)));
    }
    // A hub this one dialled (learned from gossip, say) must prove itself
    // too: its answer without a credential is refused.
    let mut a = HubCore::new(
        &key(1),
        hub_policy(),
        vec![addr(1)],
        Duration::from_secs(10),
        1,
    );
    let mut stranger = HubCore::new(
        &key(60),
        Policy {
            open_hubs: true,
            ..Policy::default()
        },
        vec![addr(60)],
        Duration::from_secs(10),
        1,
    );
    let a_s = a.handle_link_up(id(60), addr(60), true, a.hub_proof(&id(60)));
    let s_a = stranger.handle_link_up(id(1), addr(1), false, None);
    for (_, f) in a.poll_transmits() {
        let (frame, _) = decode_frame(&f).expect("valid").expect("whole");
        assert_eq!(stranger.handle_frame(s_a, frame, now), Verdict::Continue);
    }
    let answer = stranger.poll_transmits();
    let (frame, _) = decode_frame(&answer[0].1).expect("valid").expect("whole");
    assert!(matches!(
        frame,
        Frame::Control(Control::HubHello { proof: None, .. })
    ));
    assert!(matches!(a.handle_frame(a_s, frame, now), Verdict::Close(_)));
    assert!(
        !a.has_hub_link(&id(60)),
        "a hub without the secret answered"
    );
    // Two hubs with the secret link, both ways.
    let (a, b, _, _) = two_hubs(now);
    assert!(a.has_hub_link(&id(2)) && b.has_hub_link(&id(1)));
    // A listed hub (a configured peer) links without a secret.
    let mut c = hub_with(Policy::default());
    c.allow_hub(id(70));
    let l = c.handle_link_up(id(70), addr(70), false, None);
    let hello = Control::HubHello {
        addrs: vec![],
        proof: None,
    };
    assert_eq!(control(&mut c, l, hello), Verdict::Continue);
    assert!(c.has_hub_link(&id(70)));
}

#[test]
fn a_neighbour_cannot_make_a_hub_assemble_oversized_or_endless_directories() {
    let now = Instant::now();
    let (_a, mut b, _ab, ba) = two_hubs(now);
    b.poll_transmits();
    let dir =
        |origin: u8, parts: u16, part: u16| signed_dir(&key(origin), 5, part, parts, vec![id(90)]);
    // Too many parts, a part past the end: refused, nothing kept or passed on.
    for msg in [dir(80, MAX_DIRECTORY_PARTS + 1, 0), dir(81, 4, 4)] {
        assert_eq!(control(&mut b, ba, msg), Verdict::Continue);
    }
    assert_eq!(b.counters.directories_refused, 2);
    assert!(b.partial.is_empty());
    assert!(b.poll_transmits().is_empty());
    // At most MAX_PARTIAL_DIRECTORIES assemble at once.
    for i in 0..MAX_PARTIAL_DIRECTORIES as u32 + 1 {
        let mut seed = [3u8; 32];
        seed[..4].copy_from_slice(&i.to_be_bytes());
        let msg = signed_dir(&SecretKey::from_seed(seed), 5, 0, 2, vec![]);
        assert_eq!(control(&mut b, ba, msg), Verdict::Continue);
    }
    assert_eq!(b.partial.len(), MAX_PARTIAL_DIRECTORIES);
    assert_eq!(b.counters.directories_refused, 3);
}

/// A directory part as `key`'s hub signs it.
fn signed_dir(key: &SecretKey, state: u64, part: u16, parts: u16, nodes: Vec<NodeId>) -> Control {
    Control::signed_directory(key, state, part, parts, nodes, vec![])
}

/// Hub `a` with a rogue hub (key 9, holding the federation's hub secret)
/// linked to it; returns the rogue's link at `a`.
fn rogue_link(a: &mut HubCore, now: Instant) -> LinkId {
    let rogue = HubCore::new(
        &key(9),
        hub_policy(),
        vec![addr(9)],
        Duration::from_secs(10),
        1,
    );
    let link = a.handle_link_up(id(9), addr(9), false, None);
    let hello = Control::HubHello {
        addrs: vec![addr(9)],
        proof: rogue.hub_proof(&id(1)),
    };
    assert_eq!(
        a.handle_frame(link, Frame::Control(hello), now),
        Verdict::Continue
    );
    a.poll_transmits();
    link
}

#[test]
fn a_linked_hub_advertising_forged_route_state_is_cut_and_takes_no_route() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    b.handle_tick(now);
    pump(&mut a, &mut b, ab, ba, now);
    let honest = *a.routes.route(&id(2)).expect("a routes to b");
    let m = rogue_link(&mut a, now);
    // A state b never reached, for a path through the rogue: beyond b's
    // chain, so a asks the rogue for the anchor instead of taking it.
    let frozen = Advert {
        origin: id(2),
        state: u64::MAX,
        hops: 0,
        proof: [7; 16],
    };
    let v = control(
        &mut a,
        m,
        Control::Adverts {
            adverts: vec![frozen],
        },
    );
    assert_eq!(v, Verdict::Continue);
    assert!(
        out(&mut a).iter().any(|(l, f)| *l == m
            && matches!(f, Frame::Control(Control::AnchorRequest { origin }) if *origin == id(2))),
        "the anchor is asked for"
    );
    assert_eq!(a.routes.route(&id(2)).map(|r| r.next_hop), Some(id(2)));
    // An anchor for b that b did not sign, which would cover that state.
    let mut fake = b.routes.anchor_of(&id(2)).expect("b's own").clone();
    fake.base = u64::MAX - 10;
    let v = control(
        &mut a,
        m,
        Control::Anchors {
            anchors: vec![fake],
        },
    );
    assert!(
        matches!(v, Verdict::Close(ref r) if r.contains("did not sign")),
        "{v:?}"
    );
    assert_eq!(a.counters.gossip_forged, 1);
    // A state within b's chain but newer than b advertised: cut too.
    let m = rogue_link(&mut a, now);
    let newer = Advert {
        state: honest.state + 3,
        ..frozen
    };
    let v = control(
        &mut a,
        m,
        Control::Adverts {
            adverts: vec![newer],
        },
    );
    assert!(
        matches!(v, Verdict::Close(ref r) if r.contains("fail")),
        "{v:?}"
    );
    assert_eq!(a.counters.gossip_forged, 2);
    a.handle_link_down(m, now);
    let after = a.routes.route(&id(2)).expect("still routed");
    assert_eq!((after.next_hop, after.state), (id(2), honest.state));
}

/// Hands `y` the frames of `outbox` that went out on `link` (to `y`,
/// where the link is `at_y`).
fn deliver(outbox: Outbox, link: LinkId, y: &mut HubCore, at_y: LinkId, now: Instant) {
    for (_, f) in outbox.into_iter().filter(|(l, _)| *l == link) {
        let (frame, _) = decode_frame(&f).expect("valid").expect("whole");
        assert_eq!(y.handle_frame(at_y, frame, now), Verdict::Continue);
    }
}

/// Links hub `x` to hub `y` (x dials) and exchanges what follows.
fn link_hubs(x: &mut HubCore, y: &mut HubCore, now: Instant) -> (LinkId, LinkId) {
    let xy = x.handle_link_up(y.id(), addr(2), true, x.hub_proof(&y.id()));
    let yx = y.handle_link_up(x.id(), addr(1), false, None);
    pump(x, y, xy, yx, now);
    (xy, yx)
}

fn hub_n(n: u8) -> HubCore {
    HubCore::new(
        &key(n),
        hub_policy(),
        vec![addr(n)],
        Duration::from_secs(10),
        1,
    )
}

#[test]
fn a_linked_hub_cannot_forge_alter_or_freeze_another_hubs_directory() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    register(&mut b, 20, vec![], now);
    pump(&mut a, &mut b, ab, ba, now);
    assert_eq!(a.home_of(&id(20)), Some(id(2)));
    // The rogue claims b's directory is empty, at a state b never reaches.
    let m = rogue_link(&mut a, now);
    let mut frozen = signed_dir(&key(9), u64::MAX, 0, 1, vec![]);
    if let Control::Directory { origin, .. } = &mut frozen {
        *origin = id(2);
    }
    let v = control(&mut a, m, frozen);
    assert!(
        matches!(v, Verdict::Close(ref r) if r.contains("did not sign")),
        "{v:?}"
    );
    // Or alters one that b signed (its listen addresses, say).
    let m = rogue_link(&mut a, now);
    let mut altered = signed_dir(&key(2), u64::MAX, 0, 1, vec![]);
    if let Control::Directory { listen, .. } = &mut altered {
        listen.push(addr(66));
    }
    let v = control(&mut a, m, altered);
    assert!(matches!(v, Verdict::Close(_)), "{v:?}");
    assert_eq!(a.counters.gossip_forged, 2);
    assert_eq!(a.home_of(&id(20)), Some(id(2)), "b's directory stands");
}

#[test]
fn a_directory_passed_on_after_its_node_moved_still_carries_its_origins_signature() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    let mut c = hub_n(3);
    let (bc, cb) = link_hubs(&mut b, &mut c, now);
    register_claiming(&mut a, 10, vec![], Some(1_000), now);
    register(&mut a, 11, vec![], now);
    // Past the hold time, the held flood goes out.
    let now = now + Duration::from_secs(1);
    a.handle_timeout(now);
    let (_, from_b) = pump(&mut a, &mut b, ab, ba, now);
    deliver(from_b, bc, &mut c, cb, now);
    pump(&mut b, &mut c, bc, cb, now);
    assert_eq!(c.home_of(&id(11)), Some(id(1)));
    // Node 10 moves to c before a notices: both directories list it.
    register_claiming(&mut c, 10, vec![], Some(2_000), now);
    let now = now + Duration::from_secs(1);
    c.handle_timeout(now);
    pump(&mut c, &mut b, cb, bc, now);
    assert_eq!(b.home_of(&id(10)), Some(id(3)));
    // A hub linking to b now gets both directories rebuilt from b's index,
    // each as its origin signed it: nothing is cut.
    let mut d = hub_n(4);
    link_hubs(&mut b, &mut d, now);
    assert_eq!(d.counters.gossip_forged, 0);
    assert_eq!(d.home_of(&id(11)), Some(id(1)));
    assert!(d.home_of(&id(10)).is_some());
    // b asked both hubs for the node's own claim: c's is the later one, and
    // a directory of a's that still lists the node does not take it back.
    let (to_a, _) = pump(&mut b, &mut c, bc, cb, now);
    deliver(to_a, ba, &mut a, ab, now);
    pump(&mut a, &mut b, ab, ba, now);
    pump(&mut c, &mut b, cb, bc, now);
    assert_eq!(b.home_of(&id(10)), Some(id(3)));
    register(&mut a, 12, vec![], now);
    let now = now + Duration::from_secs(1);
    a.handle_timeout(now);
    pump(&mut a, &mut b, ab, ba, now);
    assert_eq!(b.home_of(&id(12)), Some(id(1)));
    assert_eq!(b.home_of(&id(10)), Some(id(3)), "the proved claim holds");
}

#[test]
fn a_linked_hub_listing_a_node_it_does_not_have_cannot_take_it() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    register_claiming(&mut b, 20, vec![], Some(1_000), now);
    pump(&mut a, &mut b, ab, ba, now);
    assert_eq!(a.home_of(&id(20)), Some(id(2)));
    // The rogue lists node 20 in its own directory (validly signed: it is
    // a hub of the federation).
    let m = rogue_link(&mut a, now);
    for state in [5, 6] {
        let v = control(&mut a, m, signed_dir(&key(9), state, 0, 1, vec![id(20)]));
        assert_eq!(v, Verdict::Continue);
        // a asks both hubs for the node's claim; the rogue has none to show
        // (it answers with an entry it made up), b shows the node's own.
        let asked = out(&mut a);
        for (l, f) in &asked {
            let Frame::Control(Control::Locate { req, node, .. }) = f else {
                continue;
            };
            if *l == m {
                let fake = Control::Located {
                    asker: id(1),
                    req: *req,
                    node: *node,
                    entry: Some(DirEntry {
                        node: *node,
                        hub: id(9),
                        addrs: vec![addr(66)],
                        observed: addr(66),
                        claim: Some(Box::new(HomeClaim::new(&key(9), &id(9), u64::MAX))),
                    }),
                };
                assert_eq!(control(&mut a, m, fake), Verdict::Continue);
            } else if *l == ab {
                assert_eq!(b.handle_frame(ba, f.clone(), now), Verdict::Continue);
            }
        }
        pump(&mut a, &mut b, ab, ba, now);
        assert_eq!(a.home_of(&id(20)), Some(id(2)), "state {state}");
    }
}

#[test]
fn a_node_is_served_while_any_of_its_links_is_registered() {
    let mut core = open_hub();
    let now = Instant::now();
    let (a, b) = (id(40), id(41));
    assert!(!core.has_node(&a));
    let first = attach(&mut core, a, true);
    let connect_only = attach(&mut core, b, false);
    assert!(core.has_node(&a) && core.has_node(&b));
    // The node reconnects before its old link is seen to go.
    let second = attach(&mut core, a, true);
    core.handle_link_down(first, now);
    assert!(core.has_node(&a));
    core.handle_link_down(second, now);
    core.handle_link_down(connect_only, now);
    assert!(!core.has_node(&a) && !core.has_node(&b));
    assert!(core.node_links.is_empty());
}

#[test]
fn a_circuit_to_another_hub_is_carried_to_the_next_hub() {
    let now = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(now);
    pump(&mut a, &mut b, ab, ba, now);
    // From b, hub a is one hop on, at the addresses it listens on.
    assert_eq!(b.next_hub_towards(&id(1)), Some((id(1), vec![addr(1)])));
    assert_eq!(a.next_hub_towards(&id(2)), Some((id(2), vec![addr(2)])));
    // Itself, or a hub no route leads to: nowhere to carry it.
    assert_eq!(a.next_hub_towards(&id(1)), None);
    assert_eq!(a.next_hub_towards(&id(30)), None);
}

#[test]
fn a_hub_asks_the_hub_that_dialled_it_to_carry_a_circuit_leg() {
    use reach_proto::circuit::{CircuitHello, MAX_HOPS};
    let now = Instant::now();
    // a dialled b: a reaches b, b may not reach a.
    let (mut a, mut b, ab, ba) = two_hubs(now);
    assert_eq!(a.dialled_hub(&id(2)), Some(true));
    assert_eq!(b.dialled_hub(&id(1)), Some(false));
    assert_eq!(b.dialled_hub(&id(30)), None);
    pump(&mut a, &mut b, ab, ba, now);
    let _ = (a.poll_events(), b.poll_events());
    let leg = CircuitHello {
        ticket: [5; 16],
        from: id(7),
        peer: id(8),
        toward: Some(id(1)),
        hops: MAX_HOPS - 1,
        pulled: false,
    };
    assert!(b.pull_circuit(&id(1), &leg));
    assert!(!b.pull_circuit(&id(30), &leg), "no link, no pull");
    pump(&mut a, &mut b, ab, ba, now);
    // a dials b back where its link goes.
    assert_eq!(
        a.poll_events(),
        vec![crate::Event::CircuitPull {
            hub: id(2),
            addr: addr(2),
            leg
        }]
    );
    // A leg marked pulled already, or bytes that are no hello: ignored.
    let pulled = CircuitHello {
        pulled: true,
        ..leg
    };
    for hello in [pulled.encode().to_vec(), vec![1, 2, 3]] {
        let v = a.handle_frame(ab, Frame::Control(Control::CircuitPull { hello }), now);
        assert_eq!(v, Verdict::Continue);
    }
    assert!(a.poll_events().is_empty());
    // A node cannot ask for one.
    let mut hub = open_hub();
    let node = attach(&mut hub, id(9), true);
    let _ = hub.poll_events();
    control(
        &mut hub,
        node,
        Control::CircuitPull {
            hello: leg.encode().to_vec(),
        },
    );
    assert!(hub.poll_events().is_empty());
}

#[test]
fn hubs_learn_each_others_links_and_round_trips_for_the_overlay_map() {
    let t0 = Instant::now();
    let (mut a, mut b, ab, ba) = two_hubs(t0);
    register(&mut a, 10, vec![addr(10)], t0);
    // The tick pings each hub link; the answer comes 3 ms later.
    a.handle_tick(t0);
    b.handle_tick(t0);
    let later = t0 + Duration::from_millis(3);
    pump(&mut a, &mut b, ab, ba, later);
    a.handle_tick(later);
    b.handle_tick(later);
    pump(&mut a, &mut b, ab, ba, later);
    let map = b.status().overlay;
    assert_eq!(map.len(), 2, "{map:?}");
    assert_eq!(map[0].hub, id(2), "own card first");
    let card_a = &map[1];
    assert_eq!(
        (card_a.hub, card_a.nodes, card_a.reachable),
        (id(1), 1, true)
    );
    assert_eq!(card_a.links.len(), 1);
    let link = card_a.links[0];
    assert_eq!((link.hub, link.dialled, link.rtt_us), (id(2), true, 3_000));
    assert_eq!(map[0].links[0].hub, id(1));
    assert!(!map[0].links[0].dialled, "hub 2 accepted the link");
    // Smoothed: 7/8 of 3 ms and 1/8 of the second ping's, answered at once.
    assert_eq!(a.status().hubs[0].rtt, Some(Duration::from_micros(2_625)));
}

#[test]
fn a_forged_overlay_card_cuts_the_link_that_sent_it() {
    let now = Instant::now();
    let (_, mut b, _, ba) = two_hubs(now);
    // Hub 1's link sends a card "from" hub 3, signed by hub 1.
    let links = vec![reach_proto::overlay::LinkCard {
        hub: id(4),
        dialled: true,
        rtt_us: 100,
    }];
    let sig = key(1).sign(&reach_proto::overlay::card_signed_bytes(
        &id(3),
        7,
        0,
        0,
        &links,
    ));
    let forged = Control::HubLinks {
        origin: id(3),
        state: 7,
        nodes: 0,
        unlisted: 0,
        links,
        sig,
    };
    assert!(matches!(
        b.handle_frame(ba, Frame::Control(forged), now),
        Verdict::Close(_)
    ));
    assert_eq!(b.counters.gossip_forged, 1);
    assert_eq!(b.status().overlay.len(), 1, "only its own card");
}

#[test]
fn a_dial_back_goes_only_to_the_nodes_own_address_within_the_gate() {
    use reach_proto::link::{DialBackFrom, DialBackOutcome};
    let mut core = open_hub();
    let node = attach(&mut core, id(30), false);
    let ask = |req, port| Control::DialBack {
        req,
        port,
        from: DialBackFrom::OtherAddress,
        token: 99,
    };
    // Unregistered links are not served: no event, no answer.
    let pending = core.handle_link_up(id(31), addr(8), false, None);
    assert!(matches!(
        control(&mut core, pending, ask(1, 4000)),
        Verdict::Close(_)
    ));
    assert_eq!(core.poll_events(), vec![]);
    out(&mut core);
    // The node's observed address (addr(9)), at the port asked.
    assert_eq!(control(&mut core, node, ask(2, 4000)), Verdict::Continue);
    assert_eq!(
        core.poll_events(),
        vec![Event::DialBack(DialBackRequest {
            link: node,
            req: 2,
            to: SocketAddr::new(addr(9).ip(), 4000),
            from: DialBackFrom::OtherAddress,
            token: 99,
        })]
    );
    // Port 0, and a third running for one link, are declined at once.
    control(&mut core, node, ask(3, 0));
    control(&mut core, node, ask(4, 4001));
    control(&mut core, node, ask(5, 4002));
    assert_eq!(core.poll_events().len(), 1, "the second running one");
    let answers: Vec<u32> = out(&mut core)
        .into_iter()
        .filter_map(|(l, f)| match f {
            Frame::Control(Control::DialedBack {
                req,
                outcome: DialBackOutcome::Declined { .. },
            }) if l == node => Some(req),
            _ => None,
        })
        .collect();
    assert_eq!(answers, vec![3, 5]);
    assert_eq!(core.counters.filter_probes, 2);
    assert_eq!(core.counters.filter_probes_declined, 2);
    core.dial_back_done(node);
    core.dial_back_done(node);
    assert_eq!(core.dial_backs_running(), 0);
}
