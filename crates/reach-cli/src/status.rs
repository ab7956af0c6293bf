//! `reach status`: asks a hub for its state and prints it.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use reach::Endpoint;
use serde_json::Value;

use crate::config::Config;

/// Flags of `reach status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The hub to ask, [NODEID@]HOST:PORT (default: the configured hub).
    #[arg(long, value_name = "HUB")]
    hub: Option<String>,
    /// File holding the network secret, if the hub admits by secret.
    #[arg(long, value_name = "PATH")]
    network_secret_file: Option<PathBuf>,
    /// Print the hub's report as JSON.
    #[arg(long)]
    json: bool,
}

/// Queries the hub and prints its report.
pub async fn run(args: StatusArgs, config: &Config, state_dir: &Path) -> anyhow::Result<()> {
    let target = crate::hub_target(args.hub.as_deref(), config)?
        .context("no hub to ask: give --hub [NODEID@]HOST:PORT or set `hub` in the config file")?;
    let mut b = Endpoint::builder()
        .state_dir(state_dir)
        .bind_ip(IpAddr::from([127, 0, 0, 1]));
    if let Some(secret) = crate::network_secret(args.network_secret_file.as_deref(), config)? {
        b = b.network_secret(secret);
    }
    let endpoint = b.bind().await?;
    let json = endpoint
        .query_hub(Some(&target))
        .await
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot get the status of hub {target}"))?;
    let report: Value =
        serde_json::from_str(&json).context("the hub sent a status report that is not JSON")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
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
        });
        let text = render(&r);
        for want in [
            "hub     H",
            "P  -  dialled",
            "Q  via P  hops 2",
            "N  from 198.51.100.2:5",
            "nodes on other hubs: 4",
            "refused=0",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        let empty = render(&serde_json::json!({}));
        assert!(empty.contains("routes (0)"));
    }
}
