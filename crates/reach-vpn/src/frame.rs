//! How packets travel on a vpn stream: each frame is a 4-byte big-endian
//! length and that many bytes: a type byte ([`crate::control::FrameType`]),
//! then for a packet the offload header and the packet (see
//! [`crate::vnet`]), for a control message the message. A frame longer than [`MAX_FRAME`] is a protocol error:
//! the stream is closed, never read into an unbounded buffer.

use crate::vnet;

/// Bytes before each frame.
pub const HEADER_LEN: usize = 4;
/// The largest frame: a type byte, an offload header and a 64 KiB segment.
pub const MAX_FRAME: usize = 1 + vnet::LEN + 65_535;

/// A frame too long for the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("vpn frame of {0} bytes; at most {MAX_FRAME}")]
pub struct TooLong(pub usize);

/// Appends the concatenation of `parts` as one frame to `out`.
pub fn encode(parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), TooLong> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_FRAME {
        return Err(TooLong(len));
    }
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    Ok(())
}

/// The first whole frame in `buf` and the bytes it takes; `Ok(None)` while
/// it is incomplete.
pub fn decode(buf: &[u8]) -> Result<Option<(&[u8], usize)>, TooLong> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > MAX_FRAME {
        return Err(TooLong(len));
    }
    Ok(buf
        .get(HEADER_LEN..HEADER_LEN + len)
        .map(|f| (f, HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_oversized_ones_are_errors() {
        let mut out = Vec::new();
        encode(&[b"ab", b"c"], &mut out).unwrap();
        encode(&[], &mut out).unwrap();
        assert_eq!(decode(&out), Ok(Some((&b"abc"[..], 7))));
        assert_eq!(decode(&out[7..]), Ok(Some((&b""[..], 4))));
        assert_eq!(decode(&out[..6]), Ok(None));
        assert_eq!(decode(&[0, 1]), Ok(None));
        assert_eq!(
            encode(&[&vec![0; MAX_FRAME + 1]], &mut out),
            Err(TooLong(MAX_FRAME + 1))
        );
        assert_eq!(decode(&[0xff, 0, 0, 0]), Err(TooLong(0xff00_0000)));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_a_frame_inside_them_or_an_error(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some((f, used))) = decode(&b) {
                prop_assert!(used <= b.len() && f.len() + HEADER_LEN == used);
            }
        }
    }
}
