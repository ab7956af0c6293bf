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

/// Why a hub address does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HubTargetError {
    /// The part before `@` is not a NodeId.
    #[error("bad hub id in {text:?}: {source}")]
    BadId {
        /// The whole address.
        text: String,
        /// Why the id does not parse.
        source: reach_proto::identity::NodeIdError,
    },
    /// No `:PORT`.
    #[error("hub address {0:?} has no port (expected [ID@]HOST:PORT)")]
    NoPort(String),
    /// Nothing before `:PORT`.
    #[error("hub address {0:?} has no host")]
    NoHost(String),
    /// The port is not a number from 0 to 65535.
    #[error("bad port in hub address {0:?}")]
    BadPort(String),
}

impl FromStr for HubTarget {
    type Err = HubTargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, rest) = match s.split_once('@') {
            Some((id, rest)) => (
                Some(
                    id.parse::<NodeId>()
                        .map_err(|source| HubTargetError::BadId {
                            text: s.to_string(),
                            source,
                        })?,
                ),
                rest,
            ),
            None => (None, s),
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| HubTargetError::NoPort(s.to_string()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(HubTargetError::NoHost(s.to_string()));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| HubTargetError::BadPort(s.to_string()))?;
        Ok(Self {
            id,
            host: host.to_string(),
            port,
        })
    }
}
