#!/usr/bin/env bash
# The main demo. Until the namespace lab (step 2) lands, it runs on loopback
# (listeners bind 127.0.0.1, so no traffic reaches any other address):
# two nodes with their own identities; 100 MB each way through
# `reach listen` / `reach connect`, checked by sha256; then a connection to a
# wrong NodeId, refused with an identity mismatch. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages coreutils:sha256sum
ensure_rust_tools
step "building reach (release)"
cargo build --release --locked -p reach-cli
reach=$PWD/target/release/reach

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"

step "two nodes, each with its own identity"
echo "node A: $("$reach" --state-dir a id)"
echo "node B: $("$reach" --state-dir b id)"

step "making 100 MB of test data each way"
head -c 100M /dev/urandom > to_a.bin
head -c 100M /dev/urandom > to_b.bin

step "A: reach listen"
"$reach" --state-dir a -v listen --bind 127.0.0.1 --addr-file addr.txt < to_b.bin > got_a.bin 2> a.log &
for _ in $(seq 200); do [ -s addr.txt ] && break; sleep 0.05; done
[ -s addr.txt ] || { cat a.log; die "listener did not start"; }
echo "A listens on $(cat addr.txt)"

step "B: reach connect <A's virtual address>"
start=$(date +%s.%N)
"$reach" --state-dir b -v connect "$(cat addr.txt)" < to_a.bin > got_b.bin
end=$(date +%s.%N)
wait
grep -h "connected\|accepted" a.log || true
awk -v s="$start" -v e="$end" 'BEGIN { printf "200 MB moved (100 MB each way, at once) in %.2f s\n", e - s }' 

step "checking sha256 both ways"
check() { [ "$(sha256sum < "$1")" = "$(sha256sum < "$2")" ] && echo "ok: $3" || die "MISMATCH: $3"; }
check to_a.bin got_a.bin "B -> A intact"
check to_b.bin got_b.bin "A -> B intact"

step "a virtual address with the wrong NodeId is refused"
"$reach" --state-dir a listen --bind 127.0.0.1 --keep --addr-file addr2.txt < /dev/null > /dev/null 2>&1 &
for _ in $(seq 200); do [ -s addr2.txt ] && break; sleep 0.05; done
impostor="$("$reach" --state-dir c id):$(cut -d: -f2- addr2.txt)"
if "$reach" --state-dir b connect --timeout 5 "$impostor" < /dev/null; then
  die "connecting to a wrong NodeId succeeded"
fi
echo "ok: refused, as it must be"
step "demo done"
