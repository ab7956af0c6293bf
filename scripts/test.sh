#!/usr/bin/env bash
# Runs everything CI runs: formatting, lints, and every test, including the lab
# tests that build network namespaces (they need root). Installs missing system
# packages itself on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

require_root "the lab tests create network namespaces"
ensure_packages iproute2:ip nftables:nft openssh-server:/usr/sbin/sshd openssh-client:ssh curl:curl python3:python3 iperf3:iperf3 \
  socat:socat wireguard-tools:wg iputils-ping:ping natpmpc:natpmpc miniupnpc:upnpc \
  chromium:chromium chromium-driver:chromedriver \
  man-db:man groff-base:nroff zsh:zsh systemd:systemd-analyze
ensure_rust_tools
# Baselines the lab tests and the benchmark compare with.
ensure_cargo_tool rathole pkg-config libssl-dev
ensure_cargo_tool boringtun-cli

step "cargo fmt --check"
cargo fmt --all -- --check

step "module cycles in crates/reach (scripts/module-cycles.py)"
# No module of the library may import one that imports it back.
python3 scripts/module-cycles.py --self-test
python3 scripts/module-cycles.py

step "every source file opens with a doc paragraph (//!)"
undocumented=$(for f in $(git ls-files 'crates/*/src/*.rs' 'crates/*/src/**/*.rs'); do
  head -n 1 "$f" | grep -q '^//!' || echo "$f"
done)
if [ -n "$undocumented" ]; then
  echo "these files do not open with a //! paragraph saying what they do:" >&2
  echo "$undocumented" >&2
  exit 1
fi

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "the shim reach run preloads (a cdylib the tests load, not a test target)"
cargo build --locked -p reach-shim

step "tests (cargo nextest)"
cargo nextest run --workspace --locked --no-fail-fast --profile ci

step "install as a user would: completions, man pages, systemd units (scripts/check-dist.sh)"
bash scripts/check-dist.sh

step "the systemd units run under systemd as PID 1 (scripts/check-systemd.sh)"
bash scripts/check-systemd.sh

step "doc tests"
cargo test --workspace --locked --doc

step "all checks passed"
