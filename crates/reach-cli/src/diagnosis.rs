//! What `reach doctor` found, and what it means in plain words: the
//! report's shape (printed as JSON with `--json`), the text it prints, and
//! why a setup module could not reach a target, read from the error the
//! module gave. Pure: the checks themselves are in `doctor`.

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use reach::proto::setup_plan::Skip;
use reach::{AttemptError, ConnectError, ModuleError, SetupModule};
use serde::Serialize;

/// Everything `reach doctor` found.
#[derive(Debug, Serialize)]
pub struct Report {
    /// This node's NodeId.
    pub node: String,
    /// The host's interface addresses.
    pub interfaces: Vec<Interface>,
    /// Each hub asked, in the order given.
    pub hubs: Vec<HubCheck>,
    /// The NAT in front of this host, from the first reachable hub's TCP
    /// address echoes (none: no hub answered).
    pub nat: Option<NatCheck>,
    /// Whether inbound connections get in: the hub's dial-backs to a
    /// mapping of this host's.
    pub filtering: Option<crate::inbound::FilterCheck>,
    /// Whether UDP gets out, from the same hub's UDP echoes.
    pub udp: Option<UdpCheck>,
    /// Whether the gateway forwards a port on request (none: not checked,
    /// `--no-port-mapping`).
    pub port_mapping: Option<PortMapCheck>,
    /// Which setup modules reach the target, when one was given.
    pub target: Option<TargetCheck>,
}

/// One interface address.
#[derive(Debug, Serialize)]
pub struct Interface {
    /// The interface's name.
    pub name: String,
    /// Its address and prefix, e.g. 10.0.0.2/24.
    pub addr: String,
    /// loopback, link-local, private, shared (carrier-grade NAT), global
    /// or unusable.
    pub scope: String,
}

/// What one hub answered.
#[derive(Debug, Default, Serialize)]
pub struct HubCheck {
    /// The hub as given.
    pub hub: String,
    /// Whether this node attached to it.
    pub reachable: bool,
    /// Its NodeId, once attached.
    pub node: Option<String>,
    /// The address of the link to it.
    pub address: Option<String>,
    /// This host's address as the hub sees it.
    pub observed: Option<String>,
    /// The network round trip to the hub (the fastest of three TCP
    /// connects to its address echo, else the link's ping), milliseconds.
    pub rtt_ms: Option<f64>,
    /// How long attaching took (TCP, Noise handshake, registration), ms.
    pub attach_ms: Option<f64>,
    /// How many address echoes it runs.
    pub echoes: usize,
    /// Why it could not be reached.
    pub error: Option<String>,
}

/// The NAT in front of this host.
#[derive(Debug, Serialize)]
pub struct NatCheck {
    /// Whether there is one (the hub sees another address than this
    /// host's own).
    pub behind_nat: Option<bool>,
    /// How it maps a local port: no-nat, endpoint-independent, dependent,
    /// unknown.
    pub mapping: Option<reach::proto::nat::Mapping>,
    /// How it allocates external ports.
    pub allocation: Option<reach::proto::nat::Allocation>,
    /// Whether the echoes had two IP addresses (only then is an
    /// endpoint-independent mapping told from an address-dependent one).
    pub across_addresses: bool,
    /// The mapping in RFC 4787's terms: endpoint-independent,
    /// address-dependent or address-and-port-dependent; none without a NAT
    /// or when the echoes could not tell (one hub address).
    pub mapping_behaviour: Option<&'static str>,
    /// The external address it gave.
    pub external: Option<SocketAddr>,
    /// The behaviour in words.
    pub summary: String,
    /// What a splice can do with it.
    pub splice: String,
    /// Why it could not be probed.
    pub error: Option<String>,
}

/// Whether UDP gets out.
#[derive(Debug, Serialize)]
pub struct UdpCheck {
    /// Whether any echo answered.
    pub gets_out: bool,
    /// Each echo that answered, with the external address it saw.
    pub answers: Vec<UdpAnswer>,
    /// What that means.
    pub summary: String,
}

/// One UDP echo's answer.
#[derive(Debug, Serialize)]
pub struct UdpAnswer {
    /// The echo.
    pub echo: SocketAddr,
    /// This socket's address as the echo saw it.
    pub external: SocketAddr,
}

/// Whether the gateway forwards a port on request (step 11).
#[derive(Debug, Serialize)]
pub struct PortMapCheck {
    /// Whether a mapping was granted (and deleted again).
    pub available: bool,
    /// pcp, nat-pmp or upnp.
    pub protocol: Option<String>,
    /// The gateway that granted it.
    pub gateway: Option<String>,
    /// The external address it gave.
    pub external: Option<String>,
    /// Why not, as each protocol answered.
    pub why_not: Option<String>,
}

/// Which setup modules reach the target.
#[derive(Debug, Serialize)]
pub struct TargetCheck {
    /// The target as given.
    pub vaddr: String,
    /// One verdict per module tried.
    pub modules: Vec<ModuleVerdict>,
}

/// Whether one setup module reached the target, and why (not).
#[derive(Debug, Serialize, PartialEq)]
pub struct ModuleVerdict {
    /// direct, reverse, splice or routed.
    pub module: String,
    /// Whether it made a stream.
    pub works: bool,
    /// How long it took, when it worked, ms.
    pub setup_ms: Option<f64>,
    /// Why it works or not, in plain words.
    pub why: String,
    /// The error as the library gave it, when it failed.
    pub error: Option<String>,
}

/// The verdict on `module` from what connecting with it alone gave.
pub fn verdict(module: SetupModule, outcome: Result<Duration, &ConnectError>) -> ModuleVerdict {
    let (works, why, setup_ms) = match outcome {
        Ok(took) => (true, works_because(module).to_string(), Some(ms(took))),
        Err(ConnectError::Unreachable { modules, .. }) => {
            let why = modules
                .iter()
                .filter(|f| f.module == module)
                .map(|f| failed_because(&f.error))
                .collect::<Vec<_>>();
            let why = if why.is_empty() {
                "it did not run: the connect ran out of time first".to_string()
            } else {
                why.join("; ")
            };
            (false, why, None)
        }
        Err(ConnectError::Refused { refusal, .. }) => (
            false,
            format!("it reached the target, which refused this node: {refusal:?} (its access policy or port)"),
            None,
        ),
        Err(other) => (false, other.to_string(), None),
    };
    ModuleVerdict {
        module: module.to_string(),
        works,
        setup_ms,
        why,
        error: outcome.err().map(ToString::to_string),
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn works_because(module: SetupModule) -> &'static str {
    match module {
        SetupModule::Direct => "this node connected straight to the target's address",
        SetupModule::Reverse => "the target connected back to this node when the hubs asked it",
        SetupModule::Splice => {
            "a simultaneous connect from both sides opened the NATs or firewalls between them"
        }
        SetupModule::Routed => "the hubs carry the stream (always works while both are attached)",
    }
}

/// Why `module` failed, from its error.
pub fn failed_because(e: &ModuleError) -> String {
    match e {
        ModuleError::Skipped(skip) => match skip {
            Skip::NoDirectAddress => "not tried: the target advertises no address to connect to (no public address and no port mapping)".into(),
            Skip::NoHubSession => "not tried: this node could not attach to a hub".into(),
            Skip::NothingToConnectBackTo => "not tried: this node has no address the target could connect back to".into(),
            Skip::TargetOnAnotherNetwork => "not tried: this node is behind a NAT, so a target on another network cannot connect back to it".into(),
            other => other.to_string(),
        },
        ModuleError::Direct(inner) => direct_failed(inner),
        ModuleError::ConnectBack(inner) => format!(
            "the target could not connect back to this node ({inner}): a NAT or firewall in front of this host keeps inbound connections out"
        ),
        ModuleError::Unpredictable(profile) => format!(
            "this host's NAT cannot be predicted ({profile}), so the target cannot aim a simultaneous connect at it"
        ),
        ModuleError::Declined(why) => format!("the target declined the splice: {why}"),
        ModuleError::NoConnection { .. } => format!(
            "the simultaneous connect did not get through the NATs or firewalls on both sides ({e})"
        ),
        ModuleError::Echo(inner) => format!(
            "the hub's address echoes did not answer ({inner}), so the NAT could not be probed"
        ),
        ModuleError::HandshakeTimedOut(after) => format!(
            "a connection opened but the target did not answer the handshake within {after:?}"
        ),
        ModuleError::Refused(r) => {
            format!("it reached the target, which refused this node: {r:?} (its access policy or port)")
        }
        other => other.to_string(),
    }
}

/// Why Direct failed, from its connection race's error.
fn direct_failed(e: &ConnectError) -> String {
    let (attempts, timed_out) = match e {
        ConnectError::NoAddresses { .. } => {
            return "the target advertises no address to connect to".into()
        }
        ConnectError::Failed { attempts, .. } => (attempts.as_slice(), None),
        ConnectError::TimedOut {
            attempts, after, ..
        } => (attempts.as_slice(), Some(*after)),
        other => return other.to_string(),
    };
    let mut parts: Vec<String> = attempts
        .iter()
        .map(|a| match &a.error {
            AttemptError::Io(io) => match io.kind() {
                ErrorKind::ConnectionRefused => format!(
                    "{} refused the connection: a firewall in front of the target rejects inbound connections there, or nothing listens",
                    a.addr
                ),
                ErrorKind::TimedOut => format!(
                    "{} did not answer: packets to it are dropped on the way, by a firewall or NAT in front of the target that drops inbound connections",
                    a.addr
                ),
                ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => format!(
                    "{} is not reachable from this network (no route: a private address of another site?)",
                    a.addr
                ),
                _ => format!("{}: {io}", a.addr),
            },
            other => format!("{}: {other}", a.addr),
        })
        .collect();
    if let Some(after) = timed_out {
        parts.push(format!(
            "no address answered within {after:.1?}: packets to the target are dropped on the way, by a firewall or NAT in front of it that drops inbound connections"
        ));
    }
    if parts.is_empty() {
        return e.to_string();
    }
    parts.join("; ")
}

impl PortMapCheck {
    fn render(&self, out: &mut String) {
        let p = self;
        if p.available {
            let _ = writeln!(
                out,
                "  available: the gateway {} forwards ports on request by {} (it gave {})",
                p.gateway.as_deref().unwrap_or("-"),
                p.protocol.as_deref().unwrap_or("-"),
                p.external.as_deref().unwrap_or("-")
            );
        } else {
            let _ = writeln!(
                out,
                "  not available: {}",
                p.why_not.as_deref().unwrap_or("-")
            );
        }
    }
}

impl Report {
    /// The report in plain words, one section per check.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "node      {}", self.node);
        let _ = writeln!(out, "\ninterfaces:");
        for i in &self.interfaces {
            let _ = writeln!(out, "  {:<10} {:<28} {}", i.name, i.addr, i.scope);
        }
        let _ = writeln!(out, "\nhubs:");
        if self.hubs.is_empty() {
            let _ = writeln!(
                out,
                "  none given (--hub): NAT, UDP and the target's modules need one"
            );
        }
        for h in &self.hubs {
            if h.reachable {
                let rtt = h
                    .rtt_ms
                    .map(|r| format!("round trip {r:.2} ms, "))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {}  reachable: {rtt}attached in {:.1} ms; it sees this host as {}; {} address echoes",
                    h.hub,
                    h.attach_ms.unwrap_or_default(),
                    h.observed.as_deref().unwrap_or("-"),
                    h.echoes
                );
            } else {
                let _ = writeln!(
                    out,
                    "  {}  NOT reachable: {}",
                    h.hub,
                    h.error.as_deref().unwrap_or("-")
                );
            }
        }
        if let Some(n) = &self.nat {
            let _ = writeln!(out, "\nNAT:");
            let _ = writeln!(out, "  {}", n.summary);
            let _ = writeln!(out, "  splice: {}", n.splice);
        }
        if let Some(f) = &self.filtering {
            let _ = writeln!(out, "\ninbound:\n  {}", f.summary);
            for (what, p) in [
                ("from another port of the hub", &f.other_port),
                ("from the hub's second address", &f.other_address),
            ] {
                if let Some(p) = p {
                    let from = p.from.map(|a| format!(" ({a})")).unwrap_or_default();
                    let detail = p
                        .detail
                        .as_deref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default();
                    let _ = writeln!(out, "  {what}{from}: {}{detail}", p.result);
                }
            }
        }
        if let Some(u) = &self.udp {
            let _ = writeln!(out, "\nUDP:\n  {}", u.summary);
        }
        let _ = writeln!(out, "\nport mapping:");
        match &self.port_mapping {
            None => {
                let _ = writeln!(out, "  not checked (--no-port-mapping)");
            }
            Some(p) => p.render(&mut out),
        }
        if let Some(t) = &self.target {
            let _ = writeln!(out, "\ntarget {}:", t.vaddr);
            for m in &t.modules {
                let head = match (m.works, m.setup_ms) {
                    (true, Some(ms)) => format!("works ({ms:.1} ms)"),
                    (true, None) => "works".into(),
                    (false, _) => "cannot work".into(),
                };
                let _ = writeln!(out, "  {:<8} {head}: {}", m.module, m.why);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach::SecretKey;
    use reach::{Attempt, ModuleFailure};

    fn node() -> reach::NodeId {
        SecretKey::from_seed([3; 32]).node_id()
    }

    fn unreachable(module: SetupModule, error: ModuleError) -> ConnectError {
        ConnectError::Unreachable {
            node: node(),
            after: Duration::from_secs(5),
            modules: vec![ModuleFailure { module, error }],
        }
    }

    #[test]
    fn a_dropping_firewall_is_named_for_direct() {
        let e = unreachable(
            SetupModule::Direct,
            ModuleError::Direct(Box::new(ConnectError::TimedOut {
                node: node(),
                after: Duration::from_secs(5),
                attempts: Vec::new(),
            })),
        );
        let v = verdict(SetupModule::Direct, Err(&e));
        assert!(!v.works);
        assert!(v.why.contains("dropped on the way"), "{}", v.why);
        assert!(v.why.contains("drops inbound connections"), "{}", v.why);
        assert!(v.error.is_some());
    }

    #[test]
    fn a_rejecting_firewall_and_no_route_are_told_apart() {
        let addr: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let attempt = |kind| Attempt {
            addr,
            error: AttemptError::Io(std::io::Error::from(kind)),
        };
        let e = unreachable(
            SetupModule::Direct,
            ModuleError::Direct(Box::new(ConnectError::Failed {
                node: node(),
                attempts: vec![
                    attempt(ErrorKind::ConnectionRefused),
                    attempt(ErrorKind::NetworkUnreachable),
                ],
            })),
        );
        let why = verdict(SetupModule::Direct, Err(&e)).why;
        assert!(
            why.contains("192.0.2.7:4000 refused the connection: a firewall"),
            "{why}"
        );
        assert!(why.contains("not reachable from this network"), "{why}");
    }

    #[test]
    fn skipped_modules_say_why_they_were_not_tried() {
        let e = unreachable(
            SetupModule::Reverse,
            ModuleError::Skipped(Skip::TargetOnAnotherNetwork),
        );
        let v = verdict(SetupModule::Reverse, Err(&e));
        assert!(
            v.why.starts_with("not tried: this node is behind a NAT"),
            "{}",
            v.why
        );
        let ok = verdict(SetupModule::Routed, Ok(Duration::from_micros(2500)));
        assert!(ok.works && ok.setup_ms == Some(2.5), "{ok:?}");
        assert!(ok.why.contains("hubs carry"));
    }

    #[test]
    fn the_text_names_every_section() {
        let r = Report {
            node: "N".into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                addr: "10.0.0.2/24".into(),
                scope: "private".into(),
            }],
            hubs: vec![HubCheck {
                hub: "H@192.0.2.1:7700".into(),
                error: Some("connection refused".into()),
                ..HubCheck::default()
            }],
            nat: None,
            filtering: Some(crate::inbound::FilterCheck {
                mapped: None,
                other_port: Some(crate::inbound::InboundProbe {
                    result: "dropped",
                    from: Some("192.0.2.1:40000".parse().expect("addr")),
                    detail: Some("no answer within 3000 ms".into()),
                }),
                other_address: None,
                filtering: Some("address-and-port-dependent"),
                summary: "a firewall keeps inbound connections out".into(),
            }),
            udp: None,
            port_mapping: Some(PortMapCheck {
                available: false,
                protocol: None,
                gateway: None,
                external: None,
                why_not: Some("no default IPv4 gateway".into()),
            }),
            target: Some(TargetCheck {
                vaddr: "T:7".into(),
                modules: vec![verdict(SetupModule::Routed, Ok(Duration::from_millis(3)))],
            }),
        };
        let text = r.render();
        for want in [
            "eth0       10.0.0.2/24",
            "H@192.0.2.1:7700  NOT reachable: connection refused",
            "not available: no default IPv4 gateway",
            "inbound:\n  a firewall keeps inbound connections out",
            "from another port of the hub (192.0.2.1:40000): dropped: no answer within 3000 ms",
            "routed   works (3.0 ms): the hubs carry",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
    }
}
