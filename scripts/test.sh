#!/usr/bin/env bash
# `make test`: the Rust unit and integration tests, then the serve page in a
# real headless Chromium (scripts/browser-check.sh). Debian's chromium is
# installed beside the build so its download costs no wall time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
mkdir -p target
bash scripts/install-chromium.sh >target/install-chromium.log 2>&1 &
installer=$!
# Two tests at a time, one torch thread each (2 cores in CI): more torch threads
# than cores make OpenMP workers spin against each other.
OMP_NUM_THREADS=1 "${CARGO:-cargo}" test --release -- --test-threads=2
wait "$installer" || { cat target/install-chromium.log >&2; exit 1; }
# The screenshot goes under target/: samples/serve-page.png is rewritten only by `make browser-check`.
OUT="$ROOT/target/serve-page.png" bash scripts/browser-check.sh
