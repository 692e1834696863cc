#!/usr/bin/env bash
# Sampling s/image: `sdtune sample` against diffusers' StableDiffusionPipeline
# on the same model, prompts, seeds, scheduler (DDIM), steps, guidance and size,
# CPU, fp32, in the same run; prints a Markdown table for BENCHMARKS.md.
#
#   bash scripts/bench-sample.sh [MODEL=tests/fixtures/tiny-sd1] [STEPS=20] [SIZES="64 256"] [ROUNDS=5] [THREADS=2]
#
# Each round runs sdtune then diffusers (the order alternates between rounds),
# each as a fresh process rendering 2 prompts x 2 seeds with guidance 7.5 in one
# batch of 4 and writing the PNGs. "sample" is the rendering alone, timed inside
# each process (sdtune prints it; the Python side times its pipeline call and
# the saves); "process" is the whole command, start to exit (for diffusers that
# includes importing torch and diffusers). The medians over the rounds are
# reported, and the ratio diffusers/sdtune (above 1: sdtune is faster).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
model="${1:-tests/fixtures/tiny-sd1}"
steps="${2:-20}"
sizes="${3:-64 256}"
rounds="${4:-5}"
threads="${5:-2}"
py="$root/.venv-ref/bin/python"
export VIRTUAL_ENV="$root/.venv" PATH="$root/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
cargo build --release --bin sdtune >&2
bin="$root/target/release/sdtune"
out="$root/target/bench-sample"
mkdir -p "$out"
prompts="a red car by the sea|a blue mug on a desk"
seeds="1,2"

ours() {
  local size="$1" start end log
  start=$(date +%s.%N)
  log=$(OMP_NUM_THREADS="$threads" "$bin" sample --device cpu --model "$model" \
    --prompt "a red car by the sea" --prompt "a blue mug on a desk" --negative-prompt blurry --seeds "$seeds" \
    --steps "$steps" --guidance 7.5 --width "$size" --height "$size" --batch-size 4 --out "$out/grid.png" 2>&1 >/dev/null)
  end=$(date +%s.%N)
  local sample
  sample=$(sed -n 's/^rendered \([0-9]*\) images in \([0-9.]*\) s.*/\2/p' <<<"$log")
  echo "{\"side\": \"sdtune\", \"size\": $size, \"images\": 4, \"sample_s\": $sample, \"process_s\": $(echo "$end - $start" | bc)}"
}

theirs() {
  local size="$1" start end line
  start=$(date +%s.%N)
  line=$(OMP_NUM_THREADS="$threads" "$py" scripts/bench_sample_diffusers.py "$model" "$steps" "$size" "$threads" "$out/diffusers" "$prompts" "$seeds")
  end=$(date +%s.%N)
  echo "${line%\}}, \"size\": $size, \"wall_s\": $(echo "$end - $start" | bc)}"
}

lines=""
for size in $sizes; do
  for r in $(seq "$rounds"); do
    if (( r % 2 )); then
      lines+="$(ours "$size")"$'\n'"$(theirs "$size")"$'\n'
    else
      lines+="$(theirs "$size")"$'\n'"$(ours "$size")"$'\n'
    fi
  done
done
echo "$lines" >&2

LINES="$lines" MODEL="$model" STEPS="$steps" THREADS="$threads" "$py" - <<'PY'
import json, os, platform, statistics
rows = [json.loads(l) for l in os.environ["LINES"].splitlines() if l.strip()]
def med(side, size, key):
    vals = [r[key] for r in rows if r["side"] == side and r["size"] == size]
    return statistics.median(vals), len(vals)
print(f"CPU: {platform.machine()}, {os.cpu_count()} cores; model {os.environ['MODEL']}, DDIM {os.environ['STEPS']} steps, "
      f"guidance 7.5, 2 prompts x 2 seeds in one batch, fp32, {os.environ['THREADS']} threads")
print("| size | sdtune s/image | diffusers s/image | ratio | sdtune process s | diffusers process s | ratio | rounds |")
print("|---|---|---|---|---|---|---|---|")
for size in sorted({r["size"] for r in rows}):
    (o, n), (t, _) = med("sdtune", size, "sample_s"), med("diffusers", size, "sample_s")
    (op, _), (tp, _) = med("sdtune", size, "process_s"), med("diffusers", size, "wall_s")
    print(f"| {size}x{size} | {o / 4:.3f} | {t / 4:.3f} | {t / o:.2f}x | {op:.2f} | {tp:.2f} | {tp / op:.2f}x | {n} |")
PY
