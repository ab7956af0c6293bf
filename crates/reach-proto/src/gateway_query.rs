//! DPF's same-network query: "is this public endpoint one of your
//! mappings, and which internal endpoint does it forward to?" A node
//! asks it of its own gateway before connecting to a peer whose address
//! is the gateway's own public address, so two nodes behind the same
//! gateway connect on the LAN instead of through a hairpin the NAT
//! seldom does.
//!
//! It travels as a PCP message (RFC 6887's header, to the PCP port 5351)
//! with an opcode from PCP's private-use range (96-126, RFC 6887 section
//! 19.2), so a PCP server that does not know it answers
//! UNSUPP_OPCODE at once and a client learns quickly that there is no
//! answer to wait for.
//!
//! ```text
//! request:  version 2 | R=0, opcode 96 | reserved u16 | lifetime u32 (0)
//!           | client address (16, IPv4-mapped)
//!           | protocol u8 | reserved (3) | external port u16 | reserved u16
//!           | external address (16)
//! response: version 2 | R=1, opcode 96 | reserved u8 | result u8
//!           | lifetime u32 (how long the answer holds) | epoch u32 | reserved (12)
//!           | the request's data (24)
//!           | internal port u16 | reserved u16 | internal address (16)
//! ```
//!
//! A successful answer with internal port 0 and the unspecified address
//! says "not one of mine".

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The opcode (PCP private use).
pub const OPCODE: u8 = 96;
/// PCP's version byte.
pub const VERSION: u8 = 2;
/// PCP's header length.
const HEADER_LEN: usize = 24;
/// The query's data: protocol, external port, external address.
const DATA_LEN: usize = 24;
/// A request's length.
pub const REQUEST_LEN: usize = HEADER_LEN + DATA_LEN;
/// A response's length.
pub const RESPONSE_LEN: usize = HEADER_LEN + DATA_LEN + 20;

/// PCP's success code.
pub const SUCCESS: u8 = 0;

/// A query: which internal endpoint does `external` forward to?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    /// The asking client's own address (PCP checks it against the
    /// datagram's source).
    pub client: IpAddr,
    /// IANA protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    /// The public endpoint asked about.
    pub external: SocketAddr,
}

/// The gateway's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// PCP result code ([`SUCCESS`] or one of RFC 6887's errors).
    pub result: u8,
    /// Seconds the answer holds (the mapping's remaining lease).
    pub lifetime: u32,
    /// The gateway's epoch (seconds since it started).
    pub epoch: u32,
    /// The query answered.
    pub query: Query,
    /// The internal endpoint, when the external one is a mapping here.
    pub internal: Option<SocketAddr>,
}

/// Why bytes are not a query or an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Not the length of the message.
    #[error("same-network query message of {0} bytes has the wrong length")]
    Length(usize),
    /// Not PCP version 2, or not the query's opcode.
    #[error("not a same-network query (version {version}, opcode byte {opcode:#04x})")]
    NotQuery {
        /// The version byte.
        version: u8,
        /// The opcode byte (with the R bit).
        opcode: u8,
    },
}

/// Reads a PCP address field (16 bytes, IPv4 as IPv4-mapped IPv6); the
/// caller has checked the length.
pub fn read_addr(b: &[u8]) -> IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a).to_canonical()
}

/// Writes a PCP address field (IPv4 as IPv4-mapped IPv6).
pub fn put_addr(out: &mut Vec<u8>, ip: IpAddr) {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&v6.octets());
}

fn check(b: &[u8], len: usize, response: bool) -> Result<(), QueryError> {
    if b.len() < 2 {
        return Err(QueryError::Length(b.len()));
    }
    let opcode = OPCODE | if response { 0x80 } else { 0 };
    if b[0] != VERSION || b[1] != opcode {
        return Err(QueryError::NotQuery {
            version: b[0],
            opcode: b[1],
        });
    }
    if b.len() != len {
        return Err(QueryError::Length(b.len()));
    }
    Ok(())
}

impl Query {
    fn encode_data(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.protocol, 0, 0, 0]);
        out.extend_from_slice(&self.external.port().to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        put_addr(out, self.external.ip());
    }

    fn decode_data(client: IpAddr, d: &[u8]) -> Self {
        Query {
            client,
            protocol: d[0],
            external: SocketAddr::new(read_addr(&d[8..24]), u16::from_be_bytes([d[4], d[5]])),
        }
    }

    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REQUEST_LEN);
        out.extend_from_slice(&[VERSION, OPCODE, 0, 0, 0, 0, 0, 0]);
        put_addr(&mut out, self.client);
        self.encode_data(&mut out);
        out
    }

    /// Reads a request (the whole datagram).
    pub fn decode(b: &[u8]) -> Result<Self, QueryError> {
        check(b, REQUEST_LEN, false)?;
        Ok(Self::decode_data(read_addr(&b[8..24]), &b[HEADER_LEN..]))
    }

    /// Whether the opcode byte of `b` is the query's (a request).
    pub fn is_query(b: &[u8]) -> bool {
        b.get(1) == Some(&OPCODE)
    }
}

impl Answer {
    /// The response's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RESPONSE_LEN);
        out.extend_from_slice(&[VERSION, 0x80 | OPCODE, 0, self.result]);
        out.extend_from_slice(&self.lifetime.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&[0; 12]);
        self.query.encode_data(&mut out);
        let internal = self
            .internal
            .unwrap_or(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)));
        out.extend_from_slice(&internal.port().to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        put_addr(&mut out, internal.ip());
        out
    }

    /// Reads a response; the client field is not carried back, so
    /// `client` fills it.
    pub fn decode(b: &[u8], client: IpAddr) -> Result<Self, QueryError> {
        check(b, RESPONSE_LEN, true)?;
        let query = Query::decode_data(client, &b[HEADER_LEN..]);
        let at = HEADER_LEN + DATA_LEN;
        let port = u16::from_be_bytes([b[at], b[at + 1]]);
        let ip = read_addr(&b[at + 4..at + 20]);
        let internal = (port != 0 && !ip.is_unspecified()).then(|| SocketAddr::new(ip, port));
        Ok(Answer {
            result: b[3],
            lifetime: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            epoch: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            query,
            internal,
        })
    }

    /// The internal endpoint this answer gives for `asked`: only a
    /// successful answer to that very query counts (a stray or stale
    /// datagram does not).
    pub fn internal_for(&self, asked: &Query) -> Option<SocketAddr> {
        let same = self.query.protocol == asked.protocol && self.query.external == asked.external;
        (self.result == SUCCESS && same)
            .then_some(self.internal)
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn query() -> Query {
        Query {
            client: "10.0.0.5".parse().unwrap(),
            protocol: 6,
            external: "203.0.113.1:40001".parse().unwrap(),
        }
    }

    #[test]
    fn queries_and_answers_round_trip() {
        let q = query();
        let b = q.encode();
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(&b[..2], &[2, 96]);
        assert!(Query::is_query(&b));
        assert_eq!(Query::decode(&b), Ok(q));
        let a = Answer {
            result: SUCCESS,
            lifetime: 3600,
            epoch: 9,
            query: q,
            internal: Some("10.0.0.7:7000".parse().unwrap()),
        };
        let r = a.encode();
        assert_eq!(r.len(), RESPONSE_LEN);
        assert_eq!(Answer::decode(&r, q.client), Ok(a));
        assert_eq!(a.internal_for(&q), a.internal);
        let none = Answer {
            internal: None,
            ..a
        };
        assert_eq!(Answer::decode(&none.encode(), q.client), Ok(none));
        assert_eq!(none.internal_for(&q), None);
    }

    #[test]
    fn only_a_successful_answer_to_the_same_query_counts() {
        let q = query();
        let a = Answer {
            result: SUCCESS,
            lifetime: 60,
            epoch: 1,
            query: q,
            internal: Some("10.0.0.7:7000".parse().unwrap()),
        };
        let other = Query {
            external: "203.0.113.1:40002".parse().unwrap(),
            ..q
        };
        assert_eq!(a.internal_for(&other), None);
        let refused = Answer { result: 2, ..a };
        assert_eq!(refused.internal_for(&q), None);
    }

    #[test]
    fn other_messages_are_told_apart() {
        let b = query().encode();
        let mut map = b.clone();
        map[1] = 1;
        assert!(matches!(
            Query::decode(&map),
            Err(QueryError::NotQuery { opcode: 1, .. })
        ));
        assert_eq!(Query::decode(&b[..40]), Err(QueryError::Length(40)));
        assert_eq!(Query::decode(&[]), Err(QueryError::Length(0)));
        // A request is not an answer.
        assert!(Answer::decode(&b, query().client).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(q) = Query::decode(&b) {
                prop_assert_eq!(Query::decode(&q.encode()), Ok(q));
            }
            if let Ok(a) = Answer::decode(&b, "10.0.0.1".parse().unwrap()) {
                let again = Answer::decode(&a.encode(), a.query.client);
                prop_assert_eq!(again, Ok(a));
            }
        }

        #[test]
        fn any_answer_survives_a_round_trip(
            result in any::<u8>(), lifetime in any::<u32>(), port in 1u16.., iport in 1u16..,
            a in any::<[u8; 4]>(), i in any::<[u8; 4]>(),
        ) {
            let q = Query {
                client: "10.0.0.1".parse().unwrap(),
                protocol: 17,
                external: SocketAddr::from((a, port)),
            };
            let internal = (i != [0; 4]).then(|| SocketAddr::from((i, iport)));
            let ans = Answer { result, lifetime, epoch: 3, query: q, internal };
            prop_assert_eq!(Answer::decode(&ans.encode(), q.client), Ok(ans));
        }
    }
}
