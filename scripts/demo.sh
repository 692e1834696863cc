#!/usr/bin/env bash
# The README's first command (`make demo`) after the build: runs sdtune on the
# bundled tiny model. prepare and train join this script as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/sdtune
out=output/demo
mkdir -p "$out"
"$bin" doctor
"$bin" sample --model tests/fixtures/tiny-sd1 --device cpu \
  --prompt "product shot of a blue ceramic mug on a wooden table" \
  --negative-prompt "blurry" --seed 42 --steps 20 --width 64 --height 64 \
  --out "$out/sample.png"
echo "demo: image at $out/sample.png"
