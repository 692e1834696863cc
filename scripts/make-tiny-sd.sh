#!/usr/bin/env bash
# Makes models/tiny-sd/, the tiny SD1.x-architecture base model sdtune embeds
# as its default, from nothing but this repository, on the CPU:
#
#   1. 4000 procedurally drawn, captioned 64-px images of coloured shapes
#      ("a red circle on a blue background"), and 4000 generic ones in any
#      colour and pattern for the VAE              examples/make_shapes.rs
#   2. the UNet and CLIP text encoder at a seeded random init, the real CLIP
#      tokenizer, SD1's noise schedule              examples/tiny_sd.rs init
#   3. the VAE, trained on the generic images (so it renders any colour,
#      not only the shapes' eight)                  examples/train_vae.rs
#   4. sdtune prepare on the shapes with that VAE and text encoder
#   5. sdtune train --full: every UNet weight, from the random init
#   6. the result in fp16, diffusers layout         examples/tiny_sd.rs pack
#
# The text encoder stays at its random init (frozen): a random CLIP still
# gives each caption its own embedding, which is all the UNet needs.
#
#   bash scripts/make-tiny-sd.sh                 # about 30 minutes on 2 cores
#   UNET_STEPS=300 VAE_STEPS=200 bash scripts/make-tiny-sd.sh   # a quick rough one
#
# Work files go to target/tiny-sd-build/; only models/tiny-sd/ is kept.
# On a shared or busy machine OMP_NUM_THREADS=1 is often faster than the default.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export VIRTUAL_ENV=$root/.venv PATH=$root/.venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
build=${BUILD_DIR:-$root/target/tiny-sd-build}
out=${OUT_DIR:-$root/models/tiny-sd}
images=${IMAGES:-4000}
vae_steps=${VAE_STEPS:-2000}
unet_steps=${UNET_STEPS:-1600}
started=$(date +%s)
say() { echo "[make-tiny-sd $(( $(date +%s) - started ))s] $*"; }

bash scripts/bootstrap.sh
cargo build --release --bin sdtune --example make_shapes --example tiny_sd --example train_vae
bin=$root/target/release
rm -rf "$build"
mkdir -p "$build"

say "drawing $images training images"
"$bin/examples/make_shapes" base "$build/shapes" --count "$images"
"$bin/examples/make_shapes" vae "$build/vae-set" --count "$images"
say "random UNet and text encoder, tokenizer, scheduler"
"$bin/examples/tiny_sd" init "$build/model"
say "training the VAE ($vae_steps steps)"
"$bin/examples/train_vae" --data "$build/vae-set" --model "$build/model" --steps "$vae_steps"

mkdir -p "$build/work"
cat > "$build/work/sdtune.yaml" <<EOF
# The tiny base model's UNet: every weight trained from a random init.
model: $build/model
data:
  path: $build/shapes
  resolution: 64
  min_bucket: 64
  max_bucket: 64
  bucket_step: 64
  min_side: 64
sample:
  prompts:
  - a red circle on a blue background
  - a yellow star on a black background
  - a green square on a white background
  - a purple triangle on an orange background
  seeds: [1, 2]
train:
  name: tiny-sd-unet
  steps: $unet_steps
  batch_size: 32
  lr: 0.002
  lr_schedule: cosine
  warmup_steps: 50
  caption_dropout: 0.1
  min_snr_gamma: 5.0
  save_every: 200
  sample_every: 200
  seed: 0
EOF
cd "$build/work"
say "preparing the shapes (VAE latents, caption embeddings)"
"$bin/sdtune" prepare
say "training the UNet ($unet_steps steps)"
"$bin/sdtune" train --full
cd "$root"

rm -rf "$build/model/unet"
cp -r "$build/work/output/tiny-sd-unet/unet" "$build/model/unet"
"$bin/examples/tiny_sd" pack "$build/model" "$out"
du -sh "$out"

say "rendering samples/tiny-sd-samples.png"
"$bin/sdtune" sample --model "$out" --prompt "a red circle on a blue background" --prompt "a yellow star on a black background" \
  --prompt "a green square on a white background" --prompt "a purple triangle on an orange background" \
  --seeds 1,2,3,4 --steps 20 --guidance 5 --out "$build/tiny-sd-samples.png"
cp "$build/tiny-sd-samples.png" "$root/samples/tiny-sd-samples.png"
say "done: $out (grids of the UNet's training in $build/work/output/tiny-sd-unet/samples/)"
