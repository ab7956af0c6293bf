//! The gateway's mapping table, sans-IO: which external port forwards to
//! which internal address and port, for whom, until when; and the policy
//! every request passes (internal ranges, external ports, a quota per
//! client, a lease cap). Time comes in as seconds since the Unix epoch,
//! because leases outlive the process (the journal keeps them).
//!
//! A request is applied whole or refused whole: the table is only
//! changed by a request that passed every check.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

/// A transport protocol a mapping forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The protocol's name in nftables rules.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// From an IANA protocol number (PCP).
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// The IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which protocol a client asked through (for logs and status).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// NAT-PMP.
    NatPmp,
    /// PCP.
    Pcp,
    /// UPnP IGD.
    Upnp,
}

/// One port forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port on the gateway's external address.
    pub external_port: u16,
    /// Where it forwards to.
    pub internal: SocketAddrV4,
    /// Who asked (the request's source address).
    pub client: Ipv4Addr,
    /// When it ends, in seconds since the Unix epoch.
    pub expires: u64,
    /// Through which protocol.
    pub source: Source,
    /// PCP's nonce: only a request with it may change or delete the
    /// mapping through PCP.
    #[serde(default)]
    pub nonce: Option<[u8; 12]>,
}

/// What a client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Who asks.
    pub client: Ipv4Addr,
    /// The address to forward to: the client's own (a client maps only
    /// itself, as miniupnpd's secure mode has it for UPnP too).
    pub internal: SocketAddrV4,
    /// The external port it would like (0: any).
    pub suggested_port: u16,
    /// Whether only the suggested port will do (UPnP asks for one port).
    pub exact: bool,
    /// Seconds asked for (capped by the policy).
    pub lifetime: u32,
    /// Through which protocol.
    pub source: Source,
    /// PCP's nonce.
    pub nonce: Option<[u8; 12]>,
}

/// The limits every request passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Internal addresses mappings may forward to, as (network, prefix
    /// length); empty refuses every request.
    pub internal: Vec<(Ipv4Addr, u8)>,
    /// External ports the gateway gives out.
    pub ports: RangeInclusive<u16>,
    /// Mappings one client may hold.
    pub max_per_client: usize,
    /// Longest lease, in seconds (longer requests get this).
    pub lease_max: u32,
    /// Mappings in all (every client together).
    pub max_total: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            internal: Vec::new(),
            ports: 20000..=60999,
            max_per_client: 64,
            lease_max: 86_400,
            max_total: 65_536,
        }
    }
}

/// Whether `ip` is in `net/len`.
pub fn in_prefix(ip: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Why a request is refused. Each maps onto the protocols' own codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The internal address is outside the allowed ranges, or a client
    /// asks for another host's address, or another client's mapping.
    #[error("internal address {0} is not allowed")]
    InternalNotAllowed(Ipv4Addr),
    /// The external port asked for (exactly) is outside the range.
    #[error("external port {0} is outside the gateway's range")]
    PortOutsideRange(u16),
    /// The external port asked for (exactly) is held by another mapping.
    #[error("external port {0} is taken")]
    PortTaken(u16),
    /// The client holds its quota already.
    #[error("client {client} holds {held} mappings, its quota")]
    OverQuota {
        /// The client.
        client: Ipv4Addr,
        /// How many it holds.
        held: usize,
    },
    /// No external port is free, or the table is full.
    #[error("no external port is free")]
    NoPorts,
    /// A PCP request without the nonce of the mapping it would change.
    #[error("the mapping belongs to another nonce")]
    WrongNonce,
    /// The internal port is 0 (any) on a request that is not a delete.
    #[error("internal port 0 may only be deleted")]
    NoInternalPort,
}

/// What a successful request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new mapping: the kernel needs its rule.
    Added(Mapping),
    /// An existing mapping renewed (its rule is in place already; the
    /// journal records the new expiry).
    Renewed(Mapping),
}

impl Change {
    /// The mapping as it is now.
    pub fn mapping(&self) -> Mapping {
        match *self {
            Change::Added(m) | Change::Renewed(m) => m,
        }
    }
}

/// The key that names a mapping in the kernel and the journal.
pub type Key = (Protocol, u16);

/// The mapping table.
#[derive(Debug, Default)]
pub struct Table {
    by_external: BTreeMap<Key, Mapping>,
    per_client: HashMap<Ipv4Addr, usize>,
    policy: Policy,
}

impl Table {
    /// An empty table under `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            by_external: BTreeMap::new(),
            per_client: HashMap::new(),
            policy,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Every mapping, by protocol and external port.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapping> {
        self.by_external.values()
    }

    /// How many mappings there are.
    pub fn len(&self) -> usize {
        self.by_external.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_external.is_empty()
    }

    /// The mapping on an external port.
    pub fn get(&self, key: Key) -> Option<&Mapping> {
        self.by_external.get(&key)
    }

    /// The mapping forwarding to `internal`, if any.
    pub fn by_internal(&self, protocol: Protocol, internal: SocketAddrV4) -> Option<&Mapping> {
        self.by_external
            .values()
            .find(|m| m.protocol == protocol && m.internal == internal)
    }

    /// Puts back a mapping read from the journal, as it was (its port
    /// must be free; an expired one is not put back). Returns whether it
    /// was.
    pub fn restore(&mut self, m: Mapping, now: u64) -> bool {
        if m.expires <= now
            || self
                .by_external
                .contains_key(&(m.protocol, m.external_port))
        {
            return false;
        }
        self.insert(m);
        true
    }

    fn insert(&mut self, m: Mapping) {
        if let Some(old) = self.by_external.insert((m.protocol, m.external_port), m) {
            self.count_out(old.client);
        }
        *self.per_client.entry(m.client).or_default() += 1;
    }

    fn count_out(&mut self, client: Ipv4Addr) {
        if let Some(n) = self.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&client);
            }
        }
    }

    /// Maps or renews: the same client, protocol and internal address
    /// keep their external port (a renewal); a new one gets the
    /// suggested port if it is free and in range, else a free one.
    pub fn map(&mut self, r: &MapRequest, now: u64) -> Result<Change, Refusal> {
        if r.internal.port() == 0 {
            return Err(Refusal::NoInternalPort);
        }
        let ip = *r.internal.ip();
        if !self.policy.internal.iter().any(|p| in_prefix(ip, *p)) {
            return Err(Refusal::InternalNotAllowed(ip));
        }
        if ip != r.client {
            return Err(Refusal::InternalNotAllowed(ip));
        }
        let lifetime = r.lifetime.min(self.policy.lease_max);
        let expires = now + u64::from(lifetime);
        // The mapping this request renews, if any: for an exact port, the
        // one on it (another host's is a conflict); else the one that
        // forwards to the same internal address.
        let old = if r.exact {
            match self.get((r.protocol, r.suggested_port)) {
                Some(m) if m.internal != r.internal => {
                    return Err(Refusal::PortTaken(r.suggested_port))
                }
                m => m.copied(),
            }
        } else {
            self.by_internal(r.protocol, r.internal).copied()
        };
        if let Some(old) = old {
            if r.source == Source::Pcp && old.nonce.is_some() && old.nonce != r.nonce {
                return Err(Refusal::WrongNonce);
            }
            let m = Mapping {
                expires,
                client: r.client,
                source: r.source,
                nonce: r.nonce.or(old.nonce),
                ..old
            };
            self.insert(m);
            return Ok(Change::Renewed(m));
        }
        let held = self.per_client.get(&r.client).copied().unwrap_or(0);
        if held >= self.policy.max_per_client {
            return Err(Refusal::OverQuota {
                client: r.client,
                held,
            });
        }
        if self.by_external.len() >= self.policy.max_total {
            return Err(Refusal::NoPorts);
        }
        let port = self.choose_port(r)?;
        let m = Mapping {
            protocol: r.protocol,
            external_port: port,
            internal: r.internal,
            client: r.client,
            expires,
            source: r.source,
            nonce: r.nonce,
        };
        self.insert(m);
        Ok(Change::Added(m))
    }

    fn choose_port(&self, r: &MapRequest) -> Result<u16, Refusal> {
        let free = |p: u16| !self.by_external.contains_key(&(r.protocol, p));
        let range = &self.policy.ports;
        let s = r.suggested_port;
        if s != 0 && range.contains(&s) && free(s) {
            return Ok(s);
        }
        if r.exact {
            return Err(if range.contains(&s) {
                Refusal::PortTaken(s)
            } else {
                Refusal::PortOutsideRange(s)
            });
        }
        // The internal port, if it is in range and free, reads best; else
        // the next free port after a start spread by the client and port
        // (so clients do not all collide on the range's first port).
        let internal = r.internal.port();
        if range.contains(&internal) && free(internal) {
            return Ok(internal);
        }
        let size = u32::from(*range.end()) - u32::from(*range.start()) + 1;
        let start = (u32::from(r.client) ^ u32::from(internal).rotate_left(16)) % size;
        (0..size)
            .map(|i| (*range.start() as u32 + (start + i) % size) as u16)
            .find(|p| free(*p))
            .ok_or(Refusal::NoPorts)
    }

    /// Deletes a client's mapping of `internal` (PCP checks the nonce).
    /// Deleting what is not there succeeds (RFC 6886 and 6887 both say
    /// so): returns the mapping removed, if any.
    pub fn unmap(
        &mut self,
        protocol: Protocol,
        client: Ipv4Addr,
        internal: SocketAddrV4,
        nonce: Option<[u8; 12]>,
    ) -> Result<Option<Mapping>, Refusal> {
        let Some(m) = self.by_internal(protocol, internal).copied() else {
            return Ok(None);
        };
        if m.client != client {
            return Err(Refusal::InternalNotAllowed(*internal.ip()));
        }
        if nonce.is_some() && m.nonce.is_some() && m.nonce != nonce {
            return Err(Refusal::WrongNonce);
        }
        Ok(self.remove((m.protocol, m.external_port)))
    }

    /// Deletes the mapping on an external port, if `client` owns it
    /// (UPnP's DeletePortMapping names the external port).
    pub fn unmap_external(
        &mut self,
        key: Key,
        client: Ipv4Addr,
    ) -> Result<Option<Mapping>, Refusal> {
        match self.get(key) {
            None => Ok(None),
            Some(m) if m.client != client => Err(Refusal::InternalNotAllowed(*m.internal.ip())),
            Some(_) => Ok(self.remove(key)),
        }
    }

    /// Removes a mapping by its external port.
    pub fn remove(&mut self, key: Key) -> Option<Mapping> {
        let m = self.by_external.remove(&key)?;
        self.count_out(m.client);
        Some(m)
    }

    /// Every mapping of `client` for `protocol` (NAT-PMP's delete-all).
    pub fn of_client(&self, protocol: Protocol, client: Ipv4Addr) -> Vec<Key> {
        self.by_external
            .values()
            .filter(|m| m.protocol == protocol && m.client == client)
            .map(|m| (m.protocol, m.external_port))
            .collect()
    }

    /// The mappings whose lease has ended by `now`.
    pub fn expired(&self, now: u64) -> Vec<Key> {
        self.by_external
            .values()
            .filter(|m| m.expires <= now)
            .map(|m| (m.protocol, m.external_port))
            .collect()
    }

    /// When the next lease ends.
    pub fn next_expiry(&self) -> Option<u64> {
        self.by_external.values().map(|m| m.expires).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> Policy {
        Policy {
            internal: vec![("10.0.0.0".parse().unwrap(), 24)],
            ports: 40000..=40009,
            max_per_client: 3,
            lease_max: 3600,
            max_total: 100,
        }
    }

    fn req(client: &str, port: u16, suggested: u16) -> MapRequest {
        let client: Ipv4Addr = client.parse().unwrap();
        MapRequest {
            protocol: Protocol::Tcp,
            client,
            internal: SocketAddrV4::new(client, port),
            suggested_port: suggested,
            exact: false,
            lifetime: 7200,
            source: Source::NatPmp,
            nonce: None,
        }
    }

    #[test]
    fn a_mapping_gets_the_suggested_port_is_renewed_in_place_and_deleted() {
        let mut t = Table::new(policy());
        let m = t.map(&req("10.0.0.5", 22, 40005), 100).unwrap();
        let Change::Added(m) = m else { panic!("{m:?}") };
        assert_eq!(m.external_port, 40005);
        // Capped at the lease maximum.
        assert_eq!(m.expires, 100 + 3600);
        // The same request later renews the same port, whatever it suggests.
        let again = t.map(&req("10.0.0.5", 22, 40001), 200).unwrap();
        assert_eq!(again, Change::Renewed(Mapping { expires: 3800, ..m }));
        assert_eq!(t.len(), 1);
        let gone = t.unmap(Protocol::Tcp, m.client, m.internal, None).unwrap();
        assert_eq!(gone.map(|g| g.external_port), Some(40005));
        assert!(t.is_empty());
        // Deleting again succeeds with nothing to delete.
        assert_eq!(t.unmap(Protocol::Tcp, m.client, m.internal, None), Ok(None));
    }

    #[test]
    fn requests_outside_the_policy_are_refused_whole() {
        let mut t = Table::new(policy());
        // Outside the internal ranges.
        assert_eq!(
            t.map(&req("10.0.1.5", 22, 0), 0),
            Err(Refusal::InternalNotAllowed("10.0.1.5".parse().unwrap()))
        );
        // Another host's address, through NAT-PMP.
        let mut other = req("10.0.0.5", 22, 0);
        other.internal = "10.0.0.6:22".parse().unwrap();
        assert_eq!(
            t.map(&other, 0),
            Err(Refusal::InternalNotAllowed("10.0.0.6".parse().unwrap()))
        );
        // An exact port outside the range (UPnP).
        let mut exact = req("10.0.0.5", 22, 80);
        exact.exact = true;
        exact.source = Source::Upnp;
        assert_eq!(t.map(&exact, 0), Err(Refusal::PortOutsideRange(80)));
        // An exact port another host holds, and its mapping, are not
        // this client's.
        let mut theirs = req("10.0.0.7", 7, 40007);
        theirs.exact = true;
        t.map(&theirs, 0).unwrap();
        let mut mine = req("10.0.0.5", 22, 40007);
        mine.exact = true;
        assert_eq!(t.map(&mine, 0), Err(Refusal::PortTaken(40007)));
        assert_eq!(
            t.unmap_external((Protocol::Tcp, 40007), "10.0.0.5".parse().unwrap()),
            Err(Refusal::InternalNotAllowed("10.0.0.7".parse().unwrap()))
        );
        assert!(t
            .unmap_external((Protocol::Tcp, 40007), "10.0.0.7".parse().unwrap())
            .unwrap()
            .is_some());
        // A quota of 3.
        for port in 1..=3 {
            t.map(&req("10.0.0.5", port, 0), 0).unwrap();
        }
        assert_eq!(
            t.map(&req("10.0.0.5", 4, 0), 0),
            Err(Refusal::OverQuota {
                client: "10.0.0.5".parse().unwrap(),
                held: 3
            })
        );
        // Nothing of the refused requests is in the table.
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.of_client(Protocol::Tcp, "10.0.0.5".parse().unwrap())
                .len(),
            3
        );
    }

    #[test]
    fn ports_run_out_and_come_back_when_leases_end() {
        let mut t = Table::new(Policy {
            max_per_client: 100,
            ..policy()
        });
        for i in 0..10 {
            let mut r = req("10.0.0.5", 1000 + i, 0);
            r.lifetime = 10 + u32::from(i);
            t.map(&r, 0).unwrap();
        }
        assert_eq!(t.map(&req("10.0.0.5", 2000, 0), 0), Err(Refusal::NoPorts));
        assert_eq!(t.next_expiry(), Some(10));
        let ended = t.expired(12);
        assert_eq!(ended.len(), 3);
        for k in ended {
            t.remove(k);
        }
        assert!(t.map(&req("10.0.0.5", 2000, 0), 12).is_ok());
    }

    #[test]
    fn pcp_mappings_belong_to_their_nonce() {
        let mut t = Table::new(policy());
        let mut r = req("10.0.0.5", 22, 0);
        r.source = Source::Pcp;
        r.nonce = Some([1; 12]);
        t.map(&r, 0).unwrap();
        let thief = MapRequest {
            nonce: Some([2; 12]),
            ..r
        };
        assert_eq!(t.map(&thief, 0), Err(Refusal::WrongNonce));
        assert_eq!(
            t.unmap(Protocol::Tcp, r.client, r.internal, Some([2; 12])),
            Err(Refusal::WrongNonce)
        );
        assert!(t
            .unmap(Protocol::Tcp, r.client, r.internal, Some([1; 12]))
            .unwrap()
            .is_some());
    }

    #[test]
    fn prefixes_match_as_cidr_does() {
        let net = ("192.168.4.0".parse().unwrap(), 22);
        assert!(in_prefix("192.168.7.255".parse().unwrap(), net));
        assert!(!in_prefix("192.168.8.0".parse().unwrap(), net));
        assert!(in_prefix(
            "1.2.3.4".parse().unwrap(),
            ("0.0.0.0".parse().unwrap(), 0)
        ));
    }

    proptest! {
        /// Whatever sequence of requests comes, every mapping is inside
        /// the policy, no external port is given twice, and the quota
        /// counts agree with the table.
        #[test]
        fn the_table_keeps_its_invariants(ops in proptest::collection::vec((0u8..4, 1u8..8, 0u16..12, any::<bool>()), 0..200)) {
            let mut t = Table::new(policy());
            let mut now = 0;
            for (client, port, suggested, delete) in ops {
                now += 7;
                let ip = format!("10.0.0.{client}");
                let r = req(&ip, u16::from(port), if suggested < 10 { 40000 + suggested } else { 0 });
                if delete {
                    let _ = t.unmap(Protocol::Tcp, r.client, r.internal, None);
                } else {
                    let _ = t.map(&r, now);
                }
                for k in t.expired(now) {
                    t.remove(k);
                }
                let mut counts: HashMap<Ipv4Addr, usize> = HashMap::new();
                for m in t.mappings() {
                    prop_assert!(t.policy().ports.contains(&m.external_port));
                    *counts.entry(m.client).or_default() += 1;
                }
                for n in counts.values() {
                    prop_assert!(*n <= 3);
                }
                prop_assert_eq!(&counts, &t.per_client);
            }
        }
    }
}
