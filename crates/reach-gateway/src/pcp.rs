//! PCP (RFC 6887) messages, as a gateway reads and writes them: the MAP
//! opcode (a port forward the client owns by a nonce) and PEER (the
//! same mapping, told which remote peer it is for). Options are read
//! and skipped when optional; a mandatory one is refused.
//!
//! ```text
//! request:  version 2 | R=0, opcode (7 bits) | reserved u16 | lifetime u32
//!           | client address (16, IPv4-mapped) | opcode data | options
//! response: version 2 | R=1, opcode | reserved u8 | result u8 | lifetime u32
//!           | epoch u32 | reserved (12) | opcode data | options
//! MAP data:  nonce (12) | protocol u8 | reserved (3) | internal port u16
//!           | external port u16 | external address (16)
//! PEER data: MAP data | remote port u16 | reserved u16 | remote address (16)
//! ```

use std::net::IpAddr;

use reach_proto::gateway_query::{put_addr, read_addr};

/// The version byte of PCP.
pub const VERSION: u8 = 2;
/// Length of the common header.
pub const HEADER_LEN: usize = 24;
/// Length of MAP's opcode data.
pub const MAP_LEN: usize = 36;
/// Length of PEER's opcode data.
pub const PEER_LEN: usize = 56;
/// The longest PCP message (RFC 6887 section 7).
pub const MAX_LEN: usize = 1100;
/// The MAP opcode.
pub const OP_MAP: u8 = 1;
/// The PEER opcode.
pub const OP_PEER: u8 = 2;

/// PCP result codes (RFC 6887 section 7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ResultCode {
    /// Success.
    Success = 0,
    /// A version this server does not speak.
    UnsupportedVersion = 1,
    /// The policy refuses it.
    NotAuthorized = 2,
    /// The request cannot be read.
    MalformedRequest = 3,
    /// An opcode this server does not know.
    UnsupportedOpcode = 4,
    /// A mandatory option this server does not know.
    UnsupportedOption = 5,
    /// An option that cannot be read.
    MalformedOption = 6,
    /// The gateway has no external address now.
    NetworkFailure = 7,
    /// No port left (for now).
    NoResources = 8,
    /// A protocol other than TCP or UDP.
    UnsupportedProtocol = 9,
    /// The client is over its quota.
    UserExceededQuota = 10,
    /// The external address or port asked for cannot be given.
    CannotProvideExternal = 11,
    /// The client address in the request is not where it came from.
    AddressMismatch = 12,
    /// Too many remote peers.
    ExcessiveRemotePeers = 13,
}

/// A MAP or PEER request's mapping fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapData {
    /// The client's nonce: it owns the mapping by it.
    pub nonce: [u8; 12],
    /// IANA protocol number (6 TCP, 17 UDP, 0 all).
    pub protocol: u8,
    /// The client's port.
    pub internal_port: u16,
    /// The external port (suggested in a request, given in a response).
    pub external_port: u16,
    /// The external address (the same).
    pub external_addr: IpAddr,
}

/// A request from a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// [`OP_MAP`] or [`OP_PEER`].
    pub opcode: u8,
    /// Seconds asked for (0: delete).
    pub lifetime: u32,
    /// The client's own address, as it says.
    pub client: IpAddr,
    /// The mapping.
    pub map: MapData,
    /// PEER's remote peer, if a PEER request.
    pub peer: Option<(IpAddr, u16)>,
}

/// Why bytes are not a request this server serves.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Shorter than a header, longer than 1100 bytes, not a multiple of
    /// 4, or a response: dropped silently (RFC 6887 section 8.3).
    #[error("PCP message of {0} bytes is dropped")]
    Dropped(usize),
    /// Answered with this code and the request's header and data
    /// copied back ([`RequestError::answer`]).
    #[error("PCP request refused: {code:?}")]
    Refused {
        /// The code.
        code: ResultCode,
        /// The opcode.
        opcode: u8,
        /// The request's opcode data, up to its known length.
        data: Vec<u8>,
    },
}

impl RequestError {
    fn refused(code: ResultCode, opcode: u8, data: &[u8]) -> Self {
        RequestError::Refused {
            code,
            opcode,
            data: data.to_vec(),
        }
    }

    /// The answer the error deserves (None: drop silently). Errors that
    /// last (an unknown opcode, a version) say so with a long lifetime;
    /// the others with 30 s, when the client may try again.
    pub fn answer(&self, epoch: u32) -> Option<Vec<u8>> {
        let RequestError::Refused { code, opcode, data } = self else {
            return None;
        };
        let lifetime = match code {
            ResultCode::UnsupportedVersion
            | ResultCode::UnsupportedOpcode
            | ResultCode::UnsupportedOption
            | ResultCode::UnsupportedProtocol => 1800,
            _ => 30,
        };
        let mut out = response_header(*opcode, *code, lifetime, epoch);
        out.extend_from_slice(data);
        Some(out)
    }
}

fn response_header(opcode: u8, code: ResultCode, lifetime: u32, epoch: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + PEER_LEN);
    out.extend_from_slice(&[VERSION, 0x80 | opcode, 0, code as u8]);
    out.extend_from_slice(&lifetime.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&[0; 12]);
    out
}

impl MapData {
    fn decode(d: &[u8]) -> Self {
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&d[..12]);
        MapData {
            nonce,
            protocol: d[12],
            internal_port: u16::from_be_bytes([d[16], d[17]]),
            external_port: u16::from_be_bytes([d[18], d[19]]),
            external_addr: read_addr(&d[20..36]),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&[self.protocol, 0, 0, 0]);
        out.extend_from_slice(&self.internal_port.to_be_bytes());
        out.extend_from_slice(&self.external_port.to_be_bytes());
        put_addr(out, self.external_addr);
    }
}

impl Request {
    /// Reads a request (the whole datagram).
    pub fn decode(b: &[u8]) -> Result<Self, RequestError> {
        if b.len() < 2 || b.len() > MAX_LEN || b[1] & 0x80 != 0 {
            return Err(RequestError::Dropped(b.len()));
        }
        let opcode = b[1] & 0x7f;
        if b[0] != VERSION {
            return Err(RequestError::refused(
                ResultCode::UnsupportedVersion,
                opcode,
                &[],
            ));
        }
        if b.len() < HEADER_LEN || b.len() % 4 != 0 {
            return Err(RequestError::Dropped(b.len()));
        }
        let body = &b[HEADER_LEN..];
        let len = match opcode {
            OP_MAP => MAP_LEN,
            OP_PEER => PEER_LEN,
            _ => {
                return Err(RequestError::refused(
                    ResultCode::UnsupportedOpcode,
                    opcode,
                    &[],
                ))
            }
        };
        let Some(data) = body.get(..len) else {
            return Err(RequestError::refused(
                ResultCode::MalformedRequest,
                opcode,
                &[],
            ));
        };
        options(&body[len..]).map_err(|code| RequestError::refused(code, opcode, data))?;
        let peer = (opcode == OP_PEER).then(|| {
            (
                read_addr(&data[40..56]),
                u16::from_be_bytes([data[36], data[37]]),
            )
        });
        Ok(Request {
            opcode,
            lifetime: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            client: read_addr(&b[8..24]),
            map: MapData::decode(data),
            peer,
        })
    }

    /// Writes the request (for clients and tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION, self.opcode & 0x7f, 0, 0];
        out.extend_from_slice(&self.lifetime.to_be_bytes());
        put_addr(&mut out, self.client);
        self.map.encode(&mut out);
        if let Some((ip, port)) = self.peer {
            out.extend_from_slice(&port.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            put_addr(&mut out, ip);
        }
        out
    }

    /// The opcode data as sent, for answers that copy it.
    pub fn data(&self) -> Vec<u8> {
        let mut out = self.encode();
        out.drain(..HEADER_LEN);
        out
    }
}

/// Checks the options after the opcode data: every option must fit, and
/// a mandatory one (code below 128) is one this server does not know.
fn options(mut b: &[u8]) -> Result<(), ResultCode> {
    while !b.is_empty() {
        if b.len() < 4 {
            return Err(ResultCode::MalformedOption);
        }
        let code = b[0];
        let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
        let padded = len.div_ceil(4) * 4;
        if b.len() < 4 + padded {
            return Err(ResultCode::MalformedOption);
        }
        if code < 128 {
            return Err(ResultCode::UnsupportedOption);
        }
        b = &b[4 + padded..];
    }
    Ok(())
}

/// A successful answer: `map` with the external port and address given,
/// for `lifetime` seconds; PEER's remote peer copied back.
pub fn response(request: &Request, map: MapData, lifetime: u32, epoch: u32) -> Vec<u8> {
    let mut out = response_header(request.opcode, ResultCode::Success, lifetime, epoch);
    map.encode(&mut out);
    if let Some((ip, port)) = request.peer {
        out.extend_from_slice(&port.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        put_addr(&mut out, ip);
    }
    out
}

/// An error answer to a request that was read: its data copied back.
pub fn error_response(request: &Request, code: ResultCode, epoch: u32) -> Vec<u8> {
    RequestError::refused(code, request.opcode, &request.data())
        .answer(epoch)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map_request(lifetime: u32) -> Request {
        Request {
            opcode: OP_MAP,
            lifetime,
            client: "10.0.0.5".parse().unwrap(),
            map: MapData {
                nonce: [7; 12],
                protocol: 6,
                internal_port: 22,
                external_port: 40022,
                external_addr: "0.0.0.0".parse().unwrap(),
            },
            peer: None,
        }
    }

    #[test]
    fn map_and_peer_requests_round_trip() {
        let map = map_request(7200);
        let b = map.encode();
        assert_eq!(b.len(), HEADER_LEN + MAP_LEN);
        assert_eq!(Request::decode(&b), Ok(map));
        let peer = Request {
            opcode: OP_PEER,
            peer: Some(("2001:db8::1".parse().unwrap(), 443)),
            ..map
        };
        let b = peer.encode();
        assert_eq!(b.len(), HEADER_LEN + PEER_LEN);
        assert_eq!(Request::decode(&b), Ok(peer));
        // An optional option is skipped; a mandatory one refused.
        let mut with = map.encode();
        with.extend_from_slice(&[130, 0, 0, 3, 1, 2, 3, 0]);
        assert_eq!(Request::decode(&with), Ok(map));
        let mut mandatory = map.encode();
        mandatory.extend_from_slice(&[1, 0, 0, 0]);
        assert!(matches!(
            Request::decode(&mandatory),
            Err(RequestError::Refused {
                code: ResultCode::UnsupportedOption,
                ..
            })
        ));
        let mut cut = map.encode();
        cut.extend_from_slice(&[130, 0, 0, 8]);
        assert!(matches!(
            Request::decode(&cut),
            Err(RequestError::Refused {
                code: ResultCode::MalformedOption,
                ..
            })
        ));
    }

    #[test]
    fn bad_requests_are_dropped_or_answered_as_the_rfc_says() {
        let b = map_request(1).encode();
        assert_eq!(Request::decode(&b[..23]), Err(RequestError::Dropped(23)));
        assert_eq!(Request::decode(&b[..30]), Err(RequestError::Dropped(30)));
        let mut response = b.clone();
        response[1] |= 0x80;
        assert_eq!(
            Request::decode(&response),
            Err(RequestError::Dropped(b.len()))
        );
        let mut v3 = b.clone();
        v3[0] = 3;
        let e = Request::decode(&v3).unwrap_err();
        let answer = e.answer(5).unwrap();
        assert_eq!(&answer[..4], &[2, 0x81, 0, 1]);
        let mut op = b.clone();
        op[1] = 9;
        let answer = Request::decode(&op).unwrap_err().answer(5).unwrap();
        assert_eq!(&answer[..4], &[2, 0x89, 0, 4]);
        // MAP's data cut short: malformed.
        let short = &b[..HEADER_LEN + 32];
        assert!(matches!(
            Request::decode(short),
            Err(RequestError::Refused {
                code: ResultCode::MalformedRequest,
                ..
            })
        ));
    }

    #[test]
    fn answers_copy_the_request_and_carry_the_mapping() {
        let req = map_request(3600);
        let given = MapData {
            external_port: 40001,
            external_addr: "192.0.2.1".parse().unwrap(),
            ..req.map
        };
        let r = response(&req, given, 3600, 77);
        assert_eq!(r.len(), HEADER_LEN + MAP_LEN);
        assert_eq!(&r[..4], &[2, 0x81, 0, 0]);
        assert_eq!(u32::from_be_bytes([r[4], r[5], r[6], r[7]]), 3600);
        assert_eq!(u32::from_be_bytes([r[8], r[9], r[10], r[11]]), 77);
        assert_eq!(MapData::decode(&r[HEADER_LEN..]), given);
        let e = error_response(&req, ResultCode::NotAuthorized, 77);
        assert_eq!(&e[..4], &[2, 0x81, 0, 2]);
        assert_eq!(&e[HEADER_LEN..], &req.data()[..]);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            match Request::decode(&b) {
                Ok(r) => {
                    let again = r.encode();
                    prop_assert_eq!(Request::decode(&again), Ok(r));
                }
                Err(e) => {
                    let _ = e.answer(1);
                }
            }
        }
    }
}
