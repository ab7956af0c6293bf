//! `reach status`: lists the proxies running on this host (from their
//! control sockets), then asks the hub for its state, and prints both.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use reach::Endpoint;
use serde_json::Value;

use crate::config::Config;
use crate::control::{self, ProxyReport};

/// Flags of `reach status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The hub to ask, [NODEID@]HOST:PORT (default: the configured hub).
    #[arg(long, value_name = "HUB")]
    hub: Option<String>,
    /// File holding the network secret, if the hub admits by secret.
    #[arg(long, value_name = "PATH")]
    network_secret_file: Option<PathBuf>,
    /// Print JSON: {"proxies": [...], "hub": {...} or null}; with --watch,
    /// one such object per line at each refresh.
    #[arg(long)]
    json: bool,
    /// Refresh in place every --interval seconds until interrupted (on a
    /// terminal the screen is redrawn; otherwise each refresh is printed
    /// after the last). A hub that cannot be asked is shown as such and
    /// asked again at the next refresh.
    #[arg(long)]
    watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, requires = "watch",
          value_parser = parse_interval)]
    interval: f64,
    /// Stop after this many refreshes with --watch (default: until
    /// interrupted).
    #[arg(long, value_name = "N", requires = "watch")]
    count: Option<u64>,
}

/// Lists the local proxies, queries the hub (if there is one) and prints
/// both; with `--watch`, again and again. The proxies are printed even when
/// the hub cannot be asked.
pub async fn run(args: StatusArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let target = crate::hub_target(args.hub.as_deref(), config)?;
    // One endpoint for every refresh: it asks the hub over its own link.
    let endpoint = match &target {
        Some(_) => Some(asker(&args, config, state_dir).await?),
        None => None,
    };
    if !args.watch {
        let (proxies, hub) = ask(state_dir, target.as_ref(), endpoint.as_ref()).await;
        let (hub, failed) = match hub {
            Some(Ok(r)) => (Some(r), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        print!("{}", show(&args, &proxies, hub.as_ref(), None, false)?);
        return failed.map_or(Ok(()), Err);
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let interval = std::time::Duration::from_secs_f64(args.interval);
    let mut shown = 0u64;
    loop {
        let (proxies, hub) = ask(state_dir, target.as_ref(), endpoint.as_ref()).await;
        let (hub, failed) = match hub {
            Some(Ok(r)) => (Some(r), None),
            Some(Err(e)) => (None, Some(format!("{e:#}"))),
            None => (None, None),
        };
        let text = show(&args, &proxies, hub.as_ref(), failed.as_deref(), true)?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            // Home and clear, then the new screen: a redraw in place.
            let clear = if tty && !args.json {
                "\x1b[H\x1b[2J"
            } else {
                ""
            };
            write!(out, "{clear}{text}")
                .and_then(|()| out.flush())
                .context("cannot write to stdout")?;
        }
        shown += 1;
        if args.count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            r = tokio::signal::ctrl_c() => return r.context("cannot wait for Ctrl-C"),
        }
    }
}

/// The local proxies' reports, and the hub's (None: no hub to ask).
async fn ask(
    state_dir: &Path,
    target: Option<&reach::HubTarget>,
    endpoint: Option<&Endpoint>,
) -> (Vec<ProxyReport>, Option<anyhow::Result<Value>>) {
    let proxies = control::list(state_dir).await;
    let hub = match (target, endpoint) {
        (Some(t), Some(e)) => Some(query(t, e).await),
        _ => None,
    };
    (proxies, hub)
}

/// One refresh as text or JSON. `failed` says why the hub could not be
/// asked (shown only when `watching`; otherwise the error is returned).
fn show(
    args: &StatusArgs,
    proxies: &[ProxyReport],
    hub: Option<&Value>,
    failed: Option<&str>,
    watching: bool,
) -> anyhow::Result<String> {
    if args.json {
        let mut out = serde_json::json!({ "proxies": proxies, "hub": hub });
        if let Some(e) = failed {
            out["hub_error"] = e.into();
        }
        let text = if watching {
            serde_json::to_string(&out)?
        } else {
            serde_json::to_string_pretty(&out)?
        };
        return Ok(text + "\n");
    }
    let mut text = String::new();
    if watching {
        let _ = writeln!(
            text,
            "reach status, every {} s (Ctrl-C ends)\n",
            args.interval
        );
    }
    text += &render_proxies(proxies, control::now_secs());
    match (hub, failed) {
        (Some(report), _) => text += &format!("\n{}", render(report)),
        (None, Some(e)) => text += &format!("\nhub: cannot ask it: {e}\n"),
        (None, None) if args.hub.is_none() && !watching => {
            text += "\nno hub configured (give --hub to ask one)\n"
        }
        (None, None) => {}
    }
    Ok(text)
}

/// A refresh interval: 0.1 to 3600 seconds.
fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        Ok(_) => Err(format!("{s} is not between 0.1 and 3600 seconds")),
        Err(_) => Err(format!("{s:?} is not a number of seconds")),
    }
}

/// The endpoint that asks the hub for its report.
async fn asker(args: &StatusArgs, config: &Config, state_dir: &Path) -> anyhow::Result<Endpoint> {
    let mut b = Endpoint::builder()
        .state_dir(state_dir)
        .bind_ip(IpAddr::from([127, 0, 0, 1]));
    if let Some(secret) = crate::network_secret(args.network_secret_file.as_deref(), config)? {
        b = b.network_secret(secret);
    }
    Ok(b.bind().await?)
}

/// Asks the hub at `target` for its report.
async fn query(target: &reach::HubTarget, endpoint: &Endpoint) -> anyhow::Result<Value> {
    let json = endpoint
        .query_hub(Some(target))
        .await
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot get the status of hub {target}"))?;
    serde_json::from_str(&json).context("the hub sent a status report that is not JSON")
}

/// Bytes in a short human form: 0 B, 12.3 KB, 4.5 GB (powers of 1000).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A vpn peer's round trip on the path its packets take: the UDP path's
/// when they take it, else its stream's.
fn round_trip(v: &crate::control::VpnPeerReport) -> String {
    let (kind, us) = if v.path.starts_with("udp") {
        ("UDP", v.udp_rtt_us)
    } else {
        ("stream", v.stream_rtt_us)
    };
    us.map(|us| format!(" ({kind} round trip {:.2} ms)", us as f64 / 1000.0))
        .unwrap_or_default()
}

/// One open stream on one line: who, where it runs (and where it
/// started, when it moved), the hubs it crosses, round trip, bytes, age.
fn render_stream(st: &control::StreamReport) -> String {
    let peer: String = st.peer.chars().take(12).collect();
    let (arrow, whom) = match st.direction.as_str() {
        "in" => ("from", format!("{peer}..")),
        _ => ("to", format!("{peer}..:{}", st.port)),
    };
    let via = if st.via.is_empty() {
        String::new()
    } else {
        format!(" via {}", st.via.join(" and "))
    };
    let path = match st.moved_after_ms {
        Some(ms) => format!(
            "{}{via} -> {} {} after {}",
            st.first_module,
            st.module,
            st.remote,
            if ms < 1000 {
                format!("{ms} ms")
            } else {
                format!("{:.1} s", ms as f64 / 1000.0)
            }
        ),
        None if via.is_empty() => format!("{} {}", st.module, st.remote),
        None => format!("{}{via}", st.module),
    };
    let rtt = st
        .rtt_us
        .map(|us| format!("  round trip {:.2} ms", us as f64 / 1000.0))
        .unwrap_or_default();
    format!(
        "stream {} {arrow} {whom}  {path}{rtt}  in {}  out {}  age {}s",
        st.id,
        bytes(st.bytes_in),
        bytes(st.bytes_out),
        st.age_ms / 1000
    )
}

/// The local proxies as text; `now` in seconds since the epoch.
fn render_proxies(proxies: &[ProxyReport], now: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "proxies on this host ({}):", proxies.len());
    for p in proxies {
        let c = &p.counters;
        let name = p
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let target = p
            .vaddr
            .as_deref()
            .map(|v| format!(" -> {v}"))
            .unwrap_or_default();
        let _ = writeln!(out, "  {}{name}  {}  {}{target}", p.id, p.kind, p.local);
        if let Some(m) = &p.port_mapping {
            let _ = writeln!(out, "      port mapping: {m}");
        }
        if let Some(public) = &p.public {
            let label = if p.kind == "vpn" {
                "vpn"
            } else {
                "hub proxy port"
            };
            let _ = writeln!(out, "      {label}: {public}");
        }
        for v in &p.peers {
            let _ = writeln!(
                out,
                "      peer {} ({}, {})  path {}{}{}  out {} pkts {}  in {} pkts {}",
                v.ip,
                v.ula,
                v.node,
                v.path,
                if v.via.is_empty() || v.path.starts_with("udp") {
                    String::new()
                } else {
                    format!(" via {}", v.via.join(" and "))
                },
                round_trip(v),
                v.packets_out,
                bytes(v.bytes_out),
                v.packets_in,
                bytes(v.bytes_in)
            );
        }
        let _ = writeln!(
            out,
            "      connections {} (active {}, failed {})  in {}  out {}  up {}s",
            c.connections,
            c.active,
            c.failed,
            bytes(c.bytes_to_reach),
            bytes(c.bytes_from_reach),
            now.saturating_sub(p.started)
        );
        for st in &p.streams {
            let _ = writeln!(out, "      {}", render_stream(st));
        }
        if p.streams_total > p.streams.len() {
            let _ = writeln!(
                out,
                "      ... and {} older streams",
                p.streams_total - p.streams.len()
            );
        }
    }
    if proxies.is_empty() {
        let _ = writeln!(
            out,
            "  none (reach expose, forward, socks and vpn list themselves here)"
        );
    }
    out
}

/// The report as aligned text.
fn render(r: &Value) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let list = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    };
    let items = |key: &str| r[key].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "hub     {}", s(&r["hub"]));
    let _ = writeln!(out, "listen  {}", list(&r["listen"]));
    let links = items("hub_links");
    let _ = writeln!(out, "\nhub links ({}):", links.len());
    for l in &links {
        let dir = if l["dialled"].as_bool() == Some(true) {
            "dialled"
        } else {
            "accepted"
        };
        let _ = writeln!(out, "  {}  {}  {dir}", s(&l["hub"]), s(&l["addr"]));
    }
    let routes = items("routes");
    let _ = writeln!(out, "\nroutes ({}):", routes.len());
    for rt in &routes {
        let _ = writeln!(
            out,
            "  {}  via {}  hops {}",
            s(&rt["hub"]),
            s(&rt["next_hop"]),
            s(&rt["hops"])
        );
    }
    let nodes = items("nodes");
    let _ = writeln!(out, "\nattached nodes ({}):", s(&r["nodes_attached"]));
    for n in &nodes {
        let _ = writeln!(
            out,
            "  {}  from {}  advertises {}  streams {}",
            s(&n["node"]),
            s(&n["observed"]),
            list(&n["addrs"]),
            s(&n["streams"])
        );
    }
    let exposures = items("exposures");
    let _ = writeln!(out, "\nproxy ports ({}):", exposures.len());
    for e in &exposures {
        let allow = match list(&e["allow_from"]) {
            a if a.is_empty() => "any client".to_string(),
            a => format!("from {a}"),
        };
        let num = |k: &str| e[k].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "  {}  -> {}:{}  {allow}  connections {} (active {}, failed {}, refused {})  in {}  out {}",
            s(&e["port"]),
            s(&e["node"]),
            s(&e["vport"]),
            num("connections"),
            num("active"),
            num("failed"),
            num("refused"),
            bytes(num("bytes_in")),
            bytes(num("bytes_out")),
        );
    }
    let _ = writeln!(
        out,
        "\nnodes on other hubs: {}\nrouted streams now: {}",
        s(&r["remote_nodes"]),
        s(&r["streams"])
    );
    if let Some(c) = r["counters"].as_object() {
        let counters: Vec<_> = c.iter().map(|(k, v)| format!("{k}={}", s(v))).collect();
        let _ = writeln!(out, "counters: {}", counters.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section_and_survives_missing_keys() {
        let r = serde_json::json!({
            "hub": "H", "listen": ["192.0.2.1:7700"], "nodes_attached": 1,
            "nodes": [{"node": "N", "observed": "198.51.100.2:5", "addrs": [], "streams": 2}],
            "hub_links": [{"hub": "P", "addr": null, "dialled": true}],
            "routes": [{"hub": "Q", "next_hop": "P", "hops": 2}],
            "remote_nodes": 4, "streams": 2, "counters": {"refused": 0},
            "exposures": [{"port": 40000, "node": "N", "vport": 22, "allow_from": ["10.0.0.0/8"],
                "connections": 3, "active": 1, "failed": 0, "refused": 2,
                "bytes_in": 1500, "bytes_out": 2_000_000}],
        });
        let text = render(&r);
        for want in [
            "hub     H",
            "P  -  dialled",
            "Q  via P  hops 2",
            "N  from 198.51.100.2:5",
            "nodes on other hubs: 4",
            "refused=0",
            "40000  -> N:22  from 10.0.0.0/8  connections 3 (active 1, failed 0, refused 2)  in 1.5 KB  out 2.0 MB",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        let empty = render(&serde_json::json!({}));
        assert!(empty.contains("routes (0)"));
    }

    #[test]
    fn renders_proxies() {
        let p = ProxyReport {
            id: 42,
            name: Some("ssh".into()),
            kind: "expose".into(),
            local: "127.0.0.1:22".into(),
            vaddr: Some("V".into()),
            public: Some("192.0.2.1:40000".into()),
            started: 100,
            counters: reach_legacy::proxy::ProxyCounters {
                connections: 2,
                active: 1,
                bytes_to_reach: 999,
                bytes_from_reach: 12_345_678,
                ..Default::default()
            },
            peers: Vec::new(),
            udp: None,
            port_mapping: None,
            streams: vec![control::StreamReport {
                id: 3,
                peer: "abcdefghijklmnopqrstuvwxyz".into(),
                port: 22,
                direction: "out".into(),
                first_module: "routed".into(),
                module: "direct".into(),
                moved_after_ms: Some(420),
                local: "10.0.0.1:5000".into(),
                remote: "192.0.2.9:6000".into(),
                via: vec!["192.0.2.1:7700".into()],
                rtt_us: Some(2500),
                setup_us: 4000,
                bytes_in: 2_000_000,
                bytes_out: 300,
                age_ms: 12_500,
            }],
            streams_total: 5,
        };
        let text = render_proxies(&[p], 160);
        for want in [
            "proxies on this host (1):",
            "42 (ssh)  expose  127.0.0.1:22 -> V",
            "hub proxy port: 192.0.2.1:40000",
            "connections 2 (active 1, failed 0)  in 999 B  out 12.3 MB  up 60s",
            "stream 3 to abcdefghijkl..:22  routed via 192.0.2.1:7700 -> direct 192.0.2.9:6000 after 420 ms  round trip 2.50 ms  in 2.0 MB  out 300 B  age 12s",
            "... and 4 older streams",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        assert!(render_proxies(&[], 0).contains("none"));
        let vpn = ProxyReport {
            id: 7,
            name: Some("reach0".into()),
            kind: "vpn".into(),
            local: "reach0 10.77.0.1/16".into(),
            vaddr: None,
            public: Some("1 peers".into()),
            started: 100,
            counters: Default::default(),
            peers: vec![control::VpnPeerReport {
                ip: "10.77.0.2".into(),
                ula: "fd00::2".into(),
                node: "abc".into(),
                path: "routed".into(),
                udp_path: None,
                udp_kind: None,
                udp_rtt_us: None,
                udp_setup_us: None,
                via: vec!["192.0.2.1:7000".into(), "198.51.100.1:7000".into()],
                stream_rtt_us: Some(1500),
                packets_out: 3,
                packets_in: 4,
                bytes_out: 2500,
                bytes_in: 40,
            }],
            udp: None,
            port_mapping: None,
            streams: Vec::new(),
            streams_total: 0,
        };
        let text = render_proxies(&[vpn], 100);
        assert!(
            text.contains(
                "peer 10.77.0.2 (fd00::2, abc)  path routed via 192.0.2.1:7000 and 198.51.100.1:7000 (stream round trip 1.50 ms)  out 3 pkts 2.5 KB  in 4 pkts 40 B"
            ),
            "{text}"
        );
    }
}
