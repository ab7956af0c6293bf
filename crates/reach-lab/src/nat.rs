//! A userspace NAT for the RFC 4787 behaviours Linux conntrack cannot produce:
//! address-dependent mapping, sequential port allocation, and endpoint- or
//! address-dependent filtering (conntrack always filters by address and port).
//!
//! Sans-IO: [`Nat::outbound`] and [`Nat::inbound`] take one IPv4 packet in a
//! caller-owned buffer, rewrite it in place and say whether to forward it. The
//! lab's hop calls them for frames crossing a NAT site's WAN link; tests call
//! them directly. TCP and UDP are translated; other protocols and fragments are
//! dropped at the external address. Mappings expire when the site declares
//! timeouts (`udp_timeout_s`, `tcp_timeout_s`): a mapping idle longer is gone,
//! and so is its binding, so the next outbound packet gets a new one and an
//! inbound packet to the old port is dropped; a TCP mapping whose connection
//! closed (a reset, or a FIN each way) goes [`TCP_CLOSED`] after its last
//! packet. Without declared timeouts mappings last the lab's life. Time is an
//! input (`now`, since any fixed start).
//! Checksums are updated incrementally (RFC 1624), so a packet costs no pass
//! over its payload.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::topology::{Allocation, Filtering, Mapping};

/// First port handed out by sequential allocation.
pub const SEQUENTIAL_BASE: u16 = 20_000;
/// Lowest external port allocated (below are the well-known ports).
const LOW_PORT: u16 = 1024;

/// How long a TCP mapping outlives its connection's close, when TCP
/// mappings expire at all (RFC 5382 asks 4 min for this "transitory" state;
/// a lab test should not wait that long).
pub const TCP_CLOSED: Duration = Duration::from_secs(10);

/// Packets between sweeps of expired mappings (a mapping met by a packet is
/// checked then; the sweep bounds what idle ones hold).
const SWEEP_EVERY: u32 = 4096;

/// How a NAT behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// The NAT's external address.
    pub external: Ipv4Addr,
    /// RFC 4787 section 4.1 mapping.
    pub mapping: Mapping,
    /// RFC 4787 section 5 filtering.
    pub filtering: Filtering,
    /// Port allocation.
    pub allocation: Allocation,
    /// Seed for random allocation (time and randomness are inputs).
    pub seed: u64,
    /// RFC 4787 section 6 (REQ-9): inside hosts reach each other through
    /// their external mappings.
    pub hairpin: bool,
    /// How long an idle UDP mapping lives (None: for ever).
    pub udp_timeout: Option<Duration>,
    /// How long an idle TCP mapping lives (None: for ever).
    pub tcp_timeout: Option<Duration>,
}

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it on (rewritten, or untouched when it is not the NAT's business).
    Forward,
    /// Send it back inside: an inside host's packet to another inside host's
    /// mapping, translated at both ends (hairpinning).
    Hairpin,
    /// Drop it, and why.
    Drop(DropReason),
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not a well-formed IPv4 TCP or UDP packet, or a fragment.
    Malformed,
    /// Inbound to an external port with no mapping.
    NoMapping,
    /// Inbound from a remote endpoint the filtering does not admit.
    Filtered,
    /// Every external port is taken.
    PortsExhausted,
    /// To the NAT's own external address from inside, without hairpinning.
    NoHairpin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Proto {
    Tcp,
    Udp,
}

/// The key a mapping is looked up by: the internal endpoint, plus the parts of
/// the destination the mapping behaviour depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct MapKey {
    proto: Proto,
    internal: (Ipv4Addr, u16),
    dst_ip: Option<Ipv4Addr>,
    dst_port: Option<u16>,
}

#[derive(Debug)]
struct Binding {
    internal: (Ipv4Addr, u16),
    contacted: HashSet<(Ipv4Addr, u16)>,
    /// When a packet last crossed it.
    last: Duration,
    /// TCP: a FIN went out, a FIN came in, a reset crossed.
    fin_out: bool,
    fin_in: bool,
    reset: bool,
}

/// The translation state.
#[derive(Debug)]
pub struct Nat {
    config: NatConfig,
    maps: HashMap<MapKey, u16>,
    bindings: HashMap<(Proto, u16), Binding>,
    next_sequential: u16,
    rng: u64,
    /// Packets until the next sweep of expired mappings.
    until_sweep: u32,
}

/// Where the fields of a parsed packet are.
struct Parsed {
    proto: Proto,
    l4: usize,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    /// TCP flags (0 for UDP).
    flags: u8,
}

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

fn parse(p: &[u8]) -> Option<Parsed> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0;
    if ihl < 20 || total < ihl || total > p.len() || fragment {
        return None;
    }
    let (proto, min) = match p[9] {
        6 => (Proto::Tcp, 20),
        17 => (Proto::Udp, 8),
        _ => return None,
    };
    if total - ihl < min {
        return None;
    }
    let ip = |at: usize| Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
    let port = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
    Some(Parsed {
        proto,
        l4: ihl,
        src: (ip(12), port(ihl)),
        dst: (ip(16), port(ihl + 2)),
        flags: if proto == Proto::Tcp { p[ihl + 13] } else { 0 },
    })
}

/// RFC 1624 eqn. 3: the checksum after 16-bit words `old` became `new`.
fn adjust(checksum: u16, old: &[u16], new: &[u16]) -> u16 {
    let mut sum = u32::from(!checksum);
    for w in old {
        sum += u32::from(!*w);
    }
    for w in new {
        sum += u32::from(*w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn words(ip: Ipv4Addr, port: u16) -> [u16; 3] {
    let o = ip.octets();
    [
        u16::from_be_bytes([o[0], o[1]]),
        u16::from_be_bytes([o[2], o[3]]),
        port,
    ]
}

/// Rewrites the source (`at_src`) or destination endpoint, fixing both checksums.
fn rewrite(p: &mut [u8], parsed: &Parsed, at_src: bool, to: (Ipv4Addr, u16)) {
    let from = if at_src { parsed.src } else { parsed.dst };
    let (ip_at, port_at) = if at_src {
        (12, parsed.l4)
    } else {
        (16, parsed.l4 + 2)
    };
    let (old, new) = (words(from.0, from.1), words(to.0, to.1));
    let ip_sum = u16::from_be_bytes([p[10], p[11]]);
    p[10..12].copy_from_slice(&adjust(ip_sum, &old[..2], &new[..2]).to_be_bytes());
    let sum_at = parsed.l4 + if parsed.proto == Proto::Tcp { 16 } else { 6 };
    let l4_sum = u16::from_be_bytes([p[sum_at], p[sum_at + 1]]);
    // A UDP checksum of zero means "none" and stays so; a computed zero is sent
    // as all ones (RFC 768).
    if !(parsed.proto == Proto::Udp && l4_sum == 0) {
        let mut s = adjust(l4_sum, &old, &new);
        if parsed.proto == Proto::Udp && s == 0 {
            s = 0xffff;
        }
        p[sum_at..sum_at + 2].copy_from_slice(&s.to_be_bytes());
    }
    p[ip_at..ip_at + 4].copy_from_slice(&to.0.octets());
    p[port_at..port_at + 2].copy_from_slice(&to.1.to_be_bytes());
}

/// Whether binding `b` has been idle longer than `config` lets a mapping
/// of `proto` live (a TCP one whose connection closed, [`TCP_CLOSED`] at
/// most).
fn expired(config: &NatConfig, proto: Proto, b: &Binding, now: Duration) -> bool {
    let lifetime = match proto {
        Proto::Udp => config.udp_timeout,
        Proto::Tcp => {
            let closed = b.reset || (b.fin_out && b.fin_in);
            config
                .tcp_timeout
                .map(|t| if closed { t.min(TCP_CLOSED) } else { t })
        }
    };
    lifetime.is_some_and(|t| now.saturating_sub(b.last) > t)
}

impl Nat {
    /// A NAT with no mappings yet.
    pub fn new(config: NatConfig) -> Self {
        Self {
            config,
            maps: HashMap::new(),
            bindings: HashMap::new(),
            next_sequential: SEQUENTIAL_BASE,
            rng: config.seed | 1,
            until_sweep: SWEEP_EVERY,
        }
    }

    /// Mappings (bindings of an external port) held now.
    pub fn bindings(&self) -> usize {
        self.bindings.len()
    }

    /// Forgets the binding of `port` if it expired by `now`, with its
    /// mappings; every so many packets, every expired one.
    fn forget_expired(&mut self, proto: Proto, port: Option<u16>, now: Duration) {
        let config = self.config;
        let before = self.bindings.len();
        self.until_sweep = self.until_sweep.saturating_sub(1);
        if self.until_sweep == 0 {
            self.until_sweep = SWEEP_EVERY;
            self.bindings
                .retain(|(proto, _), b| !expired(&config, *proto, b, now));
        } else if let Some(key) = port.map(|p| (proto, p)) {
            if self
                .bindings
                .get(&key)
                .is_some_and(|b| expired(&config, proto, b, now))
            {
                self.bindings.remove(&key);
            }
        }
        if self.bindings.len() < before {
            let bindings = &self.bindings;
            self.maps
                .retain(|k, port| bindings.contains_key(&(k.proto, *port)));
        }
    }

    /// Notes a packet of `parsed` crossing the binding of `port` at `now`.
    fn touch(&mut self, parsed: &Parsed, port: u16, outbound: bool, now: Duration) {
        if let Some(b) = self.bindings.get_mut(&(parsed.proto, port)) {
            b.last = now;
            b.reset |= parsed.flags & TCP_RST != 0;
            if parsed.flags & TCP_FIN != 0 {
                if outbound {
                    b.fin_out = true;
                } else {
                    b.fin_in = true;
                }
            }
        }
    }

    /// Translates a packet leaving the inside at `now`.
    pub fn outbound(&mut self, now: Duration, p: &mut [u8]) -> Verdict {
        let Some(parsed) = parse(p) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        if parsed.src.0 == self.config.external {
            return Verdict::Forward; // the gateway's own traffic
        }
        let key = self.key(parsed.proto, parsed.src, parsed.dst);
        let mapped = self.maps.get(&key).copied();
        self.forget_expired(parsed.proto, mapped, now);
        let port = match self.maps.get(&key) {
            Some(p) => *p,
            None => {
                let Some(port) = self.allocate(parsed.proto, parsed.src.1) else {
                    return Verdict::Drop(DropReason::PortsExhausted);
                };
                self.maps.insert(key, port);
                let binding = Binding {
                    internal: parsed.src,
                    contacted: HashSet::new(),
                    last: now,
                    fin_out: false,
                    fin_in: false,
                    reset: false,
                };
                self.bindings.insert((parsed.proto, port), binding);
                port
            }
        };
        if let Some(b) = self.bindings.get_mut(&(parsed.proto, port)) {
            b.contacted.insert(parsed.dst);
        }
        self.touch(&parsed, port, true, now);
        rewrite(p, &parsed, true, (self.config.external, port));
        if parsed.dst.0 != self.config.external {
            return Verdict::Forward;
        }
        if !self.config.hairpin {
            return Verdict::Drop(DropReason::NoHairpin);
        }
        // Now from our external endpoint to our external address: translate
        // the destination as if it had come from outside, filtering included.
        match self.inbound(now, p) {
            Verdict::Forward => Verdict::Hairpin,
            other => other,
        }
    }

    /// Translates a packet arriving from outside at `now`.
    pub fn inbound(&mut self, now: Duration, p: &mut [u8]) -> Verdict {
        if p.len() >= 20 && p[0] >> 4 == 4 && p[16..20] != self.config.external.octets() {
            return Verdict::Forward; // not addressed to the NAT
        }
        let Some(parsed) = parse(p) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        self.forget_expired(parsed.proto, Some(parsed.dst.1), now);
        let Some(b) = self.bindings.get(&(parsed.proto, parsed.dst.1)) else {
            return Verdict::Drop(DropReason::NoMapping);
        };
        let admitted = match self.config.filtering {
            Filtering::EndpointIndependent => true,
            Filtering::AddressDependent => b.contacted.iter().any(|(ip, _)| *ip == parsed.src.0),
            Filtering::AddressAndPortDependent => b.contacted.contains(&parsed.src),
        };
        if !admitted {
            return Verdict::Drop(DropReason::Filtered);
        }
        let internal = b.internal;
        // An admitted inbound session is bound to the port it came in on: the
        // inside's replies must leave from there, even where the mapping
        // behaviour would give a new destination a new port.
        let key = self.key(parsed.proto, internal, parsed.src);
        self.maps.entry(key).or_insert(parsed.dst.1);
        if let Some(b) = self.bindings.get_mut(&(parsed.proto, parsed.dst.1)) {
            b.contacted.insert(parsed.src);
        }
        self.touch(&parsed, parsed.dst.1, false, now);
        rewrite(p, &parsed, false, internal);
        Verdict::Forward
    }

    /// The mapping key of a session between `internal` and `remote`.
    fn key(&self, proto: Proto, internal: (Ipv4Addr, u16), remote: (Ipv4Addr, u16)) -> MapKey {
        MapKey {
            proto,
            internal,
            dst_ip: (self.config.mapping != Mapping::EndpointIndependent).then_some(remote.0),
            dst_port: (self.config.mapping == Mapping::AddressAndPortDependent).then_some(remote.1),
        }
    }

    fn free(&self, proto: Proto, port: u16) -> bool {
        port >= LOW_PORT && !self.bindings.contains_key(&(proto, port))
    }

    fn allocate(&mut self, proto: Proto, internal_port: u16) -> Option<u16> {
        let span = u32::from(u16::MAX - LOW_PORT) + 1;
        match self.config.allocation {
            Allocation::Preserve => (0..span)
                .map(|i| {
                    LOW_PORT
                        + ((u32::from(internal_port.max(LOW_PORT) - LOW_PORT) + i) % span) as u16
                })
                .find(|p| self.free(proto, *p)),
            Allocation::Sequential => {
                let start = self.next_sequential;
                let port = (0..span)
                    .map(|i| LOW_PORT + ((u32::from(start - LOW_PORT) + i) % span) as u16)
                    .find(|p| self.free(proto, *p))?;
                self.next_sequential = if port == u16::MAX { LOW_PORT } else { port + 1 };
                Some(port)
            }
            Allocation::Random => (0..span).find_map(|_| {
                // xorshift64: deterministic from the seed.
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let p = LOW_PORT + (self.rng % u64::from(span)) as u16;
                self.free(proto, p).then_some(p)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
    const IN: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
    const OBS1: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 250);
    const OBS2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 251);
    /// The time of packets in tests that do not expire mappings.
    const T: Duration = Duration::ZERO;

    fn sum(data: &[u8], mut acc: u32) -> u32 {
        for chunk in data.chunks(2) {
            let w = if chunk.len() == 2 {
                u16::from_be_bytes([chunk[0], chunk[1]])
            } else {
                u16::from(chunk[0]) << 8
            };
            acc += u32::from(w);
        }
        acc
    }

    fn fold(mut s: u32) -> u16 {
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    /// A TCP or UDP packet with correct checksums.
    fn packet(tcp: bool, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
        let l4_len = if tcp { 20 } else { 8 } + payload.len();
        let total = 20 + l4_len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = if tcp { 6 } else { 17 };
        p[12..16].copy_from_slice(&src.0.octets());
        p[16..20].copy_from_slice(&dst.0.octets());
        p[20..22].copy_from_slice(&src.1.to_be_bytes());
        p[22..24].copy_from_slice(&dst.1.to_be_bytes());
        if tcp {
            p[32] = 0x50;
            p[33] = 0x02;
        } else {
            p[24..26].copy_from_slice(&(l4_len as u16).to_be_bytes());
        }
        p[20 + l4_len - payload.len()..].copy_from_slice(payload);
        let ip_sum = fold(sum(&p[..20], 0));
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        let at = if tcp { 36 } else { 26 };
        let mut l4_sum = fold(l4_pseudo_sum(&p));
        // As a sender's stack does: a UDP checksum that computes to zero is
        // sent as all ones, since zero means "no checksum" (RFC 768).
        if !tcp && l4_sum == 0 {
            l4_sum = 0xffff;
        }
        p[at..at + 2].copy_from_slice(&l4_sum.to_be_bytes());
        p
    }

    fn l4_pseudo_sum(p: &[u8]) -> u32 {
        let l4_len = p.len() - 20;
        let mut acc = sum(&p[12..20], 0);
        acc += u32::from(p[9]);
        acc += l4_len as u32;
        sum(&p[20..], acc)
    }

    fn checksums_valid(p: &[u8]) -> bool {
        fold(sum(&p[..20], 0)) == 0 && fold(l4_pseudo_sum(p)) == 0
    }

    /// An endpoint-independent NAT whose mappings expire.
    fn forgetful(udp_s: u64, tcp_s: u64) -> Nat {
        Nat::new(NatConfig {
            udp_timeout: Some(Duration::from_secs(udp_s)),
            tcp_timeout: Some(Duration::from_secs(tcp_s)),
            ..nat(
                Mapping::EndpointIndependent,
                Filtering::AddressAndPortDependent,
                Allocation::Preserve,
            )
            .config
        })
    }

    fn at(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn an_idle_udp_mapping_is_forgotten_after_its_timeout_and_traffic_keeps_it() {
        let mut n = forgetful(30, 600);
        let mut p = packet(false, (IN, 5000), (OBS1, 53), b"q");
        assert_eq!(n.outbound(at(0), &mut p), Verdict::Forward);
        let reply = |n: &mut Nat, t| {
            let mut r = packet(false, (OBS1, 53), (EXT, 5000), b"a");
            n.inbound(at(t), &mut r)
        };
        // Answers within the timeout keep it alive, each from its own arrival.
        assert_eq!(reply(&mut n, 29), Verdict::Forward);
        assert_eq!(reply(&mut n, 58), Verdict::Forward);
        assert_eq!(reply(&mut n, 89), Verdict::Drop(DropReason::NoMapping));
        assert_eq!(n.bindings(), 0, "forgotten with its binding");
        // The next packet out makes a new mapping.
        let mut p = packet(false, (IN, 5000), (OBS1, 53), b"q");
        assert_eq!(n.outbound(at(90), &mut p), Verdict::Forward);
        assert_eq!(reply(&mut n, 91), Verdict::Forward);
        // Without timeouts nothing is forgotten.
        let mut keep = nat(
            Mapping::EndpointIndependent,
            Filtering::AddressAndPortDependent,
            Allocation::Preserve,
        );
        let mut p = packet(false, (IN, 5000), (OBS1, 53), b"q");
        assert_eq!(keep.outbound(at(0), &mut p), Verdict::Forward);
        assert_eq!(reply(&mut keep, 1_000_000), Verdict::Forward);
    }

    #[test]
    fn a_tcp_mapping_goes_after_its_timeout_or_soon_after_its_connection_closed() {
        let flagged = |src, dst, flags: u8| {
            let mut p = packet(true, src, dst, b"");
            p[33] = flags;
            p
        };
        let (inside, outside) = ((IN, 6000), (OBS1, 80));
        let back = (EXT, 6000);
        // Idle past the timeout: gone.
        let mut n = forgetful(30, 60);
        assert_eq!(
            n.outbound(at(0), &mut flagged(inside, outside, 0x02)),
            Verdict::Forward
        );
        assert_eq!(
            n.inbound(at(59), &mut flagged(outside, back, 0x10)),
            Verdict::Forward
        );
        assert_eq!(
            n.inbound(at(120), &mut flagged(outside, back, 0x10)),
            Verdict::Drop(DropReason::NoMapping)
        );
        // A reset closes it: it goes TCP_CLOSED after its last packet.
        let mut n = forgetful(30, 600);
        assert_eq!(
            n.outbound(at(0), &mut flagged(inside, outside, 0x02)),
            Verdict::Forward
        );
        assert_eq!(
            n.inbound(at(5), &mut flagged(outside, back, 0x04)),
            Verdict::Forward
        );
        let late = 5 + TCP_CLOSED.as_secs() + 1;
        assert_eq!(
            n.inbound(at(late), &mut flagged(outside, back, 0x10)),
            Verdict::Drop(DropReason::NoMapping)
        );
        // A FIN each way closes it too; one FIN alone does not.
        let mut n = forgetful(30, 600);
        assert_eq!(
            n.outbound(at(0), &mut flagged(inside, outside, 0x11)),
            Verdict::Forward
        );
        assert_eq!(
            n.inbound(at(1), &mut flagged(outside, back, 0x10)),
            Verdict::Forward
        );
        assert_eq!(
            n.inbound(at(20), &mut flagged(outside, back, 0x10)),
            Verdict::Forward,
            "half closed"
        );
        assert_eq!(
            n.inbound(at(21), &mut flagged(outside, back, 0x11)),
            Verdict::Forward
        );
        assert_eq!(
            n.inbound(
                at(21 + TCP_CLOSED.as_secs() + 1),
                &mut flagged(outside, back, 0x10)
            ),
            Verdict::Drop(DropReason::NoMapping)
        );
    }

    #[test]
    fn idle_mappings_are_swept_without_traffic_of_their_own() {
        let mut n = forgetful(30, 30);
        for port in 0..2000u16 {
            let mut p = packet(false, (IN, 10_000 + port), (OBS1, 53), b"q");
            assert_eq!(n.outbound(at(0), &mut p), Verdict::Forward);
        }
        assert_eq!(n.bindings(), 2000);
        // One other flow's packets, long after: the sweep forgets the rest.
        for _ in 0..SWEEP_EVERY {
            let mut p = packet(false, (IN, 9000), (OBS2, 53), b"q");
            assert_eq!(n.outbound(at(100), &mut p), Verdict::Forward);
        }
        assert_eq!(n.bindings(), 1);
        assert_eq!(n.maps.len(), 1);
    }

    fn nat(mapping: Mapping, filtering: Filtering, allocation: Allocation) -> Nat {
        Nat::new(NatConfig {
            external: EXT,
            mapping,
            filtering,
            allocation,
            seed: 7,
            hairpin: true,
            udp_timeout: None,
            tcp_timeout: None,
        })
    }

    fn out_port(n: &mut Nat, tcp: bool, src_port: u16, dst: (Ipv4Addr, u16)) -> u16 {
        let mut p = packet(tcp, (IN, src_port), dst, b"hello");
        assert_eq!(n.outbound(T, &mut p), Verdict::Forward);
        assert!(checksums_valid(&p), "checksums after outbound translation");
        assert_eq!(&p[12..16], &EXT.octets());
        u16::from_be_bytes([p[20], p[21]])
    }

    #[test]
    fn mapping_behaviours_reuse_ports_as_rfc_4787_defines() {
        use Mapping::*;
        for (mapping, same_ip_other_port, other_ip) in [
            (EndpointIndependent, true, true),
            (AddressDependent, true, false),
            (AddressAndPortDependent, false, false),
        ] {
            let mut n = nat(
                mapping,
                Filtering::AddressAndPortDependent,
                Allocation::Sequential,
            );
            let a = out_port(&mut n, true, 40000, (OBS1, 7000));
            assert_eq!(
                out_port(&mut n, true, 40000, (OBS1, 7000)),
                a,
                "{mapping:?}: same destination"
            );
            assert_eq!(
                out_port(&mut n, true, 40000, (OBS1, 7001)) == a,
                same_ip_other_port,
                "{mapping:?}"
            );
            assert_eq!(
                out_port(&mut n, true, 40000, (OBS2, 7000)) == a,
                other_ip,
                "{mapping:?}"
            );
        }
    }

    #[test]
    fn allocation_preserves_counts_up_or_randomises() {
        let mut n = nat(
            Mapping::AddressAndPortDependent,
            Filtering::AddressAndPortDependent,
            Allocation::Preserve,
        );
        assert_eq!(out_port(&mut n, false, 40000, (OBS1, 1)), 40000);
        assert_eq!(
            out_port(&mut n, false, 40000, (OBS1, 2)),
            40001,
            "taken: the next free one"
        );
        let mut n = nat(
            Mapping::AddressAndPortDependent,
            Filtering::AddressAndPortDependent,
            Allocation::Sequential,
        );
        let ports: Vec<u16> = (1..=3)
            .map(|d| out_port(&mut n, true, 40000, (OBS1, d)))
            .collect();
        assert_eq!(
            ports,
            vec![SEQUENTIAL_BASE, SEQUENTIAL_BASE + 1, SEQUENTIAL_BASE + 2]
        );
        let mut n = nat(
            Mapping::AddressAndPortDependent,
            Filtering::AddressAndPortDependent,
            Allocation::Random,
        );
        let ports: HashSet<u16> = (1..=20)
            .map(|d| out_port(&mut n, true, 40000, (OBS1, d)))
            .collect();
        assert_eq!(ports.len(), 20);
        assert!(ports.iter().all(|p| *p >= LOW_PORT));
    }

    #[test]
    fn filtering_admits_what_rfc_4787_section_5_says() {
        use Filtering::*;
        for (filtering, from_same_ip_other_port, from_other_ip) in [
            (EndpointIndependent, true, true),
            (AddressDependent, true, false),
            (AddressAndPortDependent, false, false),
        ] {
            let mut n = nat(
                Mapping::EndpointIndependent,
                filtering,
                Allocation::Preserve,
            );
            let ext = out_port(&mut n, true, 40000, (OBS1, 7000));
            let mut reply = packet(true, (OBS1, 7000), (EXT, ext), b"back");
            assert_eq!(
                n.inbound(T, &mut reply),
                Verdict::Forward,
                "{filtering:?}: the reply"
            );
            assert!(checksums_valid(&reply));
            assert_eq!(&reply[16..20], &IN.octets());
            assert_eq!(u16::from_be_bytes([reply[22], reply[23]]), 40000);
            for (src, admitted) in [
                ((OBS1, 7001), from_same_ip_other_port),
                ((OBS2, 7000), from_other_ip),
            ] {
                let mut p = packet(true, src, (EXT, ext), b"");
                let want = if admitted {
                    Verdict::Forward
                } else {
                    Verdict::Drop(DropReason::Filtered)
                };
                assert_eq!(n.inbound(T, &mut p), want, "{filtering:?} from {src:?}");
            }
        }
    }

    #[test]
    fn replies_to_an_admitted_inbound_session_leave_from_its_port() {
        // Full cone filtering with address-dependent mapping: OBS2 reaches a
        // mapping made towards OBS1, and the inside's reply to OBS2 must come
        // from that same port, not from a fresh per-address mapping.
        let mut n = nat(
            Mapping::AddressDependent,
            Filtering::EndpointIndependent,
            Allocation::Sequential,
        );
        let ext = out_port(&mut n, true, 41000, (OBS1, 7000));
        let mut syn = packet(true, (OBS2, 5555), (EXT, ext), b"");
        assert_eq!(n.inbound(T, &mut syn), Verdict::Forward);
        assert_eq!(out_port(&mut n, true, 41000, (OBS2, 5555)), ext);
    }

    #[test]
    fn hairpinning_translates_both_ends_and_sends_it_back_inside() {
        const B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
        let mut n = nat(
            Mapping::EndpointIndependent,
            Filtering::EndpointIndependent,
            Allocation::Preserve,
        );
        // B has a mapping (from talking to an observer).
        let mut b_out = packet(true, (B, 41000), (OBS1, 7000), b"");
        assert_eq!(n.outbound(T, &mut b_out), Verdict::Forward);
        // A sends to B's mapping: it comes back inside, from A's mapping, to B.
        let mut p = packet(true, (IN, 42000), (EXT, 41000), b"hi");
        assert_eq!(n.outbound(T, &mut p), Verdict::Hairpin);
        assert!(checksums_valid(&p));
        assert_eq!(&p[12..16], &EXT.octets(), "source is A's mapping");
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 42000);
        assert_eq!(&p[16..20], &B.octets(), "destination is B itself");
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 41000);
        // B answers A's mapping: back to A the same way.
        let mut reply = packet(true, (B, 41000), (EXT, 42000), b"yo");
        assert_eq!(n.outbound(T, &mut reply), Verdict::Hairpin);
        assert_eq!(&reply[16..20], &IN.octets());
        // Without hairpinning the NAT refuses to loop packets.
        let mut off = Nat::new(NatConfig {
            hairpin: false,
            ..n.config
        });
        let mut p = packet(true, (IN, 42000), (EXT, 41000), b"");
        assert_eq!(
            off.outbound(T, &mut p),
            Verdict::Drop(DropReason::NoHairpin)
        );
    }

    #[test]
    fn unmapped_ports_and_other_protocols_are_dropped() {
        let mut n = nat(
            Mapping::EndpointIndependent,
            Filtering::EndpointIndependent,
            Allocation::Preserve,
        );
        let mut p = packet(true, (OBS1, 1), (EXT, 5555), b"");
        assert_eq!(n.inbound(T, &mut p), Verdict::Drop(DropReason::NoMapping));
        let mut icmp = packet(true, (OBS1, 1), (EXT, 5555), b"");
        icmp[9] = 1;
        assert_eq!(
            n.inbound(T, &mut icmp),
            Verdict::Drop(DropReason::Malformed)
        );
        let mut elsewhere = packet(true, (OBS1, 1), (OBS2, 5555), b"");
        assert_eq!(
            n.inbound(T, &mut elsewhere),
            Verdict::Forward,
            "not for the NAT"
        );
    }

    #[test]
    fn udp_without_checksum_keeps_none() {
        let mut n = nat(
            Mapping::EndpointIndependent,
            Filtering::EndpointIndependent,
            Allocation::Sequential,
        );
        let mut p = packet(false, (IN, 5000), (OBS1, 53), b"q");
        p[26] = 0;
        p[27] = 0;
        assert_eq!(n.outbound(T, &mut p), Verdict::Forward);
        assert_eq!(&p[26..28], &[0, 0]);
    }

    proptest! {
        #[test]
        fn arbitrary_packets_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), inbound in any::<bool>()) {
            let mut n = nat(Mapping::AddressDependent, Filtering::AddressDependent, Allocation::Random);
            let _ = if inbound { n.inbound(T, &mut bytes) } else { n.outbound(T, &mut bytes) };
        }

        #[test]
        fn translation_keeps_checksums_valid(
            tcp in any::<bool>(),
            src_port in 1u16..,
            dst_port in 1u16..,
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut n = nat(Mapping::EndpointIndependent, Filtering::EndpointIndependent, Allocation::Random);
            let mut p = packet(tcp, (IN, src_port), (OBS1, dst_port), &payload);
            prop_assert_eq!(n.outbound(T, &mut p), Verdict::Forward);
            prop_assert!(checksums_valid(&p));
            let ext = u16::from_be_bytes([p[20], p[21]]);
            let mut back = packet(tcp, (OBS1, dst_port), (EXT, ext), &payload);
            prop_assert_eq!(n.inbound(T, &mut back), Verdict::Forward);
            prop_assert!(checksums_valid(&back));
        }
    }

    /// One side of a simulated splice: a host at `IN` behind `nat`.
    struct Side {
        nat: Nat,
        ext: Ipv4Addr,
        port: u16,
        candidates: Vec<(Ipv4Addr, u16)>,
    }

    const HUB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 66);

    /// Probes the hub's two echoes from one port (and a third mapping from
    /// another port for a sequential allocator), then predicts, as a node does.
    fn prepare(mut nat: Nat, ext: Ipv4Addr, port: u16) -> Side {
        use reach_proto::nat::{classify, confirm_sequential, predict, Allocation, Observation};
        let sa = |ip: Ipv4Addr, p: u16| std::net::SocketAddr::from((ip, p));
        let mut observe = |from: u16, echo: u16| {
            let mut p = packet(true, (IN, from), (HUB, echo), b"");
            assert_eq!(nat.outbound(T, &mut p), Verdict::Forward);
            Observation {
                local: sa(IN, from),
                server: sa(HUB, echo),
                mapped: sa(ext, u16::from_be_bytes([p[20], p[21]])),
            }
        };
        let obs = [observe(port, 7701), observe(port, 7702)];
        let mut profile = classify(&obs);
        if let Allocation::Sequential { .. } = profile.allocation {
            profile = confirm_sequential(&profile, &observe(port + 1000, 7701));
        }
        let candidates = predict(&profile, &[], port)
            .into_iter()
            .map(|a| match a {
                std::net::SocketAddr::V4(v4) => (*v4.ip(), v4.port()),
                std::net::SocketAddr::V6(_) => unreachable!("IPv4 only here"),
            })
            .collect();
        Side {
            nat,
            ext,
            port,
            candidates,
        }
    }

    /// Whether a TCP simultaneous open gets through: the target sends its
    /// SYNs first (dropped or not at the asker's NAT), then the asker sends
    /// its own, each in candidate order; one asker SYN that the target's NAT
    /// forwards to the target's port makes the connection (its listener
    /// takes it when no connecting socket matches).
    fn splices(asker: &mut Side, target: &mut Side) -> bool {
        for c in asker.candidates.clone() {
            let mut p = packet(true, (IN, target.port), c, b"");
            if target.nat.outbound(T, &mut p) == Verdict::Forward && c.0 == asker.ext {
                let _ = asker.nat.inbound(T, &mut p);
            }
        }
        let mut through = false;
        for c in target.candidates.clone() {
            let mut p = packet(true, (IN, asker.port), c, b"");
            if asker.nat.outbound(T, &mut p) != Verdict::Forward || c.0 != target.ext {
                continue;
            }
            if target.nat.inbound(T, &mut p) == Verdict::Forward {
                let to = (
                    Ipv4Addr::new(p[16], p[17], p[18], p[19]),
                    u16::from_be_bytes([p[22], p[23]]),
                );
                through |= to == (IN, target.port);
            }
        }
        through
    }

    #[test]
    fn prediction_splices_every_pair_of_predictable_nats_in_simulation() {
        use Allocation::*;
        use Mapping::*;
        let kinds = [
            (EndpointIndependent, Preserve),
            (AddressDependent, Preserve),
            (AddressDependent, Sequential),
            (AddressAndPortDependent, Sequential),
            (AddressAndPortDependent, Random),
        ];
        let a_ext = Ipv4Addr::new(203, 0, 113, 21);
        let b_ext = Ipv4Addr::new(203, 0, 113, 22);
        for (i, (am, aa)) in kinds.iter().enumerate() {
            for (j, (bm, ba)) in kinds.iter().enumerate() {
                let mk = |ext, m, a, seed| {
                    Nat::new(NatConfig {
                        external: ext,
                        mapping: m,
                        filtering: Filtering::AddressAndPortDependent,
                        allocation: a,
                        seed,
                        hairpin: false,
                        udp_timeout: None,
                        tcp_timeout: None,
                    })
                };
                let mut a = prepare(mk(a_ext, *am, *aa, 11 + i as u64), a_ext, 40_000);
                let mut b = prepare(mk(b_ext, *bm, *ba, 97 + j as u64), b_ext, 41_000);
                let random = *aa == Random || *ba == Random;
                if random {
                    // A random allocator predicts nothing: the splice is
                    // declined before any SYN is sent.
                    assert!(
                        a.candidates.is_empty() || b.candidates.is_empty(),
                        "{am:?}/{aa:?} with {bm:?}/{ba:?}"
                    );
                    continue;
                }
                assert!(
                    splices(&mut a, &mut b),
                    "{am:?}/{aa:?} asking {bm:?}/{ba:?}: candidates {:?} and {:?}",
                    a.candidates,
                    b.candidates
                );
            }
        }
    }
}
