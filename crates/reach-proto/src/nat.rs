//! NAT behaviour detection and port prediction for the Splice module.
//!
//! A node learns how its NAT maps a local port by connecting from that one
//! port to two address echoes of its hub (two ports, or two hubs) and reading
//! back the external address each saw ([`Observation`]). [`classify`] turns
//! those into a [`NatProfile`] (RFC 4787 terms: mapping behaviour and port
//! allocation), and [`predict`] turns the profile into the external endpoints
//! a peer should aim its simultaneous-open SYNs at.
//!
//! Prediction follows the allocation the echoes revealed: one endpoint for an
//! endpoint-independent mapping, the next few ports for a mapping that may
//! depend on the destination's address (only one echo address seen), and a
//! window at multiples of the observed step for a sequential allocator (the
//! SmartSockets paper tries port..port+5 whatever the step). A random
//! allocator predicts nothing: splicing is skipped instead of guessed.
//!
//! The echo's wire format is one line, `reach-echo ADDR\n`, from the echo to
//! the client, after which the echo closes; [`encode_echo`] and
//! [`decode_echo`] are its codec. Hubs answer on UDP at the same ports: a
//! datagram of [`UDP_ECHO_REQUEST_LEN`] bytes starting `reach-echo?` gets
//! the same line back, never longer than the question (no amplification).

use std::net::{IpAddr, SocketAddr};

/// Largest allocation step still read as sequential (larger is random).
pub const MAX_SEQUENTIAL_STEP: i32 = 64;
/// Predicted ports for a sequential allocator.
pub const SEQUENTIAL_WINDOW: i32 = 6;
/// Predicted ports after the observed one when the mapping may depend on the
/// destination address (only one echo address was available). Such a NAT
/// gives the peer's address the next free port after the observed one;
/// ports still held by earlier mappings push it further.
pub const ADDRESS_DEPENDENT_WINDOW: i32 = 4;
/// Most candidates a peer is given.
pub const MAX_CANDIDATES: usize = 8;
/// Most bytes an echo answer may take.
pub const MAX_ECHO_LEN: usize = 64;

/// One echo's answer: from `local`, the echo at `server` saw `mapped`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The local end of the probe connection (the kernel's source address).
    pub local: SocketAddr,
    /// The echo.
    pub server: SocketAddr,
    /// The address the echo saw.
    pub mapped: SocketAddr,
}

/// How the NAT picks an external endpoint for a new destination (RFC 4787
/// section 4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// No translation: the echo saw the local address itself.
    NoNat,
    /// The same external endpoint for every destination seen.
    EndpointIndependent,
    /// A new external endpoint per destination (address and port, or at
    /// least port: probes to two ports of one echo differed).
    Dependent,
    /// One observation only.
    Unknown,
}

/// How the NAT picks external ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allocation {
    /// The external port is the local port.
    Preserved,
    /// Each new mapping takes the last port plus `step`.
    Sequential {
        /// Observed difference between consecutive mappings.
        step: i32,
    },
    /// New mappings land on unpredictable ports.
    Random,
    /// Not enough observations to tell.
    Unknown,
}

/// What the echoes revealed about the NAT in front of one local port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NatProfile {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Port allocation.
    pub allocation: Allocation,
    /// Whether the echoes had different IP addresses: only then is an
    /// endpoint-independent mapping told apart from an address-dependent one.
    pub across_addresses: bool,
    /// The last external endpoint observed.
    pub external: Option<SocketAddr>,
}

impl NatProfile {
    /// Whether a peer can be given useful candidates at all.
    pub fn predictable(&self) -> bool {
        self.external.is_some() && self.allocation != Allocation::Random
    }
}

impl std::fmt::Display for NatProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mapping = match self.mapping {
            Mapping::NoNat => "no NAT",
            Mapping::EndpointIndependent if self.across_addresses => "endpoint-independent mapping",
            Mapping::EndpointIndependent => {
                "endpoint-independent mapping (one echo address: may be address-dependent)"
            }
            Mapping::Dependent => "destination-dependent mapping",
            Mapping::Unknown => "unknown mapping",
        };
        f.write_str(mapping)?;
        match self.allocation {
            Allocation::Preserved => f.write_str(", ports preserved"),
            Allocation::Sequential { step } => write!(f, ", sequential ports (step {step})"),
            Allocation::Random => f.write_str(", random ports"),
            Allocation::Unknown => Ok(()),
        }
    }
}

/// Classifies observations made from one local port, in the order made.
pub fn classify(obs: &[Observation]) -> NatProfile {
    let Some(last) = obs.last() else {
        return NatProfile {
            mapping: Mapping::Unknown,
            allocation: Allocation::Unknown,
            across_addresses: false,
            external: None,
        };
    };
    let across_addresses = obs.iter().any(|o| o.server.ip() != last.server.ip());
    let preserved = obs.iter().all(|o| o.mapped.port() == o.local.port());
    if obs.iter().all(|o| o.mapped == o.local) {
        return NatProfile {
            mapping: Mapping::NoNat,
            allocation: Allocation::Preserved,
            across_addresses,
            external: Some(last.mapped),
        };
    }
    let allocation_if_same = if preserved {
        Allocation::Preserved
    } else {
        Allocation::Unknown
    };
    if obs.len() == 1 {
        return NatProfile {
            mapping: Mapping::Unknown,
            allocation: allocation_if_same,
            across_addresses,
            external: Some(last.mapped),
        };
    }
    if obs.iter().all(|o| o.mapped == last.mapped) {
        return NatProfile {
            mapping: Mapping::EndpointIndependent,
            allocation: allocation_if_same,
            across_addresses,
            external: Some(last.mapped),
        };
    }
    // Dependent mapping: the steps between consecutive mappings say how the
    // allocator moves. Steps that agree (up to sign) and stay small are
    // sequential; anything else is unpredictable.
    let steps: Vec<i32> = obs
        .windows(2)
        .map(|w| i32::from(w[1].mapped.port()) - i32::from(w[0].mapped.port()))
        .collect();
    let step = steps[steps.len() - 1];
    let sequential = step != 0
        && step.abs() <= MAX_SEQUENTIAL_STEP
        && steps.iter().all(|s| *s == step)
        && obs.iter().all(|o| o.mapped.ip() == last.mapped.ip());
    NatProfile {
        mapping: Mapping::Dependent,
        allocation: if sequential {
            Allocation::Sequential { step }
        } else {
            Allocation::Random
        },
        across_addresses,
        external: Some(last.mapped),
    }
}

/// Steps a confirming observation may be off by (other hosts behind the same
/// NAT allocating in between) and still count as sequential.
pub const CONFIRM_SLACK: i32 = 3;

/// Confirms a sequential allocation with a third mapping, made from another
/// local port right after the first two: it must follow the last one by the
/// same step (give or take [`CONFIRM_SLACK`] allocations by others). Two
/// random ports land within [`MAX_SEQUENTIAL_STEP`] of each other about once
/// in 500 tries; a third one agreeing by chance is a thousand times rarer.
/// The third mapping is the newest, so predictions start from it.
pub fn confirm_sequential(profile: &NatProfile, third: &Observation) -> NatProfile {
    let Allocation::Sequential { step } = profile.allocation else {
        return *profile;
    };
    let Some(last) = profile.external else {
        return *profile;
    };
    let moved = i32::from(third.mapped.port()) - i32::from(last.port());
    let steps = moved / step;
    let consistent = third.mapped.ip() == last.ip()
        && moved % step == 0
        && (1..=1 + CONFIRM_SLACK).contains(&steps);
    NatProfile {
        allocation: if consistent {
            Allocation::Sequential { step }
        } else {
            Allocation::Random
        },
        external: Some(third.mapped),
        ..*profile
    }
}

/// The external endpoints a peer should connect to, most likely first.
///
/// `public` are this host's own public addresses: with no NAT on the way to
/// the echo (or a multi-homed host whose public interface is not the one the
/// echo saw), the bound port is reachable on each of them too.
pub fn predict(profile: &NatProfile, public: &[IpAddr], local_port: u16) -> Vec<SocketAddr> {
    let Some(ext) = profile.external else {
        return Vec::new();
    };
    let offsets: Vec<i32> = match (profile.mapping, profile.allocation) {
        (_, Allocation::Random) => return Vec::new(),
        (Mapping::NoNat, _) => vec![0],
        (Mapping::EndpointIndependent, _) if profile.across_addresses => vec![0],
        // One echo address: an address-dependent mapping looks endpoint-
        // independent from there, and gives the peer's address the next free
        // port. Extra SYNs at an endpoint-independent NAT's unmapped ports
        // are dropped, so the window costs nothing there.
        (Mapping::EndpointIndependent | Mapping::Unknown, _) => {
            (0..=ADDRESS_DEPENDENT_WINDOW).collect()
        }
        (Mapping::Dependent, Allocation::Sequential { step }) => {
            (1..=SEQUENTIAL_WINDOW).map(|i| i * step).collect()
        }
        (Mapping::Dependent, _) => return Vec::new(),
    };
    let mut out: Vec<SocketAddr> = offsets
        .iter()
        .filter_map(|off| {
            let port = u16::try_from(i32::from(ext.port()) + off).ok()?;
            (port != 0).then_some(SocketAddr::new(ext.ip(), port))
        })
        .collect();
    // On loopback (a test, or hub and peer on one host) other interfaces
    // are not on the way.
    let public = if ext.ip().is_loopback() {
        &[][..]
    } else {
        public
    };
    for ip in public {
        let a = SocketAddr::new(*ip, local_port);
        if !out.contains(&a) && a.is_ipv4() == ext.is_ipv4() {
            out.push(a);
        }
    }
    out.truncate(MAX_CANDIDATES);
    out
}

/// Why an echo answer is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EchoError {
    /// The answer does not start with `reach-echo `.
    #[error("not a reach address echo")]
    NotEcho,
    /// The answer has no end of line within [`MAX_ECHO_LEN`] bytes.
    #[error("address echo answer is incomplete or too long")]
    Incomplete,
    /// The address does not parse.
    #[error("address echo sent a bad address: {0:?}")]
    BadAddress(String),
}

const ECHO_PREFIX: &str = "reach-echo ";

/// Length of a UDP echo request: at least as long as any answer.
pub const UDP_ECHO_REQUEST_LEN: usize = MAX_ECHO_LEN;
const UDP_ECHO_MAGIC: &[u8] = b"reach-echo?";

/// A UDP echo request.
pub fn udp_echo_request() -> [u8; UDP_ECHO_REQUEST_LEN] {
    let mut b = [0u8; UDP_ECHO_REQUEST_LEN];
    b[..UDP_ECHO_MAGIC.len()].copy_from_slice(UDP_ECHO_MAGIC);
    b
}

/// Whether `b` is a UDP echo request (its magic, and long enough that the
/// answer is no larger).
pub fn is_udp_echo_request(b: &[u8]) -> bool {
    b.len() >= UDP_ECHO_REQUEST_LEN && b.starts_with(UDP_ECHO_MAGIC)
}

/// The echo's answer for a client seen at `addr`.
pub fn encode_echo(addr: SocketAddr) -> String {
    format!("{ECHO_PREFIX}{addr}\n")
}

/// Parses an echo answer.
pub fn decode_echo(bytes: &[u8]) -> Result<SocketAddr, EchoError> {
    let head = &bytes[..bytes.len().min(ECHO_PREFIX.len())];
    if !ECHO_PREFIX.as_bytes().starts_with(head) {
        return Err(EchoError::NotEcho);
    }
    let end = bytes
        .iter()
        .take(MAX_ECHO_LEN)
        .position(|b| *b == b'\n')
        .ok_or(EchoError::Incomplete)?;
    if end < ECHO_PREFIX.len() {
        return Err(EchoError::NotEcho);
    }
    let text = String::from_utf8_lossy(&bytes[ECHO_PREFIX.len()..end]);
    text.parse()
        .map_err(|_| EchoError::BadAddress(text.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn obs(local: &str, server: &str, mapped: &str) -> Observation {
        Observation {
            local: sa(local),
            server: sa(server),
            mapped: sa(mapped),
        }
    }

    #[test]
    fn udp_echo_answers_are_never_longer_than_the_request() {
        let longest = encode_echo(sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"));
        assert!(longest.len() <= UDP_ECHO_REQUEST_LEN);
        assert!(is_udp_echo_request(&udp_echo_request()));
        assert!(!is_udp_echo_request(&udp_echo_request()[..20]));
        assert!(!is_udp_echo_request(&[0u8; 64]));
    }

    #[test]
    fn no_nat_gives_the_bound_port_on_each_public_address() {
        let o = [
            obs("198.51.100.5:4000", "192.0.2.1:7701", "198.51.100.5:4000"),
            obs("198.51.100.5:4000", "192.0.2.1:7702", "198.51.100.5:4000"),
        ];
        let p = classify(&o);
        assert_eq!(p.mapping, Mapping::NoNat);
        let public = [
            "198.51.100.5".parse().unwrap(),
            "203.0.113.9".parse().unwrap(),
        ];
        assert_eq!(
            predict(&p, &public, 4000),
            vec![sa("198.51.100.5:4000"), sa("203.0.113.9:4000")]
        );
    }

    #[test]
    fn endpoint_independent_mapping_is_one_endpoint_when_two_addresses_agree() {
        let o = [
            obs("10.0.0.2:4000", "192.0.2.1:7701", "203.0.113.7:4000"),
            obs("10.0.0.2:4000", "192.0.2.2:7701", "203.0.113.7:4000"),
        ];
        let p = classify(&o);
        assert_eq!(p.mapping, Mapping::EndpointIndependent);
        assert_eq!(p.allocation, Allocation::Preserved);
        assert_eq!(predict(&p, &[], 4000), vec![sa("203.0.113.7:4000")]);
        assert!(p.to_string().starts_with("endpoint-independent mapping,"));
    }

    #[test]
    fn one_echo_address_leaves_room_for_an_address_dependent_mapping() {
        let o = [
            obs("10.0.0.2:4000", "192.0.2.1:7701", "203.0.113.7:4000"),
            obs("10.0.0.2:4000", "192.0.2.1:7702", "203.0.113.7:4000"),
        ];
        let p = classify(&o);
        assert!(!p.across_addresses);
        assert_eq!(
            predict(&p, &[], 4000),
            (4000..=4004)
                .map(|p| SocketAddr::new("203.0.113.7".parse().unwrap(), p))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn sequential_allocation_predicts_a_window_at_the_observed_step() {
        for (a, b, step) in [(20000, 20001, 1), (30000, 30002, 2), (5000, 4997, -3)] {
            let o = [
                obs(
                    "10.0.0.2:4000",
                    "192.0.2.1:7701",
                    &format!("203.0.113.7:{a}"),
                ),
                obs(
                    "10.0.0.2:4000",
                    "192.0.2.1:7702",
                    &format!("203.0.113.7:{b}"),
                ),
            ];
            let p = classify(&o);
            assert_eq!(p.mapping, Mapping::Dependent);
            assert_eq!(p.allocation, Allocation::Sequential { step });
            let want: Vec<SocketAddr> = (1..=SEQUENTIAL_WINDOW)
                .map(|i| SocketAddr::new(p.external.unwrap().ip(), (b + i * step) as u16))
                .collect();
            assert_eq!(predict(&p, &[], 4000), want);
        }
    }

    #[test]
    fn a_third_mapping_confirms_a_sequential_allocator_or_unmasks_a_random_one() {
        let o = [
            obs("10.0.0.2:4000", "192.0.2.1:7701", "203.0.113.7:20000"),
            obs("10.0.0.2:4000", "192.0.2.1:7702", "203.0.113.7:20001"),
        ];
        let p = classify(&o);
        let third = |port: u16| {
            obs(
                "10.0.0.2:4100",
                "192.0.2.1:7701",
                &format!("203.0.113.7:{port}"),
            )
        };
        let confirmed = confirm_sequential(&p, &third(20002));
        assert_eq!(confirmed.allocation, Allocation::Sequential { step: 1 });
        assert_eq!(confirmed.external, Some(sa("203.0.113.7:20002")));
        assert_eq!(predict(&confirmed, &[], 4000)[0], sa("203.0.113.7:20003"));
        // Others allocated two ports in between: still sequential.
        let busy = confirm_sequential(&p, &third(20004));
        assert_eq!(busy.allocation, Allocation::Sequential { step: 1 });
        // Two random ports that happened to be close, and a third that is not.
        let unmasked = confirm_sequential(&p, &third(41234));
        assert_eq!(unmasked.allocation, Allocation::Random);
        assert!(predict(&unmasked, &[], 4000).is_empty());
        // Nothing to confirm for other allocations.
        let eim = classify(&[o[0], o[0]]);
        assert_eq!(confirm_sequential(&eim, &third(1)), eim);
    }

    #[test]
    fn random_allocation_predicts_nothing() {
        let o = [
            obs("10.0.0.2:4000", "192.0.2.1:7701", "203.0.113.7:31234"),
            obs("10.0.0.2:4000", "192.0.2.1:7702", "203.0.113.7:50111"),
        ];
        let p = classify(&o);
        assert_eq!(p.allocation, Allocation::Random);
        assert!(!p.predictable());
        assert!(predict(&p, &["198.51.100.1".parse().unwrap()], 4000).is_empty());
    }

    #[test]
    fn predictions_never_leave_the_port_range() {
        let o = [
            obs("10.0.0.2:4000", "192.0.2.1:7701", "203.0.113.7:65533"),
            obs("10.0.0.2:4000", "192.0.2.1:7702", "203.0.113.7:65534"),
        ];
        let got = predict(&classify(&o), &[], 4000);
        assert_eq!(got, vec![sa("203.0.113.7:65535")]);
    }

    #[test]
    fn echo_round_trips_and_rejects_junk() {
        for a in ["203.0.113.7:4000", "[2001:db8::1]:65535"] {
            assert_eq!(decode_echo(encode_echo(sa(a)).as_bytes()), Ok(sa(a)));
        }
        assert_eq!(decode_echo(b"SSH-2.0-x\n"), Err(EchoError::NotEcho));
        assert_eq!(
            decode_echo(b"reach-echo 1.2.3.4:5"),
            Err(EchoError::Incomplete)
        );
        assert!(matches!(
            decode_echo(b"reach-echo nope\n"),
            Err(EchoError::BadAddress(_))
        ));
    }

    proptest! {
        #[test]
        fn echo_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode_echo(&bytes);
        }

        #[test]
        fn classify_and_predict_never_panic_and_stay_bounded(
            ports in proptest::collection::vec((any::<u16>(), any::<u16>(), any::<bool>()), 0..5)
        ) {
            let o: Vec<Observation> = ports
                .iter()
                .map(|(l, m, other)| Observation {
                    local: SocketAddr::new("10.0.0.2".parse().unwrap(), *l),
                    server: SocketAddr::new(
                        if *other { "192.0.2.2" } else { "192.0.2.1" }.parse().unwrap(),
                        7701,
                    ),
                    mapped: SocketAddr::new("203.0.113.7".parse().unwrap(), *m),
                })
                .collect();
            let p = classify(&o);
            let c = predict(&p, &["198.51.100.1".parse().unwrap()], 4000);
            prop_assert!(c.len() <= MAX_CANDIDATES);
            prop_assert!(c.iter().all(|a| a.port() != 0));
        }
    }
}
