//! Asking a hub's TCP address echo what this host's port looks like from
//! outside: the one exchange that splice's NAT probe and `reach doctor`'s
//! checks (filtering, the mapping across the hub's addresses) are built
//! from. Sockets bind with address and port reuse, so a port can listen
//! and connect out at once (a splice, a dial-back's listener).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reach_proto::nat::{self, MAX_ECHO_LEN};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::error::EchoError;

/// A TCP socket bound to `local` with address and port reuse on.
pub fn reusable_socket(local: SocketAddr) -> std::io::Result<TcpSocket> {
    let s = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(local)?;
    Ok(s)
}

/// A reusable socket on a port the kernel picks, on the unspecified
/// address of `ipv4`'s family; the socket holds the port.
pub fn fresh_port(ipv4: bool) -> std::io::Result<(TcpSocket, SocketAddr)> {
    let any: IpAddr = if ipv4 {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let s = reusable_socket(SocketAddr::new(any, 0))?;
    let at = s.local_addr()?;
    Ok((s, at))
}

/// Connects from `local` to the echo at `echo` and reads the address it
/// saw, within `budget`. The connection comes back open: holding it keeps
/// the NAT's mapping for it.
pub async fn ask(
    local: SocketAddr,
    echo: SocketAddr,
    budget: Duration,
) -> Result<(TcpStream, SocketAddr), EchoError> {
    let io = |source| EchoError::Io { echo, source };
    let exchange = async {
        let mut tcp = reusable_socket(local)
            .map_err(EchoError::Bind)?
            .connect(echo)
            .await
            .map_err(io)?;
        let mut buf = [0u8; MAX_ECHO_LEN];
        let mut n = 0;
        while n < buf.len() && !buf[..n].contains(&b'\n') {
            match tcp.read(&mut buf[n..]).await.map_err(io)? {
                0 => break,
                k => n += k,
            }
        }
        let mapped =
            nat::decode_echo(&buf[..n]).map_err(|source| EchoError::BadAnswer { echo, source })?;
        Ok((tcp, mapped))
    };
    tokio::time::timeout(budget, exchange)
        .await
        .unwrap_or(Err(EchoError::TimedOut {
            echo,
            after: budget,
        }))
}
