//! NAT-PMP (RFC 6886) messages, as a gateway reads and writes them.
//!
//! ```text
//! request  external address: version 0 | opcode 0
//! request  map:              version 0 | opcode 1 (UDP) or 2 (TCP) | reserved u16
//!                            | internal port u16 | suggested external port u16
//!                            | lifetime u32 (0: delete)
//! response external address: version 0 | 128 | result u16 | epoch u32 | address (4)
//! response map:              version 0 | 128 + opcode | result u16 | epoch u32
//!                            | internal port u16 | external port u16 | lifetime u32
//! ```
//!
//! A PCP server shares the port (5351) and tells the two apart by the
//! version byte (0 here, 2 for PCP, [`crate::pcp`]).

use std::net::Ipv4Addr;

use crate::table::Protocol;

/// The version byte of NAT-PMP.
pub const VERSION: u8 = 0;

/// A request from a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// What is the gateway's external address?
    ExternalAddress,
    /// Map (or, with lifetime 0, delete) a port.
    Map {
        /// TCP or UDP.
        protocol: Protocol,
        /// The client's port (0 with lifetime 0: every mapping of the
        /// client for the protocol).
        internal_port: u16,
        /// The external port it would like (0: any).
        suggested_port: u16,
        /// Seconds it asks for (0: delete).
        lifetime: u32,
    },
}

/// NAT-PMP result codes (RFC 6886 section 3.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ResultCode {
    /// Success.
    Success = 0,
    /// The request's version is not 0.
    UnsupportedVersion = 1,
    /// Refused (the policy does not allow it).
    NotAuthorized = 2,
    /// The gateway has no external address now.
    NetworkFailure = 3,
    /// No port left, or the client is over its quota.
    OutOfResources = 4,
    /// An opcode this server does not know.
    UnsupportedOpcode = 5,
}

/// Why bytes are not a request this server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Too short for its opcode, or not a request at all: dropped
    /// silently (RFC 6886 3.3 answers only well-formed requests).
    #[error("NAT-PMP request of {0} bytes is malformed")]
    Malformed(usize),
    /// A version other than 0: answered with [`ResultCode::UnsupportedVersion`].
    #[error("NAT-PMP version {version}, this server speaks 0")]
    Version {
        /// The version asked for.
        version: u8,
        /// The opcode (for the answer).
        opcode: u8,
    },
    /// An opcode other than 0, 1, 2: answered with
    /// [`ResultCode::UnsupportedOpcode`].
    #[error("NAT-PMP opcode {0} is not supported")]
    Opcode(u8),
}

impl RequestError {
    /// The answer the error deserves (None: drop silently).
    pub fn answer(&self, epoch: u32) -> Option<Vec<u8>> {
        let (opcode, code) = match *self {
            RequestError::Malformed(_) => return None,
            RequestError::Version { opcode, .. } => (opcode, ResultCode::UnsupportedVersion),
            RequestError::Opcode(op) => (op, ResultCode::UnsupportedOpcode),
        };
        // Responses have the top bit set; a request with it set already
        // is a response, which decode refused as malformed.
        let mut out = vec![VERSION, opcode | 0x80];
        out.extend_from_slice(&(code as u16).to_be_bytes());
        out.extend_from_slice(&epoch.to_be_bytes());
        Some(out)
    }
}

impl Request {
    /// Reads a request (the whole datagram).
    pub fn decode(b: &[u8]) -> Result<Self, RequestError> {
        let (&version, rest) = b.split_first().ok_or(RequestError::Malformed(0))?;
        let &opcode = rest.first().ok_or(RequestError::Malformed(b.len()))?;
        if opcode & 0x80 != 0 {
            // A response (or a reflection of one): never answered.
            return Err(RequestError::Malformed(b.len()));
        }
        if version != VERSION {
            return Err(RequestError::Version { version, opcode });
        }
        match opcode {
            0 if b.len() >= 2 => Ok(Request::ExternalAddress),
            1 | 2 if b.len() >= 12 => {
                let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
                Ok(Request::Map {
                    protocol: if opcode == 1 {
                        Protocol::Udp
                    } else {
                        Protocol::Tcp
                    },
                    internal_port: u16_at(4),
                    suggested_port: u16_at(6),
                    lifetime: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
                })
            }
            0..=2 => Err(RequestError::Malformed(b.len())),
            op => Err(RequestError::Opcode(op)),
        }
    }

    /// Writes the request (for clients and tests).
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Request::ExternalAddress => vec![VERSION, 0],
            Request::Map {
                protocol,
                internal_port,
                suggested_port,
                lifetime,
            } => {
                let mut out = vec![VERSION, opcode_of(protocol), 0, 0];
                out.extend_from_slice(&internal_port.to_be_bytes());
                out.extend_from_slice(&suggested_port.to_be_bytes());
                out.extend_from_slice(&lifetime.to_be_bytes());
                out
            }
        }
    }
}

fn opcode_of(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Udp => 1,
        Protocol::Tcp => 2,
    }
}

/// The answer to an external address request.
pub fn external_address_response(code: ResultCode, epoch: u32, addr: Ipv4Addr) -> Vec<u8> {
    let mut out = vec![VERSION, 0x80];
    out.extend_from_slice(&(code as u16).to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&addr.octets());
    out
}

/// The answer to a map request. On an error, RFC 6886 asks the request's
/// internal port back, and zero for the external port and the lifetime.
pub fn map_response(
    protocol: Protocol,
    code: ResultCode,
    epoch: u32,
    internal_port: u16,
    external_port: u16,
    lifetime: u32,
) -> Vec<u8> {
    let mut out = vec![VERSION, 0x80 | opcode_of(protocol)];
    out.extend_from_slice(&(code as u16).to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&internal_port.to_be_bytes());
    out.extend_from_slice(&external_port.to_be_bytes());
    out.extend_from_slice(&lifetime.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_named() {
        for r in [
            Request::ExternalAddress,
            Request::Map {
                protocol: Protocol::Tcp,
                internal_port: 22,
                suggested_port: 40022,
                lifetime: 7200,
            },
            Request::Map {
                protocol: Protocol::Udp,
                internal_port: 0,
                suggested_port: 0,
                lifetime: 0,
            },
        ] {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
        assert_eq!(Request::decode(&[]), Err(RequestError::Malformed(0)));
        assert_eq!(Request::decode(&[0]), Err(RequestError::Malformed(1)));
        assert_eq!(Request::decode(&[0, 2, 0]), Err(RequestError::Malformed(3)));
        assert_eq!(Request::decode(&[0, 0x81]), Err(RequestError::Malformed(2)));
        assert_eq!(
            Request::decode(&[1, 0]),
            Err(RequestError::Version {
                version: 1,
                opcode: 0
            })
        );
        assert_eq!(Request::decode(&[0, 3]), Err(RequestError::Opcode(3)));
        // The answers to errors: version 0, the opcode with its top bit,
        // the code, the epoch.
        assert_eq!(
            RequestError::Opcode(3).answer(9),
            Some(vec![0, 0x83, 0, 5, 0, 0, 0, 9])
        );
        assert_eq!(RequestError::Malformed(1).answer(9), None);
    }

    #[test]
    fn responses_have_the_rfc_layout() {
        let r = map_response(Protocol::Tcp, ResultCode::Success, 7, 22, 40022, 3600);
        assert_eq!(
            r,
            [0, 130, 0, 0, 0, 0, 0, 7, 0, 22, 0x9c, 0x56, 0, 0, 0x0e, 0x10]
        );
        let a = external_address_response(ResultCode::Success, 1, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(a, [0, 128, 0, 0, 0, 0, 0, 1, 192, 0, 2, 1]);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            match Request::decode(&b) {
                Ok(r) => {
                    // What decodes is what its first bytes say.
                    let again = r.encode();
                    prop_assert_eq!(&b[..2], &again[..2]);
                }
                Err(e) => {
                    let _ = e.answer(1);
                }
            }
        }
    }
}
