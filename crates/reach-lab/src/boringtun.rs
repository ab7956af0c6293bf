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
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::lab::Process;
use crate::rathole::find_tool;
use crate::Lab;

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

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A WireGuard key pair from `wg`: (private, public).
fn keypair() -> Result<(String, String), String> {
    let private = run(Command::new("wg").arg("genkey"), "wg genkey")?;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("wg pubkey: {e}"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or("wg pubkey: no stdin")?;
        stdin
            .write_all(private.as_bytes())
            .map_err(|e| format!("wg pubkey: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wg pubkey: {e}"))?;
    Ok((
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

impl Tunnel {
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
    ) -> Result<Tunnel, String> {
        let bin = find_tool("boringtun-cli").ok_or(
            "boringtun-cli not found on PATH or in ~/.cargo/bin: run `cargo install boringtun-cli` \
             (scripts/bench.sh does it)",
        )?;
        if find_tool("wg").is_none() {
            return Err("wg not found: apt-get install wireguard-tools".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let keys = [keypair()?, keypair()?];
        let ends = [
            (a, INNER_A, &keys[0].0, &keys[1].1, b_ip),
            (b, INNER_B, &keys[1].0, &keys[0].1, a_ip),
        ];
        let mut tunnel = Tunnel {
            ends: Vec::new(),
            sockets: Vec::new(),
        };
        for (i, (host, inner, private, peer_public, peer_ip)) in ends.into_iter().enumerate() {
            let name = format!("wg{tag}{i}");
            let key_file = dir.join(format!("{name}.key"));
            std::fs::write(&key_file, private).map_err(|e| e.to_string())?;
            tunnel.sockets.push(socket_of(&name));
            tunnel.ends.push(start_end(lab, &bin, host, &name, dir)?);
            let peer_inner = if i == 0 { INNER_B } else { INNER_A };
            run(
                lab.command(host, "wg")
                    .args(["set", &name, "private-key"])
                    .arg(&key_file)
                    .args(["listen-port", &PORT.to_string(), "peer", peer_public])
                    .args(["endpoint", &format!("{peer_ip}:{PORT}")])
                    .args(["allowed-ips", &format!("{peer_inner}/32")]),
                "wg set",
            )?;
            run(
                lab.command(host, "ip")
                    .args(["addr", "add", &format!("{inner}/24"), "dev", &name]),
                "ip addr add",
            )?;
            run(
                lab.command(host, "ip").args(["link", "set", &name, "up"]),
                "ip link set up",
            )?;
        }
        Ok(tunnel)
    }
}

/// Runs one boringtun end in `host`, waiting for its control socket.
fn start_end(
    lab: &Lab,
    bin: &PathBuf,
    host: &str,
    name: &str,
    dir: &Path,
) -> Result<Process, String> {
    let sock = socket_of(name);
    let _ = std::fs::remove_file(&sock);
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
    let child = lab
        .command(host, bin)
        .args([name, "--foreground", "--disable-drop-privileges"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot run boringtun-cli: {e}"))?;
    let p = Process::new(child);
    if crate::wait::until(Duration::from_secs(10), || sock.exists().then_some(())).is_none() {
        return Err(format!(
            "boringtun {name} did not open {}: {}",
            sock.display(),
            std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
        ));
    }
    Ok(p)
}
