#!/usr/bin/env bash
# Runs every benchmark beside its baseline, in one run (reach-bench all):
# direct and routed reach between network namespaces beside plain TCP, socat
# and rathole; setup per module in the SmartSockets testbed with the paper's
# round trips; reach vpn beside raw veth TCP and boringtun (iperf3, ping);
# reach gateway's mapping rate and memory, and setup through its mappings
# beside a static forward; hub capacity. A full run records its results in
# docs/benchmarks.md and docs/bench-all.json; --quick only prints them.
# Installs what it needs (Debian/Ubuntu): socat, nftables, openssh, iperf3, ping,
# wireguard-tools, natpmpc, and with cargo install rathole and boringtun-cli.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

require_root "the benchmarks build network namespaces"
ensure_packages iproute2:ip nftables:nft openssh-server:/usr/sbin/sshd openssh-client:ssh socat:socat iperf3:iperf3 iputils-ping:ping \
  wireguard-tools:wg natpmpc:natpmpc
ensure_rust_tools
ensure_cargo_tool rathole pkg-config libssl-dev
ensure_cargo_tool boringtun-cli

step "cargo build --release"
cargo build --release --locked -p reach-cli -p reach-lab -p reach-bench -p reach-shim

if [ "${1:-}" = "--quick" ]; then
  step "reach-bench all --quick"
  exec target/release/reach-bench all --quick
fi
step "reach-bench all (about 4 minutes on 2 cores)"
target/release/reach-bench all --json docs/bench-all.json --markdown docs/benchmarks.md
step "results recorded in docs/benchmarks.md and docs/bench-all.json"
