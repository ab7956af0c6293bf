//! The UPnP side's sockets: SSDP on the LAN's multicast group, and the
//! HTTP server for the description and SOAP control. Control requests go
//! to the daemon's loop, which owns the table (one writer); everything
//! here is bounded: connections at once, bytes per request, time per
//! connection, searches answered per second.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::table::in_prefix;
use crate::upnp;

/// HTTP connections served at once at most (more wait in the backlog).
const MAX_CONNECTIONS: usize = 32;
/// How long one connection may take, request and answer.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// Searches answered per second at most (each brings up to 7 answers).
const SEARCHES_PER_SECOND: u32 = 50;

/// A control request for the daemon's loop, with where its answer goes.
pub type Call = (upnp::Request, Ipv4Addr, oneshot::Sender<Vec<u8>>);

/// Who may ask: the allowed internal ranges.
#[derive(Clone, Debug)]
pub struct Admission(pub Vec<(Ipv4Addr, u8)>);

impl Admission {
    fn admits(&self, ip: Ipv4Addr) -> bool {
        self.0.iter().any(|p| in_prefix(ip, *p))
    }
}

/// Binds the HTTP server on `lan:port` (0: any free port).
pub async fn bind_http(lan: Ipv4Addr, port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddrV4::new(lan, port)).await
}

/// Binds the SSDP socket: port 1900 on all addresses, the group joined
/// on the LAN interface's address.
pub fn bind_ssdp(lan: Ipv4Addr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, upnp::SSDP_PORT)).into())?;
    s.join_multicast_v4(&upnp::SSDP_GROUP, &lan)?;
    s.set_multicast_if_v4(&lan)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

/// Answers searches from admitted hosts (forever).
pub async fn serve_ssdp(socket: UdpSocket, admission: Admission, location: String, uuid: String) {
    let mut buf = vec![0u8; 2048];
    let mut window = Instant::now();
    let mut answered = 0u32;
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("SSDP socket: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let SocketAddr::V4(from4) = from else {
            continue;
        };
        if !admission.admits(*from4.ip()) {
            continue;
        }
        let Some(st) = upnp::search_target(&buf[..n]) else {
            continue;
        };
        if window.elapsed() >= Duration::from_secs(1) {
            window = Instant::now();
            answered = 0;
        }
        if answered >= SEARCHES_PER_SECOND {
            tracing::debug!(%from, "SSDP search not answered: {SEARCHES_PER_SECOND} a second already");
            continue;
        }
        answered += 1;
        for answer in upnp::search_answers(&st, &location, &uuid) {
            if let Err(e) = socket.send_to(answer.as_bytes(), from).await {
                tracing::debug!(%from, "SSDP answer not sent: {e}");
            }
        }
    }
}

/// Serves HTTP on `listener` (forever): the description itself, control
/// requests through `calls`.
pub async fn serve_http(
    listener: TcpListener,
    admission: Admission,
    uuid: String,
    calls: mpsc::Sender<Call>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (conn, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("UPnP HTTP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let SocketAddr::V4(from4) = from else {
            continue;
        };
        if !admission.admits(*from4.ip()) {
            tracing::debug!(%from, "UPnP connection from outside the allowed ranges closed");
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::info!(%from, "UPnP connection closed: {MAX_CONNECTIONS} served already");
            continue;
        };
        let (uuid, calls) = (uuid.clone(), calls.clone());
        tokio::spawn(async move {
            let served = tokio::time::timeout(
                CONNECTION_DEADLINE,
                serve_connection(conn, *from4.ip(), &uuid, &calls),
            )
            .await;
            if served.is_err() {
                tracing::debug!(%from, "UPnP connection cut: not done within {CONNECTION_DEADLINE:?}");
            }
            drop(slot);
        });
    }
}

async fn serve_connection(
    mut conn: TcpStream,
    client: Ipv4Addr,
    uuid: &str,
    calls: &mpsc::Sender<Call>,
) {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let request = loop {
        match upnp::parse_request(&buf) {
            upnp::Parse::Done(r) => break r,
            upnp::Parse::Bad(why) => {
                tracing::debug!(%client, "bad UPnP request: {why}");
                let _ = conn
                    .write_all(
                        upnp::http_response(400, "Bad Request", "text/plain", why).as_bytes(),
                    )
                    .await;
                return;
            }
            upnp::Parse::Incomplete => {}
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let answer = match (request.method.as_str(), request.path.as_str()) {
        ("GET", upnp::DESCRIPTION) => upnp::http_response(
            200,
            "OK",
            "text/xml; charset=\"utf-8\"",
            &upnp::description(uuid),
        )
        .into_bytes(),
        ("POST", upnp::CONTROL_IP | upnp::CONTROL_COMMON) => {
            let (tx, rx) = oneshot::channel();
            if calls.try_send((request, client, tx)).is_err() {
                upnp::fault(upnp::code::ACTION_FAILED, "Action Failed: busy").into_bytes()
            } else {
                match rx.await {
                    Ok(b) => b,
                    Err(_) => return,
                }
            }
        }
        _ => upnp::http_response(404, "Not Found", "text/plain", "not found").into_bytes(),
    };
    let _ = conn.write_all(&answer).await;
    let _ = conn.shutdown().await;
}

/// A UUID for the device, kept in `path` (made once, random).
pub fn device_uuid(path: &std::path::Path) -> std::io::Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        let s = s.trim();
        if s.len() == 36 {
            return Ok(s.to_string());
        }
    }
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    );
    std::fs::write(path, format!("{uuid}\n"))?;
    Ok(uuid)
}
