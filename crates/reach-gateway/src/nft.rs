//! The kernel's side of the mappings: the gateway's own nftables table,
//! written through nft's JSON interface (`nft -j -f -`), one batch (one
//! transaction) per call. The forwards live in maps and sets, not in a
//! rule each: two fixed rules look the packet up, and a mapping is one
//! map element (its DNAT) and one set element (its accept), added and
//! deleted by key, so a change costs the same with 10 mappings or 10000.
//! Nothing outside this table is ever touched.
//!
//! ```text
//! table ip reach_gateway
//!   map tcp_fwd { inet_service : ipv4_addr . inet_service }   40001 : 10.0.0.5 . 22
//!   set tcp_in  { ipv4_addr . inet_service }                  10.0.0.5 . 22
//!   (udp_fwd, udp_in alike)
//!   chain prerouting (nat, priority dstnat)
//!     iifname WAN dnat ip to tcp dport map @tcp_fwd
//!   chain forward (filter, priority filter)
//!     iifname WAN ip daddr . tcp dport @tcp_in ct status dnat accept
//! ```
//!
//! The accept lets the forwarded connections through where this table's
//! chain is the one that decides; a host firewall with its own forward
//! chain that drops must accept DNATed connections too (`ct status dnat
//! accept`), as nftables gives every base chain its say.

use std::collections::{BTreeMap, BTreeSet};
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
/// The comment on the table's fixed rules.
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

/// What the kernel's table holds: the forwards by external port, and the
/// internal endpoints forwarded connections are accepted to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// External port to internal endpoint.
    pub forwards: BTreeMap<Key, SocketAddrV4>,
    /// Internal endpoints accepted.
    pub accepted: BTreeSet<(Protocol, SocketAddrV4)>,
}

impl Held {
    /// What `mappings` need.
    pub fn of(mappings: &[Mapping]) -> Self {
        Self {
            forwards: mappings
                .iter()
                .map(|m| ((m.protocol, m.external_port), m.internal))
                .collect(),
            accepted: mappings.iter().map(|m| (m.protocol, m.internal)).collect(),
        }
    }
}

/// What turns one [`Held`] into another: elements to add and to delete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Forwards to add (or replace: a changed one is deleted first).
    pub add_forwards: Vec<(Key, SocketAddrV4)>,
    /// Forwards to delete, by key.
    pub del_forwards: Vec<Key>,
    /// Accepts to add.
    pub add_accepted: Vec<(Protocol, SocketAddrV4)>,
    /// Accepts to delete.
    pub del_accepted: Vec<(Protocol, SocketAddrV4)>,
}

impl Plan {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.add_forwards.is_empty()
            && self.del_forwards.is_empty()
            && self.add_accepted.is_empty()
            && self.del_accepted.is_empty()
    }
}

/// The changes that make `actual` into `desired`.
pub fn plan(desired: &Held, actual: &Held) -> Plan {
    let mut p = Plan::default();
    for (k, to) in &desired.forwards {
        match actual.forwards.get(k) {
            Some(have) if have == to => {}
            Some(_) => {
                p.del_forwards.push(*k);
                p.add_forwards.push((*k, *to));
            }
            None => p.add_forwards.push((*k, *to)),
        }
    }
    p.del_forwards.extend(
        actual
            .forwards
            .keys()
            .filter(|k| !desired.forwards.contains_key(k)),
    );
    p.add_accepted = desired
        .accepted
        .difference(&actual.accepted)
        .copied()
        .collect();
    p.del_accepted = actual
        .accepted
        .difference(&desired.accepted)
        .copied()
        .collect();
    p
}

fn names(protocol: Protocol) -> (&'static str, &'static str) {
    match protocol {
        Protocol::Tcp => ("tcp_fwd", "tcp_in"),
        Protocol::Udp => ("udp_fwd", "udp_in"),
    }
}

fn endpoint(a: &SocketAddrV4) -> Value {
    json!({"concat": [a.ip().to_string(), a.port()]})
}

/// Reads `{"concat": [IP, PORT]}`.
fn read_endpoint(v: &Value) -> Option<SocketAddrV4> {
    let c = v.get("concat")?.as_array()?;
    let ip = c.first()?.as_str()?.parse().ok()?;
    let port = u16::try_from(c.get(1)?.as_u64()?).ok()?;
    Some(SocketAddrV4::new(ip, port))
}

/// The gateway's nftables table.
#[derive(Clone, Debug)]
pub struct Kernel {
    nft: PathBuf,
    table: String,
    wan: String,
    /// What the table holds, as listed at start and changed since.
    held: Held,
}

impl Kernel {
    /// The table `table` forwarding from interface `wan`.
    pub fn new(table: impl Into<String>, wan: impl Into<String>) -> Self {
        Self {
            nft: PathBuf::from("nft"),
            table: table.into(),
            wan: wan.into(),
            held: Held::default(),
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

    /// Reads the table: its forwards and accepts, and whether its fixed
    /// rules are there (None: no table).
    fn read(&self) -> Result<Option<(Held, usize)>, NftError> {
        let out = match self.run(&["-j", "list", "table", "ip", &self.table], None) {
            Ok(out) => out,
            Err(NftError::Failed(e)) if e.contains("No such file or directory") => return Ok(None),
            Err(e) => return Err(e),
        };
        let doc: Value =
            serde_json::from_slice(&out).map_err(|e| NftError::Output(e.to_string()))?;
        let items = doc["nftables"]
            .as_array()
            .ok_or_else(|| NftError::Output("no nftables array".into()))?;
        let mut held = Held::default();
        let mut rules = 0;
        for item in items {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let (fwd, inb) = names(protocol);
                if let Some(map) = item.get("map").filter(|m| m["name"] == fwd) {
                    for e in map["elem"].as_array().into_iter().flatten() {
                        let port = e
                            .get(0)
                            .and_then(Value::as_u64)
                            .and_then(|p| u16::try_from(p).ok());
                        if let (Some(port), Some(to)) = (port, e.get(1).and_then(read_endpoint)) {
                            held.forwards.insert((protocol, port), to);
                        }
                    }
                }
                if let Some(set) = item.get("set").filter(|s| s["name"] == inb) {
                    for e in set["elem"].as_array().into_iter().flatten() {
                        if let Some(to) = read_endpoint(e) {
                            held.accepted.insert((protocol, to));
                        }
                    }
                }
            }
            if item.get("rule").is_some_and(|r| r["comment"] == TAG) {
                rules += 1;
            }
        }
        Ok(Some((held, rules)))
    }

    /// Runs nft's text syntax (the table's skeleton: nft 1.0's JSON input
    /// cannot declare a map whose values are concatenations).
    fn script(&self, text: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], Some(text.as_bytes())).map(|_| ())
    }

    /// Creates the table, its maps, sets, chains and fixed rules where
    /// they are missing (a table that is whole is left as it is), and
    /// reads what it holds.
    pub fn ensure(&mut self) -> Result<(), NftError> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.@:".contains(c))
        };
        if !name_ok(&self.wan) || !name_ok(&self.table) {
            return Err(NftError::Failed(format!(
                "bad interface or table name {:?} / {:?}",
                self.wan, self.table
            )));
        }
        let t = &self.table;
        // Declarations add what is missing and keep what is there
        // (elements included).
        self.script(&format!(
            "table ip {t} {{\n\
             map tcp_fwd {{ type inet_service : ipv4_addr . inet_service; }}\n\
             map udp_fwd {{ type inet_service : ipv4_addr . inet_service; }}\n\
             set tcp_in {{ type ipv4_addr . inet_service; }}\n\
             set udp_in {{ type ipv4_addr . inet_service; }}\n\
             chain {PREROUTING} {{ type nat hook prerouting priority -100; policy accept; }}\n\
             chain {FORWARD} {{ type filter hook forward priority 0; policy accept; }}\n\
             }}\n"
        ))?;
        let (held, rules) = self.read()?.unwrap_or_default();
        if rules != 4 {
            // Missing or changed by hand: the fixed rules are put back whole.
            let wan = &self.wan;
            let mut text =
                format!("flush chain ip {t} {PREROUTING}\nflush chain ip {t} {FORWARD}\n");
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let (fwd, inb) = names(protocol);
                let p = protocol.name();
                text += &format!(
                    "add rule ip {t} {PREROUTING} iifname \"{wan}\" dnat ip to {p} dport map @{fwd} comment \"{TAG}\"\n\
                     add rule ip {t} {FORWARD} iifname \"{wan}\" ip daddr . {p} dport @{inb} ct status dnat accept comment \"{TAG}\"\n"
                );
            }
            self.script(&text)?;
        }
        self.held = held;
        Ok(())
    }

    /// Applies `p` in one transaction: all of it happens or none.
    pub fn apply(&mut self, p: &Plan) -> Result<(), NftError> {
        if p.is_empty() {
            return Ok(());
        }
        let t = &self.table;
        let element = |op: &str, name: &str, elem: Vec<Value>| json!({op: {"element": {"family": "ip", "table": t, "name": name, "elem": elem}}});
        let mut cmds = Vec::new();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let (fwd, inb) = names(protocol);
            let del: Vec<Value> = p
                .del_forwards
                .iter()
                .filter(|k| k.0 == protocol)
                .map(|k| json!(k.1))
                .collect();
            let add: Vec<Value> = p
                .add_forwards
                .iter()
                .filter(|(k, _)| k.0 == protocol)
                .map(|(k, to)| json!([k.1, endpoint(to)]))
                .collect();
            let del_in: Vec<Value> = p
                .del_accepted
                .iter()
                .filter(|a| a.0 == protocol)
                .map(|a| endpoint(&a.1))
                .collect();
            let add_in: Vec<Value> = p
                .add_accepted
                .iter()
                .filter(|a| a.0 == protocol)
                .map(|a| endpoint(&a.1))
                .collect();
            for (op, name, elems) in [
                ("delete", fwd, del),
                ("add", fwd, add),
                ("delete", inb, del_in),
                ("add", inb, add_in),
            ] {
                if !elems.is_empty() {
                    cmds.push(element(op, name, elems));
                }
            }
        }
        self.batch(cmds)?;
        for k in &p.del_forwards {
            self.held.forwards.remove(k);
        }
        for (k, to) in &p.add_forwards {
            self.held.forwards.insert(*k, *to);
        }
        for a in &p.del_accepted {
            self.held.accepted.remove(a);
        }
        self.held.accepted.extend(p.add_accepted.iter().copied());
        Ok(())
    }

    /// Adds the forwards of `add` and deletes those of `delete` (an accept
    /// goes only when no forward left needs it), in one transaction.
    pub fn change(&mut self, add: &[Mapping], delete: &[Mapping]) -> Result<(), NftError> {
        let mut want = self.held.clone();
        for m in delete {
            want.forwards.remove(&(m.protocol, m.external_port));
        }
        for m in add {
            want.forwards
                .insert((m.protocol, m.external_port), m.internal);
        }
        want.accepted = want.forwards.iter().map(|(k, to)| (k.0, *to)).collect();
        self.apply(&plan(&want, &self.held))
    }

    /// Makes the table hold exactly `desired`'s forwards; returns how
    /// many elements were added and deleted.
    pub fn reconcile(&mut self, desired: &[Mapping]) -> Result<(usize, usize), NftError> {
        self.ensure()?;
        let p = plan(&Held::of(desired), &self.held);
        self.apply(&p)?;
        Ok((
            p.add_forwards.len() + p.add_accepted.len(),
            p.del_forwards.len() + p.del_accepted.len(),
        ))
    }

    /// Reads the table again (after a transaction failed: it may have
    /// been changed by hand).
    pub fn refresh(&mut self) -> Result<(), NftError> {
        self.held = self.read()?.map(|(h, _)| h).unwrap_or_default();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Source;

    fn m(port: u16, to: &str) -> Mapping {
        Mapping {
            protocol: Protocol::Udp,
            external_port: port,
            internal: to.parse().unwrap(),
            client: "10.0.0.5".parse().unwrap(),
            expires: 9,
            source: Source::NatPmp,
            nonce: None,
        }
    }

    #[test]
    fn reconciling_adds_what_is_missing_and_deletes_the_rest() {
        let (a, b, c) = (m(1, "10.0.0.5:1"), m(2, "10.0.0.5:2"), m(3, "10.0.0.6:3"));
        let mut actual = Held::of(&[a, m(2, "10.0.0.9:9"), m(7, "10.0.0.7:7")]);
        // An accept no forward needs.
        actual
            .accepted
            .insert((Protocol::Tcp, "10.0.0.8:8".parse().unwrap()));
        let p = plan(&Held::of(&[a, b, c]), &actual);
        // b's forward changed: deleted and added; c's new; 7's gone.
        assert_eq!(
            p.add_forwards,
            [
                ((Protocol::Udp, 2), b.internal),
                ((Protocol::Udp, 3), c.internal)
            ]
        );
        assert_eq!(p.del_forwards, [(Protocol::Udp, 2), (Protocol::Udp, 7)]);
        assert_eq!(
            p.add_accepted,
            [(Protocol::Udp, b.internal), (Protocol::Udp, c.internal)]
        );
        assert_eq!(p.del_accepted.len(), 3);
        // Done, nothing is left to do.
        assert!(plan(&Held::of(&[a, b, c]), &Held::of(&[a, b, c])).is_empty());
    }

    #[test]
    fn an_accept_stays_while_another_forward_needs_it() {
        let mut k = Kernel::new("t", "wan");
        let (x, y) = (m(1, "10.0.0.5:22"), m(2, "10.0.0.5:22"));
        k.held = Held::of(&[x, y]);
        let mut want = k.held.clone();
        want.forwards.remove(&(Protocol::Udp, 1));
        want.accepted = want.forwards.iter().map(|(k, to)| (k.0, *to)).collect();
        let p = plan(&want, &k.held);
        assert_eq!(p.del_forwards, [(Protocol::Udp, 1)]);
        assert!(p.del_accepted.is_empty(), "{p:?}");
    }

    #[test]
    fn elements_read_back_as_written() {
        let a: SocketAddrV4 = "10.0.0.5:22".parse().unwrap();
        assert_eq!(read_endpoint(&endpoint(&a)), Some(a));
        assert_eq!(read_endpoint(&json!({"concat": ["x", 1]})), None);
        assert_eq!(read_endpoint(&json!({"concat": ["10.0.0.5", 70000]})), None);
    }
}
