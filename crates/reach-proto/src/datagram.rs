//! Datagrams over a byte stream, for UDP forwarding: each datagram is a
//! 2-byte big-endian length and its payload, so boundaries survive the
//! stream and any length a UDP datagram can have (up to 65535) fits.

/// Largest datagram carried.
pub const MAX_DATAGRAM: usize = u16::MAX as usize;
/// Bytes before each datagram.
pub const HEADER_LEN: usize = 2;

/// A datagram too large to carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("datagram of {0} bytes is larger than {MAX_DATAGRAM}")]
pub struct TooLarge(pub usize);

/// Appends one framed datagram to `out`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) -> Result<(), TooLarge> {
    let len = u16::try_from(payload.len()).map_err(|_| TooLarge(payload.len()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// The first whole datagram in `buf` and the bytes it takes, or `None` while
/// it is incomplete. Every byte sequence is a valid prefix of some stream.
pub fn decode(buf: &[u8]) -> Option<(&[u8], usize)> {
    let len = usize::from(u16::from_be_bytes([*buf.first()?, *buf.get(1)?]));
    let end = HEADER_LEN + len;
    buf.get(HEADER_LEN..end).map(|d| (d, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn boundaries_survive_and_limits_hold() {
        let mut wire = Vec::new();
        encode(b"one", &mut wire).expect("small");
        encode(b"", &mut wire).expect("empty");
        encode(&[7; MAX_DATAGRAM], &mut wire).expect("largest");
        assert_eq!(
            encode(&[0; MAX_DATAGRAM + 1], &mut wire),
            Err(TooLarge(MAX_DATAGRAM + 1))
        );
        let (a, n) = decode(&wire).expect("first");
        assert_eq!(a, b"one");
        let (b, m) = decode(&wire[n..]).expect("second");
        assert!(b.is_empty());
        let (c, k) = decode(&wire[n + m..]).expect("third");
        assert_eq!(c.len(), MAX_DATAGRAM);
        assert_eq!(n + m + k, wire.len());
        assert_eq!(decode(&wire[..1]), None);
        assert_eq!(decode(&wire[..4]), None);
    }

    proptest! {
        #[test]
        fn any_split_of_any_datagrams_decodes_back(
            grams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = decode(&junk);
            let mut wire = Vec::new();
            for g in &grams {
                encode(g, &mut wire).expect("encode");
            }
            let mut at = 0;
            let mut got = Vec::new();
            while let Some((d, n)) = decode(&wire[at..]) {
                got.push(d.to_vec());
                at += n;
            }
            prop_assert_eq!(at, wire.len());
            prop_assert_eq!(got, grams);
        }
    }
}
