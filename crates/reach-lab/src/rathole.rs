//! rathole, the reverse proxy people use today to publish a service behind
//! NAT, run in lab hosts as a baseline for reach's hub proxy ports: its
//! server on the hub host opens a public port, its client beside the service
//! keeps a control channel to the server and opens a data channel per
//! visitor. `cargo install rathole` (0.5.0) installs it; `scripts/test.sh`
//! does so when it is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::apply::run;
use crate::lab::Process;
use crate::{Lab, LabError};

/// How rathole's client and server talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP, rathole's default: no encryption.
    Tcp,
    /// The Noise protocol (Noise_NK_25519_ChaChaPoly_BLAKE2s), encrypted.
    Noise,
}

impl Transport {
    /// The name rathole's configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Noise => "noise",
        }
    }
}

/// The rathole binary.
fn binary() -> Result<PathBuf, LabError> {
    crate::find_tool("rathole").ok_or(LabError::MissingCrate { tool: "rathole" })
}

/// A rathole server and client publishing one service.
pub struct Rathole {
    server: Process,
    _client: Process,
    /// The public address clients connect to.
    pub public: SocketAddr,
}

/// How long rathole has to start and connect its control channel.
const START_WAIT: Duration = Duration::from_secs(20);

/// What rathole publishes, and where it runs.
#[derive(Clone, Debug)]
pub struct Setup<'a> {
    /// The host of rathole's server (the hub's place).
    pub server_host: &'a str,
    /// Its control port, which the client connects to.
    pub control: SocketAddr,
    /// The public port visitors connect to.
    pub public: SocketAddr,
    /// The host of rathole's client, beside the service.
    pub client_host: &'a str,
    /// The service, as the client host reaches it.
    pub service: SocketAddr,
}

impl Rathole {
    /// The process id of rathole's server (the relay).
    pub fn server_pid(&self) -> u32 {
        self.server.id()
    }

    /// Runs rathole's server and client as `setup` says, talking over
    /// `transport`; configuration and logs go to `dir`. Returns once the
    /// client's control channel is up.
    pub fn start(
        lab: &Lab,
        setup: &Setup,
        transport: Transport,
        dir: &Path,
    ) -> Result<Rathole, LabError> {
        let Setup {
            server_host,
            control,
            public,
            client_host,
            service,
        } = *setup;
        let bin = binary()?;
        std::fs::create_dir_all(dir)?;
        let (server_noise, client_noise) = match transport {
            Transport::Tcp => (String::new(), String::new()),
            Transport::Noise => {
                let (private, public) = genkey(&bin)?;
                (
                    format!("[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"),
                    format!("[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n"),
                )
            }
        };
        let server_conf = format!(
            "[server]\nbind_addr = \"{control}\"\ndefault_token = \"reach-lab\"\n\
             {server_noise}[server.services.svc]\nbind_addr = \"{public}\"\n"
        );
        let client_conf = format!(
            "[client]\nremote_addr = \"{control}\"\ndefault_token = \"reach-lab\"\n\
             {client_noise}[client.services.svc]\nlocal_addr = \"{service}\"\n"
        );
        let tag = transport.name();
        let server = spawn(
            lab,
            server_host,
            &bin,
            dir,
            &format!("server-{tag}"),
            &server_conf,
            "-s",
        )?;
        let client = spawn(
            lab,
            client_host,
            &bin,
            dir,
            &format!("client-{tag}"),
            &client_conf,
            "-c",
        )?;
        let log = dir.join(format!("client-{tag}.log"));
        let up = crate::wait::until(START_WAIT, || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("Control channel established").then_some(())
        });
        if up.is_none() {
            return Err(LabError::Command {
                command: format!("rathole -c in {client_host}"),
                output: format!(
                    "its control channel did not come up within {START_WAIT:?}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            });
        }
        Ok(Rathole {
            server,
            _client: client,
            public,
        })
    }
}

/// Writes `conf` to DIR/NAME.toml and runs rathole on it in `host`, logging
/// to DIR/NAME.log.
fn spawn(
    lab: &Lab,
    host: &str,
    bin: &Path,
    dir: &Path,
    name: &str,
    conf: &str,
    role: &str,
) -> Result<Process, LabError> {
    let conf_path = dir.join(format!("{name}.toml"));
    std::fs::write(&conf_path, conf)?;
    Lab::spawn_logged(
        lab.command(host, bin)
            .arg(role)
            .arg(&conf_path)
            .env("RUST_LOG", "info"),
        &dir.join(format!("{name}.log")),
    )
}

/// A fresh x25519 key pair from `rathole --genkey`: (private, public).
fn genkey(bin: &Path) -> Result<(String, String), LabError> {
    let out = run(Command::new(bin).arg("--genkey"), None)?;
    parse_genkey(&out).ok_or_else(|| LabError::Command {
        command: "rathole --genkey".into(),
        output: format!("no key pair in {out:?}"),
    })
}

/// The keys in `rathole --genkey`'s output.
fn parse_genkey(text: &str) -> Option<(String, String)> {
    let after = |label: &str| {
        let mut lines = text.lines();
        lines.find(|l| l.trim() == label)?;
        lines
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    };
    Some((after("Private Key:")?, after("Public Key:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genkey_output_parses() {
        let text = "Private Key:\nAAA=\n\nPublic Key:\nBBB=\n";
        assert_eq!(parse_genkey(text), Some(("AAA=".into(), "BBB=".into())));
        assert_eq!(parse_genkey("nothing"), None);
    }
}
