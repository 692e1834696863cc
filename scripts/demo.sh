#!/usr/bin/env bash
# The README's first command (`make demo`) after the build: the whole job on
# sdtune's built-in tiny model and the bundled example brand set, on the CPU,
# in about a minute:
#
#   sdtune prepare datasets/example-brand   cache VAE latents + caption embeddings
#   sdtune train                            a LoRA of the "tidewave" house style
#   sdtune sample --compare                 base model beside the LoRA, same prompts and seeds
#   sdtune report                           report.html: grids over steps, loss, consistency
#
# It works in output/demo/ with configs/demo.yaml as its sdtune.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=$root/target/release/sdtune
work=$root/output/demo
run=output/tidewave
started=$(date +%s)

rm -rf "$work"
mkdir -p "$work"
cp configs/demo.yaml "$work/sdtune.yaml"
cd "$work"

echo "== sdtune prepare datasets/example-brand"
"$bin" prepare "$root/datasets/example-brand"
echo "== sdtune train"
"$bin" train
echo "== sdtune sample: the base model beside the LoRA"
"$bin" sample --prompt "tidewave style, a circle" --prompt "tidewave style, a star" \
  --prompt "tidewave style, a square" --seeds 1,2,3,4 --steps 20 --guidance 5 \
  --lora "$run/tidewave.safetensors" --compare --out "$run/samples/before-after.png"
echo "== sdtune report"
"$bin" report "$run"

echo
echo "demo finished in $(( $(date +%s) - started )) s"
echo "  before/after grid: $work/$run/samples/before-after.png"
echo "  palette distances: $work/$run/samples/before-after.consistency.json"
echo "  report:            $work/$run/report.html"
