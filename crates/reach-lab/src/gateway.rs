//! Port-mapping daemons in the lab: `reach gateway` in the namespace of
//! every site gateway whose topology says `port_mapping = true` (LAN
//! bridge `br0`, WAN interface `wan`), for the matrix and whoever else
//! wants the site as it would run.

use std::path::Path;
use std::time::Duration;

use crate::lab::Process;
use crate::{Lab, LabError, Topology};

/// How long a daemon may take to serve.
const START: Duration = Duration::from_secs(20);

/// Starts `reach gateway` at every site with `port_mapping`, state and
/// log (`gateway.log`) in `state/gateway-SITE`; they run while the
/// returned processes live.
pub fn start(
    lab: &Lab,
    topology: &Topology,
    tools: &Path,
    state: &Path,
) -> Result<Vec<Process>, LabError> {
    topology
        .sites
        .iter()
        .filter(|s| s.port_mapping)
        .map(|site| {
            let dir = state.join(format!("gateway-{}", site.name));
            start_at(lab, &site.name, tools, &dir, &[])
        })
        .collect()
}

/// Starts `reach gateway` with `flags` in the gateway of site `site`,
/// state and log (`gateway.log`) in `dir`, and waits until it serves.
pub fn start_at(
    lab: &Lab,
    site: &str,
    tools: &Path,
    dir: &Path,
    flags: &[&str],
) -> Result<Process, LabError> {
    std::fs::create_dir_all(dir)?;
    let log = dir.join("gateway.log");
    let mut cmd = lab.gateway_command(site, tools.join("reach"));
    cmd.arg("--state-dir")
        .arg(dir)
        .args(["-v", "gateway", "--lan", "br0", "--wan", "wan"])
        .args(flags);
    let proc = Lab::spawn_logged(&mut cmd, &log)?;
    let served = crate::wait::until(START, || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("gateway serving"))
    });
    if served.is_none() {
        return Err(LabError::Command {
            command: format!("reach gateway at site {site}"),
            output: std::fs::read_to_string(&log).unwrap_or_default(),
        });
    }
    Ok(proc)
}
