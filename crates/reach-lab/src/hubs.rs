//! Hubs for the reach-mode matrix, placed and linked as the topology's
//! `[hubs]` table says.
//!
//! Every hub's identity is created first (`reach id`), so each can be started
//! with its peers' NodeIds; then the hubs start, each in its host's namespace
//! on [`HUB_PORT`]. A link to a hub with a public address dials that address;
//! an `ssh` link runs through the lab's ssh client key to the site's ssh entry
//! (the public address, or the NAT's port forward), exactly as a user of the
//! real site would. Every matrix host attaches to its own site's hub, or to
//! the one `attach` names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::apply::LabError;
use crate::lab::{Lab, Process};
use crate::topology::{Hubs, Topology};

/// The TCP port lab hubs listen on unless the topology says (`[hubs] port`).
pub const HUB_PORT: u16 = 7700;

/// Running hubs, and which hub each matrix host attaches to.
pub struct HubSet {
    /// The hub processes by host (killed when dropped).
    procs: BTreeMap<String, Process>,
    /// Each hub's command line after `reach`, to restart it alike.
    args: BTreeMap<String, Vec<std::ffi::OsString>>,
    /// Hub host name to its NodeId.
    ids: BTreeMap<String, String>,
    /// Matrix host name to `NODEID@IP:PORT` of its hub.
    pub attach: BTreeMap<String, String>,
    /// Hub host name to its state directory (logs live there).
    pub dirs: BTreeMap<String, PathBuf>,
    /// The TCP port the hubs listen on.
    pub port: u16,
}

/// Starts the hubs of `hubs` in `lab`, with state under `state`.
pub fn start(
    lab: &Lab,
    topology: &Topology,
    hubs: &Hubs,
    tools: &Path,
    state: &Path,
) -> Result<HubSet, LabError> {
    let reach = tools.join("reach");
    let mut ids = BTreeMap::new();
    let mut dirs = BTreeMap::new();
    for h in &hubs.hosts {
        let dir = state.join(format!("hub-{h}"));
        std::fs::create_dir_all(&dir)?;
        let out = std::process::Command::new(&reach)
            .arg("--state-dir")
            .arg(&dir)
            .arg("id")
            .output()?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: format!("reach id for hub {h}"),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        ids.insert(
            h.clone(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        );
        dirs.insert(h.clone(), dir);
    }
    let ssh_dir = lab.record().state_dir().join("ssh");
    // The federation's hub secret: hubs that learn of each other by gossip
    // link directly only if they prove it (configured links are admitted
    // by NodeId below).
    let hub_secret = state.join("hub.secret");
    let mut secret = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut secret)?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&hub_secret, hex + "\n")?;
    let mut set = HubSet {
        procs: BTreeMap::new(),
        args: BTreeMap::new(),
        ids: BTreeMap::new(),
        attach: BTreeMap::new(),
        dirs: dirs.clone(),
        port: hubs.port.unwrap_or(HUB_PORT),
    };
    for h in &hubs.hosts {
        let dir = &dirs[h];
        let mut args: Vec<std::ffi::OsString> = vec!["--state-dir".into(), dir.into()];
        for a in [
            "-v",
            "hub",
            "--tcp-port",
            &set.port.to_string(),
            "--addr-file",
        ] {
            args.push(a.into());
        }
        args.push(dir.join("hub.txt").into());
        args.extend(["--hub-secret-file".into(), hub_secret.clone().into()]);
        // A multi-homed hub is reached at its public address from other
        // sites; its LAN address is a second source for dial-backs
        // (`reach doctor`'s filtering check).
        if lab.host(h).public.is_some() {
            args.extend([
                "--dial-back-from".into(),
                lab.host(h).lan.to_string().into(),
            ]);
        }
        for link in hubs.links.iter().filter(|l| &l.from == h) {
            let peer = peer_spec(
                lab,
                topology,
                (&ids[&link.to], set.port),
                h,
                &link.to,
                link.ssh,
            )?;
            args.extend(["--peer".into(), peer.into()]);
        }
        // Links dialled by the other side are admitted by key.
        for link in hubs.links.iter().filter(|l| &l.to == h) {
            args.extend(["--allow-hub".into(), ids[&link.from].clone().into()]);
        }
        if hubs.links.iter().any(|l| &l.from == h && l.ssh) {
            for arg in crate::sshd::client_args(&ssh_dir) {
                args.push(format!("--ssh-arg={arg}").into());
            }
        }
        set.args.insert(h.clone(), args);
        set.spawn(lab, tools, h)?;
    }
    for h in &hubs.hosts {
        set.wait_ready(h)?;
    }
    set.ids = ids;
    let mut attach = BTreeMap::new();
    for node in &lab.record().matrix {
        let hub = match hubs.attach.get(node) {
            Some(hub) => Some(hub.clone()),
            None => {
                let site = &lab.host(node).site;
                hubs.hosts
                    .iter()
                    .find(|h| &lab.host(h).site == site)
                    .cloned()
            }
        };
        let Some(hub) = hub else {
            continue;
        };
        if let Some(target) = set.target(lab, node, &hub) {
            attach.insert(node.clone(), target);
        }
    }
    set.attach = attach;
    Ok(set)
}

impl HubSet {
    /// The process id of the hub of `host`, while it runs.
    pub fn pid(&self, host: &str) -> Option<u32> {
        self.procs.get(host).map(Process::id)
    }

    /// `NODEID@IP:PORT` of the hub of host `hub`, as host `from` reaches it.
    pub fn target(&self, lab: &Lab, from: &str, hub: &str) -> Option<String> {
        let id = self.ids.get(hub)?;
        let at = std::net::SocketAddr::new(address_from(lab, from, hub), self.port);
        Some(format!("{id}@{at}"))
    }

    /// Starts (or restarts) the hub of `host` with its command line.
    fn spawn(&mut self, lab: &Lab, tools: &Path, host: &str) -> Result<(), LabError> {
        let dir = &self.dirs[host];
        let _ = std::fs::remove_file(dir.join("hub.txt"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("hub.log"))?;
        let child = lab
            .command(host, tools.join("reach"))
            .args(&self.args[host])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.procs.insert(host.to_string(), Process::new(child));
        Ok(())
    }

    /// Waits until the hub of `host` says where it listens.
    fn wait_ready(&self, host: &str) -> Result<(), LabError> {
        let file = self.dirs[host].join("hub.txt");
        if crate::wait::for_file(&file, Duration::from_secs(20)).is_none() {
            return Err(LabError::Command {
                command: format!("reach hub in {host}"),
                output: std::fs::read_to_string(self.dirs[host].join("hub.log"))
                    .unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Kills the hub of `host` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, host: &str) {
        self.procs.remove(host);
    }

    /// Starts the hub of `host` again, with the same identity and flags, and
    /// waits until it listens.
    pub fn restart(&mut self, lab: &Lab, tools: &Path, host: &str) -> Result<(), LabError> {
        self.spawn(lab, tools, host)?;
        self.wait_ready(host)
    }

    /// Waits until every hub's directory holds `nodes` nodes (attached or
    /// learned from other hubs): the hubs have linked and gossiped. Each
    /// hub is asked with `reach status` from its own host.
    pub fn wait_converged(
        &self,
        lab: &Lab,
        tools: &Path,
        nodes: usize,
        timeout: Duration,
    ) -> Result<(), LabError> {
        let mut last = BTreeMap::new();
        let converged = crate::wait::until(timeout, || {
            for (host, id) in &self.ids {
                let known = self.known_nodes(lab, tools, host, id);
                last.insert(host.clone(), known.clone());
                if known.ok()? < nodes {
                    return None;
                }
            }
            Some(())
        });
        converged.ok_or_else(|| LabError::Command {
            command: format!("waiting for every hub to know all {nodes} nodes"),
            output: last
                .iter()
                .map(|(h, k)| match k {
                    Ok(n) => format!("{h}: {n} nodes"),
                    Err(e) => format!("{h}: {e}"),
                })
                .collect::<Vec<_>>()
                .join("; "),
        })
    }

    /// How many nodes hub `host` knows: attached plus on other hubs.
    fn known_nodes(&self, lab: &Lab, tools: &Path, host: &str, id: &str) -> Result<usize, String> {
        let v = self.status_of(lab, tools, host, id)?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0) as usize;
        Ok(n("nodes_attached") + n("remote_nodes"))
    }

    /// The JSON status report of the hub of `host` (`reach status --json`,
    /// run in `host`).
    pub fn status(&self, lab: &Lab, tools: &Path, host: &str) -> Result<serde_json::Value, String> {
        self.status_of(lab, tools, host, &self.ids[host])
    }

    fn status_of(
        &self,
        lab: &Lab,
        tools: &Path,
        host: &str,
        id: &str,
    ) -> Result<serde_json::Value, String> {
        let out = lab
            .command(host, tools.join("reach"))
            .arg("--state-dir")
            .arg(self.dirs[host].join("status-client"))
            .args(["status", "--json", "--hub"])
            .arg(format!("{id}@127.0.0.1:{}", self.port))
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok(v["hub"].clone())
    }
}

/// The address `from` uses to reach hub host `hub`: its LAN address within a
/// site, its public address across sites; an IPv6-only host uses the hub's
/// IPv6 address (routed from anywhere: there is no IPv6 NAT).
fn address_from(lab: &Lab, from: &str, hub: &str) -> std::net::IpAddr {
    let h = lab.host(hub);
    if let (false, Some(v6)) = (lab.host(from).ipv4, h.lan6) {
        return v6.into();
    }
    if lab.host(from).site == h.site {
        h.lan.into()
    } else {
        h.public.unwrap_or(h.gateway).into()
    }
}

/// The `--peer` argument for a link from hub host `from` to hub host `to`
/// with NodeId `id` (within a site over the LAN, so a non-routed hub can
/// link to its site's front-end).
fn peer_spec(
    lab: &Lab,
    topology: &Topology,
    (id, port): (&str, u16),
    from: &str,
    to: &str,
    ssh: bool,
) -> Result<String, LabError> {
    if !ssh {
        let at = std::net::SocketAddr::new(address_from(lab, from, to), port);
        return Ok(format!("{id}@{at}"));
    }
    let site = topology.site_of(to).ok_or_else(|| LabError::Command {
        command: format!("hub link to {to}"),
        output: "no such host in the topology".into(),
    })?;
    let entry = crate::verify::ssh_entry(site, lab.host(to)).ok_or_else(|| LabError::Command {
        command: format!("ssh hub link to {to}"),
        output: format!(
            "site {} has no ssh entry to {to} (sshd on it, and port 22 open or forwarded)",
            site.name
        ),
    })?;
    // Inside the tunnel the hub is on the ssh server's own host.
    Ok(format!(
        "{id}@127.0.0.1:{port},ssh=root@{}:{}",
        entry.ip(),
        entry.port()
    ))
}
