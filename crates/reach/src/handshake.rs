//! Drives the sans-IO handshake of `reach_proto::handshake` over a transport:
//! a TCP socket (Direct, Reverse) or a routed stream.
//!
//! Both sides read exactly the bytes the handshake announces (a fixed header, then
//! a body whose length the header gives and bounds), so nothing past the
//! handshake is read here and a plaintext stream can be the bare transport after it.

use std::net::SocketAddr;

use std::time::Instant;

use reach_proto::handshake::{
    self, Admission, Established, HandshakeError, HelloHeader, Initiator, InitiatorOptions, Knock,
    ReplyHeader, Responded, ResponderOptions, Resumption, Unconfirmed, CONFIRM_LEN,
    HELLO_HEADER_LEN, REPLY_HEADER_LEN,
};
use reach_proto::resume::{TicketError, TicketKey};
use reach_proto::{NodeId, SecretKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::counters::bump;
use crate::counters::Counters;
use crate::error::AttemptError;
use crate::ticket_store::TicketStore;

/// 32 bytes from the OS CSPRNG for the handshake's ephemeral key.
pub(crate) fn seed() -> std::io::Result<[u8; 32]> {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(s)
}

async fn read_exact_or_closed<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut [u8],
) -> Result<(), AttemptError> {
    match io.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(AttemptError::ClosedEarly),
        Err(e) => Err(e.into()),
    }
}

/// An initiator's identity and the resumption tickets it holds (none:
/// every handshake is a full one).
#[derive(Clone, Copy)]
pub(crate) struct Me<'a> {
    pub(crate) secret: &'a SecretKey,
    pub(crate) tickets: Option<&'a TicketStore>,
}

/// Runs the initiator's side on a connected transport (a TCP socket or a
/// routed stream): a resumption when a ticket for `target` is held, else
/// (or when the target no longer honours it) a full handshake, which
/// leaves a ticket for the next time.
pub(crate) async fn initiate<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    me: Me<'_>,
    target: NodeId,
    port: u16,
    options: InitiatorOptions,
) -> Result<Established, AttemptError> {
    let ticket = me.tickets.and_then(|t| t.get(&target));
    if let Some(ticket) = ticket {
        let (init, hello) = Initiator::resume(me.secret, &ticket, port, options, seed()?)?;
        match exchange(io, init, &hello).await {
            Err(AttemptError::Handshake(HandshakeError::ResumeRejected)) => {
                // The target restarted (or the ticket expired): a full
                // handshake on the same connection.
                if let Some(t) = me.tickets {
                    t.remove(&target);
                }
            }
            other => return other,
        }
    }
    let (init, hello) = Initiator::new(me.secret, target, port, options, seed()?)?;
    let mut est = exchange(io, init, &hello).await?;
    if let (Some(ticket), Some(t)) = (est.ticket.take(), me.tickets) {
        t.insert(*ticket);
    }
    Ok(est)
}

/// Sends `hello`, reads the reply, and sends the key confirmation.
async fn exchange<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    init: Initiator,
    hello: &[u8],
) -> Result<Established, AttemptError> {
    io.write_all(hello).await?;
    io.flush().await?;
    let mut h = [0u8; REPLY_HEADER_LEN];
    read_exact_or_closed(io, &mut h).await?;
    let header = ReplyHeader::decode(&h).map_err(HandshakeError::from)?;
    let mut body = vec![0u8; header.len];
    read_exact_or_closed(io, &mut body).await?;
    let (est, confirmation) = init.handle_reply(header, &body)?;
    // Sent at once, not with the first data: a server-speaks-first
    // protocol (ssh) waits for it before its banner.
    io.write_all(&confirmation).await?;
    io.flush().await?;
    Ok(est)
}

/// What the responder's side needs of its node: its key, its handshake
/// settings, and the counters refusals go to.
#[derive(Clone, Copy)]
pub(crate) struct Responder<'a> {
    pub(crate) secret: &'a SecretKey,
    pub(crate) options: ResponderOptions,
    pub(crate) counters: &'a Counters,
    /// Issues and honours resumption tickets (none: every handshake is a
    /// full one).
    pub(crate) tickets: Option<&'a TicketKey>,
}

/// Runs the responder's side on an accepted transport for `node`. `admit` decides whether an authenticated initiator may open a
/// stream for its hello; an admitted stream is returned once the initiator
/// confirmed the session keys.
pub(crate) async fn respond<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    node: Responder<'_>,
    admit: impl FnOnce(&Knock<'_>) -> Admission,
) -> Result<Established, AttemptError> {
    let pending = respond_unconfirmed(io, node, admit).await?;
    confirm(io, node.counters, pending).await
}

/// Waits for the initiator's key confirmation of `pending`.
pub(crate) async fn confirm<T: AsyncRead + Unpin>(
    io: &mut T,
    counters: &Counters,
    pending: Unconfirmed,
) -> Result<Established, AttemptError> {
    let mut confirmation = [0u8; CONFIRM_LEN];
    let confirmed = match read_exact_or_closed(io, &mut confirmation).await {
        Ok(()) => pending.confirm(&confirmation).map_err(AttemptError::from),
        Err(e) => Err(e),
    };
    if confirmed.is_err() {
        bump(&counters.not_confirmed);
    }
    confirmed
}

/// The responder's side up to its reply: an admitted stream whose
/// initiator has not confirmed the keys yet.
pub(crate) async fn respond_unconfirmed<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    node: Responder<'_>,
    admit: impl FnOnce(&Knock<'_>) -> Admission,
) -> Result<Unconfirmed, AttemptError> {
    respond_announcing(io, node, admit, |_| {}).await
}

/// [`respond_unconfirmed`], calling `accepted` with an admitted stream's
/// outcome before the reply goes out: whatever the initiator may do once
/// it has the reply (move the stream, say) finds it in place.
pub(crate) async fn respond_announcing<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    node: Responder<'_>,
    admit: impl FnOnce(&Knock<'_>) -> Admission,
    accepted: impl FnOnce(&Established),
) -> Result<Unconfirmed, AttemptError> {
    let mut admit = Some(admit);
    let mut accepted = Some(accepted);
    // A resumption hello whose ticket is not honoured is followed by a
    // full hello on the same connection; one such retry, no more.
    let mut resumption_allowed = true;
    loop {
        let mut h = [0u8; HELLO_HEADER_LEN];
        read_exact_or_closed(io, &mut h).await?;
        let header = match HelloHeader::decode(&h) {
            Ok(header) if header.resume && !resumption_allowed => {
                // The ticket was refused a moment ago on this connection.
                let e = HandshakeError::Ticket(TicketError::NotIssuedHere);
                let _ = io.write_all(&handshake::reply_failed()).await;
                let _ = io.flush().await;
                return Err(e.into());
            }
            Ok(header) => header,
            Err(e) => {
                if let Some(reply) = handshake::reply_to_bad_header(&e) {
                    // Best effort: the peer is already misbehaving.
                    let _ = io.write_all(&reply).await;
                    let _ = io.flush().await;
                }
                return Err(HandshakeError::from(e).into());
            }
        };
        let mut body = vec![0u8; header.noise_len];
        read_exact_or_closed(io, &mut body).await?;
        let resumption = node.tickets.map(|key| Resumption {
            key,
            now: Instant::now(),
        });
        // Asked once at most: a refused ticket is refused before it.
        let decide = |k: &Knock<'_>| match admit.take() {
            Some(admit) => admit(k),
            None => Admission::Refuse(handshake::Refusal::NotAdmitted),
        };
        let (reply, outcome) = handshake::respond(
            node.secret,
            &header,
            &body,
            node.options,
            resumption,
            decide,
            seed()?,
        );
        if let (Responded::Accepted(pending), Some(accepted)) = (&outcome, accepted.take()) {
            accepted(pending.established());
        }
        io.write_all(&reply).await?;
        io.flush().await?;
        return match outcome {
            Responded::Accepted(pending) => Ok(pending),
            Responded::Refused { refusal, .. } => Err(HandshakeError::Refused(refusal).into()),
            Responded::Failed(HandshakeError::Ticket(why)) if resumption_allowed => {
                bump(&node.counters.tickets_refused);
                tracing::debug!("resumption ticket not honoured ({why}); a full hello may follow");
                resumption_allowed = false;
                continue;
            }
            Responded::Failed(e) => Err(e.into()),
        };
    }
}

/// Connects a TCP socket with the options every reach connection uses.
pub(crate) async fn tcp_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    // Handshake messages and interactive traffic must not wait for Nagle.
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use reach_proto::handshake::Cipher;
    use tokio::io::{DuplexStream, ReadBuf};

    use super::*;

    /// A transport that counts the bytes written to it.
    struct Counted {
        io: DuplexStream,
        written: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
            self.written.fetch_add(n, Ordering::SeqCst);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// A routed stream registers for moves in `accepted`: the initiator may
    /// move it as soon as it reads the reply, so nothing of the reply may
    /// have gone out before.
    #[tokio::test]
    async fn an_admitted_stream_is_announced_before_the_reply_goes_out() {
        let (initiator_key, responder_key) = (
            crate::keystore::generate().expect("key"),
            crate::keystore::generate().expect("key"),
        );
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        let written = Arc::new(AtomicUsize::new(0));
        let mut b = Counted {
            io: b,
            written: written.clone(),
        };
        let counters = Counters::default();
        let responder = Responder {
            secret: &responder_key,
            options: ResponderOptions {
                allow_plaintext: false,
                plaintext_port: None,
                reveal_identity: false,
                network: None,
            },
            counters: &counters,
            tickets: None,
        };
        let mut announced = None;
        let respond = respond_announcing(
            &mut b,
            responder,
            |_| Admission::Accept,
            |est| announced = Some((est.peer, written.load(Ordering::SeqCst))),
        );
        let me = Me {
            secret: &initiator_key,
            tickets: None,
        };
        let options = InitiatorOptions {
            plaintext: false,
            cipher: Cipher::AesGcm,
            reverse: false,
            upgrade: false,
            network: None,
        };
        let initiate = initiate(&mut a, me, responder_key.node_id(), 7, options);
        let (responded, initiated) = tokio::join!(respond, initiate);
        responded.expect("responder");
        initiated.expect("initiator");
        assert_eq!(announced, Some((initiator_key.node_id(), 0)));
        assert!(
            written.load(Ordering::SeqCst) > 0,
            "the reply went out after"
        );
    }
}
