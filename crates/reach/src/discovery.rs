//! Discovering this host's interface addresses.
//!
//! Reads IPv4 and IPv6 interface addresses with their prefix lengths; the pure
//! classification and ordering logic lives in `reach_proto::candidates`.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach_proto::candidates::LocalAddr;

/// How long a snapshot of the interface addresses is reused. Enumerating them
/// (a netlink dump) costs about 100 us, more than a loopback TCP connect, so
/// every connect re-reading them would show in setup time; interfaces change
/// rarely, and a second is quick enough to follow a roaming laptop.
pub const LOCAL_ADDR_TTL: Duration = Duration::from_secs(1);

/// A snapshot of [`local_addrs`], refreshed when older than [`LOCAL_ADDR_TTL`].
#[derive(Debug, Default)]
pub struct LocalAddrCache {
    snapshot: Mutex<Option<(Instant, Arc<Vec<LocalAddr>>)>>,
}

impl LocalAddrCache {
    /// The current snapshot, re-read when stale.
    pub fn get(&self) -> Arc<Vec<LocalAddr>> {
        let now = Instant::now();
        let mut guard = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        match &*guard {
            Some((taken, addrs)) if now.duration_since(*taken) < LOCAL_ADDR_TTL => addrs.clone(),
            _ => {
                let addrs = Arc::new(local_addrs());
                *guard = Some((now, addrs.clone()));
                addrs
            }
        }
    }
}

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

    #[test]
    fn the_cache_reuses_a_fresh_snapshot() {
        let cache = LocalAddrCache::default();
        let (a, b) = (cache.get(), cache.get());
        assert!(Arc::ptr_eq(&a, &b));
    }
}
