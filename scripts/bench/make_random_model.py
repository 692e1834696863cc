#!/usr/bin/env python3
"""A full-size diffusers model folder with random weights, and a LoRA for it,
for benchmarks that load a model from disk (scripts/bench-serve.py --model):
no real SD weights exist on the benchmark machines.

  .venv-ref/bin/python scripts/bench/make_random_model.py CONFIGS OUT [--rank 16]

CONFIGS is the folder `sdtune bench --dump-configs` writes (sd15, sd21). The
pipeline is built exactly as diffusers_bench.py builds it (seed 0), saved with
`save_pretrained` (safetensors, fp32), and a LoRA of rank r (alpha r) on the
UNet's cross-attention projections, with random A and B (peft's
init_lora_weights=False, so it changes the image), saved by diffusers'
`save_lora_weights` as OUT/lora_r{r}.safetensors: the layout diffusers'
training scripts write.
"""
import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diffusers_bench  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("configs")
    p.add_argument("out")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokenizer", default="tests/fixtures/tiny-sd1/tokenizer")
    args = p.parse_args()
    for name in ("unet.json", "vae.json", "text_encoder.json", "scheduler.json"):
        if not os.path.isfile(os.path.join(args.configs, name)):
            sys.exit(f"{args.configs}: no {name}; write the folder with `sdtune bench --arch sd15 --dump-configs DIR`")
    if os.path.exists(os.path.join(args.configs, "text_encoder_2.json")):
        sys.exit(f"{args.configs}: SDXL configs are not supported here; dump sd15 or sd21")
    if os.path.exists(args.out):
        sys.exit(f"{args.out} already exists; remove it or name another folder")
    # Written beside OUT and renamed at the end, so a killed run leaves no half model under OUT.
    partial = args.out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)

    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    build = argparse.Namespace(configs=args.configs, tokenizer=args.tokenizer, tokenizer_2=None)
    pipe = diffusers_bench.build_pipeline(build, "cpu", torch.float32)
    pipe.save_pretrained(partial, safe_serialization=True)

    torch.manual_seed(1)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=False,
                        target_modules=diffusers_bench.TARGETS["cross-attn"])
    pipe.unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(partial, unet_lora_layers=layers,
                                              weight_name=f"lora_r{args.rank}.safetensors")
    os.rename(partial, args.out)
    print(f"wrote {args.out} (random weights) and {args.out}/lora_r{args.rank}.safetensors ({len(layers)} tensors)")


if __name__ == "__main__":
    main()
