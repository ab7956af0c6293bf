#!/usr/bin/env bash
# Installs reach the way docs/deploy.md tells a user to (cargo install, the
# shim beside it), generates its shell completions and man pages, and checks
# them and the systemd units of dist/ with the tools that consume them:
# bash completes a subcommand, man renders every page without a warning,
# and systemd-analyze verify accepts every unit against the installed tree.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages man-db:man groff-base:nroff zsh:zsh systemd:systemd-analyze
root="$PWD/target/tmp/dist-root"
rm -rf "$root"
prefix="$root/usr/local"

step "cargo install --path crates/reach-cli (into $prefix)"
# --debug and the workspace's target directory: the tests' build is reused.
cargo install --quiet --locked --debug --path crates/reach-cli --root "$prefix" --target-dir target
cargo build --quiet --locked -p reach-shim
install -D -m 0644 target/debug/libreach_shim.so "$prefix/lib/reach/libreach_shim.so"
reach="$prefix/bin/reach"
"$reach" --version

step "shell completions"
mkdir -p "$root/completions"
for shell in bash zsh fish elvish powershell; do
  "$reach" completions "$shell" > "$root/completions/$shell"
  [ -s "$root/completions/$shell" ] || die "reach completions $shell printed nothing"
done
bash -n "$root/completions/bash"
zsh -n "$root/completions/zsh"
# bash offers the subcommands for `reach h<TAB>` and the hub's flags for
# `reach hub --me<TAB>`.
offered=$(bash -c '
  source "$1"
  COMP_WORDS=(reach h); COMP_CWORD=1; COMP_LINE="reach h"; COMP_POINT=${#COMP_LINE}
  _reach reach h reach; echo "${COMPREPLY[*]}"
  COMP_WORDS=(reach hub --me); COMP_CWORD=2; COMP_LINE="reach hub --me"; COMP_POINT=${#COMP_LINE}
  _reach reach --me hub; echo "${COMPREPLY[*]}"' _ "$root/completions/bash")
echo "$offered"
grep -q -w hub <<<"$offered" || die "bash completion does not offer 'hub' for 'reach h'"
grep -q -- --metrics <<<"$offered" || die "bash completion does not offer --metrics for 'reach hub --me'"

step "man pages"
man1="$prefix/share/man/man1"
"$reach" man --out-dir "$man1" > "$root/man-pages.txt"
pages=$(wc -l < "$root/man-pages.txt")
[ "$pages" -ge 15 ] || die "reach man wrote only $pages pages"
for page in "$man1"/*.1; do
  warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null)
  [ -z "$warnings" ] || die "man warns about $page: $warnings"
done
MANPATH="$prefix/share/man" man -w reach-hub > /dev/null
echo "$pages pages render without warnings"

step "systemd units (systemd-analyze verify)"
units="$root/etc/systemd/system"
mkdir -p "$units"
cp dist/*.service "$units/"
# An instance of the template, as `systemctl enable reach-vpn@office` makes.
ln -s "reach-vpn@.service" "$units/reach-vpn@office.service"
# The system's own units (sysinit.target, ...) the services are ordered
# after, as in a real root.
mkdir -p "$root/usr/lib/systemd"
cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/"
# --root resolves ExecStart in the installed tree; MANPATH lets the
# Documentation=man: lines be checked against the generated pages.
out=$(MANPATH="$prefix/share/man" systemd-analyze verify --root="$root" \
  "$units/reach-hub.service" "$units/reach-gateway.service" "$units/reach-vpn@office.service" 2>&1) \
  || die "systemd-analyze verify failed: $out"
[ -z "$out" ] || die "systemd-analyze verify warns: $out"
echo "reach-hub.service reach-gateway.service reach-vpn@.service verified"
