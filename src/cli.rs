//! Commands and flags only: each command parses its flags and calls the
//! library. Errors reach the user as one sentence, never a backtrace.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::commands;

const ABOUT: &str = "Fine-tune Stable Diffusion on your own image set, so it renders your brand consistently.";

const AFTER_HELP: &str = "\
The job in three commands:
  sdtune prepare ./brand_photos     check images and captions, bucket, cache VAE latents
  sdtune train                      train a LoRA on the UNet attention layers
  sdtune sample --prompt \"...\"      render fixed-seed images to judge consistency

Check the set-up with `sdtune doctor`.";

#[derive(Parser, Debug)]
#[command(name = "sdtune", version, about = ABOUT, after_help = AFTER_HELP, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check an image folder, caption and bucket it, and cache its VAE latents.
    #[command(after_help = PREPARE_EXAMPLES)]
    Prepare(PrepareArgs),
    /// Train a LoRA on the prepared images (reads ./sdtune.yaml; every key has a flag).
    #[command(after_help = TRAIN_EXAMPLES)]
    Train(TrainArgs),
    /// Render fixed-seed images and labelled grids; judge them against the brand set.
    #[command(after_help = SAMPLE_EXAMPLES)]
    Sample(SampleArgs),
    /// Print libtorch's version, CUDA availability and bf16 support.
    Doctor,
    /// Describe a model or LoRA: format, architecture, dtypes, parameters, prediction type.
    #[command(after_help = INFO_EXAMPLES)]
    Info(InfoArgs),
    /// Write a run's report.html again: grids over steps, loss curve, consistency, settings.
    #[command(after_help = REPORT_EXAMPLES)]
    Report(ReportArgs),
    /// Measure training steps/s, sampling s/image or encoding images/s and peak memory, no weights needed.
    #[command(after_help = BENCH_EXAMPLES)]
    Bench(BenchArgs),
}

const BENCH_EXAMPLES: &str = "\
Examples:
  sdtune bench train --arch sd15 --resolution 256 --steps 5 --warmup 3 --device cpu
  sdtune bench train --arch sd15 --batch-size 4 --precision bf16 --device cuda
  sdtune bench sample --arch sd15 --steps 30 --guidance 7.5 --images 8 --batch-size 4
  sdtune bench encode --arch sd15 --batch-size 4
  sdtune bench train --model ./stable-diffusion-v1-5 --resolution 512
  sdtune bench train --arch tiny --dump-configs cfg     (write the configs and stop)

Models are built from a config with random weights (--arch) or loaded (--model), so no
download is needed. The training step is sdtune's own, on random cached latents and text
states of the right shapes. A table goes to stderr and one JSON line to stdout: steps_per_s
(or s_per_image, images_per_s), peak_mem_mb (peak RSS on CPU; on CUDA the caching
allocator's reserved peak, an upper bound of torch's max_memory_allocated) and, on CUDA,
model FLOP utilisation. OMP_NUM_THREADS sets the CPU threads. scripts/bench-vs-diffusers.sh
runs the same configs through diffusers+peft in the same run.";

/// Flags of `sdtune bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure: train (LoRA optimizer steps), sample (text to image) or encode (VAE + text encoder).
    #[arg(value_parser = ["train", "sample", "encode"])]
    pub kind: String,
    /// Model config with random weights: tiny (the test fixture's sizes), sd15 or sd21.
    #[arg(long, default_value = "sd15", value_parser = ["tiny", "sd15", "sd21"], conflicts_with = "model")]
    pub arch: String,
    /// A diffusers model folder to load instead of random weights.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Image side in pixels [default: the model's own: 512 sd15, 768 sd21, 64 tiny].
    #[arg(long, value_name = "PX")]
    pub resolution: Option<i64>,
    /// Images per training step, UNet batch when sampling, images per encode batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// LoRA rank (alpha = rank).
    #[arg(long, default_value_t = 16)]
    pub rank: i64,
    /// Layers that get LoRA: cross-attn, attn or transformer.
    #[arg(long, default_value = "cross-attn")]
    pub targets: String,
    /// Timed optimizer steps (train), denoising steps (sample) or timed batches (encode)
    /// [default: 20 train, 30 sample, 5 encode].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Untimed rounds first: optimizer steps (train), images (sample) or batches (encode) [default: 3, 1, 1].
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
    /// Images rendered in the timed part of `sample` [default: --batch-size].
    #[arg(long, value_name = "N")]
    pub images: Option<usize>,
    /// Guidance scale of `sample` (above 1: classifier-free guidance, two UNet passes).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Sampler of `sample`.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Min-SNR-gamma of the training loss; 0 turns it off.
    #[arg(long, default_value_t = 5.0)]
    pub min_snr_gamma: f64,
    /// CLIP tokenizer folder for `sample` with --arch [default: tests/fixtures/tiny-sd1/tokenizer].
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Frozen-weight precision: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// The device's peak dense TFLOP/s in this precision, for model FLOP utilisation [default: 790 on CUDA].
    #[arg(long, value_name = "TFLOPS")]
    pub peak_tflops: Option<f64>,
    /// Write the model's configs as diffusers config files into DIR and stop.
    #[arg(long, value_name = "DIR")]
    pub dump_configs: Option<PathBuf>,
}

const REPORT_EXAMPLES: &str = "\
Examples:
  sdtune report                     the run named in ./sdtune.yaml (output/<name>/report.html)
  sdtune report output/acme         any run folder

`sdtune train` writes the report when it finishes; run this after adding grids to the
run's samples/ folder (e.g. sdtune sample --compare --out output/acme/samples/before-after.png).
One self-contained HTML file: images inlined, charts as SVG, nothing fetched.";

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The run folder [default: <output>/<name> from ./sdtune.yaml].
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: Option<PathBuf>,
}

const INFO_EXAMPLES: &str = "\
Examples:
  sdtune info ./v1-5-pruned-emaonly.safetensors     single-file checkpoint (A1111/civitai)
  sdtune info ./stable-diffusion-2-1                diffusers folder
  sdtune info stabilityai/stable-diffusion-2-1      Hub id, from the local Hugging Face cache
  sdtune info output/brand/brand.safetensors        LoRA: format, rank, alpha, layers, base, metadata

Reads only file headers and configs: nothing is loaded, pickles are never opened.";

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// A model (diffusers folder, single-file .safetensors, Hub id org/name) or a LoRA file.
    #[arg(value_name = "PATH|ID")]
    pub target: String,
    /// What the UNet predicts, if you know better than the file (as for sample).
    #[arg(long, value_name = "epsilon|v")]
    pub prediction_type: Option<String>,
}

const SAMPLE_EXAMPLES: &str = "\
Examples:
  sdtune sample --model ./stable-diffusion-v1-5 --prompt \"a red car by the sea\" --seed 42 --out car.png
  sdtune sample --model ./sd21 --prompt \"product shot, white background\" \\
      --negative-prompt \"blurry\" --steps 30 --guidance 7.5 --width 768 --height 768
  sdtune sample --model ./sd15 --prompt \"acme mug on a desk\" --lora output/acme/acme.safetensors:0.8
  sdtune sample --model ./sd15 --prompt \"acme mug\" --prompt \"acme bag\" --seeds 1,2,3,4 --out grid.png
  sdtune sample --model ./sd15 --prompts prompts.txt --seed 1 --count 4 \\
      --lora acme.safetensors --compare 0.5,1     (base | LoRA x0.5 | LoRA x1 for each seed)
  sdtune sample                     in a training folder: sdtune.yaml's prompts x seeds, run's LoRA
  sdtune sample --from grid-p1-s2.png             render an image again from its PNG's settings

The same model, prompt, seed, scheduler and steps give the same image as
diffusers' StableDiffusionPipeline with torch.Generator(\"cpu\").manual_seed(seed);
noise is drawn on the CPU, so a seed gives the same image on CUDA up to precision.
A grid (several prompts or seeds) is written to --out with each image beside it
as <stem>-p<row>-s<seed>.png; every PNG carries its settings (A1111's
`parameters` text plus sdtune's own), which `--from` reads back. With a brand
set (--brand DIR, or the images `sdtune prepare` cached here) the palette
distance of each image to it is printed and written to <stem>.consistency.json.";

const PREPARE_EXAMPLES: &str = "\
Examples:
  sdtune prepare ./brand_photos --model ./stable-diffusion-v1-5 --trigger brandx
  sdtune prepare ./brand_photos --model ./v1-5-pruned-emaonly.safetensors --trigger brandx
  sdtune prepare ./brand_photos --resolution 768 --flip --no-upscale
  sdtune prepare                    (the folder and model named in ./sdtune.yaml)

Run it in your working folder: it reads ./sdtune.yaml (and writes one when there
is none) and caches into ./.sdtune/cache. Captions come from NAME.txt beside each
image, else metadata.jsonl (file_name, text), else --caption-template. Every file
that is not used is listed with the reason, also in .sdtune/prepare-report.json.
Run it again after adding, editing or removing images: only what changed is encoded.
Exits 0 when at least one image is usable.";

/// Flags override `sdtune.yaml`'s `data:` section for this run.
#[derive(Args, Debug, Default)]
pub struct PrepareArgs {
    /// The image folder, searched recursively [default: data.path in sdtune.yaml].
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The model whose VAE and text encoder encode the images and captions: a
    /// diffusers folder (holding model_index.json), a single-file .safetensors
    /// checkpoint (A1111/civitai, SD1.x or SD2.x) or a Hugging Face id (org/name)
    /// found in the local Hugging Face cache [default: model in sdtune.yaml].
    #[arg(long, value_name = "DIR|FILE|ID")]
    pub model: Option<String>,
    /// Training resolution: buckets hold about this many pixels squared [default: 512].
    #[arg(long, value_name = "PX")]
    pub resolution: Option<u32>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// VAE and text-encoder precision: auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Trigger word: replaces [trigger] in captions, else is prepended to them.
    #[arg(long, value_name = "WORD")]
    pub trigger: Option<String>,
    /// Caption for images with none, e.g. "a photo of [trigger]".
    #[arg(long, value_name = "TEXT")]
    pub caption_template: Option<String>,
    /// Also cache horizontally flipped latents (augmentation).
    #[arg(long)]
    pub flip: bool,
    /// Never scale an image up to fit a bucket; small images get smaller buckets.
    #[arg(long)]
    pub no_upscale: bool,
    /// Keep images whose short side is under --min-side, scaled up.
    #[arg(long)]
    pub allow_upscale: bool,
    /// Skip images whose short side is under this many pixels [default: 256].
    #[arg(long, value_name = "PX")]
    pub min_side: Option<u32>,
    /// Smallest bucket side [default: 256].
    #[arg(long, value_name = "PX")]
    pub min_bucket: Option<u32>,
    /// Largest bucket side [default: 1024].
    #[arg(long, value_name = "PX")]
    pub max_bucket: Option<u32>,
    /// Bucket sides are multiples of this [default: 64].
    #[arg(long, value_name = "PX")]
    pub bucket_step: Option<u32>,
    /// Colour behind transparent pixels: white, black, gray or #rrggbb [default: white].
    #[arg(long, value_name = "COLOUR")]
    pub background: Option<String>,
    /// Refuse images with more pixels than this, before decoding [default: 178956970].
    #[arg(long, value_name = "N")]
    pub max_pixels: Option<u64>,
    /// Images per VAE-encode batch [default: 4].
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// The model: a diffusers folder (holding model_index.json), a single-file
    /// .safetensors checkpoint (A1111/civitai, SD1.x or SD2.x), or a Hugging Face
    /// id (org/name) found in the local Hugging Face cache. Pickles (.ckpt, .pt,
    /// .bin) are refused. A single file reads configs from a folder or NAME.yaml
    /// named like it, when present.
    /// [default: sdtune.yaml's model, or the one the --from image was made with]
    #[arg(long, value_name = "DIR|FILE|ID")]
    pub model: Option<PathBuf>,
    /// Weight variant of a diffusers folder or Hub id, e.g. fp16 (*.fp16.safetensors).
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// What the UNet predicts: epsilon or v [default: the model's config; for a
    /// single file without one, epsilon for SD1 and v for SD2, with a warning].
    #[arg(long, value_name = "epsilon|v")]
    pub prediction_type: Option<String>,
    /// What to render; repeat for more grid rows. Without any prompt, sdtune.yaml's
    /// sample prompts and seeds are rendered with the run's trained LoRA.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Vec<String>,
    /// A text file of prompts, one a line (blank lines and # comments skipped).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// What to steer away from (used when --guidance > 1).
    #[arg(long, value_name = "TEXT")]
    pub negative_prompt: Option<String>,
    /// Seed of the initial noise; the same seed gives the same image.
    #[arg(long, default_value_t = 42, conflicts_with = "seeds")]
    pub seed: u64,
    /// Grid columns: --count seeds from --seed on (--seed 1 --count 4: seeds 1,2,3,4).
    #[arg(long, default_value_t = 1, value_name = "N", conflicts_with = "seeds")]
    pub count: usize,
    /// Grid columns: these seeds, e.g. 1,2,3,4.
    #[arg(long, value_name = "S,S,...", value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Denoising steps [default: 30; sdtune.yaml's sample_steps for the run's grid].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; 1 turns guidance off (no unconditional pass)
    /// [default: 7.5; sdtune.yaml's sample_guidance for the run's grid].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Image width in pixels [default: the model's native size].
    #[arg(long)]
    pub width: Option<i64>,
    /// Image height in pixels [default: the model's native size].
    #[arg(long)]
    pub height: Option<i64>,
    /// Sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, heun, lms or pndm.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Skip this many final text-encoder layers (A1111's "clip skip" minus one).
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
    /// A LoRA to apply, with an optional strength (default 1); repeat to
    /// stack several. kohya (A1111/ComfyUI) and diffusers/PEFT files load.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<String>,
    /// Fuse the LoRAs into the weights (faster; same image up to rounding).
    #[arg(long)]
    pub fuse: bool,
    /// Put the base model's image beside the LoRAs' for each seed: alone, the LoRAs
    /// at the strengths given; with values (0.5,1), at those multiples of them.
    #[arg(long, value_name = "M,M,...", num_args = 0.., value_delimiter = ',')]
    pub compare: Option<Vec<f64>>,
    /// Render the image (or grid) a PNG written by sdtune again, from the settings
    /// it carries (A1111 PNGs too, with --model); --model and --lora replace the recorded ones.
    #[arg(long, value_name = "IMAGE.png", conflicts_with_all = [
        "prompt", "prompts", "negative_prompt", "seed", "count", "seeds", "steps", "guidance",
        "width", "height", "scheduler", "clip_skip", "compare", "precision", "fuse",
    ])]
    pub from: Option<PathBuf>,
    /// Folder of brand images for the consistency figures [default: the images
    /// `sdtune prepare` cached in this folder, for grids].
    #[arg(long, value_name = "DIR")]
    pub brand: Option<PathBuf>,
    /// Images per UNet batch (more is faster until memory runs out).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub batch_size: usize,
    /// Where to write the PNG; for a grid, the grid (its images go beside it)
    /// [default: sample.png; output/<name>/samples/final.png for the run's grid;
    /// IMAGE-again.png with --from].
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weight precision: fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32")]
    pub precision: String,
}

const TRAIN_EXAMPLES: &str = "\
Examples:
  sdtune train                                  # settings from ./sdtune.yaml
  sdtune train --steps 2000 --rank 32 --lr 1e-4 --precision bf16
  sdtune train --resume                         # continue from the newest save
  sdtune train --format diffusers --output runs --name acme-v2
  sdtune train --full --lr 1e-3 --name my-unet  # every UNet weight, not a LoRA

Writes <output>/<name>/<name>.safetensors (kohya format: loads in A1111 and ComfyUI;
--format diffusers for load_lora_weights), lora/step-NNNNNN.safetensors and state/
every --save-every steps, samples/step-NNNNNN.png every --sample-every steps
(step 0 is the base model), and metrics.jsonl. Ctrl-C saves and stops cleanly.";

/// Flags of `sdtune train`; each overrides the same key of `train:` in sdtune.yaml.
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// The config file; its folder is the working folder (cache, outputs) [default: ./sdtune.yaml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Base model: a diffusers folder, a single-file .safetensors checkpoint or a
    /// Hub id [default: the model the images were prepared with].
    #[arg(long, value_name = "DIR|FILE|ID")]
    pub model: Option<String>,
    /// Optimizer steps [default: 1000].
    #[arg(long)]
    pub steps: Option<u64>,
    /// LoRA rank [default: 16].
    #[arg(long)]
    pub rank: Option<i64>,
    /// LoRA alpha; updates are scaled by alpha / rank [default: 16].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Learning rate [default: 1e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, constant_with_warmup or cosine [default: constant].
    #[arg(long, value_name = "NAME")]
    pub lr_schedule: Option<String>,
    /// Warm-up steps for the schedules that have one [default: 0].
    #[arg(long, value_name = "N")]
    pub warmup_steps: Option<u64>,
    /// Images per step (one bucket per batch) [default: 1].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Batches whose gradients are summed per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Seed of LoRA init, data order and noise [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (frozen weights; LoRA stays fp32).
    #[arg(long)]
    pub precision: Option<String>,
    /// auto, cpu, cuda or cuda:N [default: auto].
    #[arg(long)]
    pub device: Option<String>,
    /// Layers that get LoRA: cross-attn, attn or transformer [default: cross-attn].
    #[arg(long)]
    pub targets: Option<String>,
    /// Save LoRA + resumable state every N steps (0: only at the end) [default: 250].
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Render the sample grid every N steps (0: never) [default: 250].
    #[arg(long, value_name = "N")]
    pub sample_every: Option<u64>,
    /// Resumable states kept [default: 3].
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Folder of runs [default: output].
    #[arg(long, value_name = "DIR")]
    pub output: Option<String>,
    /// Run name; files go to <output>/<name>/ [default: brand-lora].
    #[arg(long)]
    pub name: Option<String>,
    /// kohya or diffusers [default: kohya].
    #[arg(long)]
    pub format: Option<String>,
    /// Extra per-channel noise, e.g. 0.05 [default: 0].
    #[arg(long)]
    pub noise_offset: Option<f64>,
    /// Min-SNR-gamma weighting; 0 turns it off [default: 5].
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Fraction of steps trained on the empty caption [default: 0.05].
    #[arg(long)]
    pub caption_dropout: Option<f64>,
    /// Continue from the newest saved state of this run.
    #[arg(long)]
    pub resume: bool,
    /// Train every UNet weight (fp32) instead of a LoRA, e.g. to make a base
    /// model; writes a diffusers unet/ folder to <output>/<name>/unet/.
    #[arg(long)]
    pub full: bool,
}

/// Runs the command line; returns the process exit code.
pub fn run() -> i32 {
    install_panic_message();
    crate::runtime::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(args) => commands::prepare::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Sample(args) => commands::sample::run(args),
        Command::Doctor => commands::doctor::run(),
        Command::Info(args) => commands::info::run(args),
        Command::Report(args) => commands::report::run(args),
        Command::Bench(args) => commands::bench::run(args),
    };
    match result {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {}", one_sentence(&err));
            1
        }
    }
}

/// The error and its causes as one line, without repeating a cause the
/// message already contains.
pub fn one_sentence(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// A bug should still read as one plain message, not a Rust backtrace.
fn install_panic_message() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown cause");
        let first_line = msg.lines().next().unwrap_or(msg);
        eprintln!("error: sdtune hit an internal error ({first_line}); please report it with the command you ran");
    }));
}
