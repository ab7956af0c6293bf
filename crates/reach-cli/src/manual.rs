//! Shell completions and man pages, generated from the command's own
//! definition so they never drift from `--help`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory};
use clap_complete::Shell;

/// Flags of `reach completions`.
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for: bash, zsh, fish, elvish or powershell.
    #[arg(value_name = "SHELL")]
    shell: Shell,
}

/// Flags of `reach man`.
#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write one page per command (reach.1, reach-hub.1, reach-vpn-up.1,
    /// ...) into this directory instead of printing reach.1 to stdout.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` to stdout.
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = crate::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "reach", &mut out);
    write_stdout(&out)
}

/// Prints reach.1, or writes every command's page into `--out-dir`.
pub fn man(args: &ManArgs) -> anyhow::Result<()> {
    let cmd = crate::Cli::command();
    match &args.out_dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("cannot render the man page")?;
            write_stdout(&out)
        }
        Some(dir) => {
            let written = write_pages(cmd, dir)?;
            for page in written {
                println!("{}", page.display());
            }
            Ok(())
        }
    }
}

/// Writes the page of `cmd` and of each subcommand, at any depth, into
/// `dir` (created if missing); returns the files written.
fn write_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let mut queue = vec![cmd];
    while let Some(mut cmd) = queue.pop() {
        // Built so each subcommand carries its full name (reach-vpn-up) and
        // the global flags it inherits.
        cmd.build();
        let name = cmd
            .get_display_name()
            .unwrap_or_else(|| cmd.get_name())
            .to_string();
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .title(name.clone())
            .render(&mut page)
            .with_context(|| format!("cannot render the man page of {name}"))?;
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
        queue.extend(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set() && s.get_name() != "help")
                .cloned(),
        );
    }
    written.sort();
    Ok(written)
}

/// Writes `bytes` to stdout; a closed pipe (`reach man | head`) is an
/// error like any other, not a panic.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_gets_a_page_named_for_its_full_path() {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_pages(crate::Cli::command(), dir.path()).unwrap();
        let names: Vec<_> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "reach.1",
            "reach-hub.1",
            "reach-vpn.1",
            "reach-vpn-up.1",
            "reach-doctor.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        let hub = std::fs::read_to_string(dir.path().join("reach-hub.1")).unwrap();
        assert!(hub.contains(".TH reach-hub 1"), "{hub}");
        assert!(
            hub.contains("\\-\\-metrics"),
            "the hub's flags are documented"
        );
    }
}
