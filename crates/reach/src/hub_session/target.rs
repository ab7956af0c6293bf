//! Where a hub is: `[NODEID@]HOST:PORT`, parsed and printed.

use std::fmt;
use std::str::FromStr;

use reach_proto::{HubAddr, NodeId};

/// Where a hub listens, and optionally who it is: `NODEID@HOST:PORT` or
/// `HOST:PORT`. Without the NodeId the first contact learns it and pins it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubTarget {
    /// The hub's NodeId, if given.
    pub id: Option<NodeId>,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for HubTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(id) = &self.id {
            write!(f, "{id}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl From<&HubAddr> for HubTarget {
    /// A virtual address's `hub=` hint: the hub's identity is pinned on first
    /// contact.
    fn from(a: &HubAddr) -> Self {
        Self {
            id: None,
            host: a.host.clone(),
            port: a.port,
        }
    }
}

impl From<&HubTarget> for HubAddr {
    fn from(t: &HubTarget) -> Self {
        Self {
            host: t.host.clone(),
            port: t.port,
        }
    }
}

impl FromStr for HubTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, rest) = match s.split_once('@') {
            Some((id, rest)) => (
                Some(
                    id.parse::<NodeId>()
                        .map_err(|e| format!("bad hub id in {s:?}: {e}"))?,
                ),
                rest,
            ),
            None => (None, s),
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("hub address {s:?} has no port (expected [ID@]HOST:PORT)"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("hub address {s:?} has no host"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("bad port in hub address {s:?}"))?;
        Ok(Self {
            id,
            host: host.to_string(),
            port,
        })
    }
}
