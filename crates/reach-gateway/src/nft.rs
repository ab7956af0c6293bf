//! The kernel's side of the mappings: the gateway's own nftables table,
//! written through nft's JSON interface (`nft -j -f -`), one batch (one
//! transaction) per call. Each mapping is two rules: a DNAT in the
//! `prerouting` chain and the matching accept in `forward`, both carrying
//! the comment `reach-gateway PROTO PORT INTERNAL`, by which the table is
//! read back. Nothing outside this table is ever touched.
//!
//! ```text
//! table ip reach_gateway
//!   chain prerouting (nat, priority dstnat)
//!     iifname WAN tcp dport 40001 dnat to 10.0.0.5:22 comment "reach-gateway tcp 40001 10.0.0.5:22"
//!   chain forward (filter, priority filter)
//!     iifname WAN ip daddr 10.0.0.5 tcp dport 22 ct status dnat accept comment "..."
//! ```
//!
//! The accept lets the forwarded connections through where this table's
//! chain is the one that decides; a host firewall with its own forward
//! chain that drops must accept DNATed connections too (`ct status dnat
//! accept`), as nftables gives every base chain its say.

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::table::{Key, Mapping, Protocol};

/// The table's name unless told otherwise.
pub const TABLE: &str = "reach_gateway";
const PREROUTING: &str = "prerouting";
const FORWARD: &str = "forward";
const TAG: &str = "reach-gateway";

/// Why the kernel table could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be run.
    #[error("cannot run {nft}: {source} (install nftables)")]
    Spawn {
        /// The program.
        nft: String,
        /// Why.
        source: std::io::Error,
    },
    /// `nft` refused the batch or the listing.
    #[error("nft failed: {0}")]
    Failed(String),
    /// Its output is not the JSON it documents.
    #[error("cannot read nft's JSON: {0}")]
    Output(String),
}

/// A rule of the gateway's table, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its chain.
    pub chain: String,
    /// Its handle (for deleting it).
    pub handle: u64,
    /// Its comment.
    pub comment: String,
}

impl Rule {
    /// The mapping its comment names, if it is one of the gateway's.
    pub fn mapping(&self) -> Option<(Key, SocketAddrV4)> {
        parse_comment(&self.comment)
    }
}

/// The comment that names a mapping's rules.
pub fn comment(m: &Mapping) -> String {
    format!("{TAG} {} {} {}", m.protocol, m.external_port, m.internal)
}

fn parse_comment(c: &str) -> Option<(Key, SocketAddrV4)> {
    let mut w = c.split(' ');
    if w.next()? != TAG {
        return None;
    }
    let protocol = match w.next()? {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    let port = w.next()?.parse().ok()?;
    let internal = w.next()?.parse().ok()?;
    w.next().is_none().then_some(((protocol, port), internal))
}

/// What a reconciliation does: rules to add (per mapping) and rules to
/// delete. A mapping counts as present only when both its rules are, with
/// its exact comment; anything else in the table goes.
pub fn plan(desired: &[Mapping], actual: &[Rule]) -> (Vec<Mapping>, Vec<Rule>) {
    let present = |chain: &str| -> HashSet<&str> {
        actual
            .iter()
            .filter(|r| r.chain == chain)
            .map(|r| r.comment.as_str())
            .collect()
    };
    let (pre, fwd) = (present(PREROUTING), present(FORWARD));
    let mut keep = HashSet::new();
    let mut add = Vec::new();
    for m in desired {
        let c = comment(m);
        if pre.contains(c.as_str()) && fwd.contains(c.as_str()) {
            keep.insert(c);
        } else {
            add.push(*m);
        }
    }
    let mut seen = HashSet::new();
    let delete = actual
        .iter()
        // One rule per chain and comment is kept; duplicates go.
        .filter(|r| {
            !(keep.contains(&r.comment) && seen.insert((r.chain.clone(), r.comment.clone())))
        })
        .cloned()
        .collect();
    (add, delete)
}

/// The gateway's nftables table.
#[derive(Clone, Debug)]
pub struct Kernel {
    nft: PathBuf,
    table: String,
    wan: String,
}

impl Kernel {
    /// The table `table` forwarding from interface `wan`.
    pub fn new(table: impl Into<String>, wan: impl Into<String>) -> Self {
        Self {
            nft: PathBuf::from("nft"),
            table: table.into(),
            wan: wan.into(),
        }
    }

    fn run(&self, args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>, NftError> {
        let mut cmd = Command::new(&self.nft);
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| NftError::Spawn {
            nft: self.nft.display().to_string(),
            source,
        })?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(input)
                .map_err(|e| NftError::Failed(format!("writing the batch: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| NftError::Failed(e.to_string()))?;
        if !out.status.success() {
            return Err(NftError::Failed(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(out.stdout)
    }

    fn batch(&self, commands: Vec<Value>) -> Result<(), NftError> {
        if commands.is_empty() {
            return Ok(());
        }
        let doc = json!({ "nftables": commands });
        self.run(&["-j", "-f", "-"], Some(doc.to_string().as_bytes()))
            .map(|_| ())
    }

    /// Creates the table and its two chains if they are not there (a
    /// table that is there is left as it is).
    pub fn ensure(&self) -> Result<(), NftError> {
        let t = &self.table;
        self.batch(vec![
            json!({"add": {"table": {"family": "ip", "name": t}}}),
            json!({"add": {"chain": {"family": "ip", "table": t, "name": PREROUTING,
                "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}}}),
            json!({"add": {"chain": {"family": "ip", "table": t, "name": FORWARD,
                "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}),
        ])
    }

    /// Removes the table and everything in it.
    pub fn remove(&self) -> Result<(), NftError> {
        self.batch(vec![
            json!({"delete": {"table": {"family": "ip", "name": &self.table}}}),
        ])
    }

    /// The table's rules.
    pub fn list(&self) -> Result<Vec<Rule>, NftError> {
        let out = self.run(&["-j", "list", "table", "ip", &self.table], None)?;
        let doc: Value =
            serde_json::from_slice(&out).map_err(|e| NftError::Output(e.to_string()))?;
        let items = doc["nftables"]
            .as_array()
            .ok_or_else(|| NftError::Output("no nftables array".into()))?;
        Ok(items
            .iter()
            .filter_map(|i| i.get("rule"))
            .filter_map(|r| {
                Some(Rule {
                    chain: r["chain"].as_str()?.to_string(),
                    handle: r["handle"].as_u64()?,
                    comment: r["comment"].as_str().unwrap_or_default().to_string(),
                })
            })
            .collect())
    }

    /// Adds the rules of `add` and deletes `delete`, in one transaction:
    /// all of it happens or none.
    pub fn apply(&self, add: &[Mapping], delete: &[Rule]) -> Result<(), NftError> {
        let t = &self.table;
        let mut cmds: Vec<Value> = delete
            .iter()
            .map(|r| {
                json!({"delete": {"rule": {"family": "ip", "table": t, "chain": r.chain, "handle": r.handle}}})
            })
            .collect();
        for m in add {
            let c = comment(m);
            let proto = m.protocol.name();
            let iif = json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": &self.wan}});
            cmds.push(json!({"add": {"rule": {"family": "ip", "table": t, "chain": PREROUTING, "comment": c, "expr": [
                iif,
                {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "dport"}}, "right": m.external_port}},
                {"dnat": {"addr": m.internal.ip().to_string(), "port": m.internal.port()}},
            ]}}}));
            cmds.push(json!({"add": {"rule": {"family": "ip", "table": t, "chain": FORWARD, "comment": c, "expr": [
                iif,
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": m.internal.ip().to_string()}},
                {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "dport"}}, "right": m.internal.port()}},
                {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                {"accept": null},
            ]}}}));
        }
        self.batch(cmds)
    }

    /// Deletes the rules of mappings `gone` (looked up by comment).
    pub fn delete(&self, gone: &[Mapping]) -> Result<(), NftError> {
        if gone.is_empty() {
            return Ok(());
        }
        let comments: HashSet<String> = gone.iter().map(comment).collect();
        let rules: Vec<Rule> = self
            .list()?
            .into_iter()
            .filter(|r| comments.contains(&r.comment))
            .collect();
        self.apply(&[], &rules)
    }

    /// Makes the table hold exactly `desired`'s rules; returns how many
    /// mappings were added and rules deleted.
    pub fn reconcile(&self, desired: &[Mapping]) -> Result<(usize, usize), NftError> {
        self.ensure()?;
        let (add, delete) = plan(desired, &self.list()?);
        self.apply(&add, &delete)?;
        Ok((add.len(), delete.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Source;

    fn m(port: u16) -> Mapping {
        Mapping {
            protocol: Protocol::Udp,
            external_port: port,
            internal: "10.0.0.5:5000".parse().unwrap(),
            client: "10.0.0.5".parse().unwrap(),
            expires: 9,
            source: Source::NatPmp,
            nonce: None,
        }
    }

    fn rule(chain: &str, handle: u64, comment: &str) -> Rule {
        Rule {
            chain: chain.into(),
            handle,
            comment: comment.into(),
        }
    }

    #[test]
    fn comments_name_the_mapping_and_nothing_else_parses() {
        let c = comment(&m(40001));
        assert_eq!(c, "reach-gateway udp 40001 10.0.0.5:5000");
        assert_eq!(
            rule(PREROUTING, 1, &c).mapping(),
            Some(((Protocol::Udp, 40001), "10.0.0.5:5000".parse().unwrap()))
        );
        for bad in [
            "",
            "reach-gateway",
            "reach-gateway sctp 1 10.0.0.5:1",
            "reach-gateway tcp 1 10.0.0.5:1 x",
            "other tcp 1 10.0.0.5:1",
        ] {
            assert_eq!(rule(PREROUTING, 1, bad).mapping(), None, "{bad}");
        }
    }

    #[test]
    fn reconciling_adds_what_is_missing_and_deletes_the_rest() {
        let (a, b, c) = (m(1), m(2), m(3));
        let actual = vec![
            // a: complete.
            rule(PREROUTING, 1, &comment(&a)),
            rule(FORWARD, 2, &comment(&a)),
            // a's DNAT twice: the duplicate goes.
            rule(PREROUTING, 3, &comment(&a)),
            // b: only its DNAT (a crash between two batches cannot do it,
            // but a hand edit can): deleted and added whole.
            rule(PREROUTING, 4, &comment(&b)),
            // A mapping the table no longer holds.
            rule(PREROUTING, 5, &comment(&m(9))),
            rule(FORWARD, 6, &comment(&m(9))),
            // Something else in the gateway's own table.
            rule(FORWARD, 7, "hand made"),
        ];
        let (add, delete) = plan(&[a, b, c], &actual);
        assert_eq!(add, [b, c]);
        let handles: Vec<u64> = delete.iter().map(|r| r.handle).collect();
        assert_eq!(handles, [3, 4, 5, 6, 7]);
        // Applied, the plan is empty.
        let after = vec![
            rule(PREROUTING, 1, &comment(&a)),
            rule(FORWARD, 2, &comment(&a)),
            rule(PREROUTING, 8, &comment(&b)),
            rule(FORWARD, 9, &comment(&b)),
            rule(PREROUTING, 10, &comment(&c)),
            rule(FORWARD, 11, &comment(&c)),
        ];
        assert_eq!(plan(&[a, b, c], &after), (vec![], vec![]));
    }
}
