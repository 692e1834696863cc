#!/usr/bin/env python3
"""The diffusers+peft side of scripts/bench-vs-diffusers.sh and scripts/gpu-check.sh.

Mirrors `sdtune bench train|sample|encode` on the same model, built from the
config files `sdtune bench --dump-configs DIR` wrote (random weights):

  train   diffusers' examples/text_to_image/train_text_to_image_lora.py step:
          frozen UNet in the weight dtype, peft LoRA (rank r, alpha r) on the
          targets, LoRA params fp32, torch.optim.AdamW (lr 1e-4, wd 1e-2),
          cached latents = mean + std * randn of the right shape (scaled by the
          VAE factor), cached text states, min-SNR-gamma weighting (or plain
          MSE), clip_grad_norm_ 1.0, loss.item() each step; autocast as
          accelerate's mixed precision does when the weights are half.
          SDXL (a text_encoder_2.json in --configs): the UNet also gets the
          cached pooled embedding and time ids (h, w, 0, 0, h, w), as
          train_text_to_image_lora_sdxl.py passes them;
          --gradient-checkpointing calls unet.enable_gradient_checkpointing().
  sample  StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) with
          DDIM, the same prompt, one CPU generator per image, output_type="pt".
  encode  AutoencoderKL.encode (mean and std to the CPU) and the text encoder.

Prints one JSON line with the keys sdtune's JSON line has (side "diffusers").
Peak memory: VmHWM on the CPU; on CUDA torch.cuda.max_memory_allocated (and
max_memory_reserved beside it).
"""
import argparse
import json
import os
import sys
import time

PROMPT = "a studio photo of a red ceramic mug with a white logo on a wooden desk, soft light"
TARGETS = {
    "cross-attn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    "attn": ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
}


def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    return None


def peak_rss_mb():
    return status_mb("VmHWM:")


def rounded(x):
    if x is None:
        return None
    return round(x, 1) if abs(x) >= 100 else round(x, 4)


def read_config(path):
    """A config file sdtune wrote, as diffusers/transformers take it: nulls
    dropped (each side then uses the same library default)."""
    with open(path) as f:
        cfg = json.load(f)
    return {k: v for k, v in cfg.items() if v is not None}


def vae_config(path):
    cfg = read_config(path)
    n = len(cfg["block_out_channels"])
    if not cfg.get("down_block_types"):
        cfg["down_block_types"] = ["DownEncoderBlock2D"] * n
    if not cfg.get("up_block_types"):
        cfg["up_block_types"] = ["UpDecoderBlock2D"] * n
    return cfg


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    def __init__(self, device):
        import torch
        self.device = device
        self.rss_after_build = None
        if device.type == "cuda":
            torch.zeros(1, device=device)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def built(self):
        self.rss_after_build = status_mb("VmRSS:")

    def report(self, out):
        import torch
        out["rss_after_build_mb"] = rounded(self.rss_after_build)
        out["peak_rss_mb"] = rounded(peak_rss_mb())
        if self.device.type == "cuda":
            out["peak_mem_mb"] = rounded(torch.cuda.max_memory_allocated(self.device) / 2**20)
            out["peak_reserved_mb"] = rounded(torch.cuda.max_memory_reserved(self.device) / 2**20)
            out["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
        else:
            out["peak_mem_mb"] = out["peak_rss_mb"]
            out["peak_mem_kind"] = "cpu peak RSS (VmHWM)"


def counted_flops(fn):
    """FLOPs of fn() by torch's FlopCounterMode, as sdtune counts its layers:
    linear, conv and attention products (the CPU attention kernel counted as
    FlopCounterMode counts the CUDA ones)."""
    import torch
    import torch.utils.flop_counter as fc

    def cpu_attention(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    counter = fc.FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention})
    with counter:
        out = fn()
    return out, counter.get_total_flops()


def matmul_gflops(device, dtype):
    """The same probe as sdtune's bench::peak_probe: best of 4 square matmuls."""
    import torch
    n = 8192 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best = 0.0
    for _ in range(4):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n ** 3 / max(time.perf_counter() - t0, 1e-9) / 1e9)
    return best


def flop_rate(flops, seconds, probed, peak_tflops):
    """The fields sdtune's measure::insert_flop_rate writes."""
    achieved = flops / max(seconds, 1e-12) / 1e9
    return {"achieved_gflops": rounded(achieved), "probed_peak_gflops": rounded(probed),
            "fraction_of_probed_peak": rounded(achieved / probed if probed > 0 else None),
            "mfu": rounded(achieved / 1e3 / peak_tflops if peak_tflops else None)}


def is_sdxl(args):
    return os.path.exists(os.path.join(args.configs, "text_encoder_2.json"))


def common(args, device, dtype, kind):
    import torch
    return {
        "bench": kind, "side": "diffusers", "arch": args.arch,
        "device": str(device), "precision": args.precision, "threads": torch.get_num_threads(),
        "resolution": args.resolution, "batch_size": args.batch_size,
    }


def bench_train(args, device, dtype):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params, compute_snr
    from peft import LoraConfig

    ucfg = read_config(os.path.join(args.configs, "unet.json"))
    scfg = read_config(os.path.join(args.configs, "scheduler.json"))
    vcfg = vae_config(os.path.join(args.configs, "vae.json"))
    factor = 2 ** (len(vcfg["block_out_channels"]) - 1)
    latent = (args.resolution // factor, args.resolution // factor)
    memory = Memory(device)

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(ucfg)
    unet.requires_grad_(False)
    unet.to(device, dtype=dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet_params = sum(p.numel() for p in unet.parameters())
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=TARGETS[args.targets]))
    if dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    noise_scheduler = DDPMScheduler.from_config(scfg)
    scaling = vcfg.get("scaling_factor", 0.18215)
    memory.built()

    torch.manual_seed(1)
    b = args.batch_size
    text_dim = ucfg["cross_attention_dim"]
    text_dim = text_dim[0] if isinstance(text_dim, list) else text_dim
    means = torch.randn(b, ucfg.get("in_channels", 4), *latent) * 5.0
    stds = torch.full_like(means, 0.05)
    texts = torch.randn(b, 77, text_dim)
    added = None
    if ucfg.get("addition_embed_type") == "text_time":
        pooled_dim = ucfg["projection_class_embeddings_input_dim"] - 6 * ucfg["addition_time_embed_dim"]
        h = w = float(args.resolution)
        added = {"text_embeds": torch.randn(b, pooled_dim).to(device, dtype),
                 "time_ids": torch.tensor([[h, w, 0.0, 0.0, h, w]] * b).to(device, dtype)}
    autocast = dtype != torch.float32

    def step():
        latents = (means + stds * torch.randn_like(means)).to(device) * scaling
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=device).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        ehs = texts.to(device)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            pred = unet(noisy.to(dtype), timesteps, ehs.to(dtype), added_cond_kwargs=added, return_dict=False)[0]
        if args.min_snr_gamma <= 0:
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        else:
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.stack([snr, args.min_snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
            if noise_scheduler.config.prediction_type == "epsilon":
                weights = weights / snr
            else:
                weights = weights / (snr + 1)
            loss = F.mse_loss(pred.float(), target.float(), reduction="none")
            loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
        _, forward_flops = counted_flops(lambda: unet(
            torch.zeros(b, ucfg.get("in_channels", 4), *latent, device=device, dtype=dtype),
            torch.full((b,), 500, device=device), texts.to(device, dtype), added_cond_kwargs=added))
    probed = matmul_gflops(device, dtype)
    torch.manual_seed(3)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0

    sps = args.steps / seconds
    out = common(args, device, dtype, "train")
    flops_per_step = 2.1 * forward_flops
    out.update({
        "unet_params": unet_params, "gradient_checkpointing": bool(args.gradient_checkpointing), "rank": args.rank, "targets": args.targets, "lora_modules": sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A")),
        "lora_params": lora_params, "min_snr_gamma": args.min_snr_gamma if args.min_snr_gamma > 0 else None,
        "warmup_steps": args.warmup, "steps": args.steps, "warmup_s": rounded(warmup_s),
        "seconds": rounded(seconds), "steps_per_s": rounded(sps), "s_per_step": rounded(seconds / args.steps),
        "cpu_s_per_step": rounded(cpu / args.steps),
        "samples_per_s": rounded(sps * b), "loss": rounded(loss),
        "model_tflop_per_step": rounded(flops_per_step / 1e12),
        **flop_rate(flops_per_step * args.steps, seconds, probed, args.peak_tflops),
    })
    memory.report(out)
    return out


def build_pipeline(args, device, dtype):
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(read_config(os.path.join(args.configs, "unet.json")))
    vae = AutoencoderKL.from_config(vae_config(os.path.join(args.configs, "vae.json")))
    text = CLIPTextModel(CLIPTextConfig(**read_config(os.path.join(args.configs, "text_encoder.json"))))
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    scheduler = DDIMScheduler.from_config(read_config(os.path.join(args.configs, "scheduler.json")))
    if is_sdxl(args):
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**read_config(os.path.join(args.configs, "text_encoder_2.json"))))
        tokenizer_2 = CLIPTokenizer.from_pretrained(args.tokenizer_2)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_sample(args, device, dtype):
    import torch
    memory = Memory(device)
    pipe = build_pipeline(args, device, dtype)
    memory.built()

    def render(seeds):
        images = []
        for i in range(0, len(seeds), args.batch_size):
            chunk = seeds[i:i + args.batch_size]
            gens = [torch.Generator("cpu").manual_seed(s) for s in chunk]
            out = pipe([PROMPT] * len(chunk), num_inference_steps=args.steps, guidance_scale=args.guidance,
                       height=args.resolution, width=args.resolution, generator=gens, output_type="pt")
            images.append(out.images)
        return torch.cat(images)

    # The warm-up images are counted (counting slows Python, not the kernels;
    # they are not timed): FLOPs per image, text encoders, UNet passes, VAE decode.
    _, warm_flops = counted_flops(lambda: render(list(range(1000, 1000 + max(args.warmup, 1)))))
    flops_per_image = warm_flops / max(args.warmup, 1)
    probed = matmul_gflops(device, dtype)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    images = render(list(range(args.images)))
    sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0

    n = args.images
    out = common(args, device, dtype, "sample")
    out.update({
        "scheduler": "ddim", "steps": args.steps, "guidance": args.guidance, "warmup_images": args.warmup,
        "images": n, "seconds": rounded(seconds), "s_per_image": rounded(seconds / n),
        "images_per_s": rounded(n / seconds), "cpu_s_per_image": rounded(cpu / n), "finite": bool(torch.isfinite(images).all()),
        "model_tflop_per_image": rounded(flops_per_image / 1e12),
        **flop_rate(flops_per_image * n, seconds, probed, args.peak_tflops),
    })
    memory.report(out)
    return out


def bench_encode(args, device, dtype):
    import torch
    memory = Memory(device)
    pipe = build_pipeline(args, device, dtype)
    memory.built()
    b = args.batch_size
    torch.manual_seed(4)
    images = (torch.rand(b, 3, args.resolution, args.resolution) * 2 - 1).to(device, dtype=dtype)
    ids = pipe.tokenizer([PROMPT] * b, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    @torch.no_grad()
    def encode_images():
        dist = pipe.vae.encode(images).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    @torch.no_grad()
    def encode_text():
        return pipe.text_encoder(ids)[0].float().cpu()

    for _ in range(args.warmup):
        encode_images()
        encode_text()
    _, vae_flops = counted_flops(encode_images)
    probed = matmul_gflops(device, dtype)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        encode_images()
    sync(device)
    vae_s, vae_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        encode_text()
    sync(device)
    text_s = time.perf_counter() - t0
    n = args.steps * b
    out = common(args, device, dtype, "encode")
    out.update({
        "batches": args.steps, "vae_seconds": rounded(vae_s), "images_per_s": rounded(n / vae_s),
        "s_per_image": rounded(vae_s / n), "cpu_s_per_image": rounded(vae_cpu / n), "text_seconds": rounded(text_s), "captions_per_s": rounded(n / text_s),
        "vae_tflop_per_image": rounded(vae_flops / b / 1e12),
        **flop_rate(vae_flops * args.steps, vae_s, probed, args.peak_tflops),
    })
    memory.report(out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["train", "sample", "encode"])
    p.add_argument("--configs", required=True, help="folder written by `sdtune bench --dump-configs`")
    p.add_argument("--arch", default="?", help="name shown in the JSON line")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="cross-attn", choices=sorted(TARGETS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--tokenizer", default=None,
                   help="default: tests/fixtures/tiny-sd1/tokenizer (tiny-sdxl/tokenizer for SDXL configs)")
    p.add_argument("--tokenizer-2", default="tests/fixtures/tiny-sdxl/tokenizer_2")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args()

    if args.tokenizer is None:
        args.tokenizer = "tests/fixtures/tiny-sdxl/tokenizer" if is_sdxl(args) else "tests/fixtures/tiny-sd1/tokenizer"
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = 790.0
    defaults = {"train": (20, 3), "sample": (30, 1), "encode": (5, 1)}[args.kind]
    args.steps = args.steps or defaults[0]
    args.warmup = defaults[1] if args.warmup is None else args.warmup
    args.images = args.images or args.batch_size
    run = {"train": bench_train, "sample": bench_sample, "encode": bench_encode}[args.kind]
    out = run(args, device, dtype)
    print(json.dumps(out, sort_keys=True))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
