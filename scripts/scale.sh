#!/usr/bin/env bash
# Measures how the hub federation scales, in virtual time (reach-sim): 10,
# 100 and 1000 hubs with 100 nodes each, seed 1, random topology, then the
# 100-hub federation with a tenth of its hubs crashed and restarted, and cut
# in two for 20 s. Writes
# one JSON report per run to docs/scale/ and prints a table; docs/scale.md
# quotes it. Needs only Rust; the 1000-hub run takes several minutes and
# several GiB of memory (a thousand hubs' tables in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

step "cargo build --release -p reach-sim"
cargo build --release --locked -p reach-sim
mkdir -p docs/scale
sim=target/release/reach-sim
for hubs in 10 100 1000; do
  nodes=$((hubs * 100))
  step "reach-sim federation --hubs $hubs --nodes $nodes --seed 1"
  "$sim" federation --hubs "$hubs" --nodes "$nodes" --seed 1 --json "docs/scale/h$hubs.json" > /dev/null
done
step "reach-sim federation --hubs 100 --nodes 10000 --seed 1 --kill 0.1"
"$sim" federation --hubs 100 --nodes 10000 --seed 1 --kill 0.1 --json docs/scale/h100-kill.json > /dev/null
step "reach-sim federation --hubs 100 --nodes 10000 --seed 1 --partition-secs 20"
"$sim" federation --hubs 100 --nodes 10000 --seed 1 --partition-secs 20 --json docs/scale/h100-cut.json > /dev/null

step "results (docs/scale/*.json)"
python3 - <<'PY'
import json, glob
rows = [json.load(open(f)) for f in sorted(glob.glob("docs/scale/h*.json"), key=lambda f: (len(f), f))]
print("| hubs | nodes | converged | virtual s | rounds | messages | MB | route KB/hub | directory KB/hub | lookup ms (median/max) | recovery s | heal s | wall s | peak RSS MB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    f = r.get("faults") or {}
    rec = f"{f['recovery_ms']/1000:.1f}" if f.get("recovery_ms") is not None else "-"
    c = r.get("partition") or {}
    heal = f"{c['heal_ms']/1000:.1f}" if c.get("heal_ms") is not None else "-"
    lk = r["lookups"]
    print(f"| {r['hubs']} | {r['nodes']} | {r['converged']} | {r['virtual_ms_to_converge']/1000:.2f} | {r['rounds_to_converge']} "
          f"| {r['messages']} | {r['bytes']/1e6:.0f} | {r['max_route_bytes_per_hub']/1e3:.0f} | {r['max_directory_bytes_per_hub']/1e3:.0f} "
          f"| {lk['median_ms']}/{lk['max_ms']} | {rec} | {heal} | {r['wall_ms']/1000:.1f} | {(r['peak_rss_bytes'] or 0)/1e6:.0f} |")
PY
