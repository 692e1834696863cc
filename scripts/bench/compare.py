#!/usr/bin/env python3
"""Turns the JSON lines of `sdtune bench` and diffusers_bench.py into a
Markdown table of sdtune / diffusers+peft ratios.

    python3 scripts/bench/compare.py RESULTS.jsonl

Per case (bench, with or without gradient checkpointing, arch, resolution,
batch, device, precision, steps) and side:
the best round for speed (highest rate, lowest CPU seconds) and the highest
peak memory. Speed ratio = sdtune rate / diffusers rate (above 1: sdtune is
faster); memory ratio = sdtune peak / diffusers peak (below 1: sdtune needs less).
"""
import datetime
import json
import os
import platform
import sys

RATE = {"train": ("steps_per_s", "steps/s", "cpu_s_per_step"),
        "sample": ("images_per_s", "images/s", "cpu_s_per_image"),
        "encode": ("images_per_s", "images/s", "cpu_s_per_image")}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fmt(x, digits=3):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def main():
    rows = []
    with open(sys.argv[1]) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    cases = {}
    for r in rows:
        bench = r["bench"] + (" +ckpt" if r.get("gradient_checkpointing") else "")
        key = (bench, r["arch"], r["resolution"], r["batch_size"], r["device"], r["precision"], r.get("steps", r.get("batches")))
        cases.setdefault(key, {}).setdefault(r["side"], []).append(r)

    print(f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
          f"machine: {cpu_model()}, {os.cpu_count()} cores; threads: {rows[0].get('threads') if rows else '?'}; "
          f"rounds per side: {max((len(v) for c in cases.values() for v in c.values()), default=0)}")
    print()
    print("| bench | model | px | batch | device, precision | steps | sdtune | diffusers+peft | speed ratio | "
          "CPU-s ratio | peak MB sdtune | peak MB diffusers | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, sides in cases.items():
        bench, arch, res, batch, device, precision, steps = key
        rate, unit, cpu_key = RATE[bench.split()[0]]
        best = {}
        for side, runs in sides.items():
            best[side] = {
                "rate": max(r[rate] for r in runs),
                "cpu": min((r[cpu_key] for r in runs if r.get(cpu_key) is not None), default=None),
                "mem": max((r["peak_mem_mb"] for r in runs if r.get("peak_mem_mb") is not None), default=None),
                "mfu": max((r.get("mfu") or 0 for r in runs), default=0) or None,
                "gflops": max((r.get("achieved_gflops") or 0 for r in runs), default=0) or None,
                "of_peak": max((r.get("fraction_of_probed_peak") or 0 for r in runs), default=0) or None,
            }
        s, d = best.get("sdtune"), best.get("diffusers")
        speed = s["rate"] / d["rate"] if s and d else None
        cpu = d["cpu"] / s["cpu"] if s and d and s["cpu"] and d["cpu"] else None
        mem = s["mem"] / d["mem"] if s and d and s["mem"] and d["mem"] else None

        def shown(b):
            if not b:
                return "–"
            text = f"{fmt(b['rate'])} {unit}"
            if b["mfu"]:
                text += f" (MFU {100 * b['mfu']:.1f}%)"
            elif b["gflops"]:
                # On the CPU: the model GFLOP/s and its share of the probed matmul peak.
                share = f", {100 * b['of_peak']:.0f}% of probed peak" if b["of_peak"] else ""
                text += f" ({fmt(b['gflops'])} GFLOP/s{share})"
            return text

        print(f"| {bench} | {arch} | {res} | {batch} | {device}, {precision} | {steps} | {shown(s)} | {shown(d)} | "
              f"{fmt(speed)}x | {fmt(cpu)}x | {fmt(s and s['mem'])} | {fmt(d and d['mem'])} | {fmt(mem)} |")


if __name__ == "__main__":
    main()
