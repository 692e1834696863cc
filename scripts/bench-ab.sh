#!/usr/bin/env bash
# Same-run A/B of two sdtune binaries on the SD1.5 config (random weights):
# `bench train` and `bench sample` at 256 px, alternating A and B each round
# so both see the same machine load. Prints one line per measurement and the
# B/A ratios of the best rounds (higher is better for B).
#
#   bash scripts/bench-ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
a=$1 b=$2 rounds=${3:-2} threads=${4:-1}
export OMP_NUM_THREADS=$threads
out=$(mktemp -d)
for round in $(seq "$rounds"); do
  for side in a b; do
    bin=${!side}
    "$bin" bench train --arch sd15 --resolution 256 --steps 4 --warmup 2 --device cpu 2>/dev/null \
      | sed "s/^/{\"side\":\"$side\",\"round\":$round,\"kind\":\"train\",\"line\":/; s/\$/}/" >> "$out/results.jsonl"
    "$bin" bench sample --arch sd15 --resolution 256 --steps 4 --warmup 0 --device cpu 2>/dev/null \
      | sed "s/^/{\"side\":\"$side\",\"round\":$round,\"kind\":\"sample\",\"line\":/; s/\$/}/" >> "$out/results.jsonl"
  done
done
python3 - "$out/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    line = r["line"]
    if r["kind"] == "train":
        value, better = line["steps_per_s"], max
    else:
        value, better = 1.0 / line["s_per_image"], max
    print(f'round {r["round"]} {r["side"]} {r["kind"]}: ' + (f'{line["steps_per_s"]:.4f} steps/s' if r["kind"] == "train" else f'{line["s_per_image"]:.2f} s/image') + f', peak {line.get("peak_mem_mb", float("nan")):.0f} MB')
    key = (r["side"], r["kind"])
    best[key] = better(best.get(key, value), value)
for kind in ["train", "sample"]:
    if ("a", kind) in best and ("b", kind) in best:
        print(f'{kind}: B/A speed ratio of the best rounds {best[("b", kind)] / best[("a", kind)]:.3f}')
PY
