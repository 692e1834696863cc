#!/usr/bin/env python3
"""diffusers' side of scripts/bench-prepare.sh.

    python scripts/bench_prepare_diffusers.py make-vae DIR      # SD1.x-sized VAE, random weights (seed 0)
    python scripts/bench_prepare_diffusers.py encode DIR PIXELS THREADS

`encode` reads the exact [N, 3, H, W] float32 batch that sdtune preprocessed
(PIXELS, a safetensors file with tensor "pixels"), encodes it one image at a
time after one warm-up, as sdtune's benchmark does, and prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file


def make_vae(out: str) -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(out, safe_serialization=True)


def encode(vae_dir: str, pixels_file: str, threads: int) -> None:
    torch.set_num_threads(threads)
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
    pixels = load_file(pixels_file)["pixels"]
    with torch.inference_mode():
        vae.encode(pixels[:1]).latent_dist.mean  # warm-up
        start = time.perf_counter()
        for i in range(pixels.shape[0]):
            vae.encode(pixels[i : i + 1]).latent_dist.mean
        seconds = time.perf_counter() - start
    n = pixels.shape[0]
    print(json.dumps({"side": "diffusers", "images": n, "seconds": seconds, "images_per_s": n / seconds,
                      "size": list(pixels.shape[2:]), "threads": threads}))


if __name__ == "__main__":
    if sys.argv[1] == "make-vae":
        make_vae(sys.argv[2])
    elif sys.argv[1] == "encode":
        encode(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
