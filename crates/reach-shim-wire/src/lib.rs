//! What `reach run`'s preloaded shim and its agent say to each other,
//! and the pool of addresses `.reach` names resolve to. Std only: the
//! shim is loaded into every process `reach run` starts, so it carries
//! nothing it does not need.
//!
//! One request a connection, over the agent's private Unix socket; one
//! line each way, at most [`MAX_LINE`] bytes:
//!
//! ```text
//! shim -> agent:  resolve NAME                 (a NODEID.reach name or alias)
//!                 connect POOL_IP PORT LOCAL_PORT   (answered once the stream is up)
//!                 open POOL_IP PORT LOCAL_PORT      (answered at once: a non-blocking
//!                                                    socket; a failed setup resets it)
//!                 listen ADDR:PORT             (the program listens there)
//!                 udp POOL_IP PORT LOCAL_PORT  (a UDP socket connects to the pool:
//!                                               answered with the agent's UDP relay)
//!                 listen-udp ADDR:PORT         (a UDP socket is bound there)
//!                 peer PORT                    (who is the node behind the agent's
//!                                               connection from loopback port PORT?)
//! agent -> shim:  ok                           (listen: noted)
//!                 ok IP                        (resolve: the pool address)
//!                 ok RELAY_PORT                (connect: the stream is up; connect
//!                                               the socket to 127.0.0.1:RELAY_PORT)
//!                 err KIND MESSAGE             (KIND: noname refused timedout
//!                                               unreachable denied busy)
//! ```
//!
//! The pool is 127.77.0.0/16: loopback, so a program that gets past the
//! shim (a static binary, say) reaches nothing outside the host.

use std::net::{Ipv4Addr, SocketAddr};

/// The longest line either side sends.
pub const MAX_LINE: usize = 512;
/// The environment variable that names the agent's socket.
pub const SOCKET_ENV: &str = "REACH_RUN_SOCKET";
/// The suffix of names that stand for nodes.
pub const SUFFIX: &str = ".reach";

/// The first address of the pool.
pub const POOL_BASE: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 0);
/// The pool's prefix length.
pub const POOL_PREFIX: u8 = 16;

/// Whether `ip` is in the pool.
pub fn in_pool(ip: Ipv4Addr) -> bool {
    u32::from(ip) >> (32 - POOL_PREFIX) == u32::from(POOL_BASE) >> (32 - POOL_PREFIX)
}

/// The pool's `n`th address (from 1; the network address is not given
/// out), or None past its end.
pub fn pool_addr(n: u32) -> Option<Ipv4Addr> {
    let size = 1u32 << (32 - POOL_PREFIX);
    (n >= 1 && n < size - 1).then(|| Ipv4Addr::from(u32::from(POOL_BASE) + n))
}

/// A name the shim hands to the agent: ends in `.reach` (any case, an
/// optional final dot), so that every other name resolves as before.
pub fn is_reach_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.len() > SUFFIX.len()
        && name.is_char_boundary(name.len() - SUFFIX.len())
        && name[name.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX)
}

/// A request from the shim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Resolve a `.reach` name to a pool address.
    Resolve(String),
    /// Set up a stream to the node behind `pool_ip`, virtual port `port`,
    /// for the socket bound at 127.0.0.1:`local_port`.
    Connect {
        /// The pool address the program connects to.
        pool_ip: Ipv4Addr,
        /// The port it connects to (the virtual port).
        port: u16,
        /// The socket's own loopback port (the relay admits only it).
        local_port: u16,
    },
    /// As `Connect`, answered at once (for a non-blocking socket): the
    /// stream is set up while the socket connects to the relay, and a
    /// setup that fails resets the socket.
    Open {
        /// The pool address the program connects to.
        pool_ip: Ipv4Addr,
        /// The port it connects to (the virtual port).
        port: u16,
        /// The socket's own loopback port (the relay admits only it).
        local_port: u16,
    },
    /// The program listens (TCP) at this address: serve its port on the
    /// reach network.
    Listen(SocketAddr),
    /// The program accepted a connection from the agent's port `0`: the
    /// pool address of the node it carries.
    Peer(u16),
    /// A UDP socket at loopback port `local_port` connects to the pool
    /// address `pool_ip`, port `port`.
    Udp {
        /// The pool address.
        pool_ip: Ipv4Addr,
        /// The UDP port on the node.
        port: u16,
        /// The socket's own loopback port.
        local_port: u16,
    },
    /// A UDP socket is bound at this address: serve its port.
    ListenUdp(SocketAddr),
}

/// The virtual port that carries every UDP port of a `reach run` node: a
/// stream to it starts with the UDP port (2 bytes, big-endian), then
/// carries framed datagrams. (A stream to a virtual port does not say
/// whether it carries a TCP connection or datagrams, and a program may
/// use one port number for both.)
pub const UDP_VPORT: u16 = 65535;

/// Why a request failed, as the shim reports it to the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such name (`EAI_NONAME`).
    NoName,
    /// The node refused (`ECONNREFUSED`).
    Refused,
    /// No answer in time (`ETIMEDOUT`).
    TimedOut,
    /// The node cannot be reached (`EHOSTUNREACH`).
    Unreachable,
    /// Not allowed (`EACCES`).
    Denied,
    /// The agent is at a limit (`EAGAIN`).
    Busy,
}

impl ErrorKind {
    const ALL: [ErrorKind; 6] = [
        ErrorKind::NoName,
        ErrorKind::Refused,
        ErrorKind::TimedOut,
        ErrorKind::Unreachable,
        ErrorKind::Denied,
        ErrorKind::Busy,
    ];

    /// Its word on the wire.
    pub fn word(self) -> &'static str {
        match self {
            ErrorKind::NoName => "noname",
            ErrorKind::Refused => "refused",
            ErrorKind::TimedOut => "timedout",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Denied => "denied",
            ErrorKind::Busy => "busy",
        }
    }

    fn from_word(w: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.word() == w)
    }
}

/// The agent's reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Done (listen).
    Done,
    /// Resolved: the pool address.
    Address(Ipv4Addr),
    /// Connected: the relay's loopback port.
    Relay(u16),
    /// Failed, with why.
    Error(ErrorKind, String),
}

/// Why a line is not a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn bad(what: &str, line: &str) -> WireError {
    let shown: String = line.chars().take(64).collect();
    WireError(format!("{what}: {shown:?}"))
}

/// The line without its end, if it is one line within [`MAX_LINE`].
fn one_line(b: &[u8]) -> Result<&str, WireError> {
    if b.len() > MAX_LINE {
        return Err(WireError(format!(
            "line of {} bytes is over {MAX_LINE}",
            b.len()
        )));
    }
    let text = std::str::from_utf8(b).map_err(|_| WireError("line is not UTF-8".into()))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.contains('\n') {
        return Err(bad("more than one line", text));
    }
    Ok(text)
}

impl Request {
    /// The line to send (with its end).
    pub fn encode(&self) -> String {
        match self {
            Request::Resolve(name) => format!("resolve {name}\n"),
            Request::Connect {
                pool_ip,
                port,
                local_port,
            } => format!("connect {pool_ip} {port} {local_port}\n"),
            Request::Open {
                pool_ip,
                port,
                local_port,
            } => format!("open {pool_ip} {port} {local_port}\n"),
            Request::Listen(addr) => format!("listen {addr}\n"),
            Request::Peer(port) => format!("peer {port}\n"),
            Request::Udp {
                pool_ip,
                port,
                local_port,
            } => format!("udp {pool_ip} {port} {local_port}\n"),
            Request::ListenUdp(addr) => format!("listen-udp {addr}\n"),
        }
    }

    /// Reads a request line.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let line = one_line(b)?;
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("resolve"), Some(name), None, None)
                if !name.is_empty() && name.bytes().all(|c| c.is_ascii_graphic()) =>
            {
                Ok(Request::Resolve(name.to_string()))
            }
            (Some(verb @ ("connect" | "open" | "udp")), Some(ip), Some(port), Some(local))
                if words.next().is_none() =>
            {
                let pool_ip = ip.parse().map_err(|_| bad("bad pool address", line))?;
                let port = port.parse().map_err(|_| bad("bad port", line))?;
                let local_port = local.parse().map_err(|_| bad("bad local port", line))?;
                Ok(match verb {
                    "open" => Request::Open {
                        pool_ip,
                        port,
                        local_port,
                    },
                    "udp" => Request::Udp {
                        pool_ip,
                        port,
                        local_port,
                    },
                    _ => Request::Connect {
                        pool_ip,
                        port,
                        local_port,
                    },
                })
            }
            (Some("peer"), Some(port), None, None) => port
                .parse()
                .map(Request::Peer)
                .map_err(|_| bad("bad port", line)),
            (Some("listen"), Some(addr), None, None) => addr
                .parse()
                .map(Request::Listen)
                .map_err(|_| bad("bad listening address", line)),
            (Some("listen-udp"), Some(addr), None, None) => addr
                .parse()
                .map(Request::ListenUdp)
                .map_err(|_| bad("bad bound address", line)),
            _ => Err(bad("not a request", line)),
        }
    }
}

/// An error message as it goes on the wire: no control characters, cut
/// to leave room for the rest of the line.
fn clean(msg: &str) -> String {
    let mut out: String = msg
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    while out.len() > MAX_LINE - 16 {
        out.pop();
    }
    out
}

impl Reply {
    /// The line to send (with its end); a message is cut to fit.
    pub fn encode(&self) -> String {
        match self {
            Reply::Done => "ok\n".to_string(),
            Reply::Address(ip) => format!("ok {ip}\n"),
            Reply::Relay(port) => format!("ok {port}\n"),
            Reply::Error(kind, msg) => format!("err {} {}\n", kind.word(), clean(msg)),
        }
    }

    /// Reads a reply line.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let line = one_line(b)?;
        if line == "ok" {
            return Ok(Reply::Done);
        }
        if let Some(rest) = line.strip_prefix("ok ") {
            if let Ok(ip) = rest.parse::<Ipv4Addr>() {
                return Ok(Reply::Address(ip));
            }
            return rest
                .parse::<u16>()
                .map(Reply::Relay)
                .map_err(|_| bad("bad ok reply", line));
        }
        if let Some(rest) = line.strip_prefix("err ") {
            let (word, msg) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = ErrorKind::from_word(word).ok_or_else(|| bad("unknown error kind", line))?;
            return Ok(Reply::Error(kind, clean(msg)));
        }
        Err(bad("not a reply", line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let reqs = [
            Request::Resolve("abc.reach".into()),
            Request::Connect {
                pool_ip: Ipv4Addr::new(127, 77, 0, 1),
                port: 8000,
                local_port: 41000,
            },
            Request::Listen("0.0.0.0:8000".parse().unwrap()),
            Request::Listen("[::]:22".parse().unwrap()),
            Request::Peer(40000),
            Request::Open {
                pool_ip: Ipv4Addr::new(127, 77, 0, 2),
                port: 22,
                local_port: 41001,
            },
            Request::Udp {
                pool_ip: Ipv4Addr::new(127, 77, 0, 3),
                port: 53,
                local_port: 41002,
            },
            Request::ListenUdp("0.0.0.0:5201".parse().unwrap()),
        ];
        for r in reqs {
            assert_eq!(Request::decode(r.encode().as_bytes()), Ok(r));
        }
        let replies = [
            Reply::Address(Ipv4Addr::new(127, 77, 0, 9)),
            Reply::Relay(39000),
            Reply::Done,
            Reply::Error(ErrorKind::Refused, "the node refused: not allowed".into()),
            Reply::Error(ErrorKind::NoName, String::new()),
        ];
        for r in replies {
            assert_eq!(Reply::decode(r.encode().as_bytes()), Ok(r));
        }
    }

    #[test]
    fn bad_lines_are_named() {
        assert!(Request::decode(b"resolve\n").is_err());
        assert!(Request::decode(b"resolve a b\n").is_err());
        assert!(Request::decode(b"connect 1.2.3.4 80\n").is_err());
        assert!(Request::decode(b"connect 1.2.3.4 80 99999\n").is_err());
        assert!(Request::decode(b"resolve a\nresolve b\n").is_err());
        assert!(Request::decode(&[b'x'; MAX_LINE + 1]).is_err());
        assert!(Reply::decode(b"err nonsense x\n").is_err());
        assert!(Reply::decode(b"ok 1.2.3\n").is_err());
        assert!(Request::decode(b"listen 8000\n").is_err());
        let e = Request::decode(b"fly me\n").unwrap_err();
        assert!(e.to_string().contains("not a request"), "{e}");
        // A long message is cut to fit a line.
        let long = Reply::Error(ErrorKind::Busy, "x".repeat(2000)).encode();
        assert!(long.len() <= MAX_LINE);
        assert!(Reply::decode(long.as_bytes()).is_ok());
    }

    #[test]
    fn reach_names_and_the_pool() {
        assert!(is_reach_name("abc.reach"));
        assert!(is_reach_name("ABC.REACH."));
        assert!(!is_reach_name(".reach"));
        assert!(!is_reach_name("reach"));
        assert!(!is_reach_name("example.org"));
        assert!(!is_reach_name("é.reac"));
        assert_eq!(pool_addr(1), Some(Ipv4Addr::new(127, 77, 0, 1)));
        assert_eq!(pool_addr(0), None);
        assert_eq!(pool_addr(65534), Some(Ipv4Addr::new(127, 77, 255, 254)));
        assert_eq!(pool_addr(65535), None);
        assert!(in_pool(Ipv4Addr::new(127, 77, 3, 4)));
        assert!(!in_pool(Ipv4Addr::new(127, 0, 0, 1)));
        assert!(!in_pool(Ipv4Addr::new(127, 78, 0, 1)));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(r) = Request::decode(&b) {
                prop_assert_eq!(Request::decode(r.encode().as_bytes()), Ok(r));
            }
            if let Ok(r) = Reply::decode(&b) {
                prop_assert_eq!(Reply::decode(r.encode().as_bytes()), Ok(r));
            }
        }

        #[test]
        fn any_name_is_classified_without_panic(s in ".{0,40}") {
            let _ = is_reach_name(&s);
        }
    }
}
