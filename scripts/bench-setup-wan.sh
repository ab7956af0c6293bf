#!/usr/bin/env bash
# Connection setup over an emulated WAN link, side by side in one run: reach's
# direct setup (TCP connect + Noise IK handshake) against plain TCP connect plus
# one application round trip (a probe that connects and reads a greeting), from
# the NATed desktop to das3-v-node in lab/topologies/smartsockets-wan.toml
# (round trip 14 ms). Needs root; all traffic stays inside the lab.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_root "the benchmark builds network namespaces"
ensure_packages iproute2:ip nftables:nft openssh-server:/usr/sbin/sshd openssh-client:ssh
N=${N:-20}
cargo build --release --locked -q -p reach-cli -p reach-lab
bin=$PWD/target/release
lab_bin=$bin/reach-lab
work=$(mktemp -d)
lab=$("$lab_bin" up lab/topologies/smartsockets-wan.toml | awk 'NR == 1 { print $2 }')
trap '"$lab_bin" down "$lab" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$lab_bin" exec das3-v-node --lab "$lab" -- "$lab_bin" probe serve --name node --port 7000 > "$work/probe.ready" &
disown $!
"$lab_bin" exec das3-v-node --lab "$lab" -- "$bin/reach" --state-dir "$work/node" \
  listen --keep --addr-file "$work/addr" < /dev/null > /dev/null 2>&1 &
disown $!
for _ in $(seq 200); do [ -s "$work/addr" ] && [ -s "$work/probe.ready" ] && break; sleep 0.05; done
node=$(sed 's/.*a=//; s/,/\n/g' "$work/addr" | grep '^203\.' | head -1 | cut -d: -f1)
# One warm-up each: the lab's first packets pay for ARP across the delay hops.
"$lab_bin" exec desktop --lab "$lab" -- "$lab_bin" probe connect "$node:7000" > /dev/null
for _ in $(seq "$N"); do
  "$lab_bin" exec desktop --lab "$lab" -- "$lab_bin" probe connect "$node:7000" |
    sed 's/.*"ms":\([0-9.]*\).*/\1/' >> "$work/tcp"
  echo x | "$lab_bin" exec desktop --lab "$lab" -- "$bin/reach" --state-dir "$work/desktop" -v \
    connect "$(cat "$work/addr")" 2>&1 >/dev/null | sed -n 's/.*setup=\([0-9.]*\)ms.*/\1/p' >> "$work/reach"
done
median() { sort -n "$1" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
tcp=$(median "$work/tcp"); reach=$(median "$work/reach")
printf '%-48s %10s\n' "figure (median of $N, desktop -> das3-v-node)" "ms"
printf '%-48s %10.2f\n' "plain TCP connect + 1 round trip (baseline)" "$tcp"
printf '%-48s %10.2f\n' "reach direct setup (TCP + Noise IK handshake)" "$reach"
awk -v r="$reach" -v t="$tcp" 'BEGIN { printf "%-48s %10.3f\n%-48s %10.2f\n", "ratio", r / t, "added beyond TCP + 1 round trip (ms)", r - t }'
