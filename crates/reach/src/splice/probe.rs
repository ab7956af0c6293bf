//! Learning this host's NAT mapping for a fresh local port from the hub's
//! address echoes, and predicting the endpoints a peer should aim at
//! (`reach_proto::nat` classifies and predicts; this does the I/O).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reach_proto::candidates::{classify as addr_class, AddrClass};
use reach_proto::nat::{self, NatProfile, Observation};
use tokio::net::TcpSocket;

use crate::echo::reusable_socket;
use crate::error::EchoError;
use crate::node::Shared;

/// How long one address echo may take to answer.
const ECHO_BUDGET: Duration = Duration::from_millis(800);
/// Fresh ports bound at most when looking for one not used lately.
const PORT_TRIES: usize = 16;

/// What probing the hub's echoes found about this host's NAT.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NatReport {
    /// The classification.
    pub profile: NatProfile,
    /// The local port probed from.
    pub local_port: u16,
    /// The endpoints a peer would be told to aim at for that port (empty:
    /// not predictable, so splicing is skipped).
    pub candidates: Vec<SocketAddr>,
}

/// Probes the NAT in front of this host, as a splice would.
pub(crate) async fn probe(shared: &Shared, echoes: &[SocketAddr]) -> Result<NatReport, EchoError> {
    let p = prepare(shared, echoes).await?;
    Ok(NatReport {
        profile: p.profile,
        local_port: p.local.port(),
        candidates: p.candidates,
    })
}

/// A local port with its learned NAT mapping and predicted endpoints.
pub(super) struct Prepared {
    /// Holds the port while the splice runs.
    _anchor: TcpSocket,
    pub(super) local: SocketAddr,
    pub(super) profile: NatProfile,
    pub(super) candidates: Vec<SocketAddr>,
}

impl Prepared {
    /// Fails when there is nothing to tell the peer.
    pub(super) fn predictable(self) -> Result<Self, NatProfile> {
        if self.candidates.is_empty() {
            return Err(self.profile);
        }
        Ok(self)
    }
}

/// Asks one echo, from `local`, what it sees.
async fn observe(local: SocketAddr, server: SocketAddr) -> Result<Observation, EchoError> {
    let (tcp, mapped) = crate::echo::ask(local, server, ECHO_BUDGET).await?;
    let from = tcp.local_addr().map_err(|source| EchoError::Io {
        echo: server,
        source,
    })?;
    // Close with a reset: no TIME_WAIT at either end. Thousands of probes
    // otherwise leave the echo with TIME_WAIT entries that a later probe's
    // (random) port can hit, costing it a SYN retransmission.
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    Ok(Observation {
        local: from,
        server,
        mapped,
    })
}

/// Binds a port not used for splicing lately: such a port may still have
/// stale NAT mappings (see `port_memory`). The sockets tried are held until
/// one is found, so the kernel does not hand the same port out again.
fn fresh_port(shared: &Shared, ip: IpAddr) -> Result<(TcpSocket, SocketAddr), EchoError> {
    let mut tried = Vec::new();
    let (anchor, local) = loop {
        let anchor = reusable_socket(SocketAddr::new(ip, 0)).map_err(EchoError::Bind)?;
        let local = anchor.local_addr().map_err(EchoError::Bind)?;
        if !shared.splice_ports.recently_used(local.port()) || tried.len() >= PORT_TRIES {
            break (anchor, local);
        }
        tried.push(anchor);
    };
    shared.splice_ports.remember(local.port());
    Ok((anchor, local))
}

/// Binds a fresh port, learns its mapping from the echoes and predicts.
pub(super) async fn prepare(shared: &Shared, echoes: &[SocketAddr]) -> Result<Prepared, EchoError> {
    let first = *echoes.first().ok_or(EchoError::NoEcho)?;
    let unspecified: IpAddr = if first.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let (anchor, local) = fresh_port(shared, unspecified)?;
    let mut observations = Vec::new();
    for (i, echo) in echoes.iter().take(2).enumerate() {
        match observe(local, *echo).await {
            Ok(o) => observations.push(o),
            Err(e) if i == 0 => return Err(e),
            Err(e) => tracing::debug!("second echo failed, classifying from one: {e}"),
        }
    }
    let mut profile = nat::classify(&observations);
    if let (nat::Allocation::Sequential { .. }, Some(first)) =
        (profile.allocation, observations.first())
    {
        // Confirm with a third mapping from another fresh port; it also is
        // the newest allocation, which predictions start from.
        let other = fresh_port(shared, unspecified)?;
        let third = observe(other.1, first.server).await?;
        profile = nat::confirm_sequential(&profile, &third);
    }
    let public: Vec<IpAddr> = shared
        .local_addrs
        .get()
        .iter()
        .map(|l| l.ip)
        .filter(|ip| addr_class(*ip) == AddrClass::Global)
        .collect();
    let candidates = nat::predict(&profile, &public, local.port());
    tracing::debug!(%profile, ?candidates, port = local.port(), "splice port prepared");
    Ok(Prepared {
        _anchor: anchor,
        local,
        profile,
        candidates,
    })
}
