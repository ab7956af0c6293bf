//! Errors of the `reach` library: one enum per layer, each variant one
//! cause. A leaf module: errors name what went wrong (an address, a module,
//! a hub's reason) but depend on no module that produces them.

use std::net::SocketAddr;
use std::time::Duration;

use reach_proto::handshake::{HandshakeError, Refusal};
use reach_proto::NodeId;

use crate::keystore::KeyStoreError;
use crate::setup_module::SetupModule;

/// Why one connection attempt to one address failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttemptError {
    /// The OS reported an error (refused, unreachable, reset...).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The handshake failed (wrong node, bad authentication, malformed reply).
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    /// The peer closed the connection during the handshake.
    #[error("peer closed the connection during the handshake (not a reach listener?)")]
    ClosedEarly,
}

/// One failed attempt in a connection race.
#[derive(Debug)]
pub struct Attempt {
    /// The address tried.
    pub addr: SocketAddr,
    /// What went wrong.
    pub error: AttemptError,
}

impl Attempt {
    /// Whether this attempt reached a node other than the one wanted.
    pub fn is_identity_mismatch(&self) -> bool {
        matches!(
            self.error,
            AttemptError::Handshake(HandshakeError::WrongNode { .. })
        )
    }
}

fn list(attempts: &[Attempt]) -> String {
    if attempts.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = attempts
        .iter()
        .map(|a| format!("{}: {}", a.addr, a.error))
        .collect();
    format!(" [{}]", parts.join("; "))
}

/// Why `connect` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The virtual address holds no direct address to try.
    #[error("no address known for node {node}: the virtual address carries no usable a= hints")]
    NoAddresses {
        /// The target.
        node: NodeId,
    },
    /// Every candidate failed.
    #[error("cannot reach node {node}: every address failed{}", list(.attempts))]
    Failed {
        /// The target.
        node: NodeId,
        /// Each failed attempt.
        attempts: Vec<Attempt>,
    },
    /// The deadline passed before any candidate succeeded.
    #[error("cannot reach node {node}: timed out after {after:?}{}", list(.attempts))]
    TimedOut {
        /// The target.
        node: NodeId,
        /// The timeout that expired.
        after: Duration,
        /// Attempts that failed before the deadline.
        attempts: Vec<Attempt>,
    },
    /// Every applicable setup module failed (or was skipped).
    #[error("cannot reach node {node} (after {after:.1?}): {}", modules_text(.modules))]
    Unreachable {
        /// The target.
        node: NodeId,
        /// Time spent.
        after: Duration,
        /// What each module did.
        modules: Vec<ModuleFailure>,
    },
    /// The node authenticated us and refused the stream.
    #[error("node {node} refused the stream: {}", refusal_text(*.refusal))]
    Refused {
        /// The target.
        node: NodeId,
        /// Why.
        refusal: Refusal,
    },
}

/// What one setup module did when it did not produce a stream.
#[derive(Debug, Clone)]
pub struct ModuleFailure {
    /// The module.
    pub module: SetupModule,
    /// Why it failed or was skipped.
    pub error: String,
}

fn modules_text(m: &[ModuleFailure]) -> String {
    if m.is_empty() {
        return "no setup module had time to run".into();
    }
    m.iter()
        .map(|f| format!("{}: {}", f.module, f.error))
        .collect::<Vec<_>>()
        .join("; ")
}

fn refusal_text(r: Refusal) -> String {
    HandshakeError::Refused(r).to_string()
}

impl ConnectError {
    /// The failed attempts, if any.
    pub fn attempts(&self) -> &[Attempt] {
        match self {
            ConnectError::Failed { attempts, .. } | ConnectError::TimedOut { attempts, .. } => {
                attempts
            }
            _ => &[],
        }
    }

    /// Whether some attempt reached a node other than the one wanted.
    pub fn is_identity_mismatch(&self) -> bool {
        self.attempts().iter().any(Attempt::is_identity_mismatch)
    }
}

/// Errors of building, binding and using an endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The identity could not be loaded or created.
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    /// The listening socket could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// The address or range we tried.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A port range was given with its ends reversed or empty.
    #[error("bad port range {0}-{1}: the first port must not exceed the last")]
    BadPortRange(u16, u16),
    /// The endpoint has shut down.
    #[error("endpoint is closed")]
    Closed,
}

/// Why a service could not be published on the hub's proxy ports.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ExposeError {
    /// The endpoint has no hub.
    #[error("no hub configured: proxy ports are a hub's")]
    NoHub,
    /// The hub offers no proxy ports at all.
    #[error("the hub offers no proxy ports")]
    NoProxyPorts,
    /// The hub's policy or limits refused it.
    #[error("the hub refused: {0}")]
    Refused(String),
    /// No answer (the session is down, or the hub is slow).
    #[error("{0}")]
    NoAnswer(String),
}

/// Why NAT behaviour could not be probed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum NatProbeError {
    /// The endpoint has no hub to ask.
    #[error("no hub configured: NAT behaviour is learned from a hub's address echoes")]
    NoHub,
    /// The hub session is not up.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The hub runs no address echo.
    #[error("the hub runs no address echo")]
    NoEcho,
    /// An echo did not answer usably (the OS error or the bad answer).
    #[error("{0}")]
    Echo(String),
}

/// Why a hub operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No session is up (yet); the last failure says why.
    #[error("no session with hub {hub}{}", .last.as_ref().map(|l| format!(": {l}")).unwrap_or_default())]
    Down {
        /// The configured hub.
        hub: String,
        /// The last reason the session failed, if any.
        last: Option<String>,
    },
    /// The hub did not answer in time.
    #[error("hub did not answer within {0:?}")]
    TimedOut(Duration),
    /// The hub refused to admit this node (its policy lists neither the node's
    /// key nor accepts its network secret). The session keeps retrying slowly,
    /// in case the policy changes.
    #[error("hub {hub} refused this node: {reason}")]
    Refused {
        /// The hub.
        hub: String,
        /// The hub's reason.
        reason: String,
    },
}
