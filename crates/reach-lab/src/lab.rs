//! A running lab: its namespaces, its hosts, and its teardown.
//!
//! `Lab::up` gives each lab a unique prefix (`rl` + 5 characters), so tests and
//! users run labs side by side, and records it in the registry directory
//! (`/run/reach-lab`) so the CLI can find it and `down --all` can clean up after
//! a crash. Dropping a `Lab` (also during a panic) kills the processes inside
//! its namespaces and deletes them, unless it was made persistent with
//! [`Lab::persist`] (what `reach-lab up` does).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::apply::{self, LabError};
use crate::plan::{plan, HostAddrs};
use crate::topology::Topology;

/// Every lab prefix starts with this.
pub const PREFIX_START: &str = "rl";

/// Where running labs are recorded.
pub fn registry_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("REACH_LAB_REGISTRY").unwrap_or_else(|| "/run/reach-lab".into()))
}

/// What the registry keeps about a lab.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabRecord {
    /// The namespace prefix.
    pub prefix: String,
    /// The topology's name.
    pub topology: String,
    /// Every namespace name (with prefix).
    pub namespaces: Vec<String>,
    /// The hosts.
    pub hosts: Vec<HostAddrs>,
    /// The observers on the internet (see `plan::OBSERVERS`).
    #[serde(default)]
    pub observers: Vec<HostAddrs>,
    /// The hosts `reach-lab matrix` pairs up.
    #[serde(default)]
    pub matrix: Vec<String>,
}

impl LabRecord {
    /// The host (or observer) named `name`.
    pub fn host(&self, name: &str) -> Option<&HostAddrs> {
        self.hosts
            .iter()
            .chain(&self.observers)
            .find(|h| h.name == name)
    }

    /// The full namespace name of a host.
    pub fn host_ns(&self, host: &HostAddrs) -> String {
        format!("{}-{}", self.prefix, host.ns)
    }

    /// All labs in the registry.
    pub fn all() -> Vec<LabRecord> {
        let Ok(dir) = std::fs::read_dir(registry_dir()) else {
            return Vec::new();
        };
        let mut labs: Vec<LabRecord> = dir
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect();
        labs.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        labs
    }

    fn path(&self) -> PathBuf {
        registry_dir().join(format!("{}.json", self.prefix))
    }

    /// The lab's own state directory (ssh keys, logs).
    pub fn state_dir(&self) -> PathBuf {
        registry_dir().join(format!("{}.d", self.prefix))
    }

    /// An `ssh` command run from `from` with the lab's client key; add the
    /// destination and arguments.
    pub fn ssh(&self, from: &str) -> Option<Command> {
        let host = self.host(from)?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host_ns(host), "ssh"])
            .args(crate::sshd::client_args(&self.state_dir().join("ssh")));
        Some(c)
    }

    /// Deletes the lab's namespaces (killing their processes) and its record.
    pub fn tear_down(&self) {
        for ns in self.namespaces.iter().rev() {
            apply::remove_namespace(ns);
        }
        // REACH_LAB_KEEP keeps the lab's files (logs, state, transfer data)
        // for a look after a failure; the namespaces go anyway.
        if std::env::var_os("REACH_LAB_KEEP").is_some() {
            eprintln!("kept the lab's files in {}", self.state_dir().display());
        } else {
            let _ = std::fs::remove_dir_all(self.state_dir());
        }
        let _ = std::fs::remove_file(self.path());
    }
}

/// A process running inside a lab host (a probe server, a listener), killed
/// and reaped when dropped. The lab's teardown kills it anyway; this stops it
/// as soon as its user is done with it.
#[derive(Debug)]
pub struct Process(std::process::Child);

impl Process {
    /// Takes charge of a spawned child.
    pub fn new(child: std::process::Child) -> Self {
        Self(child)
    }

    /// Its process id (the program's own: `ip netns exec` execs it).
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the process to exit, at most `timeout`; `None` if it still
    /// runs (it is killed when dropped).
    pub fn wait_timeout(
        &mut self,
        timeout: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        crate::wait::until(timeout, || self.0.try_wait().ok().flatten())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A lab that exists while this value lives.
pub struct Lab {
    record: LabRecord,
    armed: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lab({} {})", self.record.prefix, self.record.topology)
    }
}

/// Where the `reach-lab` binary is (delay hops run it): `$REACH_LAB_BIN`, this
/// program if it is `reach-lab`, or a `reach-lab` beside this program or one
/// directory up (cargo puts test binaries in `deps/` below the binaries).
pub fn reach_lab_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("REACH_LAB_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    if exe.file_name().is_some_and(|n| n == "reach-lab") {
        return Some(exe);
    }
    let dir = exe.parent()?;
    [dir.join("reach-lab"), dir.parent()?.join("reach-lab")]
        .into_iter()
        .find(|p| p.exists())
}

fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut x = u64::from(std::process::id()) << 32
        ^ u64::from(nanos)
        ^ u64::from(COUNTER.fetch_add(1, Ordering::Relaxed)).wrapping_mul(0x9e37_79b9);
    let mut s = String::from(PREFIX_START);
    for _ in 0..5 {
        let d = (x % 36) as u32;
        s.push(char::from_digit(d, 36).unwrap_or('0'));
        x /= 36;
    }
    s
}

impl Lab {
    /// Builds the topology. On failure, whatever was built is removed again.
    pub fn up(topology: &Topology) -> Result<Lab, LabError> {
        apply::check_prerequisites()?;
        let plan = plan(topology)?;
        let prefix = unique_prefix();
        let record = LabRecord {
            namespaces: plan
                .namespaces
                .iter()
                .map(|n| format!("{prefix}-{}", n.name))
                .collect(),
            hosts: plan.hosts.clone(),
            observers: plan.observers.clone(),
            matrix: topology
                .matrix
                .clone()
                .unwrap_or_else(|| plan.hosts.iter().map(|h| h.name.clone()).collect()),
            topology: topology.name.clone(),
            prefix,
        };
        std::fs::create_dir_all(registry_dir())?;
        std::fs::write(
            record.path(),
            serde_json::to_string_pretty(&record).map_err(std::io::Error::other)?,
        )?;
        let lab = Lab {
            record,
            armed: true,
        };
        // On error `lab` drops here and removes the partial lab.
        apply::apply(&lab.record.prefix, &plan, reach_lab_binary().as_deref())?;
        let ssh_hosts: Vec<&HostAddrs> = lab.record.hosts.iter().filter(|h| h.sshd).collect();
        if !ssh_hosts.is_empty() {
            let dir = lab.record.state_dir().join("ssh");
            crate::sshd::prepare(&dir)?;
            for h in ssh_hosts {
                crate::sshd::start(&dir, &lab.record.host_ns(h), &h.name)?;
            }
        }
        Ok(lab)
    }

    /// What the registry holds about this lab.
    pub fn record(&self) -> &LabRecord {
        &self.record
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> &HostAddrs {
        self.record
            .host(name)
            .unwrap_or_else(|| panic!("no host {name:?} in lab {}", self.record.topology))
    }

    /// A command that runs `program` inside host `name`'s namespace.
    pub fn command(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.record.host_ns(self.host(name))])
            .arg(program);
        c
    }

    /// A command that runs `program` inside the namespace of site `site`'s
    /// gateway (`gw-SITE`: LAN bridge `br0`, WAN interface `wan`), e.g. a
    /// port-mapping daemon or `nft`.
    pub fn gateway_command(&self, site: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &format!("{}-gw-{site}", self.record.prefix),
        ])
        .arg(program);
        c
    }

    /// Runs `cmd` (made by [`Lab::command`]) in the background with its
    /// stdout and stderr in the file `log`; it is killed when the returned
    /// value is dropped.
    pub fn spawn_logged(
        cmd: &mut Command,
        log: &std::path::Path,
    ) -> Result<Process, crate::LabError> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| crate::LabError::Command {
                command: format!("{cmd:?}").replace('"', ""),
                output: e.to_string(),
            })?;
        Ok(Process::new(child))
    }

    /// Keeps the lab after this value is dropped (for `reach-lab up`).
    pub fn persist(mut self) -> LabRecord {
        self.armed = false;
        self.record.clone()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.armed {
            self.record.tear_down();
        }
    }
}

/// Removes every lab namespace on the system, recorded or orphaned.
pub fn down_all() -> usize {
    let mut n = 0;
    for rec in LabRecord::all() {
        rec.tear_down();
        n += 1;
    }
    for ns in apply::namespaces_with_prefix(PREFIX_START) {
        // Only names of our own shape: rl + 5 base-36 characters + '-'.
        let ours = ns.len() > 8
            && ns.as_bytes()[7] == b'-'
            && ns[2..7]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if ours {
            apply::remove_namespace(&ns);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_unique_and_well_formed() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        assert_eq!(a.len(), 7);
        assert!(a.starts_with(PREFIX_START));
    }
}
