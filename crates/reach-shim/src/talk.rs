//! Asking the agent: one request a connection over its Unix socket, with
//! deadlines, so a program never hangs on an agent that died or stalls.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::Duration;

use reach_shim_wire::{Reply, Request, MAX_LINE, SOCKET_ENV};

/// How long the agent may take to answer: a connect's setup runs within
/// it (the agent's own connect timeout is shorter).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);
/// How long sending a request may take.
const SEND_WITHIN: Duration = Duration::from_secs(5);

/// The agent's socket, read from the environment once (reading it in
/// every call would race with a program's `setenv`).
pub(crate) fn agent_socket() -> Option<&'static std::ffi::OsStr> {
    static PATH: OnceLock<Option<std::ffi::OsString>> = OnceLock::new();
    PATH.get_or_init(|| std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()))
        .as_deref()
}

/// Sends `req` to the agent and reads its reply; an error says why the
/// agent could not be asked (and is logged on stderr, once a kind).
pub(crate) fn ask(req: &Request) -> Result<Reply, String> {
    let path = agent_socket().ok_or("not under reach run")?;
    let result = (|| {
        let mut s = UnixStream::connect(path).map_err(|e| format!("cannot reach it: {e}"))?;
        s.set_write_timeout(Some(SEND_WITHIN))
            .and_then(|()| s.set_read_timeout(Some(ANSWER_WITHIN)))
            .map_err(|e| format!("socket options: {e}"))?;
        s.write_all(req.encode().as_bytes())
            .map_err(|e| format!("cannot send to it: {e}"))?;
        let mut line = Vec::with_capacity(64);
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\n") {
            match s.read(&mut byte) {
                Ok(0) => return Err("it closed without an answer".to_string()),
                Ok(_) if line.len() >= MAX_LINE => return Err("its answer is too long".into()),
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("no answer: {e}")),
            }
        }
        Reply::decode(&line).map_err(|e| format!("bad answer: {e}"))
    })();
    if let Err(why) = &result {
        eprintln!(
            "reach run: the agent at {} did not answer ({why}): {} fails",
            std::path::Path::new(path).display(),
            match req {
                Request::Resolve(name) => format!("looking up {name}"),
                Request::Connect { pool_ip, port, .. }
                | Request::Open { pool_ip, port, .. }
                | Request::Udp { pool_ip, port, .. } => {
                    format!("connecting to {pool_ip}:{port}")
                }
                Request::Listen(addr) | Request::ListenUdp(addr) => {
                    format!("serving {addr} on the reach network")
                }
                Request::Peer(port) =>
                    format!("naming the peer of an accepted connection (port {port})"),
            }
        );
    }
    result
}
