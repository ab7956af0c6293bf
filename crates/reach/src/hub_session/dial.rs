//! Reaching a hub: resolve its name, learn or check its identity (pinned
//! like ssh's known_hosts), dial and authenticate it, and the one-shot status
//! query.
//!
//! Data flow: `HubTarget` -> resolve -> identity (given, pinned, or learned
//! by greeting the hub under our own name) -> `direct::connect` -> an
//! authenticated `ReachStream` to the hub's virtual port. The node session,
//! a hub dialling a peer hub and `reach status` all start here.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use reach_proto::handshake::{HandshakeError, InitiatorOptions};
use reach_proto::link::{admission_proof, encode_control, Control, Frame, HUB_VPORT};
use reach_proto::setup_plan::SetupModule;
use reach_proto::{Cipher, NodeId, SecretKey, VirtualAddr};
use tokio::io::AsyncWriteExt;

use super::HubTarget;
use crate::direct::{self, RaceSettings};
use crate::discovery::LocalAddrCache;
use crate::error::{AttemptError, HubError};
use crate::handshake::{initiate, tcp_connect};
use crate::link::FrameReader;
use crate::stream::ReachStream;

/// How long dialling a hub, and its first answer, may take.
pub(crate) const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// What dialling a hub needs of the node: its identity, its local addresses
/// (for the connection race) and its handshake settings.
#[derive(Clone)]
pub(crate) struct Dialer {
    pub(crate) secret: SecretKey,
    pub(crate) local_addrs: std::sync::Arc<LocalAddrCache>,
    pub(crate) options: InitiatorOptions,
    pub(crate) attempt_delay: Duration,
    /// Where hub identities learned on first contact are pinned.
    pub(crate) known_hubs: Option<std::path::PathBuf>,
}

/// Resolves the hub's addresses.
async fn resolve(target: &HubTarget) -> Result<Vec<SocketAddr>, HubError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|source| HubError::Resolve {
            host: target.host.clone(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(HubError::NoAddress {
            host: target.host.clone(),
        });
    }
    Ok(addrs)
}

/// The pinned NodeId of the hub at `key`, from a known_hubs file.
fn pinned(path: &Path, key: &str) -> Option<NodeId> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, id)| id.trim().parse().ok())
}

/// Learns the NodeId of the hub at `addrs` by greeting it under our own name:
/// it answers that it is another node and says which.
async fn learn_hub_id(
    secret: &SecretKey,
    cipher: Cipher,
    addrs: &[SocketAddr],
) -> Result<NodeId, HubError> {
    let mut last = String::from("no address");
    for addr in addrs {
        let mut tcp = match tcp_connect(*addr).await {
            Ok(t) => t,
            Err(e) => {
                last = format!("{addr}: {e}");
                continue;
            }
        };
        let opts = InitiatorOptions {
            plaintext: false,
            cipher,
            reverse: false,
            upgrade: false,
            network: None,
        };
        match initiate(
            &mut tcp,
            crate::handshake::Me {
                secret,
                tickets: None,
            },
            secret.node_id(),
            HUB_VPORT,
            opts,
        )
        .await
        {
            Err(AttemptError::Handshake(HandshakeError::WrongNode { found, .. })) => {
                return Ok(found)
            }
            Err(e) => last = format!("{addr}: {e}"),
            Ok(_) => last = format!("{addr}: answered as this node itself"),
        }
    }
    Err(HubError::UnknownIdentity { last })
}

/// The hub's NodeId: given, pinned, or learned and pinned now.
async fn hub_id(
    target: &HubTarget,
    known_hubs: Option<&Path>,
    secret: &SecretKey,
    cipher: Cipher,
    addrs: &[SocketAddr],
) -> Result<NodeId, HubError> {
    if let Some(id) = target.id {
        return Ok(id);
    }
    let key = format!("{}:{}", target.host, target.port);
    if let Some(id) = known_hubs.and_then(|p| pinned(p, &key)) {
        return Ok(id);
    }
    let id = learn_hub_id(secret, cipher, addrs).await?;
    tracing::info!(hub = %key, %id, "learned the hub's identity on first contact; pinned");
    if let Some(path) = known_hubs {
        // Rewritten whole and atomically: a crash mid-write must not lose
        // the pins already there.
        let mut text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!("cannot read {}: {e}; not pinning", path.display());
                return Ok(id);
            }
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{key} {id}\n"));
        let pinned = crate::files::write_atomically(path, text.as_bytes(), 0o600);
        if let Err(e) = pinned {
            tracing::warn!("cannot pin the hub's identity in {}: {e}", path.display());
        }
    }
    Ok(id)
}

impl Dialer {
    /// Dials a hub and authenticates it: the link of a node's session, or of
    /// a hub to a peer hub.
    pub(crate) async fn dial(&self, hub: &HubTarget) -> Result<ReachStream, HubError> {
        let addrs = resolve(hub).await?;
        let known_hubs = self.known_hubs.as_deref();
        let id = hub_id(hub, known_hubs, &self.secret, self.options.cipher, &addrs).await?;
        let target = VirtualAddr::new(id, HUB_VPORT).with_direct(addrs);
        let settings = RaceSettings {
            // A plaintext link still authenticates both ends; routed streams
            // on it stay end-to-end encrypted unless their own peers both opt
            // out.
            options: self.options,
            attempt_delay: self.attempt_delay,
            timeout: ATTACH_TIMEOUT,
            module: SetupModule::Direct,
            first: None,
        };
        direct::connect(
            &self.secret,
            None,
            &self.local_addrs.get(),
            &target,
            settings,
        )
        .await
        .map_err(|source| HubError::Connect {
            key_changed: source.is_identity_mismatch(),
            known_hubs: known_hubs.map(Path::to_path_buf),
            source,
        })
    }

    /// Asks `hub` for its status report (JSON) on a short-lived link: the hub
    /// answers one `StatusQuery` from an admitted node and closes.
    pub(crate) async fn query_status(
        &self,
        hub: &HubTarget,
        network_secret: Option<&[u8]>,
    ) -> Result<String, HubError> {
        let stream = tokio::time::timeout(ATTACH_TIMEOUT, self.dial(hub))
            .await
            .map_err(|_| HubError::TimedOut {
                hub: hub.to_string(),
                what: "did not answer",
                after: ATTACH_TIMEOUT,
            })??;
        let hub_id = stream.peer();
        let (r, mut w) = tokio::io::split(stream);
        let proof = network_secret.map(|s| admission_proof(s, &self.secret.node_id(), &hub_id));
        let mut frame = Vec::new();
        // A StatusQuery is a few dozen bytes: it always fits a frame.
        let _ = encode_control(&Control::StatusQuery { proof }, &mut frame);
        const DURING: &str = "during the status query";
        async {
            w.write_all(&frame).await?;
            w.flush().await
        }
        .await
        .map_err(|e| HubError::Link {
            hub: hub_id,
            during: DURING,
            source: e.into(),
        })?;
        let mut reader = FrameReader::new(r);
        match first_answer(&mut reader, hub_id, "the status query", DURING).await? {
            Control::StatusReport { json } => Ok(json),
            other => Err(HubError::Unexpected {
                hub: hub_id,
                during: DURING,
                got: format!("{other:?}"),
            }),
        }
    }
}

/// The hub's first answer on a fresh link (to a registration or a status
/// query): a control message within [`ATTACH_TIMEOUT`]. A refusal becomes
/// [`HubError::Refused`] of `what`; anything else that is not a control
/// message, a closed or broken link, or silence is an error `during` it.
async fn first_answer<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    hub: NodeId,
    what: &'static str,
    during: &'static str,
) -> Result<Control, HubError> {
    let answer = tokio::time::timeout(ATTACH_TIMEOUT, reader.next())
        .await
        .map_err(|_| HubError::TimedOut {
            hub: hub.to_string(),
            what: "did not answer",
            after: ATTACH_TIMEOUT,
        })?;
    match answer {
        Ok(Some(Frame::Control(Control::Refused { reason }))) => {
            Err(HubError::Refused { hub, what, reason })
        }
        Ok(Some(Frame::Control(msg))) => Ok(msg),
        Ok(Some(other)) => Err(HubError::Unexpected {
            hub,
            during,
            got: format!("{other:?}"),
        }),
        Ok(None) => Err(HubError::Closed { hub, during }),
        Err(source) => Err(HubError::Link {
            hub,
            during,
            source,
        }),
    }
}
