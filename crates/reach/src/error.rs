//! Errors of the `reach` library: one enum per layer, each variant one
//! cause. A leaf module: errors name what went wrong (an address, a module,
//! a hub's reason) but depend on no module that produces them.

use std::net::SocketAddr;
use std::time::Duration;

use reach_proto::handshake::{HandshakeError, Refusal};
use reach_proto::setup_plan::SetupModule;
use reach_proto::NodeId;

use crate::keystore::KeyStoreError;

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
#[derive(Debug)]
pub struct ModuleFailure {
    /// The module.
    pub module: SetupModule,
    /// Why it failed or was skipped.
    pub error: ModuleError,
}

/// Why one setup module did not produce a stream: one variant per cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModuleError {
    /// Not run: the setup planner's reason.
    #[error(transparent)]
    Skipped(#[from] reach_proto::setup_plan::Skip),
    /// No hub session to run it on.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The hub link went down while the module ran.
    #[error("the hub link went down")]
    LinkLost,
    /// No random token could be drawn.
    #[error("no randomness for a token: {0}")]
    Random(getrandom::Error),
    /// Direct: every address failed, or the budget ran out (each attempt is
    /// listed).
    #[error(transparent)]
    Direct(Box<ConnectError>),
    /// Reverse: the connect-back did not come.
    #[error(transparent)]
    ConnectBack(#[from] ConnectBackError),
    /// Splice: this node's NAT mapping could not be learned.
    #[error(transparent)]
    Echo(#[from] EchoError),
    /// Splice: this node's NAT allocates ports that cannot be predicted.
    #[error("this node's NAT cannot be predicted ({0})")]
    Unpredictable(reach_proto::nat::NatProfile),
    /// Splice: the target declined the offer (its reason).
    #[error("the node declined: {0}")]
    Declined(String),
    /// Splice: the hubs could not deliver the offer (their reason).
    #[error("the offer could not be delivered: {0}")]
    Undeliverable(String),
    /// Splice: no answer within the module's wait.
    #[error("no splice answer within {0:?}")]
    NoAnswer(Duration),
    /// Splice: the endpoint dropped the offer (it is shutting down).
    #[error("the splice offer was dropped")]
    OfferDropped,
    /// Splice: no punched connection opened.
    #[error("no connection opened towards {theirs:?} (this side: {profile})")]
    NoConnection {
        /// The target's predicted endpoints.
        theirs: Vec<SocketAddr>,
        /// This side's NAT behaviour.
        profile: reach_proto::nat::NatProfile,
    },
    /// The handshake on the module's connection or routed stream failed.
    #[error("handshake: {0}")]
    Handshake(AttemptError),
    /// The handshake did not finish within the module's budget.
    #[error("no handshake answer within {0:?}")]
    HandshakeTimedOut(Duration),
    /// The connection could not be set up as a stream (socket options).
    #[error("cannot set up the connection: {0}")]
    Socket(std::io::Error),
    /// The node authenticated us and refused the stream (the setup driver
    /// ends the connect with [`ConnectError::Refused`]).
    #[error("{}", refusal_text(*.0))]
    Refused(Refusal),
}

impl ModuleError {
    /// The error of a handshake on a module's connection: a refusal ends the
    /// whole connect, anything else only this module.
    pub(crate) fn handshake(e: AttemptError) -> Self {
        match e {
            AttemptError::Handshake(HandshakeError::Refused(r)) => Self::Refused(r),
            other => Self::Handshake(other),
        }
    }
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
    /// The OS random number generator failed (for this node's ticket key).
    #[error("cannot read random bytes: {0}")]
    Random(std::io::Error),
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
    /// No hub session to ask on.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The hub link ended before the hub answered.
    #[error("the hub session ended before the hub answered")]
    LinkLost,
    /// The request does not fit one frame (too many `allow_from` ranges).
    #[error("the request cannot be sent: {0}")]
    TooLarge(reach_proto::link::LinkError),
    /// The hub did not answer in time.
    #[error("the hub did not answer within {0:?}")]
    TimedOut(Duration),
}

/// Why NAT behaviour could not be probed.
#[derive(Debug, thiserror::Error)]
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
    /// An echo did not answer usably.
    #[error(transparent)]
    Echo(#[from] EchoError),
}

/// Why asking a hub's address echo what it sees failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EchoError {
    /// The hub runs no address echo.
    #[error("the hub runs no address echo")]
    NoEcho,
    /// No local port could be bound to probe from.
    #[error("cannot bind a probe port: {0}")]
    Bind(#[source] std::io::Error),
    /// Connecting to the echo or reading its answer failed.
    #[error("address echo {echo}: {source}")]
    Io {
        /// The echo.
        echo: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The echo's answer is not an address.
    #[error("address echo {echo}: {source}")]
    BadAnswer {
        /// The echo.
        echo: SocketAddr,
        /// What is wrong with it.
        source: reach_proto::nat::EchoError,
    },
    /// The echo did not answer in time.
    #[error("address echo {echo}: no answer within {after:?}")]
    TimedOut {
        /// The echo.
        echo: SocketAddr,
        /// The deadline.
        after: Duration,
    },
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
        /// Why the last link ended or the last attach failed, if one did.
        last: Option<reach_proto::node_session::LinkEnd>,
    },
    /// The hub link ended before the hub answered.
    #[error("the hub link to {hub} ended before the hub answered")]
    LinkLost {
        /// The hub.
        hub: String,
    },
    /// Too many requests are pending on the hub link.
    #[error("too many lookups pending on the hub link")]
    Busy,
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

/// Why a hub could not be dialled, attached to or asked for its status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// No hub was named and the endpoint has none configured.
    #[error("no hub given and none configured")]
    NoHub,
    /// The hub's host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host name.
        host: String,
        /// What the resolver said.
        source: std::io::Error,
    },
    /// The hub's host name resolved to no address.
    #[error("{host} resolves to no address")]
    NoAddress {
        /// The host name.
        host: String,
    },
    /// The hub was named without its NodeId, and no address answered as a
    /// reach node that would say which it is.
    #[error("cannot learn the hub's identity ({last})")]
    UnknownIdentity {
        /// The last address tried and why it failed.
        last: String,
    },
    /// Connecting to the hub failed.
    #[error("{source}{}", key_changed_hint(*.key_changed, .known_hubs.as_deref()))]
    Connect {
        /// Why.
        source: ConnectError,
        /// Whether the hub answered under another identity than the one
        /// expected (pinned, or named in the address).
        key_changed: bool,
        /// The file pinning hub identities, if any.
        known_hubs: Option<std::path::PathBuf>,
    },
    /// The hub did not answer in time.
    #[error("hub {hub} {what} within {after:?}")]
    TimedOut {
        /// The hub (its address, or its NodeId once known).
        hub: String,
        /// What did not happen.
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The hub refused (its reason).
    #[error("hub {hub} refused {what}: {reason}")]
    Refused {
        /// The hub.
        hub: NodeId,
        /// What it refused.
        what: &'static str,
        /// Its reason.
        reason: String,
    },
    /// The link to the hub failed.
    #[error("hub {hub} link failed {during}: {source}")]
    Link {
        /// The hub.
        hub: NodeId,
        /// What was going on.
        during: &'static str,
        /// What broke.
        source: crate::link::LinkReadError,
    },
    /// The hub closed the link early.
    #[error("hub {hub} closed the link {during}")]
    Closed {
        /// The hub.
        hub: NodeId,
        /// What was going on.
        during: &'static str,
    },
    /// The hub answered out of turn.
    #[error("hub {hub} answered {during} with {got}")]
    Unexpected {
        /// The hub.
        hub: NodeId,
        /// What was going on.
        during: &'static str,
        /// What it sent.
        got: String,
    },
}

fn key_changed_hint(key_changed: bool, known_hubs: Option<&std::path::Path>) -> String {
    if !key_changed {
        return String::new();
    }
    let file = known_hubs.map_or("the known_hubs file".into(), |p| p.display().to_string());
    format!(" (the hub's key changed? if that is expected, remove its line from {file})")
}

/// Why a connect-back awaited with `Endpoint::expect_connect_back` did not
/// arrive.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectBackError {
    /// The hubs could not deliver the request, or the node could not
    /// connect (their reason).
    #[error("hub could not ask the node: {0}")]
    NotDelivered(String),
    /// The endpoint dropped the request (it is shutting down).
    #[error("the connect-back request was dropped")]
    Dropped,
    /// The node did not connect back in time.
    #[error("the node did not connect back within {0:?}")]
    TimedOut(Duration),
}
