#!/usr/bin/env python3
"""Serving throughput and latency on the CPU, all in one run (the machine is
shared and noisy: compare the ratios, not the absolute numbers).

Modes, each N sequential one-image requests (by default the tiny SD1 test
model at 64 px; DDIM, guidance 7.5), measured as the client sees them (POST, wait on the event
stream, GET the PNG), taken in turn request by request so load drift hits
each alike:
  one adapter      every request kohya_a at 0.8
  switching        kohya_a and kohya_a2 (the same weights under another name, so
                   each image costs the same) in turn: every request detaches one
                   adapter and attaches the other
  base             no adapter
and, for reference, in-process without HTTP (`sdtune sample --count N
--batch-size 1`, its own s/image line): attached vs `--fuse`d kohya_a; and
re-running `sdtune sample` per request (a process that loads the model each time).

  python3 scripts/bench-serve.py [--requests 20] [--steps 20] [--rounds 3]
  python3 scripts/bench-serve.py --model DIR --lora FILE --resolution 256 ...

--model takes any diffusers folder, e.g. a full-size SD1.5 with random weights
and its LoRA from scripts/bench/make_random_model.py. Stdlib only. Uses target/release/sdtune (SDTUNE overrides); OMP_NUM_THREADS=1.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDTUNE = os.environ.get("SDTUNE", os.path.join(ROOT, "target/release/sdtune"))
MODEL = os.path.join(ROOT, "tests/fixtures/tiny-sd1")
LORA = os.path.join(ROOT, "tests/fixtures/lora/kohya_a.safetensors")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.read()


def one_request(base, body):
    t0 = time.perf_counter()
    job = json.loads(http("POST", base + "/v1/images", body))
    http("GET", base + f"/v1/jobs/{job['id']}/events")  # ends with the job
    done = json.loads(http("GET", base + f"/v1/jobs/{job['id']}"))
    assert done["status"] == "done", done
    http("GET", base + done["results"][0]["url"])
    return time.perf_counter() - t0


def serve_modes(base, n, steps, side, modes, results):
    """Request i of every mode, then request i + 1 of every mode, ..."""
    for i in range(n):
        for name, adapters_for in modes.items():
            body = {"prompt": "a red square", "seed": i, "steps": steps, "width": side, "height": side,
                    "adapters": adapters_for(i)}
            results.setdefault(name, []).append(one_request(base, body))


def sample_command(model, steps, side, seed, out):
    """`sdtune sample` with kohya_a at 0.8, as the serve modes ask for it."""
    return [SDTUNE, "sample", "--model", model, "--width", str(side), "--height", str(side), "--prompt", "a red square",
            "--seed", str(seed), "--steps", str(steps), "--device", "cpu", "--out", out,
            "--lora", "adapters/kohya_a.safetensors:0.8"]


def sample_in_process(work, model, n, steps, side, fuse):
    args = sample_command(model, steps, side, 1, "grid.png") + ["--count", str(n), "--batch-size", "1"]
    out = subprocess.run(args + (["--fuse"] if fuse else []), cwd=work, env=ENV, capture_output=True, text=True,
                         check=True)
    m = re.search(r"\(([0-9.]+) s/image\)", out.stderr)
    return float(m.group(1))


def sample_per_request(work, model, n, steps, side):
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        subprocess.run(sample_command(model, steps, side, i, "one.png"), cwd=work, env=ENV, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=MODEL, help="diffusers model folder [default: the tiny test model]")
    ap.add_argument("--lora", default=LORA, help="the adapter file (served as kohya_a and kohya_a2)")
    ap.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests per serve mode first")
    ap.add_argument("--per-request", type=int, default=None,
                    help="`sdtune sample` processes per round [default: max(3, requests / 4)]")
    args = ap.parse_args()
    model, lora = os.path.abspath(args.model), os.path.abspath(args.lora)
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        sys.exit(f"{args.model}: not a diffusers model folder (no model_index.json); pass --model a folder such as "
                 "scripts/bench/make_random_model.py writes")
    if not os.path.isfile(lora):
        sys.exit(f"{args.lora}: no such LoRA file; pass --lora an adapter file for --model")
    work = tempfile.mkdtemp()
    os.makedirs(os.path.join(work, "adapters"))
    for name in ("kohya_a", "kohya_a2"):
        shutil.copy(lora, os.path.join(work, "adapters", name + ".safetensors"))
    server_log = open(os.path.join(work, "serve.err"), "w+")
    server = subprocess.Popen([SDTUNE, "serve", "--model", model, "--adapters", "adapters", "--port", "0", "--device", "cpu"],
                              cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=server_log, text=True)
    try:
        first = server.stdout.readline().strip()
        if not first.startswith("listening on "):
            server.wait()
            server_log.seek(0)
            sys.exit(f"sdtune serve did not start ({args.model}): {server_log.read().strip()}")
        base = first.removeprefix("listening on ").rstrip("/")
        a = [{"name": "kohya_a", "scale": 0.8}]
        modes = {
            "serve, one adapter": lambda i: a,
            "serve, switching adapters": lambda i: [{"name": "kohya_a" if i % 2 == 0 else "kohya_a2", "scale": 0.8}],
            "serve, base (no adapter)": lambda i: [],
        }
        serve_modes(base, args.warmup, args.steps, args.resolution, modes, {})  # warm-up: first calls, adapter cache
        results = {k: [] for k in modes}
        results["sample in-process, attached"] = []
        results["sample in-process, fused"] = []
        results["sample per request (new process)"] = []
        for _ in range(args.rounds):
            serve_modes(base, args.requests, args.steps, args.resolution, modes, results)
            for fused in (False, True):
                key = "sample in-process, fused" if fused else "sample in-process, attached"
                results[key].append(sample_in_process(work, model, args.requests, args.steps, args.resolution, fused))
            per_request = args.per_request if args.per_request is not None else max(3, args.requests // 4)
            results["sample per request (new process)"] += sample_per_request(work, model, per_request, args.steps,
                                                                              args.resolution)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    ref = statistics.median(results["serve, one adapter"])
    print(f"{args.model}: {args.rounds} rounds x {args.requests} requests, {args.steps} DDIM steps, "
          f"{args.resolution} px, guidance 7.5, OMP_NUM_THREADS=1")
    print("latency: per request (serve, per-request sample) or per image (in-process sample); images/s = 1 / median")
    print(f"{'mode':36} {'n':>3} {'median s':>9} {'p90 s':>7} {'images/s':>9} {'vs one adapter':>15}")
    for name, times in results.items():
        med = statistics.median(times)
        p90 = sorted(times)[int(0.9 * (len(times) - 1))]
        print(f"{name:36} {len(times):3} {med:9.3f} {p90:7.3f} {1 / med:9.2f} {med / ref:14.2f}x")


if __name__ == "__main__":
    sys.exit(main())
