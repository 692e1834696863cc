#!/usr/bin/env bash
# The demo's LoRA (configs/demo.yaml on datasets/example-brand, built-in tiny
# model, CPU) trained UNet-only and with --train-text-encoder, alternating
# UNet, TE (200 steps), UNet, TE (40 steps) in one session, then each 200-step LoRA sampled as the demo
# samples it (sdtune sample --compare: palette distance and seed spread).
# Training grids are off (--sample-every 0) so steps/s is the step alone.
# For BENCHMARKS.md (issue 15); figures there.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=$root/target/release/sdtune
work=$root/output/bench-te
rm -rf "$work" && mkdir -p "$work" && cp configs/demo.yaml "$work/sdtune.yaml" && cd "$work"
"$bin" prepare "$root/datasets/example-brand" >/dev/null
# Round 1: the demo's 200 steps (sampled below); round 2: 40 steps, timing only.
for round in 1 2; do
  steps=200 && [ "$round" = 2 ] && steps=40
  for kind in unet te; do
    extra=()
    [ "$kind" = te ] && extra=(--train-text-encoder)
    "$bin" train --sample-every 0 --steps "$steps" --name "$kind-$round" "${extra[@]}" >/dev/null
    # steps/s over the last 3/4 of the steps (the first hold the warm-up).
    python3 - "output/$kind-$round/metrics.jsonl" "$kind" "$round" "$steps" <<'PY'
import json, sys
rows = {r["step"]: r for r in map(json.loads, open(sys.argv[1])) if "step" in r and "seconds" in r}
last = int(sys.argv[4]); first = last // 4
print(f"{sys.argv[2]} round {sys.argv[3]}: {(last - first) / (rows[last]['seconds'] - rows[first]['seconds']):.3f} steps/s over steps {first + 1}..{last}")
PY
  done
done
for kind in unet te; do
  "$bin" sample --prompt "tidewave style, a circle" --prompt "tidewave style, a star" \
    --prompt "tidewave style, a square" --seeds 1,2,3,4 --steps 20 --guidance 5 \
    --lora "output/$kind-1/$kind-1.safetensors" --compare --out "output/$kind-1/before-after.png" >/dev/null
  echo "$kind: $(cat output/$kind-1/before-after.consistency.json)"
done
