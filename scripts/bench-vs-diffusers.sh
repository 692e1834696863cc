#!/usr/bin/env bash
# sdtune against diffusers+peft on the same model configs, in the same run,
# alternating, and the ratios. CPU by default; DEVICE=cuda on a GPU machine.
#
#   bash scripts/bench-vs-diffusers.sh                 # everything below, CPU
#   ONLY=train ROUNDS=3 bash scripts/bench-vs-diffusers.sh
#   QUICK=1 bash scripts/bench-vs-diffusers.sh         # a minute: tiny only, few steps (proves it runs)
#
# Cases (batch 1, LoRA rank 16 on attn2.{to_q,to_k,to_v,to_out.0}, min-SNR 5, fp32 on CPU):
#   train  tiny @ 64 px (the test fixture's sizes, native), tiny @ 256 px, sd15 @ 256 px
#   sample tiny @ 64 px (30 DDIM steps, guidance 7.5), sd15 @ 256 px (SD15_SAMPLE_STEPS, guidance 7.5)
#   encode sd15 VAE + text encoder @ 256 px
#   sdxl-train, sdxl-ckpt, sdxl-sample (not in the default set: minutes per step on a CPU):
#          the full SDXL base config @ 512 px, training without and with gradient
#          checkpointing, sampling SDXL_SAMPLE_STEPS DDIM steps with guidance 7.5, cold
# Models are built from the config files `sdtune bench --dump-configs` writes,
# with random weights, by both sides (same parameter count, printed).
# Each case runs ROUNDS times, sdtune and diffusers alternating (who goes first
# swaps each round); each side keeps its best round for speed and its highest
# peak memory. CPU seconds (user + system, all threads) are shown beside the
# wall-clock figures: on a machine others share they are the steadier ratio.
#
# Environment: THREADS (torch threads for both sides, default 1: on a busy
# 2-core machine two OpenMP threads stall on each other), ROUNDS (2),
# SD15_TRAIN_STEPS (5), SD15_TRAIN_WARMUP (3), SD15_SAMPLE_STEPS (10),
# SD15_SAMPLE_WARMUP (1 image; 0 times both sides cold, as a user's first image),
# SDXL_RESOLUTION (512), SDXL_TRAIN_STEPS (1), SDXL_TRAIN_WARMUP (1), SDXL_SAMPLE_STEPS (4),
# ARCHS (tiny,sd15,sdxl: the model configs to run), DEVICE (cpu), PRECISION (fp32 on cpu, auto otherwise), ONLY (train,sample,encode; or sdxl-train,sdxl-ckpt,sdxl-sample), QUICK, SDTUNE (a
# prebuilt binary; otherwise cargo builds one), BENCH_PY (a python with the
# pinned stack; otherwise .venv-bench/ is created from scripts/bench/requirements.txt).
# Raw JSON lines go to target/bench/results-<time>.jsonl; the Markdown table to stdout.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads="${THREADS:-1}"
rounds="${ROUNDS:-2}"
device="${DEVICE:-cpu}"
# Both sides in one precision: fp32 on the CPU unless PRECISION says otherwise
# (sdtune's own `auto` picks bf16 on a CPU with AVX512-BF16, diffusers' fp32).
if [ "$device" = cpu ]; then precision="${PRECISION:-fp32}"; else precision="${PRECISION:-auto}"; fi
only="${ONLY:-train,sample,encode}"
archs="${ARCHS:-tiny,sd15,sdxl}"
sd15_train_steps="${SD15_TRAIN_STEPS:-5}"
sd15_train_warmup="${SD15_TRAIN_WARMUP:-3}"
sd15_sample_steps="${SD15_SAMPLE_STEPS:-10}"
sd15_sample_warmup="${SD15_SAMPLE_WARMUP:-1}"
sdxl_res="${SDXL_RESOLUTION:-512}"
sdxl_train_steps="${SDXL_TRAIN_STEPS:-1}"
sdxl_train_warmup="${SDXL_TRAIN_WARMUP:-1}"
sdxl_sample_steps="${SDXL_SAMPLE_STEPS:-4}"
out_dir="$root/target/bench"
mkdir -p "$out_dir"
results="$out_dir/results-$(date -u +%Y%m%dT%H%M%SZ).jsonl"

# The diffusers side: a virtualenv of its own with the pinned stack.
py="${BENCH_PY:-}"
if [ -z "$py" ]; then
  venv="$root/.venv-bench"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c "import diffusers, peft, transformers, torch" 2>/dev/null; then
    "$venv/bin/python" -m pip install -r "$root/scripts/bench/requirements.txt" >&2
  fi
  py="$venv/bin/python"
fi

# The sdtune side.
bin="${SDTUNE:-}"
if [ -z "$bin" ]; then
  export VIRTUAL_ENV="$root/.venv" PATH="$root/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
  cargo build --release --bin sdtune >&2
  bin="$root/target/release/sdtune"
fi

export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error HF_HUB_OFFLINE=1

for arch in tiny sd15 sdxl; do
  "$bin" bench train --arch "$arch" --dump-configs "$out_dir/configs/$arch" 2>/dev/null
done

# case KIND ARCH RESOLUTION EXTRA-FLAGS...: ROUNDS alternating runs of both sides.
run_case() {
  local kind="$1" arch="$2" res="$3"
  shift 3
  [[ ",$archs," == *",$arch,"* ]] || return 0
  local flags=(--resolution "$res" --batch-size 1 --device "$device" --precision "$precision" "$@")
  for r in $(seq "$rounds"); do
    local order=(sdtune diffusers)
    if [ $((r % 2)) -eq 0 ]; then order=(diffusers sdtune); fi
    for side in "${order[@]}"; do
      echo "round $r: $side $kind $arch ${res}px" >&2
      if [ "$side" = sdtune ]; then
        "$bin" bench "$kind" --arch "$arch" "${flags[@]}" 2>/dev/null | tail -1 >>"$results"
      else
        "$py" scripts/bench/diffusers_bench.py "$kind" --configs "$out_dir/configs/$arch" --arch "$arch" \
          --threads "$threads" "${flags[@]}" 2>/dev/null | tail -1 >>"$results"
      fi
    done
  done
}

want() { [[ ",$only," == *",$1,"* ]]; }
if [ -n "${QUICK:-}" ]; then
  want train && run_case train tiny 64 --steps 5 --warmup 1
  want sample && run_case sample tiny 64 --steps 5 --warmup 1
  want encode && run_case encode tiny 64 --steps 2 --warmup 1
else
  if want train; then
    run_case train tiny 64 --steps 40 --warmup 5
    run_case train tiny 256 --steps 10 --warmup 3
    run_case train sd15 256 --steps "$sd15_train_steps" --warmup "$sd15_train_warmup"
  fi
  if want sample; then
    run_case sample tiny 64 --steps 30 --images 4 --warmup 1
    run_case sample sd15 256 --steps "$sd15_sample_steps" --images 1 --warmup "$sd15_sample_warmup"
  fi
  if want encode; then
    run_case encode sd15 256 --steps 3 --warmup 1
  fi
  want sdxl-train && run_case train sdxl "$sdxl_res" --steps "$sdxl_train_steps" --warmup "$sdxl_train_warmup"
  want sdxl-ckpt && run_case train sdxl "$sdxl_res" --steps "$sdxl_train_steps" --warmup "$sdxl_train_warmup" --gradient-checkpointing
  want sdxl-sample && run_case sample sdxl "$sdxl_res" --steps "$sdxl_sample_steps" --images 1 --warmup 0
fi

echo "raw results: $results" >&2
"$py" scripts/bench/compare.py "$results"
