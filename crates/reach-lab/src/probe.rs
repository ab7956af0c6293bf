//! Probes for checking what a lab's network lets through.
//!
//! `serve` answers every TCP connection with one line, `reach-lab-probe NAME
//! IP:PORT`: who the server is (the paper's identity check, so reaching a
//! different host at an overlapping private address is told apart) and the
//! client's address as the server sees it (a NAT's external mapping).
//! `connect` reports what happened as one JSON line.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::apply::LabError;
use crate::lab::{Lab, Process};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

const GREETING: &str = "reach-lab-probe";

/// What one probe connection saw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// Connected and greeted.
    Ok {
        /// The name the server gave.
        server: String,
        /// Our address as the server saw it.
        seen_as: SocketAddr,
        /// Our local address.
        local: SocketAddr,
        /// Milliseconds the TCP connect took (one round trip).
        connect_ms: f64,
        /// Milliseconds from the start of the connect to the greeting.
        ms: f64,
    },
    /// Actively refused (TCP reset, ICMP port unreachable or admin-prohibited).
    Refused,
    /// No answer before the timeout (dropped).
    Timeout,
    /// No route (network or host unreachable).
    Unreachable,
    /// Connected, and another kind of server answered (sshd, say).
    Foreign {
        /// The first line it sent.
        banner: String,
        /// Milliseconds the TCP connect took (one round trip).
        connect_ms: f64,
    },
    /// Another error.
    Error {
        /// What went wrong.
        message: String,
    },
}

impl Outcome {
    /// A short description for tables and messages.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Ok {
                server, seen_as, ..
            } => format!("ok (reached {server}, seen as {seen_as})"),
            Outcome::Refused => "refused".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Unreachable => "unreachable".into(),
            Outcome::Foreign { banner, .. } => format!("ok (another server: {banner:?})"),
            Outcome::Error { message } => format!("error: {message}"),
        }
    }
}

/// Starts `reach-lab probe ARGS` (from `tools`) in `host` and waits for it to
/// print `ready` (it does once its ports are bound; it closes stdout if it
/// exits on an error instead).
fn spawn_ready(lab: &Lab, tools: &Path, host: &str, args: &[String]) -> Result<Process, LabError> {
    let mut child = lab
        .command(host, tools.join("reach-lab"))
        .arg("probe")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let process = Process::new(child);
    if line.trim() != "ready" {
        return Err(LabError::Command {
            command: format!("reach-lab probe {} in {host}", args.join(" ")),
            output: "exited before it was ready".into(),
        });
    }
    Ok(process)
}

/// Starts a probe server (greetings) in `host` on `ports`, ready to answer.
pub fn spawn_server(
    lab: &Lab,
    tools: &Path,
    host: &str,
    ports: &[u16],
) -> Result<Process, LabError> {
    let mut args = vec!["serve".to_string(), "--name".into(), host.into()];
    for p in ports {
        args.extend(["--port".to_string(), p.to_string()]);
    }
    spawn_ready(lab, tools, host, &args)
}

/// Starts a bulk sink in `host` on `port`, ready to receive.
pub fn spawn_sink(lab: &Lab, tools: &Path, host: &str, port: u16) -> Result<Process, LabError> {
    spawn_ready(
        lab,
        tools,
        host,
        &["sink".into(), "--port".into(), port.to_string()],
    )
}

/// Runs `reach-lab probe connect` inside `host` and returns what it saw.
pub fn connect_from(
    lab: &Lab,
    tools: &Path,
    host: &str,
    addr: SocketAddr,
    timeout: Duration,
    bind_port: Option<u16>,
) -> Outcome {
    probe_from(lab, tools, host, addr, timeout, Kind::Tcp { bind_port })
}

/// Runs `reach-lab probe connect --udp` inside `host`: one datagram to
/// `addr`, and what came back (with `later`, the greeting sent that long
/// after the first).
pub fn udp_from(
    lab: &Lab,
    tools: &Path,
    host: &str,
    addr: SocketAddr,
    timeout: Duration,
    later: Option<Duration>,
) -> Outcome {
    probe_from(lab, tools, host, addr, timeout, Kind::Udp { later })
}

/// What `probe connect` sends.
enum Kind {
    /// A TCP connection, from `bind_port` if given.
    Tcp { bind_port: Option<u16> },
    /// A UDP datagram, with `later` asking for a second answer then.
    Udp { later: Option<Duration> },
}

fn probe_from(
    lab: &Lab,
    tools: &Path,
    host: &str,
    addr: SocketAddr,
    timeout: Duration,
    kind: Kind,
) -> Outcome {
    let mut cmd = lab.command(host, tools.join("reach-lab"));
    cmd.args(["probe", "connect", &addr.to_string(), "--timeout"])
        .arg(timeout.as_secs_f64().to_string());
    match kind {
        Kind::Tcp { bind_port } => {
            if let Some(p) = bind_port {
                cmd.args(["--bind-port", &p.to_string()]);
            }
        }
        Kind::Udp { later } => {
            cmd.arg("--udp");
            if let Some(d) = later {
                cmd.args(["--later", &d.as_secs_f64().to_string()]);
            }
        }
    }
    match cmd.output() {
        Ok(out) => serde_json::from_slice(&out.stdout).unwrap_or_else(|_| Outcome::Error {
            message: format!(
                "probe printed {:?}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
        Err(e) => Outcome::Error {
            message: format!("cannot run the probe: {e}"),
        },
    }
}

/// Serves probe greetings on every given port until the process is killed.
/// Prints `ready` on stdout once every port is bound, so a caller can wait for
/// that line instead of guessing.
pub fn serve(name: &str, ports: &[u16]) -> std::io::Result<()> {
    let listeners = ports
        .iter()
        .map(|&port| {
            // Both families where the namespace has IPv6 (a dual-stack
            // socket), IPv4 where it has not.
            TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    // The same greeting for each UDP datagram on the same ports.
    let udp = ports
        .iter()
        .map(|&port| {
            UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
                .or_else(|_| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut handles = Vec::new();
    for socket in udp {
        let name = name.to_string();
        handles.push(std::thread::spawn(move || {
            let socket = std::sync::Arc::new(socket);
            let mut buf = [0u8; 64];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let greeting = format!("{GREETING} {name} {}\n", canonical(peer));
                let _ = socket.send_to(greeting.as_bytes(), peer);
                // "later MS": greet once more after MS milliseconds, to the
                // same address (a NAT mapping that should by then be gone).
                if let Some(ms) = later_ms(&buf[..n]) {
                    let socket = socket.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(ms));
                        let _ = socket.send_to(greeting.as_bytes(), peer);
                    });
                }
            }
        }));
    }
    for listener in listeners {
        let name = name.to_string();
        handles.push(std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Ok(peer) = conn.peer_addr() {
                    let mut conn = conn;
                    let _ = writeln!(conn, "{GREETING} {name} {}", canonical(peer));
                }
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// Connects to `addr` (from `bind_port` if given) and reads the greeting.
pub fn connect(addr: SocketAddr, timeout: Duration, bind_port: Option<u16>) -> Outcome {
    let started = Instant::now();
    let stream = match open(addr, timeout, bind_port) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    let connect_ms = started.elapsed().as_secs_f64() * 1e3;
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => return classify(&e),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut line = String::new();
    if let Err(e) = BufReader::new(stream).read_line(&mut line) {
        return classify(&e);
    }
    match parse_greeting(&line) {
        Some((server, seen_as)) => Outcome::Ok {
            server,
            seen_as,
            local,
            connect_ms,
            ms: started.elapsed().as_secs_f64() * 1e3,
        },
        None => Outcome::Foreign {
            banner: line.trim().chars().take(80).collect(),
            connect_ms,
        },
    }
}

/// The delay a "later MS" request asks for (at most 10 minutes).
fn later_ms(request: &[u8]) -> Option<u64> {
    let ms = std::str::from_utf8(request).ok()?.strip_prefix("later ")?;
    ms.trim().parse().ok().filter(|ms| *ms <= 600_000)
}

/// Sends one UDP datagram to `addr` (from `bind_port` if given) and waits
/// for the greeting; `connect_ms` and `ms` are the round trip. With `later`,
/// asks the server to greet again after that long and waits for that second
/// greeting instead (`timeout` after it is due): whether a NAT mapping left
/// idle that long still lets an answer in.
pub fn udp(
    addr: SocketAddr,
    timeout: Duration,
    bind_port: Option<u16>,
    later: Option<Duration>,
) -> Outcome {
    let started = Instant::now();
    let exchange = || -> std::io::Result<(String, SocketAddr)> {
        let socket = UdpSocket::bind((unspecified(&addr), bind_port.unwrap_or(0)))?;
        // Connected: an ICMP port unreachable comes back as a refusal.
        socket.connect(addr)?;
        socket.set_read_timeout(Some(timeout))?;
        let request = match later {
            Some(d) => format!("later {}", d.as_millis()),
            None => "probe".into(),
        };
        socket.send(request.as_bytes())?;
        let mut buf = [0u8; 256];
        let mut n = socket.recv(&mut buf)?;
        if let Some(d) = later {
            // The first greeting came: the mapping exists. Now silence,
            // then the second.
            socket.set_read_timeout(Some(d + timeout))?;
            n = socket.recv(&mut buf)?;
        }
        Ok((
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            socket.local_addr()?,
        ))
    };
    match exchange() {
        Ok((line, local)) => {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            match parse_greeting(&line) {
                Some((server, seen_as)) => Outcome::Ok {
                    server,
                    seen_as,
                    local,
                    connect_ms: ms,
                    ms,
                },
                None => Outcome::Foreign {
                    banner: line.trim().chars().take(80).collect(),
                    connect_ms: ms,
                },
            }
        }
        Err(e) => classify(&e),
    }
}

fn open(addr: SocketAddr, timeout: Duration, bind_port: Option<u16>) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(port) = bind_port {
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from((unspecified(&addr), port)).into())?;
    }
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// `addr` with an IPv4-mapped IPv6 address (what a dual-stack socket sees
/// of an IPv4 peer) written as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The unspecified address of `addr`'s family.
fn unspecified(addr: &SocketAddr) -> std::net::IpAddr {
    match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

fn parse_greeting(line: &str) -> Option<(String, SocketAddr)> {
    let mut parts = line.split_whitespace();
    (parts.next()? == GREETING).then_some(())?;
    let name = parts.next()?.to_string();
    let seen: SocketAddr = parts.next()?.parse().ok()?;
    Some((name, seen))
}

fn classify(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Outcome::Refused,
        TimedOut | WouldBlock => Outcome::Timeout,
        NetworkUnreachable | HostUnreachable => Outcome::Unreachable,
        _ => match e.raw_os_error() {
            // EHOSTUNREACH / ENETUNREACH on older kinds, EACCES/EPERM from a local
            // firewall's reject, ECONNRESET from a reset during the greeting.
            Some(113) | Some(101) => Outcome::Unreachable,
            Some(13) | Some(1) | Some(104) => Outcome::Refused,
            _ => Outcome::Error {
                message: e.to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_parse_and_garbage_does_not() {
        assert_eq!(
            parse_greeting("reach-lab-probe fe 203.0.113.5:4000\n"),
            Some(("fe".into(), "203.0.113.5:4000".parse().expect("addr")))
        );
        assert_eq!(parse_greeting("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_greeting(""), None);
    }

    #[test]
    fn probe_round_trip_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            if let Some(Ok(mut c)) = listener.incoming().next() {
                let peer = c.peer_addr().expect("peer");
                let _ = writeln!(c, "{GREETING} me {peer}");
            }
        });
        let out = connect(addr, Duration::from_secs(5), None);
        assert!(
            matches!(out, Outcome::Ok { ref server, .. } if server == "me"),
            "{out:?}"
        );
        // UDP: a greeting for a datagram; a closed port refuses.
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let udp_addr = socket.local_addr().expect("addr");
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(format!("{GREETING} udp {peer}\n").as_bytes(), peer);
            }
        });
        let out = udp(udp_addr, Duration::from_secs(5), None, None);
        assert!(
            matches!(out, Outcome::Ok { ref server, .. } if server == "udp"),
            "{out:?}"
        );
        let shut = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let shut_addr = shut.local_addr().expect("addr");
        drop(shut);
        assert_eq!(
            udp(shut_addr, Duration::from_secs(5), None, None),
            Outcome::Refused
        );
        assert_eq!(later_ms(b"later 1500"), Some(1500));
        assert_eq!(later_ms(b"later 99999999"), None, "bounded");
        assert_eq!(later_ms(b"probe"), None);
        let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed_addr = closed.local_addr().expect("addr");
        drop(closed);
        assert_eq!(
            connect(closed_addr, Duration::from_secs(5), None),
            Outcome::Refused
        );
    }

    proptest::proptest! {
        #[test]
        fn greeting_parser_never_panics(s in "\\PC{0,100}") {
            let _ = parse_greeting(&s);
        }
    }
}

/// Echoes every TCP connection on `port` (all IPv4 addresses) back to its
/// sender until the process is killed: an epoll server on tokio's runtime.
/// Prints `ready` once bound.
pub fn echo(port: u16) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
        println!("ready");
        loop {
            let (mut conn, _) = listener.accept().await?;
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

/// Serves bulk transfers on `port`: reads each connection to its end, then
/// answers `received N SHA256` (what arrived, and its hash). Prints `ready`
/// once bound.
pub fn sink(port: u16) -> std::io::Result<()> {
    use sha2::Digest;
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
    println!("ready");
    std::io::stdout().flush()?;
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut conn = conn;
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0u64;
            let mut hash = sha2::Sha256::new();
            loop {
                match std::io::Read::read(&mut conn, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        n += k as u64;
                        hash.update(&buf[..k]);
                    }
                }
            }
            let _ = writeln!(conn, "received {n} {}", hex(&hash.finalize()));
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fills `buf` with the next bytes of a fixed pseudo-random sequence
/// (xorshift64 from `state`): bulk data whose hash catches reordering and
/// duplication, not only loss.
fn pattern(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// What a bulk transfer measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bulk {
    /// Bytes the sink confirmed.
    pub bytes: u64,
    /// Seconds from connect to the confirmation.
    pub secs: f64,
    /// Throughput in Mbit/s.
    pub mbit_s: f64,
    /// The sink's sha256 of what it received equals the sender's.
    #[serde(default)]
    pub intact: bool,
}

/// Sends `bytes` (a fixed pseudo-random sequence) to a sink and waits for
/// its confirmation, comparing the sink's hash of what arrived with its own.
pub fn send(addr: SocketAddr, bytes: u64, timeout: Duration) -> std::io::Result<Bulk> {
    use sha2::Digest;
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut hash = sha2::Sha256::new();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        pattern(&mut state, &mut chunk[..n]);
        hash.update(&chunk[..n]);
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let mut words = line
        .trim()
        .strip_prefix("received ")
        .unwrap_or("")
        .split(' ');
    let got: u64 = words.next().and_then(|n| n.parse().ok()).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("sink said {line:?}"),
        )
    })?;
    let secs = started.elapsed().as_secs_f64();
    Ok(Bulk {
        bytes: got,
        secs,
        mbit_s: got as f64 * 8.0 / secs / 1e6,
        intact: got == bytes && words.next() == Some(hex(&hash.finalize()).as_str()),
    })
}
