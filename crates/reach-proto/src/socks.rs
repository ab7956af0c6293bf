//! The SOCKS5 wire format (RFC 1928), server side, no authentication, the
//! CONNECT command: enough for curl, ssh's ProxyCommand helpers, browsers and
//! most clients, which is what `reach socks` serves.
//!
//! Parsers take the bytes received so far and return `Ok(None)` while a
//! message is incomplete, the message and the bytes it used once whole, or a
//! typed error for bytes that can never become a valid message. Lengths are
//! bounded by the format itself (a domain name is at most 255 bytes).
//!
//! ```text
//! client: VER=5 NMETHODS METHODS...          server: VER=5 METHOD (0 = no auth)
//! client: VER=5 CMD RSV=0 ATYP ADDR PORT     server: VER=5 REP RSV=0 ATYP ADDR PORT
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The protocol version byte.
pub const VERSION: u8 = 5;
/// "No authentication required".
pub const METHOD_NONE: u8 = 0;
/// "No acceptable methods".
pub const METHOD_UNACCEPTABLE: u8 = 0xff;
/// The CONNECT command.
pub const CMD_CONNECT: u8 = 1;

/// Where a client wants to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An IP address and port.
    Addr(SocketAddr),
    /// A host name (not resolved by the client) and port.
    Name(String, u16),
}

/// A client's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The command (only [`CMD_CONNECT`] is served).
    pub command: u8,
    /// The destination.
    pub target: Target,
}

/// The reply codes of RFC 1928 section 6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Connected.
    Succeeded = 0,
    /// General failure.
    GeneralFailure = 1,
    /// Not allowed by the proxy's rules.
    NotAllowed = 2,
    /// Network unreachable.
    NetworkUnreachable = 3,
    /// Host unreachable.
    HostUnreachable = 4,
    /// Connection refused.
    ConnectionRefused = 5,
    /// TTL expired (used for a timeout).
    TtlExpired = 6,
    /// Command not supported.
    CommandNotSupported = 7,
    /// Address type not supported.
    AddressTypeNotSupported = 8,
}

/// Bytes that can never be a valid SOCKS5 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SocksError {
    /// Not SOCKS version 5 (a SOCKS4 client, or not SOCKS at all).
    #[error("not a SOCKS5 client (version byte {0})")]
    Version(u8),
    /// A greeting offering no methods.
    #[error("SOCKS5 greeting offers no authentication method")]
    NoMethods,
    /// An unknown address type.
    #[error("SOCKS5 address type {0} is not IPv4, a domain name or IPv6")]
    AddressType(u8),
    /// A domain name that is empty or not UTF-8.
    #[error("SOCKS5 request holds a bad host name")]
    BadName,
}

/// Parses a greeting; returns the offered methods and the bytes used.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(SocksError::Version(ver));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(SocksError::NoMethods);
    }
    let end = 2 + usize::from(n);
    Ok(buf.get(2..end).map(|m| (m.to_vec(), end)))
}

/// The server's answer to a greeting.
pub fn choose_method(offered: &[u8]) -> [u8; 2] {
    let method = if offered.contains(&METHOD_NONE) {
        METHOD_NONE
    } else {
        METHOD_UNACCEPTABLE
    };
    [VERSION, method]
}

/// Parses a request; returns it and the bytes used.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, SocksError> {
    if buf.len() < 4 {
        if let Some(&v) = buf.first() {
            if v != VERSION {
                return Err(SocksError::Version(v));
            }
        }
        return Ok(None);
    }
    if buf[0] != VERSION {
        return Err(SocksError::Version(buf[0]));
    }
    let command = buf[1];
    let (addr_len, start) = match buf[3] {
        1 => (4, 4),
        4 => (16, 4),
        3 => match buf.get(4) {
            None => return Ok(None),
            Some(0) => return Err(SocksError::BadName),
            Some(n) => (usize::from(*n), 5),
        },
        t => return Err(SocksError::AddressType(t)),
    };
    let end = start + addr_len + 2;
    let Some(body) = buf.get(start..end) else {
        return Ok(None);
    };
    let (addr, port) = body.split_at(addr_len);
    let port = u16::from_be_bytes([port[0], port[1]]);
    let target = match buf[3] {
        1 => {
            let o: [u8; 4] = addr.try_into().map_err(|_| SocksError::AddressType(1))?;
            Target::Addr(SocketAddr::new(Ipv4Addr::from(o).into(), port))
        }
        4 => {
            let o: [u8; 16] = addr.try_into().map_err(|_| SocksError::AddressType(4))?;
            Target::Addr(SocketAddr::new(Ipv6Addr::from(o).into(), port))
        }
        _ => {
            let name = std::str::from_utf8(addr).map_err(|_| SocksError::BadName)?;
            Target::Name(name.to_string(), port)
        }
    };
    Ok(Some((Request { command, target }, end)))
}

/// Encodes a request (the client's side; for tests and tools).
pub fn encode_request(req: &Request) -> Result<Vec<u8>, SocksError> {
    let mut out = vec![VERSION, req.command, 0];
    let port = match &req.target {
        Target::Addr(a) => {
            push_addr(a.ip(), &mut out);
            a.port()
        }
        Target::Name(name, port) => {
            let len = u8::try_from(name.len()).map_err(|_| SocksError::BadName)?;
            if len == 0 {
                return Err(SocksError::BadName);
            }
            out.push(3);
            out.push(len);
            out.extend_from_slice(name.as_bytes());
            *port
        }
    };
    out.extend_from_slice(&port.to_be_bytes());
    Ok(out)
}

/// The server's reply to a request; `bound` is reported as the proxy's end.
pub fn encode_reply(reply: Reply, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![VERSION, reply as u8, 0];
    push_addr(bound.ip(), &mut out);
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

/// Appends an address type and address.
fn push_addr(ip: IpAddr, out: &mut Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => {
            out.push(1);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(4);
            out.extend_from_slice(&v6.octets());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_curl_style_exchange_parses_step_by_step() {
        let greeting = [5, 2, 0, 2];
        assert_eq!(parse_greeting(&greeting[..3]), Ok(None));
        assert_eq!(parse_greeting(&greeting), Ok(Some((vec![0, 2], 4))));
        assert_eq!(choose_method(&[0, 2]), [5, 0]);
        assert_eq!(choose_method(&[2]), [5, 0xff]);
        let req = Request {
            command: CMD_CONNECT,
            target: Target::Name("abc.reach".into(), 80),
        };
        let wire = encode_request(&req).expect("encode");
        for cut in 0..wire.len() {
            assert_eq!(parse_request(&wire[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse_request(&wire), Ok(Some((req, wire.len()))));
        let reply = encode_reply(Reply::Succeeded, "0.0.0.0:0".parse().expect("addr"));
        assert_eq!(reply, [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn wrong_versions_and_types_are_specific_errors() {
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(SocksError::Version(4)));
        assert_eq!(parse_greeting(&[5, 0]), Err(SocksError::NoMethods));
        assert_eq!(
            parse_request(&[5, 1, 0, 9, 0]),
            Err(SocksError::AddressType(9))
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(SocksError::BadName)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 1, 0xff, 0, 80]),
            Err(SocksError::BadName)
        );
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_greeting(&bytes);
            if let Ok(Some((_, used))) = parse_request(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn requests_round_trip(
            ip in any::<[u8; 4]>(),
            name in "[a-z0-9.-]{1,60}",
            port in any::<u16>(),
            by_name in any::<bool>(),
        ) {
            let target = if by_name {
                Target::Name(name, port)
            } else {
                Target::Addr(SocketAddr::new(Ipv4Addr::from(ip).into(), port))
            };
            let req = Request { command: CMD_CONNECT, target };
            let wire = encode_request(&req).expect("encode");
            prop_assert_eq!(parse_request(&wire), Ok(Some((req, wire.len()))));
        }
    }
}
