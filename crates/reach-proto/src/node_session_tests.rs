//! The node session's timing and bookkeeping, in virtual time.

use super::*;
use crate::link::{decode_frame, verify_admission_proof, Frame};
use crate::SecretKey;

fn id(n: u8) -> NodeId {
    SecretKey::from_seed([n; 32]).node_id()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 7], port))
}

/// A session under test with its virtual clock.
struct Rig {
    s: NodeSession,
    t0: Instant,
    now: Instant,
}

impl Rig {
    fn new(config: Config) -> Self {
        let t0 = Instant::now();
        Self {
            s: NodeSession::new(config, 7, t0),
            t0,
            now: t0,
        }
    }

    fn default() -> Self {
        let mut c = Config::new(id(1));
        c.addrs = vec![addr(4000)];
        Self::new(c)
    }

    /// Advances to the core's next deadline (at most `limit` from now);
    /// returns the time it moved to.
    fn step(&mut self, limit: Duration) -> Duration {
        let to = self
            .s
            .poll_timeout()
            .map_or(self.now + limit, |t| t.min(self.now + limit))
            .max(self.now);
        self.now = to;
        self.s.handle_timeout(to);
        to - self.t0
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.s.poll_event()).collect()
    }

    fn controls(&mut self) -> Vec<Control> {
        let mut out = Vec::new();
        while let Some(f) = self.s.poll_transmit() {
            match decode_frame(&f) {
                Ok(Some((Frame::Control(c), _))) => out.push(c),
                other => panic!("not a control frame: {other:?}"),
            }
        }
        out
    }

    /// Dials, connects and registers; returns the link.
    fn up(&mut self, hub: NodeId) -> LinkId {
        self.step(Duration::from_secs(60));
        assert!(matches!(self.events().last(), Some(Event::Dial { .. })));
        let link = self.s.handle_connected(hub).expect("dial asked for");
        self.controls();
        self.s.handle_control(
            link,
            Control::Registered {
                observed: addr(9),
                echo: vec![7701],
            },
            self.now,
        );
        assert!(self.s.registration().is_some());
        link
    }
}

#[test]
fn it_dials_at_once_and_registers_with_its_proof() {
    let mut c = Config::new(id(1));
    c.addrs = vec![addr(4000)];
    c.network_secret = Some(b"s3cret".to_vec());
    c.key = Some(SecretKey::from_seed([1; 32]));
    c.clock_micros = 5_000;
    let mut r = Rig::new(c);
    assert_eq!(r.step(Duration::from_secs(1)), Duration::ZERO);
    let deadline = r.t0 + Timing::default().attach_timeout;
    assert_eq!(r.events(), vec![Event::Dial { deadline }]);
    let link = r.s.handle_connected(id(9)).expect("dialling");
    match r.controls().as_slice() {
        [Control::Register {
            addrs,
            proof: Some(p),
            accepts: true,
            home: Some(home),
            vpn: None,
        }] => {
            assert_eq!(addrs, &vec![addr(4000)]);
            assert!(verify_admission_proof(b"s3cret", &id(1), &id(9), p));
            // Its own claim to be at this hub, stamped past its start.
            assert!(home.is_valid(&id(1), &id(9)));
            assert!(!home.is_valid(&id(1), &id(8)));
            assert_eq!(home.stamp, 5_000 + link.0);
        }
        other => panic!("expected one Register, got {other:?}"),
    }
    r.s.handle_control(
        link,
        Control::Registered {
            observed: addr(9),
            echo: vec![7701],
        },
        r.now,
    );
    assert_eq!(
        r.events(),
        vec![Event::Up(Registration {
            link,
            hub: id(9),
            observed: addr(9),
            echo: vec![7701],
        })]
    );
}

#[test]
fn failed_dials_back_off_doubling_with_jitter_up_to_the_cap() {
    let mut r = Rig::default();
    let t = Timing::default();
    let mut expect = t.min_backoff;
    for _ in 0..8 {
        r.step(Duration::from_secs(60));
        assert!(matches!(r.events().as_slice(), [Event::Dial { .. }]));
        r.s.handle_dial_failed("connection refused".into(), r.now);
        let Some(Event::Retry { retry_in, why }) = r.s.poll_event() else {
            panic!("expected a retry");
        };
        assert_eq!(why, LinkEnd::Dial("connection refused".into()));
        assert!(
            retry_in >= expect.mul_f64(0.8) && retry_in < expect.mul_f64(1.2),
            "{retry_in:?} not within 20% of {expect:?}"
        );
        assert_eq!(r.s.poll_timeout(), Some(r.now + retry_in));
        expect = (expect * 2).min(t.max_backoff);
    }
}

#[test]
fn a_hub_restart_brings_the_node_back_within_the_first_backoff() {
    let mut r = Rig::default();
    let link = r.up(id(9));
    r.events();
    r.s.handle_link_lost(link, "the hub closed the link".into(), r.now);
    let lost_at = r.now;
    let events = r.events();
    let Some(Event::Down {
        why,
        retry_in: Some(retry),
        ..
    }) = events.first()
    else {
        panic!("expected Down, got {events:?}");
    };
    assert_eq!(why, &LinkEnd::Transport("the hub closed the link".into()));
    assert!(*retry < Timing::default().min_backoff.mul_f64(1.2));
    r.step(Duration::from_secs(60));
    assert!(matches!(r.events().as_slice(), [Event::Dial { .. }]));
    assert!(r.now - lost_at < Duration::from_millis(240));
}

#[test]
fn a_refusal_waits_long_and_is_reported() {
    let mut r = Rig::default();
    r.step(Duration::from_secs(1));
    r.events();
    let link = r.s.handle_connected(id(9)).expect("dialling");
    r.s.handle_control(
        link,
        Control::Refused {
            reason: "not on the allow list".into(),
        },
        r.now,
    );
    assert_eq!(r.s.refused(), Some("not on the allow list"));
    let Some(Event::Down {
        why,
        retry_in: Some(retry),
        ..
    }) = r.s.poll_event()
    else {
        panic!("expected Down");
    };
    assert_eq!(why, LinkEnd::Refused("not on the allow list".into()));
    assert!(retry >= Timing::default().refused_backoff.mul_f64(0.8));
    // Registering later clears it.
    r.up(id(9));
    assert_eq!(r.s.refused(), None);
    assert_eq!(r.s.last_end(), None);
}

#[test]
fn a_hub_that_never_answers_the_registration_is_left_at_the_attach_deadline() {
    let mut r = Rig::default();
    r.step(Duration::from_secs(1));
    r.events();
    let started = r.now;
    r.now += Duration::from_secs(3);
    let link = r.s.handle_connected(id(9)).expect("dialling");
    r.step(Duration::from_secs(60));
    assert_eq!(r.now - started, Timing::default().attach_timeout);
    assert!(matches!(
        r.events().as_slice(),
        [Event::Down { link: l, why: LinkEnd::NoRegistration(_), .. }] if *l == link
    ));
}

#[test]
fn a_wrong_first_answer_ends_the_link() {
    let mut r = Rig::default();
    r.step(Duration::from_secs(1));
    r.events();
    let link = r.s.handle_connected(id(9)).expect("dialling");
    r.s.handle_control(link, Control::Pong { nonce: 3 }, r.now);
    assert!(matches!(
        r.events().as_slice(),
        [Event::Down {
            why: LinkEnd::Unexpected(_),
            ..
        }]
    ));
}

#[test]
fn keepalives_go_out_every_interval_and_silence_ends_the_link() {
    let mut r = Rig::default();
    let link = r.up(id(9));
    r.events();
    // The first ping goes out at registration (it measures the round trip).
    assert_eq!(r.controls(), vec![Control::Ping { nonce: 1 }]);
    let t = Timing::default();
    let up_at = r.now;
    // Pings at 15 s and 30 s; traffic at 20 s keeps the link past 45 s.
    assert_eq!(
        r.step(Duration::from_secs(60)) - (up_at - r.t0),
        t.ping_interval
    );
    assert_eq!(r.controls(), vec![Control::Ping { nonce: 2 }]);
    r.now = up_at + Duration::from_secs(20);
    r.s.handle_traffic(link, r.now);
    r.step(Duration::from_secs(60));
    assert_eq!(r.now - up_at, 2 * t.ping_interval);
    assert_eq!(r.controls(), vec![Control::Ping { nonce: 3 }]);
    r.step(Duration::from_secs(60));
    assert_eq!(r.now - up_at, 3 * t.ping_interval);
    assert!(r.s.registration().is_some());
    // Then silence: the link ends 45 s after the last frame heard.
    while r.s.registration().is_some() {
        r.step(Duration::from_secs(60));
    }
    assert_eq!(r.now - up_at, Duration::from_secs(20) + t.idle_timeout);
    assert!(r
        .events()
        .iter()
        .any(|e| matches!(e, Event::Down { why: LinkEnd::Silent(d), .. } if *d == t.idle_timeout)));
}

#[test]
fn the_links_round_trip_is_measured_from_registration_on() {
    let mut r = Rig::default();
    let link = r.up(id(9));
    assert_eq!(r.s.link_rtt(), None, "nothing measured yet");
    let nonce = match r.controls().last() {
        Some(Control::Ping { nonce }) => *nonce,
        other => panic!("no ping at registration: {other:?}"),
    };
    r.now += Duration::from_millis(40);
    // A stale or foreign pong measures nothing.
    r.s.handle_control(link, Control::Pong { nonce: nonce + 7 }, r.now);
    assert_eq!(r.s.link_rtt(), None);
    r.s.handle_control(link, Control::Pong { nonce }, r.now);
    assert_eq!(r.s.link_rtt(), Some(Duration::from_millis(40)));
    // Later samples are smoothed (RFC 6298): 7/8 old + 1/8 new.
    r.step(Duration::from_secs(60));
    let Some(Control::Ping { nonce }) = r.controls().last().cloned() else {
        panic!("no keepalive ping")
    };
    r.now += Duration::from_millis(120);
    r.s.handle_control(link, Control::Pong { nonce }, r.now);
    assert_eq!(r.s.link_rtt(), Some(Duration::from_millis(50)));
}

#[test]
fn a_ping_from_the_hub_is_answered() {
    let mut r = Rig::default();
    let link = r.up(id(9));
    r.controls();
    r.s.handle_control(link, Control::Ping { nonce: 42 }, r.now);
    assert_eq!(r.controls(), vec![Control::Pong { nonce: 42 }]);
}

#[test]
fn lookups_are_answered_expire_or_fail_with_the_link() {
    let mut r = Rig::default();
    assert_eq!(
        r.s.lookup(id(3), r.now + Duration::from_secs(5)),
        Err(LookupFailure::NotUp)
    );
    let link = r.up(id(9));
    r.events();
    r.controls();
    let a =
        r.s.lookup(id(3), r.now + Duration::from_secs(5))
            .expect("up");
    let b =
        r.s.lookup(id(4), r.now + Duration::from_secs(2))
            .expect("up");
    let c =
        r.s.lookup(id(5), r.now + Duration::from_secs(9))
            .expect("up");
    assert_eq!(
        r.controls(),
        vec![
            Control::Lookup {
                req: a,
                node: id(3)
            },
            Control::Lookup {
                req: b,
                node: id(4)
            },
            Control::Lookup {
                req: c,
                node: id(5)
            },
        ]
    );
    let entry = DirEntry {
        node: id(3),
        hub: id(9),
        addrs: vec![addr(5)],
        observed: addr(6),
        claim: None,
    };
    r.s.handle_control(
        link,
        Control::Found {
            req: a,
            node: id(3),
            entry: Some(entry.clone()),
        },
        r.now,
    );
    assert_eq!(
        r.events(),
        vec![Event::Found {
            req: a,
            entry: Some(entry)
        }]
    );
    // b expires at its deadline, not before.
    assert_eq!(r.step(Duration::from_secs(60)), Duration::from_secs(2));
    assert_eq!(
        r.events(),
        vec![Event::LookupFailed {
            req: b,
            why: LookupFailure::TimedOut
        }]
    );
    // A late answer to b is dropped.
    r.s.handle_control(
        link,
        Control::Found {
            req: b,
            node: id(4),
            entry: None,
        },
        r.now,
    );
    assert_eq!(r.events(), vec![]);
    // c fails when the link goes.
    r.s.handle_link_lost(link, "reset".into(), r.now);
    assert_eq!(
        r.events().first(),
        Some(&Event::LookupFailed {
            req: c,
            why: LookupFailure::LinkLost
        })
    );
}

#[test]
fn a_dial_back_is_asked_answered_once_and_expires() {
    use crate::link::{DialBackFrom, DialBackOutcome};
    let mut r = Rig::default();
    let far = r.now + Duration::from_secs(5);
    assert_eq!(
        r.s.dial_back(4000, DialBackFrom::OtherPort, 7, far),
        Err(LookupFailure::NotUp)
    );
    let link = r.up(id(9));
    r.events();
    r.controls();
    let a =
        r.s.dial_back(4000, DialBackFrom::OtherPort, 7, far)
            .expect("up");
    let b =
        r.s.dial_back(
            4001,
            DialBackFrom::OtherAddress,
            8,
            r.now + Duration::from_secs(1),
        )
        .expect("up");
    assert_eq!(
        r.controls(),
        vec![
            Control::DialBack {
                req: a,
                port: 4000,
                from: DialBackFrom::OtherPort,
                token: 7
            },
            Control::DialBack {
                req: b,
                port: 4001,
                from: DialBackFrom::OtherAddress,
                token: 8
            },
        ]
    );
    let outcome = DialBackOutcome::Refused { from: addr(77) };
    let answer = Control::DialedBack {
        req: a,
        outcome: outcome.clone(),
    };
    r.s.handle_control(link, answer.clone(), r.now);
    assert_eq!(r.events(), vec![Event::DialedBack { req: a, outcome }]);
    // A second answer to the same request is dropped.
    r.s.handle_control(link, answer, r.now);
    assert_eq!(r.events(), vec![]);
    assert_eq!(r.step(Duration::from_secs(60)), Duration::from_secs(1));
    assert_eq!(
        r.events(),
        vec![Event::LookupFailed {
            req: b,
            why: LookupFailure::TimedOut
        }]
    );
}

#[test]
fn pending_lookups_are_bounded() {
    let mut c = Config::new(id(1));
    c.max_lookups = 3;
    let mut r = Rig::new(c);
    r.up(id(9));
    let far = r.now + Duration::from_secs(60);
    for _ in 0..3 {
        r.s.lookup(id(3), far).expect("room");
    }
    assert_eq!(r.s.lookup(id(3), far), Err(LookupFailure::Busy));
}

#[test]
fn services_are_published_again_after_a_reconnect_with_their_port() {
    let mut r = Rig::default();
    let link = r.up(id(9));
    r.controls();
    let allow = vec![(IpAddr::from([10, 0, 0, 0]), 8)];
    r.s.expose(22, allow.clone()).expect("fits");
    r.s.expose(80, vec![]).expect("fits");
    assert_eq!(r.controls().len(), 2);
    assert_eq!(r.s.exposure(22), Some(&Exposure::Pending));
    r.s.handle_control(
        link,
        Control::Exposed {
            vport: 22,
            port: 40022,
            proxy: id(8),
        },
        r.now,
    );
    assert!(r.s.serves_proxy_clients(&id(8), 22), "the hub's proxy node");
    assert!(r.s.serves_proxy_clients(&id(9), 22), "the hub itself");
    assert!(!r.s.serves_proxy_clients(&id(7), 22), "anyone else");
    assert!(
        !r.s.serves_proxy_clients(&id(8), 80),
        "a port not published"
    );
    let refusal = ExposeRefusal {
        offered: true,
        reason: "no free port".into(),
    };
    r.s.handle_control(
        link,
        Control::ExposeRefused {
            vport: 80,
            offered: true,
            reason: "no free port".into(),
        },
        r.now,
    );
    assert_eq!(r.s.exposure(22), Some(&Exposure::Published(40022)));
    // Refused on first asking: forgotten.
    assert_eq!(r.s.exposure(80), None);
    r.events();
    r.s.handle_link_lost(link, "reset".into(), r.now);
    let link = r.up(id(9));
    assert_eq!(r.s.exposure(22), Some(&Exposure::Pending));
    let again: Vec<Control> = r
        .controls()
        .into_iter()
        .filter(|c| matches!(c, Control::Expose { .. }))
        .collect();
    assert_eq!(
        again,
        vec![Control::Expose {
            vport: 22,
            want_port: Some(40022),
            allow_from: allow,
        }]
    );
    // Refused after a reconnect: kept, and shown refused.
    r.s.handle_control(
        link,
        Control::ExposeRefused {
            vport: 22,
            offered: true,
            reason: "no free port".into(),
        },
        r.now,
    );
    assert_eq!(r.s.exposure(22), Some(&Exposure::Refused(refusal)));
}

#[test]
fn an_expose_too_large_for_a_frame_is_refused_and_not_recorded() {
    let mut r = Rig::default();
    r.up(id(9));
    r.controls();
    let huge = vec![(IpAddr::from([10, 0, 0, 0]), 8); 20_000];
    assert!(matches!(
        r.s.expose(22, huge),
        Err(crate::link::LinkError::TooLarge(_))
    ));
    assert_eq!(r.s.exposure(22), None);
    assert_eq!(r.controls(), vec![]);
}

#[test]
fn answers_for_other_nodes_are_bounded() {
    let mut c = Config::new(id(1));
    c.max_answers = 2;
    let mut r = Rig::new(c);
    let link = r.up(id(9));
    r.events();
    r.controls();
    let cb = |token| {
        Control::ConnectBack(ConnectBack {
            from: id(5),
            target: id(1),
            token,
            vport: 22,
            addrs: vec![addr(5)],
            upgrade: None,
        })
    };
    r.s.handle_control(link, cb(1), r.now);
    let offer = Control::Relay {
        from: id(6),
        to: id(1),
        msg: Rendezvous::SpliceOffer {
            token: 9,
            vport: 22,
            candidates: vec![addr(6); 100],
            upgrade: false,
        },
    };
    r.s.handle_control(link, offer.clone(), r.now);
    let events = r.events();
    assert!(matches!(events[0], Event::ConnectBack(_)));
    match &events[1] {
        Event::SpliceOffer(SpliceOffer { candidates, .. }) => {
            assert_eq!(candidates.len(), crate::nat::MAX_CANDIDATES)
        }
        other => panic!("expected an offer, got {other:?}"),
    }
    // Full: both kinds are declined at once, to their askers.
    r.s.handle_control(link, cb(2), r.now);
    r.s.handle_control(link, offer.clone(), r.now);
    assert_eq!(r.events(), vec![]);
    match r.controls().as_slice() {
        [Control::ConnectBackFailed {
            requester, token, ..
        }, Control::Relay {
            to,
            msg: Rendezvous::SpliceDeclined { token: t, .. },
            ..
        }] => {
            assert_eq!((*requester, *token), (id(5), 2));
            assert_eq!((*to, *t), (id(6), 9));
        }
        other => panic!("expected two refusals, got {other:?}"),
    }
    r.s.answer_done();
    r.s.handle_control(link, cb(3), r.now);
    assert!(matches!(r.events().as_slice(), [Event::ConnectBack(_)]));
    assert_eq!(r.s.answers_running(), 2);
}

#[test]
fn opens_for_this_node_come_in_and_others_are_reset() {
    let mut r = Rig::default();
    let link = r.up(id(9));
    r.events();
    r.controls();
    r.s.handle_open(link, 2, id(1), id(5), r.now);
    assert_eq!(
        r.events(),
        vec![Event::Inbound {
            stream: 2,
            src: id(5)
        }]
    );
    r.s.handle_open(link, 4, id(2), id(5), r.now);
    assert_eq!(r.events(), vec![]);
    let f = r.s.poll_transmit().expect("a reset");
    assert!(matches!(
        decode_frame(&f),
        Ok(Some((
            Frame::Reset {
                stream: 4,
                code: ResetCode::NoRoute,
                ..
            },
            _
        )))
    ));
}

#[test]
fn input_about_an_old_link_is_ignored() {
    let mut r = Rig::default();
    let old = r.up(id(9));
    r.s.handle_link_lost(old, "reset".into(), r.now);
    let new = r.up(id(9));
    assert_ne!(old, new);
    r.events();
    r.controls();
    r.s.handle_control(old, Control::Refused { reason: "x".into() }, r.now);
    r.s.handle_link_lost(old, "late".into(), r.now);
    r.s.handle_open(old, 2, id(1), id(5), r.now);
    assert_eq!(r.events(), vec![]);
    assert_eq!(r.s.registration().map(|g| g.link), Some(new));
}

#[test]
fn stream_ids_are_odd_and_restart_on_a_new_link() {
    let mut r = Rig::default();
    assert_eq!(r.s.open_stream(&id(5)), None);
    let link = r.up(id(9));
    r.controls();
    assert_eq!(r.s.open_stream(&id(5)), Some((link, 1)));
    assert_eq!(r.s.open_stream(&id(5)), Some((link, 3)));
    let f = r.s.poll_transmit().expect("an open");
    assert!(matches!(
        decode_frame(&f),
        Ok(Some((Frame::Open { stream: 1, .. }, _)))
    ));
    r.s.handle_link_lost(link, "reset".into(), r.now);
    let link = r.up(id(9));
    assert_eq!(r.s.open_stream(&id(5)), Some((link, 1)));
}

#[test]
fn close_ends_the_link_and_stops_dialling() {
    let mut r = Rig::default();
    let link = r.up(id(9));
    r.events();
    r.s.close();
    assert_eq!(
        r.events(),
        vec![Event::Down {
            link,
            why: LinkEnd::Closed,
            retry_in: None
        }]
    );
    assert_eq!(r.s.poll_timeout(), None);
    r.now += Duration::from_secs(600);
    r.s.handle_timeout(r.now);
    assert_eq!(r.events(), vec![]);
    assert!(r.s.is_closed());
}

#[test]
fn the_same_seed_gives_the_same_schedule() {
    let run = || {
        let mut r = Rig::default();
        (0..6)
            .map(|_| {
                r.step(Duration::from_secs(60));
                r.events();
                r.s.handle_dial_failed("refused".into(), r.now);
                r.now - r.t0
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}
