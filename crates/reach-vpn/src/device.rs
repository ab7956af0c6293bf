//! The TUN device: made with the member's virtual IPv4 address (its
//! prefix becomes a route through the device) and its ULA (a /64 route),
//! the MTU set, offloads on (every read and write starts with a
//! virtio-net header, [`crate::vnet`]) and the link up.
//!
//! The device is not persistent: it lives as long as the file descriptor
//! this process holds, so when the process ends in any way (`vpn down`, a
//! signal, `kill -9`, a crash) the kernel removes the device, and with it
//! its addresses and routes. Nothing is left to clean up.

use std::net::{Ipv4Addr, Ipv6Addr};

use tun_rs::{AsyncDevice, DeviceBuilder};

/// Longest interface name Linux takes (IFNAMSIZ less its terminator).
pub const MAX_NAME: usize = 15;

/// What the device is made with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Interface name.
    pub name: String,
    /// The member's IPv4 address.
    pub ipv4: Ipv4Addr,
    /// The network's prefix length.
    pub prefix: u8,
    /// The member's ULA (a /64 of the network's ULA prefix).
    pub ula: Option<Ipv6Addr>,
    /// The device MTU.
    pub mtu: u16,
}

/// Why the device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A bad interface name.
    #[error(
        "interface name {0:?}: use 1 to {MAX_NAME} characters of a-z, A-Z, 0-9, '-', '_' and '.'"
    )]
    Name(String),
    /// The kernel refused (no /dev/net/tun, no CAP_NET_ADMIN, the name is
    /// taken, ...).
    #[error("cannot create TUN device {name}: {source} (reach vpn needs root or CAP_NET_ADMIN and /dev/net/tun)")]
    Create {
        /// The interface.
        name: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
}

/// Whether `name` can be an interface name.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Makes the device. The IPv6 address is added where the kernel allows
/// it; a host with IPv6 disabled gets an IPv4-only device (logged).
pub fn create(config: &DeviceConfig) -> Result<AsyncDevice, DeviceError> {
    if !valid_name(&config.name) {
        return Err(DeviceError::Name(config.name.clone()));
    }
    let create_err = |source| DeviceError::Create {
        name: config.name.clone(),
        source,
    };
    let dev = DeviceBuilder::new()
        .name(&config.name)
        .mtu(config.mtu)
        .ipv4(config.ipv4, config.prefix, None)
        // Segments of up to 64 KiB with a virtio-net header (see vnet).
        .with(|b| {
            b.offload(true);
        })
        .build_async()
        .map_err(create_err)?;
    if !dev.tcp_gso() {
        return Err(DeviceError::Create {
            name: config.name.clone(),
            source: std::io::Error::other("the kernel does not offer TUN offloads (IFF_VNET_HDR)"),
        });
    }
    if let Some(ula) = config.ula {
        if let Err(e) = dev.add_address_v6(ula, 64) {
            tracing::warn!(device = %config.name, %ula, "IPv6 address not added (IPv6 disabled on this host?): {e}; the vpn carries IPv4 only here");
        }
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(valid_name("reach0"));
        assert!(valid_name("vpn.lab-1_a"));
        assert!(!valid_name(""));
        assert!(!valid_name("a-name-too-long-x"));
        assert!(!valid_name("with space"));
        assert!(!valid_name("sl/ash"));
    }
}
