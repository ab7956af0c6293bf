//! Peer hubs as configured, and SSH tunnels to the ones only ssh can reach.
//!
//! A site that admits nothing but ssh (SmartSockets' hiroshi) still gets a hub
//! link: this hub runs the system `ssh -N -L` to the site's ssh entry and dials
//! the other hub through the tunnel. The link inside is an ordinary reach link,
//! authenticated end to end by the peer's NodeId, so the tunnel only carries
//! bytes: a wrong host behind it fails the handshake.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use reach::{HubError, HubTarget};

/// A peer hub to link to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The hub; with `ssh`, its address as seen from the ssh server.
    pub target: HubTarget,
    /// Reach it through an ssh tunnel to this server.
    pub ssh: Option<SshServer>,
}

/// An ssh server to tunnel through: `[USER@]HOST[:PORT]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshServer {
    /// `[USER@]HOST`, as `ssh` takes it.
    pub destination: String,
    /// The ssh port, if not 22.
    pub port: Option<u16>,
}

/// Why a peer does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The hub part is not `[NODEID@]HOST:PORT`.
    #[error(transparent)]
    Target(#[from] reach::HubTargetError),
    /// The ssh server is not `[USER@]HOST[:PORT]` (or could be read as an
    /// option by ssh).
    #[error("bad ssh server {server:?} in peer {peer:?}: expected [USER@]HOST[:PORT]")]
    BadSsh {
        /// The ssh part.
        server: String,
        /// The whole peer.
        peer: String,
    },
    /// The ssh port is not a number.
    #[error("bad ssh port {port:?} in peer {peer:?}")]
    BadSshPort {
        /// The port text.
        port: String,
        /// The whole peer.
        peer: String,
    },
    /// A peer reached over ssh must be named by its NodeId.
    #[error(
        "peer {0:?} is reached over ssh, so it needs its NodeId (NODEID@HOST:PORT): \
         the tunnel's local end says nothing about which hub answers"
    )]
    NeedsId(String),
}

/// Why an ssh tunnel to a peer did not come up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// No loopback port to put the tunnel's local end on.
    #[error("cannot find a free loopback port for the ssh tunnel: {0}")]
    NoLocalPort(#[source] std::io::Error),
    /// ssh could not be started.
    #[error("cannot run ssh (install openssh-client): {0}")]
    Spawn(#[source] std::io::Error),
    /// ssh exited: its status and what it printed.
    #[error("ssh exited with {status}: {stderr}")]
    Exited {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed, on one line.
        stderr: String,
    },
    /// The tunnel did not carry a hub link in time.
    #[error("ssh tunnel not usable within {after:?}: {}", .last.as_ref().map_or("no attempt".to_string(), ToString::to_string))]
    NotReady {
        /// How long it was given.
        after: Duration,
        /// The last attempt's error.
        last: Option<Box<HubError>>,
    },
}

impl FromStr for Peer {
    type Err = PeerError;

    /// `[NODEID@]HOST:PORT` or `NODEID@HOST:PORT,ssh=[USER@]SSHHOST[:SSHPORT]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hub, ssh) = match s.split_once(",ssh=") {
            Some((hub, ssh)) => (hub, Some(ssh)),
            None => (s, None),
        };
        let target: HubTarget = hub.parse()?;
        let ssh = ssh.map(|text| parse_ssh(s, text)).transpose()?;
        if ssh.is_some() && target.id.is_none() {
            return Err(PeerError::NeedsId(s.to_string()));
        }
        Ok(Self { target, ssh })
    }
}

fn parse_ssh(whole: &str, text: &str) -> Result<SshServer, PeerError> {
    let (user, rest) = match text.rsplit_once('@') {
        Some((u, r)) => (Some(u), r),
        None => (None, text),
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
            let port = p.parse::<u16>().map_err(|_| PeerError::BadSshPort {
                port: p.to_string(),
                peer: whole.to_string(),
            })?;
            (h, Some(port))
        }
        _ => (rest, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // A leading '-' would make ssh read the host as an option.
    if host.is_empty()
        || host.starts_with('-')
        || host.chars().any(char::is_whitespace)
        || user.is_some_and(|u| u.is_empty() || u.starts_with('-'))
    {
        return Err(PeerError::BadSsh {
            server: text.to_string(),
            peer: whole.to_string(),
        });
    }
    Ok(SshServer {
        destination: match user {
            Some(u) => format!("{u}@{host}"),
            None => host.to_string(),
        },
        port,
    })
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.target)?;
        if let Some(ssh) = &self.ssh {
            write!(f, ",ssh={}", ssh.destination)?;
            if let Some(p) = ssh.port {
                write!(f, ":{p}")?;
            }
        }
        Ok(())
    }
}

/// How long an ssh tunnel may take to come up.
pub const TUNNEL_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `ssh -N -L` tunnel; the ssh process is killed when this drops.
#[derive(Debug)]
pub struct Tunnel {
    child: tokio::process::Child,
    /// The tunnel's local end.
    pub local: SocketAddr,
}

impl Tunnel {
    /// Starts `ssh -N -L 127.0.0.1:PORT:HOST:HUBPORT` to `server`, with `args`
    /// (identity file, options) before the destination.
    pub async fn open(
        server: &SshServer,
        hub: &HubTarget,
        args: &[String],
    ) -> Result<Tunnel, TunnelError> {
        let local = free_loopback_port()?;
        let host = if hub.host.contains(':') {
            format!("[{}]", hub.host)
        } else {
            hub.host.clone()
        };
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "BatchMode=yes",
        ])
        .args([
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
        ])
        .arg("-L")
        .arg(format!("{local}:{host}:{}", hub.port));
        if let Some(p) = server.port {
            cmd.arg("-p").arg(p.to_string());
        }
        cmd.args(args)
            .arg("--")
            .arg(&server.destination)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(TunnelError::Spawn)?;
        Ok(Tunnel { child, local })
    }

    /// If ssh has exited: its status and what it printed.
    pub async fn exited(&mut self) -> Option<TunnelError> {
        let status = self.child.try_wait().ok().flatten()?;
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ =
                tokio::time::timeout(Duration::from_secs(1), stderr.read_to_string(&mut err)).await;
        }
        let stderr = err.split_whitespace().collect::<Vec<_>>().join(" ");
        Some(TunnelError::Exited { status, stderr })
    }

    /// The peer as dialled through the tunnel.
    pub fn target(&self, hub: &HubTarget) -> HubTarget {
        HubTarget {
            id: hub.id,
            host: self.local.ip().to_string(),
            port: self.local.port(),
        }
    }

    /// Waits until the tunnel's local end accepts connections, probing with
    /// `probe` (which dials the hub through it), or ssh fails, or the deadline.
    pub async fn wait_ready<F, Fut, T>(&mut self, mut probe: F) -> Result<T, TunnelError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, HubError>>,
    {
        let deadline = Instant::now() + TUNNEL_TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(why) = self.exited().await {
                return Err(why);
            }
            match probe().await {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(Box::new(e)),
            }
            // ssh opens the forward only after authenticating; until then the
            // local port refuses at once, so this loop costs little.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(TunnelError::NotReady {
            after: TUNNEL_TIMEOUT,
            last,
        })
    }
}

/// A loopback port free right now (ssh binds it a moment later).
fn free_loopback_port() -> Result<SocketAddr, TunnelError> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_err(TunnelError::NoLocalPort)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "2xeb76yolkqws4kk375ektwyhn53pn2qijakevercmba4tfnry2a";

    #[test]
    fn peers_parse_with_and_without_ssh() {
        let p: Peer = "hub.example:7700".parse().expect("plain");
        assert_eq!(p.ssh, None);
        let p: Peer = format!("{ID}@127.0.0.1:7700,ssh=root@203.0.113.5:2222")
            .parse()
            .expect("ssh");
        let ssh = p.ssh.clone().expect("ssh");
        assert_eq!(ssh.destination, "root@203.0.113.5");
        assert_eq!(ssh.port, Some(2222));
        assert_eq!(
            p.to_string(),
            format!("{ID}@127.0.0.1:7700,ssh=root@203.0.113.5:2222")
        );
        let p: Peer = format!("{ID}@10.4.0.2:7700,ssh=fe.example")
            .parse()
            .expect("ssh");
        assert_eq!(p.ssh.expect("ssh").port, None);
    }

    #[test]
    fn bad_peers_say_what_is_wrong() {
        let e = "127.0.0.1:7700,ssh=fe".parse::<Peer>().unwrap_err();
        assert!(matches!(e, PeerError::NeedsId(_)), "{e}");
        assert!(e.to_string().contains("needs its NodeId"), "{e}");
        let e = format!("{ID}@127.0.0.1:7700,ssh=fe:x")
            .parse::<Peer>()
            .unwrap_err();
        assert!(matches!(e, PeerError::BadSshPort { .. }), "{e}");
        let e = format!("{ID}@127.0.0.1:7700,ssh=-oProxyCommand=x")
            .parse::<Peer>()
            .unwrap_err();
        assert!(matches!(e, PeerError::BadSsh { .. }), "{e}");
        let e = format!("{ID}@127.0.0.1:7700,ssh=@fe")
            .parse::<Peer>()
            .unwrap_err();
        assert!(matches!(e, PeerError::BadSsh { .. }), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_peers_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<Peer>();
        }
    }
}
