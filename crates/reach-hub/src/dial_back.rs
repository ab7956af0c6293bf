//! Dial-backs for nodes testing how inbound connections are filtered on
//! their way (`reach doctor`): the core admits a request
//! ([`reach_hub_core::Event::DialBack`]) for the node's own observed
//! address only and within its bounds; this connects to it from the
//! source asked for, writes the greeting and answers with what happened.
//!
//! Sources: the address the node's session reached, from a fresh port
//! (filtering that depends on the port drops it), or the hub's second
//! address (`HubConfig::dial_back_from`; only endpoint-independent
//! filtering lets it in). Each dial has a deadline, and an answer always
//! goes back, so the node never waits in vain.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reach_hub_core::DialBackRequest;
use reach_proto::link::{dial_back_greeting, Control, DialBackFrom, DialBackOutcome};
use tokio::io::AsyncWriteExt;

use crate::Inner;

/// How long a dial-back may take to connect: a SYN lost once is sent again
/// after a second, so three cover one retransmission with room.
pub const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(3);

/// How long writing the greeting may take.
const GREETING_DEADLINE: Duration = Duration::from_secs(2);

/// Runs `req`, which came over a link that reached this hub at `via`.
pub(crate) fn start(inner: &Arc<Inner>, req: DialBackRequest, via: SocketAddr) {
    let inner = inner.clone();
    tokio::spawn(async move {
        let outcome = match source(req.from, via.ip(), inner.config.dial_back_from) {
            Ok(ip) => dial(ip, req.to, req.token).await,
            Err(reason) => DialBackOutcome::Declined { reason },
        };
        tracing::debug!(to = %req.to, from = ?req.from, ?outcome, "dial-back");
        let mut s = inner.state();
        s.core.dial_back_done(req.link);
        s.core.send_control(
            req.link,
            &Control::DialedBack {
                req: req.req,
                outcome,
            },
        );
        s.flush();
    });
}

/// The source address for `from`: the link's own address, or the second.
fn source(from: DialBackFrom, via: IpAddr, second: Option<IpAddr>) -> Result<IpAddr, String> {
    match (from, second) {
        (DialBackFrom::OtherPort, _) => Ok(via),
        (DialBackFrom::OtherAddress, Some(ip)) if ip != via => Ok(ip),
        (DialBackFrom::OtherAddress, Some(_)) => Err(
            "the hub's second address is the one this node reached: it cannot dial from another"
                .into(),
        ),
        (DialBackFrom::OtherAddress, None) => Err(
            "this hub has no second address to dial back from (reach hub --dial-back-from)".into(),
        ),
    }
}

/// Connects from `ip` (a fresh port) to `to` and writes the greeting.
async fn dial(ip: IpAddr, to: SocketAddr, token: u64) -> DialBackOutcome {
    let failed = |from, e: std::io::Error| DialBackOutcome::Failed {
        from,
        error: e.to_string(),
    };
    let socket = match if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    } {
        Ok(s) => s,
        Err(e) => return failed(None, e),
    };
    if let Err(e) = socket.bind(SocketAddr::new(ip, 0)) {
        return failed(None, e);
    }
    let from = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => return failed(None, e),
    };
    let mut tcp = match tokio::time::timeout(DIAL_BACK_TIMEOUT, socket.connect(to)).await {
        Err(_) => {
            return DialBackOutcome::TimedOut {
                from,
                after_ms: u32::try_from(DIAL_BACK_TIMEOUT.as_millis()).unwrap_or(u32::MAX),
            }
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return DialBackOutcome::Refused { from }
        }
        Ok(Err(e)) => return failed(Some(from), e),
        Ok(Ok(tcp)) => tcp,
    };
    let greet = async {
        tcp.write_all(&dial_back_greeting(token)).await?;
        tcp.shutdown().await
    };
    match tokio::time::timeout(GREETING_DEADLINE, greet).await {
        Ok(Ok(())) => DialBackOutcome::Connected { from },
        Ok(Err(e)) => failed(Some(from), e),
        Err(_) => failed(
            Some(from),
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connected, but the greeting could not be written within 2 s",
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_the_links_address_or_a_second_one_never_the_same() {
        let via: IpAddr = "203.0.113.1".parse().expect("ip");
        let second: IpAddr = "198.51.100.1".parse().expect("ip");
        assert_eq!(source(DialBackFrom::OtherPort, via, None), Ok(via));
        assert_eq!(
            source(DialBackFrom::OtherAddress, via, Some(second)),
            Ok(second)
        );
        assert!(source(DialBackFrom::OtherAddress, via, None)
            .is_err_and(|e| e.contains("--dial-back-from")));
        assert!(source(DialBackFrom::OtherAddress, via, Some(via)).is_err());
    }

    #[tokio::test]
    async fn a_dial_back_tells_connected_with_the_greeting_from_refused() {
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        let listener = tokio::net::TcpListener::bind((lo, 0)).await.expect("bind");
        let to = listener.local_addr().expect("addr");
        let (outcome, accepted) = tokio::join!(dial(lo, to, 42), async {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut got)
                .await
                .expect("read");
            got
        });
        assert!(
            matches!(outcome, DialBackOutcome::Connected { from } if from.ip() == lo),
            "{outcome:?}"
        );
        assert_eq!(accepted, dial_back_greeting(42));
        drop(listener);
        let outcome = dial(lo, to, 42).await;
        assert!(
            matches!(outcome, DialBackOutcome::Refused { .. }),
            "{outcome:?}"
        );
    }
}
