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
#[command(name = "sdtune", version, about = ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check an image folder, caption and bucket it, and cache its VAE latents.
    #[command(after_help = PREPARE_EXAMPLES)]
    Prepare(PrepareArgs),
    /// Render an image from a prompt with a fixed seed.
    #[command(after_help = SAMPLE_EXAMPLES)]
    Sample(SampleArgs),
    /// Print libtorch's version, CUDA availability and bf16 support.
    Doctor,
}

const SAMPLE_EXAMPLES: &str = "\
Examples:
  sdtune sample --model ./stable-diffusion-v1-5 --prompt \"a red car by the sea\" --seed 42 --out car.png
  sdtune sample --model ./sd21 --prompt \"product shot, white background\" \\
      --negative-prompt \"blurry\" --steps 30 --guidance 7.5 --width 768 --height 768
  sdtune sample --model ./sd15 --prompt \"acme mug on a desk\" --lora output/acme/acme.safetensors:0.8

The same model, prompt, seed, scheduler and steps give the same image as
diffusers' StableDiffusionPipeline with torch.Generator(\"cpu\").manual_seed(seed).";

const PREPARE_EXAMPLES: &str = "\
Examples:
  sdtune prepare ./brand_photos --model ./stable-diffusion-v1-5 --trigger brandx
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
    /// A diffusers model folder (holding model_index.json) [default: model in sdtune.yaml].
    #[arg(long, value_name = "DIR")]
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
    /// A diffusers model folder (holding model_index.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// What to render.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from (used when --guidance > 1).
    #[arg(long, value_name = "TEXT")]
    pub negative_prompt: Option<String>,
    /// Seed of the initial noise; the same seed gives the same image.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale; 1 turns guidance off.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
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
    /// Where to write the PNG.
    #[arg(long, value_name = "FILE.png", default_value = "sample.png")]
    pub out: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weight precision: fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32")]
    pub precision: String,
}

/// Runs the command line; returns the process exit code.
pub fn run() -> i32 {
    install_panic_message();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(args) => commands::prepare::run(args),
        Command::Sample(args) => commands::sample::run(args),
        Command::Doctor => commands::doctor::run(),
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
