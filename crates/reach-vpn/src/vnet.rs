//! The virtio-net header that comes before every packet on a TUN device
//! with offloads on: it lets the kernel hand the vpn one TCP segment of up
//! to 64 KiB instead of forty-five 1400-byte packets (TSO), and take such a
//! segment back (the local stack needs no segmentation for it). The vpn
//! carries header and packet together over its streams, so one read, one
//! encryption and one write move a whole segment.
//!
//! A header from a peer is checked before it reaches the local kernel:
//! only the kinds of segment a TUN device itself produces (no offload, TCP
//! over IPv4 or IPv6, UDP segmentation), only the checksum flag, and every
//! offset inside the packet, with the IP version matching the segment kind.
//! On the wire the fields are little-endian; devices use the host's order.
//!
//! ```text
//! flags u8 | gso_type u8 | hdr_len u16 | gso_size u16 | csum_start u16 | csum_offset u16
//! ```

/// Length of the header.
pub const LEN: usize = 10;

/// `flags`: the checksum is partial, from `csum_start`, stored at
/// `csum_start + csum_offset`.
const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was checked (the kernel sets it on receive).
const F_DATA_VALID: u8 = 2;
/// `gso_type` kinds.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the TCP segment has ECN set.
const GSO_ECN: u8 = 0x80;

/// A header for a packet that needs no offload (made by the vpn itself).
pub const PLAIN: [u8; LEN] = [0; LEN];

/// Why a peer's header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VnetError {
    /// Shorter than a header.
    #[error("frame of {0} bytes is shorter than its offload header")]
    Short(usize),
    /// Flags other than the checksum ones.
    #[error("offload header flags {0:#x}")]
    Flags(u8),
    /// A segment kind a TUN device does not produce.
    #[error("offload kind {0:#x}")]
    Kind(u8),
    /// A segment with no segment size, or a kind that does not match the
    /// packet's IP version.
    #[error("offload kind {0:#x} does not fit the packet")]
    Mismatch(u8),
    /// The checksum offsets point outside the packet.
    #[error("checksum offsets {start}+{offset} outside a packet of {len} bytes")]
    Checksum {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// The packet's length.
        len: usize,
    },
}

fn field(h: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([h[at], h[at + 1]])
}

/// The header in a frame read from the device, turned into wire order in
/// place (nothing to do on a little-endian host).
pub fn device_to_wire(frame: &mut [u8]) {
    if cfg!(target_endian = "big") && frame.len() >= LEN {
        for at in [2, 4, 6, 8] {
            let v = u16::from_ne_bytes([frame[at], frame[at + 1]]);
            frame[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// The header in a checked frame turned into the device's order in place.
pub fn wire_to_device(frame: &mut [u8]) {
    if cfg!(target_endian = "big") && frame.len() >= LEN {
        for at in [2, 4, 6, 8] {
            let v = field(frame, at);
            frame[at..at + 2].copy_from_slice(&v.to_ne_bytes());
        }
    }
}

/// Checks the header of `frame` (header and packet, wire order) from a
/// peer; returns the packet.
pub fn check(frame: &[u8]) -> Result<&[u8], VnetError> {
    if frame.len() < LEN {
        return Err(VnetError::Short(frame.len()));
    }
    let (h, packet) = frame.split_at(LEN);
    let (flags, kind) = (h[0], h[1]);
    if flags & !(F_NEEDS_CSUM | F_DATA_VALID) != 0 {
        return Err(VnetError::Flags(flags));
    }
    let version = packet.first().map(|b| b >> 4);
    match kind & !GSO_ECN {
        GSO_NONE if kind == GSO_NONE => {}
        GSO_TCPV4 if version == Some(4) => {}
        GSO_TCPV6 if version == Some(6) => {}
        GSO_UDP_L4 if kind == GSO_UDP_L4 && matches!(version, Some(4 | 6)) => {}
        GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4 => return Err(VnetError::Mismatch(kind)),
        _ => return Err(VnetError::Kind(kind)),
    }
    let (start, offset) = (field(h, 6), field(h, 8));
    if kind != GSO_NONE {
        if field(h, 4) == 0 {
            return Err(VnetError::Mismatch(kind));
        }
        // Segmentation rewrites each segment's checksum: it must be partial.
        if flags & F_NEEDS_CSUM == 0 {
            return Err(VnetError::Mismatch(kind));
        }
    }
    if flags & F_NEEDS_CSUM != 0 {
        let end = usize::from(start) + usize::from(offset) + 2;
        if end > packet.len() {
            return Err(VnetError::Checksum {
                start,
                offset,
                len: packet.len(),
            });
        }
    }
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(h: [u8; LEN], packet: &[u8]) -> Vec<u8> {
        let mut f = h.to_vec();
        f.extend_from_slice(packet);
        f
    }

    fn tso4(gso_size: u16, start: u16, offset: u16) -> [u8; LEN] {
        let mut h = [0u8; LEN];
        h[0] = F_NEEDS_CSUM;
        h[1] = GSO_TCPV4;
        h[2..4].copy_from_slice(&40u16.to_le_bytes());
        h[4..6].copy_from_slice(&gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&start.to_le_bytes());
        h[8..10].copy_from_slice(&offset.to_le_bytes());
        h
    }

    #[test]
    fn headers_a_tun_device_makes_pass() {
        let v4 = [0x45u8; 100];
        assert_eq!(check(&frame(PLAIN, &v4)), Ok(&v4[..]));
        assert_eq!(check(&frame(tso4(1360, 20, 16), &v4)), Ok(&v4[..]));
        let mut ecn = tso4(1360, 20, 16);
        ecn[1] |= GSO_ECN;
        assert!(check(&frame(ecn, &v4)).is_ok());
    }

    #[test]
    fn headers_a_tun_device_does_not_make_are_refused() {
        let v4 = [0x45u8; 100];
        let v6 = [0x60u8; 100];
        assert_eq!(check(&[0; 9]), Err(VnetError::Short(9)));
        let mut h = PLAIN;
        h[0] = 4;
        assert_eq!(check(&frame(h, &v4)), Err(VnetError::Flags(4)));
        let mut h = PLAIN;
        h[1] = 3; // UFO
        assert_eq!(check(&frame(h, &v4)), Err(VnetError::Kind(3)));
        assert_eq!(
            check(&frame(tso4(1360, 20, 16), &v6)),
            Err(VnetError::Mismatch(GSO_TCPV4))
        );
        assert_eq!(
            check(&frame(tso4(0, 20, 16), &v4)),
            Err(VnetError::Mismatch(GSO_TCPV4))
        );
        assert_eq!(
            check(&frame(tso4(1360, 90, 16), &v4)),
            Err(VnetError::Checksum {
                start: 90,
                offset: 16,
                len: 100
            })
        );
        let mut no_csum = tso4(1360, 20, 16);
        no_csum[0] = 0;
        assert_eq!(
            check(&frame(no_csum, &v4)),
            Err(VnetError::Mismatch(GSO_TCPV4))
        );
    }

    proptest! {
        #[test]
        fn any_bytes_are_checked_without_panic(f in proptest::collection::vec(any::<u8>(), 0..120)) {
            if let Ok(p) = check(&f) {
                prop_assert_eq!(p.len(), f.len() - LEN);
            }
        }
    }
}
