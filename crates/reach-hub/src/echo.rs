//! The hub's address echoes: plain TCP listeners that write back the address
//! each connection came from, then close. Nodes connect to two of them from
//! one local port to learn how their NAT maps it (`reach_proto::nat`).
//!
//! The echo closes first, so the TIME_WAIT state stays here and the node may
//! reuse its port at once. It reads nothing: a client cannot make it hold
//! more than one small write, and each answer has a deadline.
//!
//! The same ports answer UDP ([`serve_udp`]), for the vpn's UDP paths: a
//! request of 64 bytes gets the address line back, never longer than the
//! request, at most [`MAX_UDP_ANSWERS`] a second (a flood, or a forged
//! source aiming the answers elsewhere, gets no more than that; the rest
//! are dropped, counted and logged once a second).

use std::net::SocketAddr;
use std::time::Duration;

use reach_proto::nat::encode_echo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// How long one answer may take to leave.
const ANSWER_DEADLINE: Duration = Duration::from_secs(2);

/// Binds an echo on `ip`:`port` (0: any free port).
pub(crate) async fn bind(
    ip: std::net::IpAddr,
    port: u16,
) -> Result<TcpListener, reach::EndpointError> {
    TcpListener::bind(SocketAddr::new(ip, port))
        .await
        .map_err(|source| reach::EndpointError::Bind {
            what: format!("an address echo on port {port} of {ip}"),
            source,
        })
}

/// UDP echo answers a second at most.
pub(crate) const MAX_UDP_ANSWERS: u32 = 2000;

/// Binds a UDP echo on the address of a TCP echo.
pub(crate) async fn bind_udp(at: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    tokio::net::UdpSocket::bind(at).await
}

/// Answers every UDP echo request on `socket` with its source address,
/// within the rate bound.
pub(crate) async fn serve_udp(socket: tokio::net::UdpSocket) {
    let mut buf = [0u8; 512];
    let mut window = tokio::time::Instant::now();
    let (mut answered, mut dropped) = (0u32, 0u64);
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            // An ICMP error about an earlier answer's destination: the
            // next datagram is fine.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue
            }
            Err(e) => {
                // A socket that keeps failing must not spin a core.
                tracing::warn!("UDP address echo: receive failed: {e}; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if !reach_proto::nat::is_udp_echo_request(&buf[..n]) {
            continue;
        }
        let now = tokio::time::Instant::now();
        if now.duration_since(window) >= Duration::from_secs(1) {
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    "UDP address echo over {MAX_UDP_ANSWERS} answers a second: requests dropped"
                );
            }
            window = now;
            answered = 0;
            dropped = 0;
        }
        if answered >= MAX_UDP_ANSWERS {
            dropped += 1;
            continue;
        }
        answered += 1;
        let answer = encode_echo(SocketAddr::new(from.ip().to_canonical(), from.port()));
        let _ = socket.try_send_to(answer.as_bytes(), from);
    }
}

/// Answers in progress at once; more connections are closed unanswered, so
/// a flood cannot pile up tasks.
const MAX_ANSWERS: usize = 256;

/// Answers every connection on `listener` with its source address.
pub(crate) async fn serve(listener: TcpListener) {
    let answering = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_ANSWERS));
    loop {
        let (mut tcp, from) = reach::accept::accept(&listener, "address echo").await;
        let Ok(permit) = answering.clone().try_acquire_owned() else {
            tracing::debug!(%from, "address echo busy: connection dropped");
            continue;
        };
        tokio::spawn(async move {
            let _permit = permit;
            // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
            let answer = encode_echo(SocketAddr::new(from.ip().to_canonical(), from.port()));
            let write = async {
                tcp.write_all(answer.as_bytes()).await?;
                tcp.shutdown().await
            };
            if let Err(e) = tokio::time::timeout(ANSWER_DEADLINE, write)
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            {
                tracing::debug!(%from, "address echo answer failed: {e}");
            }
        });
    }
}
