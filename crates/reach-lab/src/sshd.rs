//! Real OpenSSH servers inside lab hosts.
//!
//! Each lab gets its own key material in its state directory: a host key, a
//! client key and an `authorized_keys` with that client key, and one sshd
//! configuration (key-only root login, no PAM, `StrictModes no` because the
//! files live under /run, TCP forwarding on for `ssh -L`/`-W`). Every host with
//! `sshd = true` runs `sshd -D -e` on port 22; the lab waits for its pid file,
//! which sshd writes once it listens. Teardown kills it with the namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::apply::{run, LabError};

/// Where sshd lives on Debian.
pub const SSHD: &str = "/usr/sbin/sshd";

/// Creates keys and the sshd configuration in `dir`.
pub fn prepare(dir: &Path) -> Result<(), LabError> {
    if !Path::new(SSHD).exists() {
        return Err(LabError::MissingTool {
            tool: "sshd",
            package: "openssh-server",
        });
    }
    std::fs::create_dir_all(dir)?;
    // sshd refuses to start without its privilege-separation directory.
    std::fs::create_dir_all("/run/sshd")?;
    for key in ["host_ed25519", "id_ed25519"] {
        let path = dir.join(key);
        if !path.exists() {
            run(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", "reach-lab", "-f"])
                    .arg(&path),
                None,
            )?;
        }
    }
    std::fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys"))?;
    let config = format!(
        "Port 22\nListenAddress 0.0.0.0\nHostKey {dir}/host_ed25519\nAuthorizedKeysFile {dir}/authorized_keys\n\
         PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nAllowTcpForwarding yes\n\
         X11Forwarding no\nPrintMotd no\nLogLevel ERROR\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("sshd_config"), config)?;
    Ok(())
}

/// Starts sshd in namespace `ns` for `host` and waits until it listens.
pub fn start(dir: &Path, ns: &str, host: &str) -> Result<(), LabError> {
    let pid_file = dir.join(format!("sshd-{host}.pid"));
    let _ = std::fs::remove_file(&pid_file);
    let log = std::fs::File::create(dir.join(format!("sshd-{host}.log")))?;
    Command::new("ip")
        .args(["netns", "exec", ns, SSHD, "-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .arg("-o")
        .arg(format!("PidFile={}", pid_file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    // sshd writes its pid file once it listens.
    if crate::wait::until(Duration::from_secs(10), || pid_file.exists().then_some(())).is_none() {
        return Err(LabError::Command {
            command: format!("sshd in {host}"),
            output: std::fs::read_to_string(dir.join(format!("sshd-{host}.log")))
                .unwrap_or_default(),
        });
    }
    Ok(())
}

/// ssh client options that log in with the lab's key.
pub fn client_args(dir: &Path) -> Vec<String> {
    let key: PathBuf = dir.join("id_ed25519");
    [
        "-i",
        &key.display().to_string(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
