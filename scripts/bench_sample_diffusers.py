"""diffusers' StableDiffusionPipeline rendering the same grid as `sdtune sample`
in scripts/bench-sample.sh: same model, prompts, seeds (one CPU generator per
image), scheduler (the model's DDIM), steps, guidance and size, CPU, fp32.
Prints one JSON line: seconds for the pipeline call (cold, as a CLI user sees
it) and for the whole process (imports and loading included)."""
import json
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402


def main():
    model, steps, size, threads, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    prompts = sys.argv[6].split("|")
    seeds = [int(s) for s in sys.argv[7].split(",")]
    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    cells = [(p, s) for p in prompts for s in seeds]
    t1 = time.perf_counter()
    images = pipe(
        prompt=[p for p, _ in cells],
        negative_prompt=["blurry"] * len(cells),
        generator=[torch.Generator("cpu").manual_seed(s) for _, s in cells],
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=size,
        width=size,
    ).images
    for i, img in enumerate(images):
        img.save(f"{out}-{i}.png")
    t2 = time.perf_counter()
    print(json.dumps({"side": "diffusers", "images": len(cells), "sample_s": t2 - t1, "process_s": t2 - t0}))


main()
