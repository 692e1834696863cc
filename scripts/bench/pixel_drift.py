#!/usr/bin/env python3
"""Pixel drift of the control prompts, beside the palette drift that
`sdtune train` writes (BENCHMARKS.md, "Prior preservation"): per run, grid
step and control prompt, the mean absolute RGB difference (0-255) of each
LoRA image to the base model's image (step 0) of the same prompt and seed.
The palette distance sees colours only; this sees layout and shape too.

    .venv-ref/bin/python scripts/bench/pixel_drift.py output/bench-prior/output [RUN ...]

RUN defaults to with-prior and without-prior (scripts/bench-prior.sh's
runs). Needs numpy and Pillow (scripts/fixtures/requirements.txt has both).
"""
import glob
import os
import re
import sys

import numpy as np
from PIL import Image

NAME = re.compile(r"control-(\d+)-p(\d+)-s(\d+)\.png$")


def pixels(path):
    try:
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    except OSError as e:
        sys.exit(f"pixel_drift: {path} is not a readable image ({e}); run scripts/bench-prior.sh again")


def run_drift(samples):
    """{step: {prompt: [per-seed mean abs difference]}} for every step after 0."""
    found = {}
    for path in glob.glob(os.path.join(samples, "control-*-p*-s*.png")):
        m = NAME.search(path)
        if m:
            found[path] = tuple(int(g) for g in m.groups())
    if not any(step == 0 for step, _, _ in found.values()):
        sys.exit(f"pixel_drift: {samples} has no base (step 0) control images; run scripts/bench-prior.sh first")
    drift = {}
    for path, (step, prompt, seed) in sorted(found.items(), key=lambda kv: kv[1]):
        if step == 0:
            continue
        base = os.path.join(samples, f"control-000000-p{prompt}-s{seed}.png")
        if not os.path.exists(base):
            sys.exit(f"pixel_drift: {path} has no base image {base}; run scripts/bench-prior.sh again")
        a, b = pixels(path), pixels(base)
        if a.shape != b.shape:
            sys.exit(f"pixel_drift: {path} is {a.shape[1]}x{a.shape[0]} but its base image is {b.shape[1]}x{b.shape[0]}")
        drift.setdefault(step, {}).setdefault(prompt, []).append(float(np.abs(a - b).mean()))
    return drift


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: pixel_drift.py OUTPUT_FOLDER [RUN ...] (e.g. output/bench-prior/output)")
    root, runs = sys.argv[1], sys.argv[2:] or ["with-prior", "without-prior"]
    drifts = []
    for run in runs:
        samples = os.path.join(root, run, "samples")
        if not os.path.isdir(samples):
            sys.exit(f"pixel_drift: {samples} is not a folder; name a run folder under {root}")
        drifts.append((run, run_drift(samples)))
    print(f"{'run':<14} {'step':>4}  {'pixel drift':>11}  per control prompt (p1 the class prompt, then sample.control_prompts)")
    for run, drift in drifts:
        for step, prompts in sorted(drift.items()):
            every = [x for seeds in prompts.values() for x in seeds]
            per = ", ".join(f"p{p} {np.mean(v):.2f}" for p, v in sorted(prompts.items()))
            print(f"{run:<14} {step:>4}  {np.mean(every):>11.2f}  {per}")


if __name__ == "__main__":
    main()
