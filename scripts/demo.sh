#!/usr/bin/env bash
# The main demo: the SmartSockets testbed (Table 2 of the paper) built from
# network namespaces with real NATs, firewalls and sshd; every gateway checked;
# every pair of compute nodes tried with plain TCP and with reach; then 100 MB
# each way through reach between a NATed desktop and a cluster node, checked by
# sha256, and a connection to a wrong NodeId refused; then splicing through
# every pair of NAT types of the NAT zoo, and a 200 MB routed transfer that
# moves onto a spliced connection mid-transfer. Needs root; installs what
# it needs. All traffic stays inside the lab's namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

require_root "the demo builds network namespaces"
ensure_packages iproute2:ip nftables:nft openssh-server:/usr/sbin/sshd openssh-client:ssh coreutils:sha256sum
ensure_rust_tools
step "building reach and reach-lab (release)"
cargo build --release --locked -p reach-cli -p reach-lab
bin=$PWD/target/release
lab_bin="$bin/reach-lab"

"$lab_bin" demo --file lab/topologies/smartsockets.toml

step "100 MB each way: desktop (behind a home NAT) <-> das3-v-node, through reach"
work=$(mktemp -d)
lab=$("$lab_bin" up lab/topologies/smartsockets.toml | awk 'NR == 1 { print $2 }')
cleanup() { "$lab_bin" down "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
head -c 100M /dev/urandom > "$work/up.bin"
head -c 100M /dev/urandom > "$work/down.bin"
"$lab_bin" exec das3-v-node --lab "$lab" -- "$bin/reach" --state-dir "$work/node" -v \
  listen --addr-file "$work/addr.txt" < "$work/down.bin" > "$work/got_up.bin" 2> "$work/node.log" &
for _ in $(seq 200); do [ -s "$work/addr.txt" ] && break; sleep 0.05; done
[ -s "$work/addr.txt" ] || { cat "$work/node.log"; die "listener did not start"; }
echo "das3-v-node listens on $(cat "$work/addr.txt")"
start=$(date +%s.%N)
"$lab_bin" exec desktop --lab "$lab" -- "$bin/reach" --state-dir "$work/desktop" -v \
  connect "$(cat "$work/addr.txt")" < "$work/up.bin" > "$work/got_down.bin" 2> "$work/desktop.log"
end=$(date +%s.%N)
wait
grep -h "connected" "$work/desktop.log" | sed 's/^.*INFO //' || true
awk -v s="$start" -v e="$end" 'BEGIN { printf "200 MB moved (100 MB each way, at once) in %.2f s\n", e - s }'
check() { [ "$(sha256sum < "$1")" = "$(sha256sum < "$2")" ] && echo "ok: $3" || die "MISMATCH: $3"; }
check "$work/up.bin" "$work/got_up.bin" "desktop -> das3-v-node intact (sha256)"
check "$work/down.bin" "$work/got_down.bin" "das3-v-node -> desktop intact (sha256)"

step "a virtual address with the wrong NodeId is refused"
"$lab_bin" exec das3-v-node --lab "$lab" -- "$bin/reach" --state-dir "$work/node" \
  listen --keep --addr-file "$work/addr2.txt" < /dev/null > /dev/null 2>&1 &
disown $!   # stopped by the lab's teardown; no job-control message
for _ in $(seq 200); do [ -s "$work/addr2.txt" ] && break; sleep 0.05; done
impostor="$("$bin/reach" --state-dir "$work/other" id):$(cut -d: -f2- "$work/addr2.txt")"
if "$lab_bin" exec desktop --lab "$lab" -- "$bin/reach" --state-dir "$work/desktop" \
  connect --timeout 5 "$impostor" < /dev/null; then
  die "connecting to a wrong NodeId succeeded"
fi
echo "ok: refused, as it must be"
"$lab_bin" down "$lab" > /dev/null

step "splice through every pair of NAT types (lab/topologies/nat-zoo.toml, 5 attempts per pair)"
"$lab_bin" splice lab/topologies/nat-zoo.toml --attempts 5 | grep -v '^  '
echo "(nat-apdm-rand allocates ports at random: splicing is declined at once and such pairs are routed)"

step "200 MB nat-eim-2 -> nat-eim: routed (hub on a 400 Mbit/s link), spliced, and routed moving to splice mid-transfer"
"$lab_bin" transfer lab/topologies/nat-zoo.toml
step "demo done"
