//! Virtual addresses: `NodeId` + virtual port + optional hints, in one text form.
//!
//! ```text
//! NODEID:VPORT[/a=ADDR[,ADDR...]][/hub=HOST:PORT]
//! ```
//!
//! `a=` lists direct socket addresses (IPv6 in brackets) the node advertises;
//! `hub=` names the node's home hub. The form uses only characters a shell passes
//! through unquoted in practice, so a user can paste it as one argument. Parsing and
//! printing round-trip; a bad address yields an error naming the part that is wrong.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::identity::{NodeId, NodeIdError};

/// Most direct-address hints one virtual address may carry. Bounds the work a
/// pasted (or hostile) address can cause in the connection race.
pub const MAX_DIRECT_HINTS: usize = 32;

/// A host and port of a hub, as given by the user (a name or an IP literal).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HubAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// A virtual address: who to reach, on which virtual port, and where to look.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VirtualAddr {
    /// The node to reach; the handshake proves the peer holds its key.
    pub node: NodeId,
    /// The virtual port on that node.
    pub port: u16,
    /// Direct socket addresses the node advertised.
    pub direct: Vec<SocketAddr>,
    /// The node's home hub, if known.
    pub hub: Option<HubAddr>,
}

/// Why a virtual address could not be parsed. Each variant names the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VirtualAddrError {
    /// The address is empty.
    #[error("virtual address is empty (expected NODEID:PORT)")]
    Empty,
    /// The node id part is bad.
    #[error("bad node id in virtual address: {0}")]
    NodeId(#[from] NodeIdError),
    /// There is no `:PORT` after the node id.
    #[error("virtual address has no port (expected NODEID:PORT)")]
    MissingPort,
    /// The port is not a number from 0 to 65535.
    #[error("bad virtual port {0:?}: expected a number from 0 to 65535")]
    BadPort(String),
    /// A hint is not of a known kind.
    #[error("unknown hint {0:?} in virtual address (expected a=ADDRS or hub=HOST:PORT)")]
    UnknownHint(String),
    /// A hint kind appears twice.
    #[error("hint {0:?} appears twice in virtual address")]
    DuplicateHint(&'static str),
    /// A direct address is not an IP:PORT socket address.
    #[error("bad direct address {0:?} in virtual address: expected IP:PORT or [IPv6]:PORT")]
    BadDirectAddr(String),
    /// Too many direct addresses.
    #[error("virtual address lists more than {MAX_DIRECT_HINTS} direct addresses")]
    TooManyDirectAddrs,
    /// The hub hint is not HOST:PORT.
    #[error("bad hub {0:?} in virtual address: expected HOST:PORT")]
    BadHub(String),
}

impl VirtualAddr {
    /// A virtual address without hints.
    pub fn new(node: NodeId, port: u16) -> Self {
        Self {
            node,
            port,
            direct: Vec::new(),
            hub: None,
        }
    }

    /// The same address with the given direct hints.
    pub fn with_direct(mut self, direct: Vec<SocketAddr>) -> Self {
        self.direct = direct;
        self
    }
}

impl fmt::Display for HubAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for HubAddr {
    type Err = VirtualAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VirtualAddrError::BadHub(s.to_string());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = match host.strip_prefix('[') {
            Some(inner) => inner
                .strip_suffix(']')
                .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
                .ok_or_else(bad)?,
            None => host,
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':');
        if host.is_empty()
            || !host.chars().all(valid)
            || (host.contains(':') && !s.starts_with('['))
        {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for VirtualAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.port)?;
        if !self.direct.is_empty() {
            f.write_str("/a=")?;
            for (i, addr) in self.direct.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{addr}")?;
            }
        }
        if let Some(hub) = &self.hub {
            write!(f, "/hub={hub}")?;
        }
        Ok(())
    }
}

impl FromStr for VirtualAddr {
    type Err = VirtualAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(VirtualAddrError::Empty);
        }
        let mut parts = s.split('/');
        let head = parts.next().unwrap_or_default();
        let (node, port) = head.split_once(':').ok_or_else(|| {
            // Distinguish "no port" from "the node id itself is bad".
            match head.parse::<NodeId>() {
                Ok(_) => VirtualAddrError::MissingPort,
                Err(e) => VirtualAddrError::NodeId(e),
            }
        })?;
        let node: NodeId = node.parse()?;
        let port: u16 = port
            .parse()
            .map_err(|_| VirtualAddrError::BadPort(port.to_string()))?;
        let mut addr = VirtualAddr::new(node, port);
        let mut seen_direct = false;
        for hint in parts {
            if let Some(list) = hint.strip_prefix("a=") {
                if std::mem::replace(&mut seen_direct, true) {
                    return Err(VirtualAddrError::DuplicateHint("a="));
                }
                addr.direct = parse_direct_list(list)?;
            } else if let Some(hub) = hint.strip_prefix("hub=") {
                if addr.hub.is_some() {
                    return Err(VirtualAddrError::DuplicateHint("hub="));
                }
                addr.hub = Some(hub.parse()?);
            } else {
                return Err(VirtualAddrError::UnknownHint(hint.to_string()));
            }
        }
        Ok(addr)
    }
}

fn parse_direct_list(list: &str) -> Result<Vec<SocketAddr>, VirtualAddrError> {
    let mut out = Vec::new();
    for item in list.split(',') {
        if out.len() == MAX_DIRECT_HINTS {
            return Err(VirtualAddrError::TooManyDirectAddrs);
        }
        let sa: SocketAddr = item
            .parse()
            .map_err(|_| VirtualAddrError::BadDirectAddr(item.to_string()))?;
        out.push(sa);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn node(seed: u8) -> NodeId {
        SecretKey::from_seed([seed; 32]).node_id()
    }

    #[test]
    fn full_form_round_trips() {
        let mut a = VirtualAddr::new(node(1), 5000).with_direct(vec![
            "192.0.2.1:4000".parse().expect("addr"),
            "[2001:db8::1]:4000".parse().expect("addr"),
        ]);
        a.hub = Some("hub.example:7070".parse().expect("hub"));
        let text = a.to_string();
        assert!(text.ends_with("/a=192.0.2.1:4000,[2001:db8::1]:4000/hub=hub.example:7070"));
        assert_eq!(text.parse::<VirtualAddr>(), Ok(a));
    }

    #[test]
    fn errors_name_the_bad_part() {
        let id = node(2).to_string();
        let cases: &[(String, VirtualAddrError)] = &[
            (String::new(), VirtualAddrError::Empty),
            (id.clone(), VirtualAddrError::MissingPort),
            (format!("{id}:x"), VirtualAddrError::BadPort("x".into())),
            (
                format!("{id}:70000"),
                VirtualAddrError::BadPort("70000".into()),
            ),
            (
                format!("{id}:1/b=1"),
                VirtualAddrError::UnknownHint("b=1".into()),
            ),
            (
                format!("{id}:1/a=1.2.3.4"),
                VirtualAddrError::BadDirectAddr("1.2.3.4".into()),
            ),
            (
                format!("{id}:1/hub=h"),
                VirtualAddrError::BadHub("h".into()),
            ),
            (
                format!("{id}:1/a=1.2.3.4:1/a=1.2.3.4:2"),
                VirtualAddrError::DuplicateHint("a="),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                &text.parse::<VirtualAddr>().expect_err(text),
                want,
                "{text}"
            );
        }
        assert!(matches!(
            "zz:1".parse::<VirtualAddr>(),
            Err(VirtualAddrError::NodeId(NodeIdError::BadLength(2)))
        ));
    }

    #[test]
    fn hub_accepts_names_and_ip_literals() {
        for text in [
            "hub-1.example.org:7070",
            "192.0.2.7:1",
            "[2001:db8::7]:7070",
        ] {
            let hub: HubAddr = text.parse().expect(text);
            assert_eq!(hub.to_string(), text);
        }
        for bad in ["2001:db8::7:7070", "[nope]:1", ":1", "a b:1", "h:"] {
            assert!(bad.parse::<HubAddr>().is_err(), "{bad}");
        }
    }

    fn arb_socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
        ]
    }

    fn arb_hub() -> impl Strategy<Value = HubAddr> {
        prop_oneof![
            ("[a-z0-9][a-z0-9.-]{0,20}", any::<u16>())
                .prop_map(|(host, port)| HubAddr { host, port }),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| HubAddr {
                host: Ipv6Addr::from(ip).to_string(),
                port
            }),
        ]
    }

    proptest! {
        #[test]
        fn print_then_parse_round_trips(
            seed in any::<u8>(),
            port in any::<u16>(),
            direct in proptest::collection::vec(arb_socket_addr(), 0..6),
            hub in proptest::option::of(arb_hub()),
        ) {
            let mut a = VirtualAddr::new(node(seed), port).with_direct(direct);
            a.hub = hub;
            prop_assert_eq!(a.to_string().parse::<VirtualAddr>(), Ok(a));
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in "\\PC{0,200}") {
            let _ = s.parse::<VirtualAddr>();
        }

        #[test]
        fn parsing_mutated_addresses_never_panics(cut in 0usize..200, junk in "[/:=,\\[\\]a-z0-9]{0,20}") {
            let mut text = VirtualAddr::new(node(3), 9).with_direct(vec![
                "[2001:db8::1]:4000".parse().expect("addr")]).to_string();
            let cut = cut.min(text.len());
            text.truncate(cut);
            text.push_str(&junk);
            let _ = text.parse::<VirtualAddr>();
        }
    }
}
