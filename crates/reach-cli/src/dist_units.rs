//! Checks of the service files shipped in `dist/`: every unit starts a
//! command line this CLI accepts, with the example settings filled in,
//! and the example hub configuration loads. (`systemd-analyze verify` in
//! scripts/check-dist.sh checks the units' own syntax.)

use std::path::{Path, PathBuf};

use clap::Parser;

/// The repository's `dist/` directory.
fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist")
}

/// The value of `key=` in a unit or environment file (the last one, as
/// systemd takes it), without surrounding quotes.
fn value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .map(|v| v.trim().trim_matches('"').to_string())
}

/// The argument list `ExecStart` of `unit` runs, with `%i` set to
/// `instance`, `${CREDENTIALS_DIRECTORY}` to where systemd puts the
/// credentials, and `$VAR` words split from the unit's environment file in
/// `dist/` (as systemd expands an unbraced variable).
fn exec_start(unit: &str, instance: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dist().join(unit)).unwrap();
    let line = value(&text, "ExecStart").expect("the unit has an ExecStart");
    let env_file = value(&text, "EnvironmentFile").map(|p| {
        // /etc/reach/vpn-%i.env ships as dist/vpn.env.
        let name = Path::new(&p)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let name = name.replace("-%i", "");
        std::fs::read_to_string(dist().join(name)).unwrap()
    });
    let mut args = Vec::new();
    let line = line.replace("%i", instance).replace(
        "${CREDENTIALS_DIRECTORY}",
        &format!(
            "/run/credentials/{}",
            unit.replace("@.", &format!("@{instance}."))
        ),
    );
    for word in line.split_whitespace() {
        match word.strip_prefix('$') {
            Some(var) => {
                let env = env_file
                    .as_deref()
                    .expect("a $VAR needs an EnvironmentFile");
                let v = value(env, var).unwrap_or_else(|| panic!("{var} not set"));
                args.extend(v.split_whitespace().map(String::from));
            }
            None => args.push(word.to_string()),
        }
    }
    args
}

#[test]
fn every_unit_starts_a_command_line_reach_accepts() {
    for (unit, sub) in [
        ("reach-hub.service", "hub"),
        ("reach-gateway.service", "gateway"),
        ("reach-vpn@.service", "vpn"),
    ] {
        let args = exec_start(unit, "office");
        assert_eq!(args[0], "/usr/local/bin/reach", "{unit}");
        assert!(args.contains(&sub.to_string()), "{unit}: {args:?}");
        if let Err(e) = crate::Cli::try_parse_from(&args) {
            panic!("{unit} runs a command reach refuses: {args:?}\n{e}");
        }
    }
    let vpn = exec_start("reach-vpn@.service", "office");
    assert!(
        vpn.windows(2).any(|w| w == ["--network", "office"]),
        "{vpn:?}"
    );
}

#[test]
fn the_example_hub_configuration_loads() {
    let config = crate::config::Config::load(Some(&dist().join("hub.toml"))).unwrap();
    let hub = config.hub_server.expect("a [hub_server] table");
    assert_eq!(hub.tcp_port, Some(crate::hub::DEFAULT_HUB_PORT));
    assert!(
        hub.metrics.unwrap().ip().is_loopback(),
        "metrics stay local"
    );
}
