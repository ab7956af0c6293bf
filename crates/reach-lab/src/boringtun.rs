//! A WireGuard tunnel between two lab hosts with boringtun, Cloudflare's
//! userspace WireGuard (what userspace VPNs of the field build on), as a
//! baseline for reach's encrypted direct streams. `cargo install
//! boringtun-cli` installs it (0.7.1); `wg` comes with Debian's
//! wireguard-tools. `scripts/bench.sh` installs both.
//!
//! boringtun's control socket lives in `/var/run/wireguard/NAME.sock`, which
//! every namespace shares, so each tunnel end gets a name of its own.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::apply::run;
use crate::lab::Process;
use crate::{Lab, LabError};

/// The tunnel's inner addresses, in a /24 that no lab uses.
pub const INNER_A: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The far end's inner address.
pub const INNER_B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The UDP port both ends listen on.
const PORT: u16 = 51820;

/// A running tunnel; both ends stop when it is dropped.
pub struct Tunnel {
    ends: Vec<Process>,
    sockets: Vec<PathBuf>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // Stop both ends first, then remove their control sockets, which
        // live outside the lab's namespaces.
        self.ends.clear();
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Where boringtun puts the control socket of interface `name`.
fn socket_of(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{name}.sock"))
}

/// A WireGuard key pair from `wg`: (private, public).
fn keypair() -> Result<(String, String), LabError> {
    let private = run(Command::new("wg").arg("genkey"), None)?;
    let public = run(Command::new("wg").arg("pubkey"), Some(&private))?;
    Ok((private.trim().to_string(), public.trim().to_string()))
}

impl Tunnel {
    /// The process ids of both ends.
    pub fn pids(&self) -> Vec<u32> {
        self.ends.iter().map(Process::id).collect()
    }

    /// Connects hosts `a` and `b` (reachable at `b_ip` from `a`, and `a_ip`
    /// from `b`) with a boringtun tunnel: `a` gets [`INNER_A`], `b`
    /// [`INNER_B`]. Keys and logs go to `dir`; `tag` makes the interface
    /// names unique on this machine.
    pub fn start(
        lab: &Lab,
        (a, a_ip): (&str, Ipv4Addr),
        (b, b_ip): (&str, Ipv4Addr),
        tag: &str,
        dir: &Path,
    ) -> Result<Tunnel, LabError> {
        let bin = crate::find_tool("boringtun-cli").ok_or(LabError::MissingCrate {
            tool: "boringtun-cli",
        })?;
        if crate::find_tool("wg").is_none() {
            return Err(LabError::MissingTool {
                tool: "wg",
                package: "wireguard-tools",
            });
        }
        std::fs::create_dir_all(dir)?;
        let keys = [keypair()?, keypair()?];
        let ends = [
            (a, INNER_A, &keys[0].0, &keys[1].1, b_ip, INNER_B),
            (b, INNER_B, &keys[1].0, &keys[0].1, a_ip, INNER_A),
        ];
        let mut tunnel = Tunnel {
            ends: Vec::new(),
            sockets: Vec::new(),
        };
        for (i, (host, inner, private, peer_public, peer_ip, peer_inner)) in
            ends.into_iter().enumerate()
        {
            let name = format!("wg{tag}{i}");
            let key_file = dir.join(format!("{name}.key"));
            std::fs::write(&key_file, private)?;
            tunnel.sockets.push(socket_of(&name));
            tunnel.ends.push(start_end(lab, &bin, host, &name, dir)?);
            run(
                lab.command(host, "wg")
                    .args(["set", &name, "private-key"])
                    .arg(&key_file)
                    .args(["listen-port", &PORT.to_string(), "peer", peer_public])
                    .args(["endpoint", &format!("{peer_ip}:{PORT}")])
                    .args(["allowed-ips", &format!("{peer_inner}/32")]),
                None,
            )?;
            let ip = |args: &[&str]| run(lab.command(host, "ip").args(args), None);
            ip(&["addr", "add", &format!("{inner}/24"), "dev", &name])?;
            ip(&["link", "set", &name, "up"])?;
        }
        Ok(tunnel)
    }
}

/// Runs one boringtun end in `host`, waiting for its control socket.
fn start_end(
    lab: &Lab,
    bin: &Path,
    host: &str,
    name: &str,
    dir: &Path,
) -> Result<Process, LabError> {
    let sock = socket_of(name);
    let _ = std::fs::remove_file(&sock);
    let log = dir.join(format!("{name}.log"));
    let p = Lab::spawn_logged(
        lab.command(host, bin)
            .args([name, "--foreground", "--disable-drop-privileges"]),
        &log,
    )?;
    if crate::wait::until(Duration::from_secs(10), || sock.exists().then_some(())).is_none() {
        return Err(LabError::Command {
            command: format!("boringtun-cli {name} in {host}"),
            output: format!(
                "no control socket {} within 10 s: {}",
                sock.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        });
    }
    Ok(p)
}
