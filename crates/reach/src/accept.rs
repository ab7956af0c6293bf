//! Accept loops that survive running out of file descriptors.
//!
//! ```text
//! TcpListener --accept()--> Ok(conn)          --> caller
//!                       \-> Err(EMFILE, ...) --> log, pause 100 ms, retry
//! ```
//! Every server of reach (the endpoint, the legacy proxies, the hub's
//! proxy ports and address echoes) accepts through [`accept`], so an
//! exhausted process slows down instead of spinning or ending the server.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// The next connection on `listener`. An accept error (typically EMFILE:
/// out of file descriptors) is logged and retried after a pause, instead of
/// spinning or ending the server; `what` names the listener in the log.
pub async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(x) => return x,
            Err(e) => {
                tracing::warn!("{what}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
