//! Drives the sans-IO handshake of `reach_proto::handshake` over a TCP stream.
//!
//! Both sides read exactly the bytes the handshake announces (a fixed header, then
//! a body whose length the header gives and bounds), so nothing past the
//! handshake is read here and a plaintext stream can be the bare socket after it.

use std::net::SocketAddr;
use std::time::Instant;

use reach_proto::handshake::{
    self, Admission, HelloHeader, Initiator, InitiatorOptions, ReplyHeader, Responded,
    ResponderOptions, HELLO_HEADER_LEN, REPLY_HEADER_LEN,
};
use reach_proto::{NodeId, SecretKey, StreamMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::AttemptError;
use crate::secure::SecureStream;
use crate::stream::{Direction, ReachStream, SetupModule, StreamInfo};

/// 32 bytes from the OS CSPRNG for the handshake's ephemeral key.
pub(crate) fn seed() -> std::io::Result<[u8; 32]> {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(s)
}

async fn read_exact_or_closed(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<(), AttemptError> {
    match tcp.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(AttemptError::ClosedEarly),
        Err(e) => Err(e.into()),
    }
}

fn finish(
    tcp: TcpStream,
    est: handshake::Established,
    direction: Direction,
    started: Instant,
) -> Result<ReachStream, AttemptError> {
    let info = StreamInfo {
        peer: est.peer,
        virtual_port: est.port,
        module: SetupModule::Direct,
        mode: est.mode,
        direction,
        local_addr: tcp.local_addr()?,
        remote_addr: tcp.peer_addr()?,
        setup_time: started.elapsed(),
    };
    Ok(match (est.mode, est.keys) {
        (StreamMode::Encrypted(_), Some(keys)) => {
            ReachStream::secure(SecureStream::new(tcp, &keys), info)
        }
        _ => ReachStream::plain(tcp, info),
    })
}

/// Runs the initiator's side on a connected socket.
pub(crate) async fn initiate(
    mut tcp: TcpStream,
    local: &SecretKey,
    target: NodeId,
    port: u16,
    options: InitiatorOptions,
    started: Instant,
) -> Result<ReachStream, AttemptError> {
    let (init, hello) = Initiator::new(local, target, port, options, seed()?)?;
    tcp.write_all(&hello).await?;
    let mut h = [0u8; REPLY_HEADER_LEN];
    read_exact_or_closed(&mut tcp, &mut h).await?;
    let header = ReplyHeader::decode(&h).map_err(handshake::HandshakeError::from)?;
    let mut body = vec![0u8; header.len];
    read_exact_or_closed(&mut tcp, &mut body).await?;
    let est = init.handle_reply(header, &body)?;
    finish(tcp, est, Direction::Outbound, started)
}

/// Runs the responder's side on an accepted socket. `admit` decides whether an
/// authenticated initiator may open a stream on the requested virtual port.
pub(crate) async fn respond(
    mut tcp: TcpStream,
    local: &SecretKey,
    options: ResponderOptions,
    admit: impl FnOnce(&NodeId, u16) -> Admission,
    started: Instant,
) -> Result<ReachStream, AttemptError> {
    let mut h = [0u8; HELLO_HEADER_LEN];
    read_exact_or_closed(&mut tcp, &mut h).await?;
    let header = match HelloHeader::decode(&h) {
        Ok(header) => header,
        Err(e) => {
            if let Some(reply) = handshake::reply_to_bad_header(&e) {
                // Best effort: the peer is already misbehaving.
                let _ = tcp.write_all(&reply).await;
            }
            return Err(handshake::HandshakeError::from(e).into());
        }
    };
    let mut body = vec![0u8; header.noise_len];
    read_exact_or_closed(&mut tcp, &mut body).await?;
    let (reply, outcome) = handshake::respond(local, &header, &body, options, admit, seed()?);
    tcp.write_all(&reply).await?;
    match outcome {
        Responded::Accepted(est) => finish(tcp, est, Direction::Inbound, started),
        Responded::Refused { refusal, .. } => {
            Err(handshake::HandshakeError::Refused(refusal).into())
        }
        Responded::Failed(e) => Err(e.into()),
    }
}

/// Connects a TCP socket with the options every reach connection uses.
pub(crate) async fn tcp_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    // Handshake messages and interactive traffic must not wait for Nagle.
    tcp.set_nodelay(true)?;
    Ok(tcp)
}
