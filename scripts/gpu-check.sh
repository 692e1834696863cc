#!/usr/bin/env bash
# The CUDA path proven on a GPU and the GPU benchmarks against diffusers+peft,
# prepared here and run there in one call of about 5 minutes.
#
# Here (no GPU needed):
#   bash scripts/gpu-check.sh prepare
#     builds sdtune (release), writes it stripped and xz-compressed to
#     gpu-carry/sdtune.xz, the bench configs to gpu-carry/configs/ and the
#     diffusers+peft wheels the GPU machine lacks to gpu-carry/wheels/
#     (gpu-carry/ is git-ignored; about 20 MB). It checks that the working
#     tree plus the carry fit the device tool's 64 MiB.
#
# There, through the device tool, carrying gpu-carry:
#   bash scripts/gpu-check.sh run
#     1. installs the carried wheels (--no-index --no-deps) into /tmp/site;
#        python3 there has torch 2.11.0+cu130; LD_LIBRARY_PATH -> its torch/lib
#     2. sdtune doctor: CUDA must be seen
#     3. tiny parity GPU vs CPU (fp32): the first training-step loss, and a
#        sampled image of the tiny fixture (max pixel difference)
#     4. end to end on CUDA, bf16 and fp16: prepare -> train -> sample (LoRA);
#        then train --nproc 1 over NCCL (one GPU cannot run two NCCL ranks)
#     5. bench train sd15 512 px bf16 batch 1 and 4, bench sample (30 steps,
#        CFG 7.5), bench encode; SDXL base at 1024 px: bench train bf16 batch 1
#        with and without gradient checkpointing, bench sample (30 steps, CFG
#        7.5); each then the same through diffusers+peft. SDXL goals there:
#        >= 4 LoRA steps/s, peak <= 12 GB with checkpointing, <= 2.5 s/image.
#     6. a Markdown table of the figures and ratios
#   Results land in $OUT (the device tool's folder; target/gpu-check here):
#   gpu-check.md, results.jsonl, gpu-check.log.
#
# Dry run on the CPU (proves the script runs; figures mean nothing):
#   bash scripts/gpu-check.sh prepare && PY=.venv-bench/bin/python bash scripts/gpu-check.sh run --device cpu
#   (--device cpu also shrinks the benchmarks to the tiny model and a few steps)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
carry="$root/gpu-carry"
mode="${1:-}"
shift || true

# Wheels the GPU machine's python3 (3.12, torch 2.11.0, numpy, pillow,
# accelerate 1.15.0, huggingface_hub 1.33, tokenizers 0.23.2, transformers
# 5.17.0, ...) lacks at the versions scripts/bench/requirements.txt pins. All
# pure Python. transformers stays at the machine's 5.17 (its wheel alone is
# 13.5 MB, and the device tool takes 64 MiB for the working tree and the
# carry together); the diffusers side only uses its CLIPTextModel there.
GPU_WHEELS=(diffusers==0.42.1 peft==0.21.2 importlib_metadata==10.2.0 lazy-importer==0.1.0)
LIMIT_BYTES=$((64 * 1024 * 1024))

if [ "$mode" = prepare ]; then
  export VIRTUAL_ENV="$root/.venv" PATH="$root/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
  cargo build --release --bin sdtune
  rm -rf "$carry"
  mkdir -p "$carry/wheels"
  # Stripped and xz-compressed: 33 MB -> 13 MB (the embedded tiny model included).
  strip -o "$carry/sdtune" target/release/sdtune 2>/dev/null || cp target/release/sdtune "$carry/sdtune"
  for arch in tiny sd15 sdxl; do
    "$carry/sdtune" bench train --arch "$arch" --dump-configs "$carry/configs/$arch"
  done
  xz -9 -T0 "$carry/sdtune"
  pip_py="$root/.venv-bench/bin/python"
  [ -x "$pip_py" ] || pip_py=python3
  "$pip_py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$carry/wheels" "${GPU_WHEELS[@]}"
  du -sh "$carry"
  # What travels: tracked + untracked-not-ignored files, and the carry.
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
  extra=$(du -sb "$carry" | cut -f1)
  echo "working tree $((tree / 1048576)) MiB + carry $((extra / 1048576)) MiB = $(((tree + extra) / 1048576)) MiB (limit 64 MiB)"
  if [ $((tree + extra)) -gt "$LIMIT_BYTES" ]; then
    echo "too big for the device tool: shrink the carry or the working tree first" >&2
    exit 1
  fi
  echo "now: device run, carry [\"gpu-carry\"], command: bash scripts/gpu-check.sh run"
  exit 0
fi
if [ "$mode" != run ]; then
  echo "usage: bash scripts/gpu-check.sh prepare | run [--device cpu]" >&2
  exit 2
fi

device=cuda
if [ "${1:-}" = "--device" ]; then device="$2"; fi
out="${OUT:-$root/target/gpu-check}"
mkdir -p "$out"
log="$out/gpu-check.log"
results="$out/results.jsonl"
: >"$results"
exec > >(tee -a "$log") 2>&1
py="${PY:-python3}"
[ -f "$carry/sdtune.xz" ] || { echo "no $carry/sdtune.xz: run 'bash scripts/gpu-check.sh prepare' first and carry gpu-carry"; exit 1; }
bin="$(mktemp -d)/sdtune"
xz -dc "$carry/sdtune.xz" >"$bin"
chmod +x "$bin"
started=$(date +%s)
stage() { echo; echo "== $* ($(($(date +%s) - started)) s)"; }
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error HF_HUB_OFFLINE=1

stage "1. environment"
torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
site=/tmp/sdtune-gpu-site
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$carry"/wheels/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c 'import torch, diffusers, peft, transformers, huggingface_hub, accelerate; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__, "peft", peft.__version__, "transformers", transformers.__version__, "hub", huggingface_hub.__version__, "accelerate", accelerate.__version__)'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"$bin" --version

stage "2. sdtune doctor"
"$bin" doctor | tee "$out/doctor.txt"
if [ "$device" = cuda ] && ! grep -qE '^cuda +yes' "$out/doctor.txt"; then
  echo "FAIL: sdtune sees no CUDA device"; exit 1
fi

stage "3. tiny parity, $device vs cpu (fp32)"
loss() { "$bin" bench train --arch tiny --device "$1" --precision fp32 --steps 2 --warmup 0 2>/dev/null | "$py" -c 'import json, sys; print(json.load(sys.stdin)["loss"])'; }
l_cpu="$(loss cpu)"; l_dev="$(loss "$device")"
echo "training loss after 2 steps: cpu $l_cpu, $device $l_dev"
"$py" -c "import sys; a, b = $l_cpu, $l_dev; d = abs(a - b) / max(abs(a), 1e-6); print(f'relative difference {d:.2e}'); sys.exit(0 if d < 1e-3 else 1)" \
  || { echo "FAIL: training losses differ"; exit 1; }
tmp="$(mktemp -d)"
for d in cpu "$device"; do
  "$bin" sample --model tests/fixtures/tiny-sd1 --prompt "an orange poster with a blue circle" --seed 7 --steps 10 \
    --width 64 --height 64 --device "$d" --precision fp32 --out "$tmp/parity-$d.png" >/dev/null
done
"$py" - "$tmp/parity-cpu.png" "$tmp/parity-$device.png" <<'PY'
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in sys.argv[1:3])
diff = np.abs(a - b).max()
print(f"sampled image, max pixel difference {diff}/255")
sys.exit(0 if diff <= 3 else 1)
PY

stage "4. end to end on $device: prepare -> train -> sample, bf16 and fp16"
work="$tmp/work"
mkdir -p "$work/brand"
"$py" - "$work/brand" <<'PY'
import sys
from PIL import Image, ImageDraw
for i in range(6):
    img = Image.new("RGB", (96, 96), (250, 120, 30 + 10 * i))
    ImageDraw.Draw(img).ellipse((20, 10, 60 + 3 * i, 50 + 3 * i), fill=(20, 40, 200))
    img.save(f"{sys.argv[1]}/poster{i}.png")
    open(f"{sys.argv[1]}/poster{i}.txt", "w").write(f"an orange acme poster with a blue circle {i}")
PY
for prec in bf16 fp16; do
  rm -rf "$work/.sdtune" "$work/sdtune.yaml"
  (cd "$work" && "$bin" prepare brand --model "$root/tests/fixtures/tiny-sd1" --device "$device" --precision "$prec" \
    --resolution 64 --min-bucket 32 --max-bucket 128 --bucket-step 32 --min-side 64 | tail -2)
  (cd "$work" && "$bin" train --device "$device" --precision "$prec" --steps 30 --lr 1e-3 --save-every 0 \
    --sample-every 0 --name "e2e-$prec" | tail -1)
  "$bin" sample --model tests/fixtures/tiny-sd1 --lora "$work/output/e2e-$prec/e2e-$prec.safetensors" \
    --prompt "an orange acme poster" --seed 1 --steps 10 --width 64 --height 64 --device "$device" \
    --precision "$prec" --out "$out/e2e-$prec.png" | tail -1
done

stage "4b. data parallel on $device: train --nproc 1 (NCCL on cuda, Gloo on cpu)"
# A one-GPU machine cannot run two NCCL ranks: this proves the NCCL group
# (store, communicator, all-reduce, broadcast, barrier) on one; figures for
# --nproc 2 and more are owed to a multi-GPU machine (BENCHMARKS.md).
if grep -qE '^--nproc +gloo yes' "$out/doctor.txt"; then
  (cd "$work" && "$bin" train --nproc 1 --device "$device" --precision fp32 --steps 10 --lr 1e-3 --save-every 0 \
    --sample-every 0 --dist-timeout 120 --name "ddp-nproc1" | tail -1)
  grep -q '"world_size":1' "$work/output/ddp-nproc1/metrics.jsonl" || { echo "FAIL: --nproc 1 wrote no metrics"; exit 1; }
  if [ "$device" = cuda ] && ! grep -qE '^--nproc +gloo yes, nccl yes' "$out/doctor.txt"; then
    echo "FAIL: this sdtune was built without NCCL (scripts/bootstrap.sh installs CUDA's headers for it)"; exit 1
  fi
else
  echo "skipped: this sdtune was built without gloo's headers"
fi

# bench KIND ARCH RES FLAGS...: sdtune, then the same through diffusers+peft.
bench() {
  local kind="$1" arch="$2" res="$3"
  shift 3
  local flags=(--resolution "$res" --device "$device" "$@")
  echo "-- sdtune bench $kind $arch ${res}px $*"
  "$bin" bench "$kind" --arch "$arch" "${flags[@]}" | tee -a "$results"
  echo "-- diffusers+peft $kind $arch ${res}px $*"
  "$py" scripts/bench/diffusers_bench.py "$kind" --configs "$carry/configs/$arch" --arch "$arch" "${flags[@]}" \
    | tee -a "$results" || echo "diffusers side failed"
}

stage "5. benchmarks on $device"
if [ "$device" = cuda ]; then
  bench train sd15 512 --precision bf16 --batch-size 1 --steps 30 --warmup 5
  bench train sd15 512 --precision bf16 --batch-size 4 --steps 20 --warmup 5
  bench sample sd15 512 --precision bf16 --batch-size 4 --images 8 --steps 30 --guidance 7.5 --warmup 4
  bench sample sd15 512 --precision bf16 --batch-size 1 --images 4 --steps 30 --guidance 7.5 --warmup 1
  bench encode sd15 512 --precision bf16 --batch-size 4 --steps 10 --warmup 2
  bench train sdxl 1024 --precision bf16 --batch-size 1 --steps 20 --warmup 5
  bench train sdxl 1024 --precision bf16 --batch-size 1 --steps 20 --warmup 5 --gradient-checkpointing
  bench sample sdxl 1024 --precision bf16 --batch-size 1 --images 2 --steps 30 --guidance 7.5 --warmup 1
else
  # Dry run: the same code paths on the tiny model, a few steps.
  bench train tiny 64 --batch-size 1 --steps 3 --warmup 1
  bench train tiny 64 --batch-size 4 --steps 3 --warmup 1
  bench sample tiny 64 --batch-size 2 --images 2 --steps 5 --warmup 1
  bench encode tiny 64 --batch-size 2 --steps 2 --warmup 1
  bench train sdxl 128 --batch-size 1 --steps 1 --warmup 0 --gradient-checkpointing
fi

stage "6. table"
"$py" scripts/bench/compare.py "$results" | tee "$out/gpu-check.md"
rm -rf "$tmp"
stage "done"
