//! Discovering this host's interface addresses.
//!
//! Reads IPv4 and IPv6 interface addresses with their prefix lengths; the pure
//! classification and ordering logic lives in `reach_proto::candidates`.

use std::net::IpAddr;

use reach_proto::candidates::LocalAddr;

/// Every address of every interface that is up, with its prefix length.
/// An enumeration failure yields an empty list: the caller then advertises nothing
/// and orders candidates without local knowledge, which still works.
pub fn local_addrs() -> Vec<LocalAddr> {
    let Ok(ifaces) = if_addrs::get_if_addrs() else {
        tracing::warn!("cannot enumerate network interfaces");
        return Vec::new();
    };
    ifaces
        .into_iter()
        .map(|i| {
            let (ip, prefix_len) = match &i.addr {
                if_addrs::IfAddr::V4(v4) => (IpAddr::V4(v4.ip), v4.prefixlen),
                if_addrs::IfAddr::V6(v6) => (IpAddr::V6(v6.ip), v6.prefixlen),
            };
            LocalAddr { ip, prefix_len }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_always_found() {
        assert!(local_addrs().iter().any(|a| a.ip.is_loopback()));
    }
}
