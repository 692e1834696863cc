#!/usr/bin/env bash
# The page of `sdtune serve` in a real headless Chromium (Debian's package),
# driven over the DevTools protocol (scripts/browser_cdp.py): the server runs
# the tiny SD1 test model with two kohya LoRAs; the page is opened with a
# recipe in its URL (?run=1 renders it at once: 4 seeds, base beside the
# run adapter acme, i.e. kohya_a's weights as a training run's final LoRA in
# a folder where a brand set was prepared); it must show its progress bar
# part-way, then a 2x4 grid of decoded images, "done", and the consistency
# figures of both rows against acme's brand set, equal to the jobs' own; both
# jobs must be done on the server; and a screenshot is written
# (samples/serve-page.png unless OUT is set).
#
#   scripts/browser-check.sh            # installs chromium first when missing (scripts/install-chromium.sh)
#   OUT=/tmp/page.png scripts/browser-check.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/samples/serve-page.png}"
SDTUNE="${SDTUNE:-$ROOT/target/release/sdtune}"

bash scripts/install-chromium.sh
if [ ! -x "$SDTUNE" ]; then
  export VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
  cargo build --release
fi

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/adapters" "$WORK/output/acme" "$WORK/brand"
cp tests/fixtures/lora/kohya_a.safetensors tests/fixtures/lora/kohya_b.safetensors "$WORK/adapters/"
cp tests/fixtures/lora/kohya_a.safetensors "$WORK/output/acme/acme.safetensors"
# The brand set: the fixture images, prepared here as `sdtune prepare` does for a run.
cp tests/fixtures/images/*.png "$WORK/brand/"
(cd "$WORK" && OMP_NUM_THREADS=1 "$SDTUNE" prepare brand --model "$ROOT/tests/fixtures/tiny-sd1" --device cpu \
  --resolution 64 --min-bucket 32 --max-bucket 128 --bucket-step 32 --min-side 32 >"$WORK/prepare.out" 2>&1) \
  || { cat "$WORK/prepare.out" >&2; exit 1; }
(cd "$WORK" && exec env OMP_NUM_THREADS=1 "$SDTUNE" serve --model "$ROOT/tests/fixtures/tiny-sd1" \
  --adapters adapters --port 0 --device cpu >"$WORK/serve.out" 2>"$WORK/serve.err") &
SERVER_PID=$!
for _ in $(seq 100); do
  grep -q "listening on" "$WORK/serve.out" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/serve.err" >&2; exit 1; }
  sleep 0.1
done
BASE="$(grep -o 'http://127.0.0.1:[0-9]*' "$WORK/serve.out")"
URL="$BASE/?prompt=a+red+square&seeds=1,2,3,4&steps=20&adapters=acme:1&compare=1&run=1"

fail() { echo "browser-check: $1" >&2; echo "--- server log:" >&2; cat "$WORK/serve.err" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
seen="$(python3 scripts/browser_cdp.py "$URL" 8 "$OUT")" || fail "the page check failed"
echo "$seen"
echo "$seen" | grep -q '"progress_seen_partway": true' || fail "the progress bar was never seen part-way"
echo "$seen" | grep -q '"status": "done: ' || fail "the status line does not say done"
jobs="$(grep -c '"status":"done"' <(curl -s "$BASE/v1/jobs/1"; echo; curl -s "$BASE/v1/jobs/2"))"
[ "$jobs" = 2 ] || fail "the page's two jobs are not both done on the server"
# The figures beside each row are the jobs' own, as the page rounds them.
for id in 1 2; do
  want="$(curl -s "$BASE/v1/jobs/$id" | python3 -c 'import json,sys; f=json.load(sys.stdin)["consistency"][0]; print("palette distance %.2f seed spread %.2f vs %s" % (f["palette_distance"], f["seed_spread"], f["adapter"]))')" \
    || fail "job $id has no consistency figures"
  echo "$seen" | grep -qF "$want" || fail "the page does not show job $id's figures ($want)"
done
[ -s "$OUT" ] || fail "no screenshot was written"
echo "browser-check: the page rendered a 2x4 grid (base | acme x 4 seeds) with both rows' consistency figures; screenshot $OUT"
