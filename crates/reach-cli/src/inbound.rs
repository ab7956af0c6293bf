//! `reach doctor`'s filtering check: whether connections this host did not
//! ask for get in, as RFC 4787 section 5 (and RFC 5780's tests) define it.
//!
//! This host opens a port's mapping by connecting from it to the hub's
//! address echo, which says what the mapping is, and keeps that connection
//! open so the mapping stays. A listener on the same port waits. The hub
//! then connects to the mapping from a port this host never contacted, and
//! from its second address if it has one (`reach hub --dial-back-from`);
//! each connection carries a token, so the listener knows it is the hub's.
//!
//! | other port | other address | filtering |
//! |---|---|---|
//! | gets in | gets in | endpoint-independent (open, or a full cone) |
//! | gets in | kept out | address-dependent |
//! | kept out | (kept out) | address-and-port-dependent |
//!
//! "Kept out" is either dropped (the hub's connect timed out) or refused (a
//! reset came back), which matters for Direct: a refusal fails at once, a
//! drop only at its deadline.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use reach::proto::link::{
    parse_dial_back_greeting, DialBackFrom, DialBackOutcome, DIAL_BACK_GREETING_LEN,
};
use reach::Endpoint;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// How long the echo that opens the mapping may take.
const ECHO_WAIT: Duration = Duration::from_secs(3);
/// How long the hub is given to answer a dial-back (its own connect
/// deadline is 3 s).
const ASK_WAIT: Duration = Duration::from_secs(8);
/// How long the listener waits for the greeting once the hub says it
/// connected.
const GREETING_WAIT: Duration = Duration::from_secs(2);
/// Connections the listener looks at for the greeting: strangers that
/// find the port cannot keep it busy for longer.
const MAX_STRANGERS: usize = 16;

/// Whether inbound connections get in.
#[derive(Debug, Serialize)]
pub struct FilterCheck {
    /// The mapping the hub dialled: this host's port as the echo saw it.
    pub mapped: Option<SocketAddr>,
    /// The hub's connection from a port this host never contacted.
    pub other_port: Option<InboundProbe>,
    /// The hub's connection from its second address.
    pub other_address: Option<InboundProbe>,
    /// endpoint-independent, address-dependent or
    /// address-and-port-dependent (RFC 4787); none when the probes did not
    /// tell.
    pub filtering: Option<&'static str>,
    /// What that means, in words.
    pub summary: String,
}

/// What one dial-back met.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboundProbe {
    /// admitted, dropped, refused, failed or declined (the hub did not
    /// try).
    pub result: &'static str,
    /// The hub's source address.
    pub from: Option<SocketAddr>,
    /// The details: the hub's error or reason.
    pub detail: Option<String>,
}

impl InboundProbe {
    /// The probe's result from the hub's outcome and whether this host's
    /// listener got the token.
    pub fn new(outcome: &DialBackOutcome, greeted: bool) -> Self {
        let (result, from, detail) = match outcome {
            DialBackOutcome::Connected { from } if greeted => ("admitted", Some(*from), None),
            DialBackOutcome::Connected { from } => (
                "failed",
                Some(*from),
                Some("the hub connected, but not to this host: something in between answered in its place".to_string()),
            ),
            DialBackOutcome::Refused { from } => ("refused", Some(*from), None),
            DialBackOutcome::TimedOut { from, after_ms } => (
                "dropped",
                Some(*from),
                Some(format!("no answer within {after_ms} ms")),
            ),
            DialBackOutcome::Failed { from, error } => ("failed", *from, Some(error.clone())),
            DialBackOutcome::Declined { reason } => ("declined", None, Some(reason.clone())),
        };
        InboundProbe {
            result,
            from,
            detail,
        }
    }

    fn admitted(&self) -> bool {
        self.result == "admitted"
    }

    fn kept_out(&self) -> bool {
        matches!(self.result, "dropped" | "refused")
    }
}

/// The filtering (RFC 4787 terms) the two probes show, if they tell.
pub fn filtering(
    other_port: Option<&InboundProbe>,
    other_address: Option<&InboundProbe>,
) -> Option<&'static str> {
    let port = other_port?;
    if port.kept_out() {
        return Some("address-and-port-dependent");
    }
    if !port.admitted() {
        return None;
    }
    match other_address {
        Some(a) if a.admitted() => Some("endpoint-independent"),
        Some(a) if a.kept_out() => Some("address-dependent"),
        _ => None,
    }
}

/// The check's findings in words; `behind_nat` from the NAT check.
pub fn summary(check: &FilterCheck, behind_nat: Option<bool>) -> String {
    let how = |p: Option<&InboundProbe>| match p.map(|p| p.result) {
        Some("refused") => "refused (a reset came back)",
        _ => "dropped",
    };
    let nat = behind_nat == Some(true);
    match (check.filtering, check.other_port.as_ref()) {
        (Some("endpoint-independent"), _) if nat => "endpoint-independent filtering (a full cone): once this host has sent from a port, anyone can connect to its mapping, so peers reach it directly there".into(),
        (Some("endpoint-independent"), _) => "open: connections from addresses this host never contacted get in; nothing filters inbound".into(),
        (Some("address-dependent"), _) => format!(
            "address-dependent filtering: only addresses this host has contacted get in (from any port); the hub's second address was {}",
            how(check.other_address.as_ref())
        ),
        (Some(_), p) if nat => format!(
            "address-and-port-dependent filtering: only the exact address and port this host contacted get in; the hub's connection from another port was {}. Peers need Splice, Reverse or Routed",
            how(p)
        ),
        (Some(_), p) => format!(
            "a firewall in front of this host keeps inbound connections out: the hub's connection from another port was {}. Direct to this host cannot work; Reverse, Splice and Routed can",
            how(p)
        ),
        (None, Some(p)) if p.admitted() => format!(
            "connections from another port of the hub get in (not port-dependent); whether other addresses do is unknown: {}",
            check
                .other_address
                .as_ref()
                .and_then(|a| a.detail.clone())
                .unwrap_or_else(|| "not checked".into())
        ),
        (None, Some(p)) => format!(
            "unknown: the dial-back {}: {}",
            p.result,
            p.detail.as_deref().unwrap_or("-")
        ),
        (None, None) => "unknown: not checked".into(),
    }
}

/// Runs the check through `endpoint`'s hub and its address `echo`;
/// `behind_nat` from the NAT check words the summary.
pub async fn check(
    endpoint: &Endpoint,
    echo: Option<SocketAddr>,
    behind_nat: Option<bool>,
) -> FilterCheck {
    let mut c = FilterCheck {
        mapped: None,
        other_port: None,
        other_address: None,
        filtering: None,
        summary: String::new(),
    };
    let Some(echo) = echo else {
        c.summary = "unknown: the hub runs no address echo to open a mapping with".into();
        return c;
    };
    let held = match hold_mapping(echo).await {
        Ok(h) => h,
        Err(e) => {
            c.summary = format!("unknown: cannot open a mapping through the echo {echo}: {e}");
            return c;
        }
    };
    c.mapped = Some(held.mapped);
    // Both at once: one listener takes the greetings for both. The second
    // address is asked even when the other port was kept out, for what it
    // tells: the hub's second address, which the mapping check uses.
    let (greeted, seen) = tokio::sync::watch::channel(Vec::new());
    let both = async {
        tokio::join!(
            probe(endpoint, &held, DialBackFrom::OtherPort, seen.clone()),
            probe(endpoint, &held, DialBackFrom::OtherAddress, seen.clone())
        )
    };
    let (port, address) = tokio::select! {
        r = both => r,
        never = greetings(&held.listener, greeted) => match never {},
    };
    c.other_port = Some(port);
    c.other_address = Some(address);
    c.filtering = filtering(c.other_port.as_ref(), c.other_address.as_ref());
    c.summary = summary(&c, behind_nat);
    c
}

/// A listening port whose mapping is held open by a connection to the echo.
struct Held {
    listener: TcpListener,
    /// Open for as long as the check runs: the mapping lives with it.
    _to_echo: TcpStream,
    mapped: SocketAddr,
}

/// Listens on a fresh port and connects from it to `echo`, which tells the
/// port's mapping.
async fn hold_mapping(echo: SocketAddr) -> std::io::Result<Held> {
    let (socket, local) = reach::echo::fresh_port(echo.is_ipv4())?;
    let listener = socket.listen(8)?;
    let (to_echo, mapped) = reach::echo::ask(local, echo, ECHO_WAIT)
        .await
        .map_err(std::io::Error::other)?;
    Ok(Held {
        listener,
        _to_echo: to_echo,
        mapped,
    })
}

/// The hub's second address, as its dial-back from there showed it.
pub fn second_address(check: &FilterCheck) -> Option<IpAddr> {
    check.other_address.as_ref()?.from.map(|a| a.ip())
}

/// Asks the hub to dial `held`'s mapping from `from`; `seen` lists the
/// tokens the listener got meanwhile.
async fn probe(
    endpoint: &Endpoint,
    held: &Held,
    from: DialBackFrom,
    mut seen: tokio::sync::watch::Receiver<Vec<u64>>,
) -> InboundProbe {
    let token = nonce(from);
    let greeted = async move {
        let _ = seen.wait_for(|t| t.contains(&token)).await;
    };
    tokio::pin!(greeted);
    let ask = endpoint.hub_dial_back(held.mapped.port(), from, token, ASK_WAIT);
    tokio::pin!(ask);
    let (answer, mut seen) = tokio::select! {
        a = &mut ask => (a, false),
        () = &mut greeted => (ask.await, true),
    };
    let outcome = match answer {
        Ok(o) => o,
        Err(e) => {
            return InboundProbe {
                result: "failed",
                from: None,
                detail: Some(format!(
                    "the hub did not answer the dial-back (a hub older than this node closes the session instead): {e}"
                )),
            }
        }
    };
    if !seen && matches!(outcome, DialBackOutcome::Connected { .. }) {
        seen = tokio::time::timeout(GREETING_WAIT, &mut greeted)
            .await
            .is_ok();
    }
    InboundProbe::new(&outcome, seen)
}

/// Reads the greeting of each connection to `listener` (each within a
/// deadline, one at a time) and lists its token in `greeted`; looks at
/// [`MAX_STRANGERS`] connections at most. Never ends: the caller bounds
/// the wait.
async fn greetings(
    listener: &TcpListener,
    greeted: tokio::sync::watch::Sender<Vec<u64>>,
) -> std::convert::Infallible {
    for _ in 0..MAX_STRANGERS {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        let mut got = [0u8; DIAL_BACK_GREETING_LEN];
        let read = tokio::time::timeout(GREETING_WAIT, tcp.read_exact(&mut got)).await;
        if let (Ok(Ok(_)), Some(token)) = (read, parse_dial_back_greeting(&got)) {
            greeted.send_modify(|t| t.push(token));
        }
    }
    std::future::pending().await
}

/// A token no one else guesses within a check's few seconds (the two
/// probes' differ).
fn nonce(from: DialBackFrom) -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one((std::time::SystemTime::now(), from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(result: &'static str) -> InboundProbe {
        InboundProbe {
            result,
            from: None,
            detail: None,
        }
    }

    #[test]
    fn the_two_probes_name_the_rfc_4787_filtering() {
        assert_eq!(
            filtering(Some(&p("admitted")), Some(&p("admitted"))),
            Some("endpoint-independent")
        );
        assert_eq!(
            filtering(Some(&p("admitted")), Some(&p("dropped"))),
            Some("address-dependent")
        );
        for out in ["dropped", "refused"] {
            assert_eq!(
                filtering(Some(&p(out)), None),
                Some("address-and-port-dependent")
            );
        }
        // Without a second address, or a probe that failed: not told.
        assert_eq!(filtering(Some(&p("admitted")), Some(&p("declined"))), None);
        assert_eq!(filtering(Some(&p("failed")), None), None);
        assert_eq!(filtering(None, None), None);
    }

    #[test]
    fn a_connection_that_did_not_reach_this_host_is_no_admission() {
        let from: SocketAddr = "203.0.113.1:5000".parse().expect("addr");
        let connected = DialBackOutcome::Connected { from };
        assert_eq!(InboundProbe::new(&connected, true).result, "admitted");
        assert_eq!(InboundProbe::new(&connected, false).result, "failed");
        let dropped = DialBackOutcome::TimedOut {
            from,
            after_ms: 3000,
        };
        assert_eq!(InboundProbe::new(&dropped, false).result, "dropped");
        assert_eq!(
            InboundProbe::new(&DialBackOutcome::Refused { from }, false).result,
            "refused"
        );
    }

    #[test]
    fn the_summary_tells_a_firewall_from_a_nat_and_a_drop_from_a_refusal() {
        let check = |port: &'static str, addr: Option<&'static str>| {
            let mut c = FilterCheck {
                mapped: None,
                other_port: Some(p(port)),
                other_address: addr.map(p),
                filtering: None,
                summary: String::new(),
            };
            c.filtering = filtering(c.other_port.as_ref(), c.other_address.as_ref());
            c
        };
        let s = summary(&check("dropped", None), Some(false));
        assert!(s.contains("firewall") && s.contains("dropped"), "{s}");
        let s = summary(&check("refused", None), Some(false));
        assert!(s.contains("firewall") && s.contains("refused"), "{s}");
        let s = summary(&check("refused", None), Some(true));
        assert!(s.starts_with("address-and-port-dependent"), "{s}");
        let s = summary(&check("admitted", Some("admitted")), Some(true));
        assert!(s.contains("full cone"), "{s}");
        let s = summary(&check("admitted", Some("admitted")), Some(false));
        assert!(s.starts_with("open"), "{s}");
        let s = summary(&check("admitted", Some("dropped")), Some(true));
        assert!(s.starts_with("address-dependent"), "{s}");
        let s = summary(&check("admitted", Some("declined")), Some(true));
        assert!(s.contains("not port-dependent"), "{s}");
    }
}
