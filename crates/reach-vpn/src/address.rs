//! Taking a virtual IPv4 address in a network: the one given (`--ip`), or
//! one derived from the NodeId inside the network's prefix, checked free
//! through the hubs' member directory before it is claimed. A derived
//! address that another member holds gives way to the node's next
//! derived one; a given address that another member holds is an error.
//!
//! Two members that check the same free address at the same moment both
//! claim it; the directory then lists both, the earlier first. A member
//! watches its claim ([`watch`]) and reports such a conflict; peers use
//! the first holder listed.

use std::net::Ipv4Addr;
use std::time::Duration;

use reach::{Endpoint, NodeId};
use reach_proto::vpn::{derived_ipv4, is_host_of, NetworkTag, VpnClaim};

/// Derived addresses tried before giving up.
pub const ATTEMPTS: u32 = 16;
/// How long a directory lookup may take while choosing.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a member checks that the directory lists it first for its
/// address.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(30);

/// Which address to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// This one.
    Given(Ipv4Addr),
    /// One derived from the NodeId.
    Derived,
}

/// Why no address was taken.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The given address is outside the prefix (or its network or
    /// broadcast address).
    #[error("{0} is not a host address of {1}/{2}")]
    OutsidePrefix(Ipv4Addr, Ipv4Addr, u8),
    /// The given address is held by another member.
    #[error("{ip} is held by member {holder}; choose another --ip, or leave it out to derive one")]
    Taken {
        /// The address.
        ip: Ipv4Addr,
        /// Who holds it.
        holder: NodeId,
    },
    /// Every derived address is held.
    #[error("the first {ATTEMPTS} addresses derived for this node in {0}/{1} are all held: use a larger prefix or --ip")]
    AllTaken(Ipv4Addr, u8),
    /// The hubs could not be asked.
    #[error("cannot check the address with the hubs: {0}")]
    Lookup(#[from] reach::SessionError),
}

/// Chooses a free address in `net/len` as `choice` says and claims it
/// with the hub.
pub async fn claim(
    endpoint: &Endpoint,
    network: NetworkTag,
    net: Ipv4Addr,
    len: u8,
    choice: Choice,
) -> Result<Ipv4Addr, ClaimError> {
    let me = endpoint.node_id();
    let candidates: Vec<Ipv4Addr> = match choice {
        Choice::Given(ip) => {
            if !is_host_of(ip, net, len) {
                return Err(ClaimError::OutsidePrefix(ip, net, len));
            }
            vec![ip]
        }
        Choice::Derived => (0..ATTEMPTS)
            .map(|k| derived_ipv4(&network, &me, net, len, k))
            .collect(),
    };
    for ip in candidates {
        let holders = endpoint
            .lookup_vip(network, ip.into(), LOOKUP_TIMEOUT)
            .await?;
        match holders.iter().find(|h| **h != me) {
            None => {
                endpoint.set_vpn_claim(Some(VpnClaim { network, ip }));
                return Ok(ip);
            }
            Some(holder) if choice != Choice::Derived => {
                return Err(ClaimError::Taken {
                    ip,
                    holder: *holder,
                })
            }
            Some(holder) => {
                tracing::info!(%ip, %holder, "derived address held by another member: trying the next");
            }
        }
    }
    Err(ClaimError::AllTaken(net, len))
}

/// Checks every [`WATCH_INTERVAL`] that the directory lists this node
/// first for `ip`, and says so loudly when it does not. Runs until
/// dropped.
pub async fn watch(endpoint: &Endpoint, network: NetworkTag, ip: Ipv4Addr) {
    let me = endpoint.node_id();
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        match endpoint
            .lookup_vip(network, ip.into(), LOOKUP_TIMEOUT)
            .await
        {
            Ok(holders) if holders.first() == Some(&me) => {}
            Ok(holders) => {
                tracing::error!(%ip, ?holders, "address conflict: the hubs list another member first for this node's vpn address; peers reach that member instead. Restart with another --ip")
            }
            Err(e) => tracing::debug!("cannot check the vpn address with the hubs: {e}"),
        }
    }
}
