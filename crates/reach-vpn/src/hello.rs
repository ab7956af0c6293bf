//! The first message each side of a vpn stream sends: which network it is
//! a member of and which IPv4 address it holds there, and the MTU of its
//! device. Both sides send theirs at once and then read the other's, so
//! neither waits for the other to speak first.
//!
//! ```text
//! "RVPN" | version u8 (3) | network tag (8) | IPv4 address (4) | MTU u16
//! ```

use std::net::Ipv4Addr;

use reach_proto::vpn::NetworkTag;

/// Length of a hello.
pub const HELLO_LEN: usize = 19;
const MAGIC: &[u8; 4] = b"RVPN";
/// 3: frames start with a type byte (packets carry an offload header,
/// see [`crate::vnet`]; control messages, [`crate::control`]).
const VERSION: u8 = 3;

/// A vpn stream's hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's network.
    pub network: NetworkTag,
    /// The sender's virtual IPv4 address.
    pub ip: Ipv4Addr,
    /// The sender's device MTU.
    pub mtu: u16,
}

/// A hello that cannot be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Not a vpn hello at all (another service on the port?).
    #[error("not a reach vpn hello")]
    Magic,
    /// A version this build does not speak.
    #[error("vpn protocol version {0}; this build speaks version {VERSION}")]
    Version(u8),
}

impl Hello {
    /// The hello as sent.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4] = VERSION;
        b[5..13].copy_from_slice(&self.network.0);
        b[13..17].copy_from_slice(&self.ip.octets());
        b[17..19].copy_from_slice(&self.mtu.to_be_bytes());
        b
    }

    /// The hello in `b`.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, HelloError> {
        if &b[..4] != MAGIC {
            return Err(HelloError::Magic);
        }
        if b[4] != VERSION {
            return Err(HelloError::Version(b[4]));
        }
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&b[5..13]);
        Ok(Self {
            network: NetworkTag(tag),
            ip: Ipv4Addr::new(b[13], b[14], b[15], b[16]),
            mtu: u16::from_be_bytes([b[17], b[18]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_hello_round_trips_and_foreign_bytes_are_named() {
        let h = Hello {
            network: NetworkTag::of("lab").unwrap(),
            ip: Ipv4Addr::new(10, 77, 1, 2),
            mtu: 1400,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[4] = 9;
        assert_eq!(Hello::decode(&b), Err(HelloError::Version(9)));
        b[0] = b'X';
        assert_eq!(Hello::decode(&b), Err(HelloError::Magic));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in any::<[u8; HELLO_LEN]>()) {
            if let Ok(h) = Hello::decode(&b) {
                prop_assert_eq!(h.encode(), b);
            }
        }
    }
}
