#!/usr/bin/env bash
# Benchmarks `sdtune prepare`'s stages and diffusers' VAE encode on the same
# images in the same run; prints a Markdown table for BENCHMARKS.md.
#
#   bash scripts/bench-prepare.sh [IMAGES=48] [ENCODE=2] [ROUNDS=2] [THREADS=2]
#
# Stage 1: check + decode + centre crop + Lanczos3 resize of IMAGES camera-sized
# JPEGs (1600x1200) to their 512-px bucket, rayon pool of 1 vs 2 threads.
# Stage 2: VAE encode (SD1.x-sized VAE, random weights saved once by diffusers and
# loaded by both sides) of ENCODE preprocessed images at batch 1, fp32, CPU;
# sdtune and diffusers alternate ROUNDS times and each keeps its best round,
# so both see the same machine load. Needs .venv (libtorch) and .venv-ref (diffusers).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
images="${1:-48}"
encode="${2:-2}"
rounds="${3:-2}"
threads="${4:-2}"
out="$root/target/bench-prepare"
py="$root/.venv-ref/bin/python"
export VIRTUAL_ENV="$root/.venv" PATH="$root/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1

mkdir -p "$out"
if [ ! -f "$out/vae/diffusion_pytorch_model.safetensors" ]; then
  echo "making an SD1.x-sized VAE with random weights (seed 0) in $out/vae" >&2
  "$py" scripts/bench_prepare_diffusers.py make-vae "$out/vae"
fi
cargo build --release --example bench_prepare >&2
bench=target/release/examples/bench_prepare
lines="$("$bench" --out "$out" --images "$images" --rounds 3)"
for _ in $(seq "$rounds"); do
  lines+=$'\n'"$("$bench" --out "$out" --vae "$out/vae" --images "$images" --encode "$encode" --threads "$threads" --skip-decode)"
  lines+=$'\n'"$("$py" scripts/bench_prepare_diffusers.py encode "$out/vae" "$out/pixels.safetensors" "$threads")"
done
echo "$lines"

LINES="$lines" "$py" - <<'PY'
import json, os, platform
rows = [json.loads(l) for l in os.environ["LINES"].splitlines() if l.strip()]
dec = {r["threads"]: r for r in rows if r.get("stage") == "decode+resize"}
ours = max((r for r in rows if r.get("stage") == "vae-encode"), key=lambda r: r["images_per_s"])
theirs = max((r for r in rows if r["side"] == "diffusers"), key=lambda r: r["images_per_s"])
print()
print(f"CPU: {platform.machine()}, {os.cpu_count()} cores")
print("| stage | sdtune | diffusers | ratio |")
print("|---|---|---|---|")
print(f"| check+decode+crop+Lanczos3 resize, 1 thread ({dec[1]['images']} x {dec[1]['input']}) | {dec[1]['images_per_s']:.2f} img/s | | |")
print(f"| same, 2 threads | {dec[2]['images_per_s']:.2f} img/s | | {dec[2]['images_per_s'] / dec[1]['images_per_s']:.2f}x vs 1 thread |")
h, w = ours["size"]
print(f"| VAE encode fp32, {w}x{h}, batch 1, {ours['threads']} threads | {ours['images_per_s']:.3f} img/s | {theirs['images_per_s']:.3f} img/s | {ours['images_per_s'] / theirs['images_per_s']:.2f}x |")
PY
