//! `sdtune bench train|sample|encode|decode`: flags -> a benchmark -> a table on
//! stderr and one JSON line on stdout.
use anyhow::{bail, Result};

use crate::bench::arch::ModelSpec;
use crate::bench::decode::DecodeBench;
use crate::bench::encode::EncodeBench;
use crate::bench::sample::{SampleBench, Tokenizers};
use crate::bench::train::TrainBench;
use crate::bench::{decode, encode, measure, sample, train, Setup};
use crate::lora::targets::Targets;
use crate::runtime::{parse_device, supports, Precision};
use crate::schedulers::SchedulerKind;

use std::path::PathBuf;

use clap::Args;
pub const EXAMPLES: &str = "\
Examples:
  sdtune bench train --arch sd15 --resolution 256 --steps 5 --warmup 3 --device cpu
  sdtune bench train --arch sd15 --batch-size 4 --precision bf16 --device cuda
  sdtune bench sample --arch sd15 --steps 30 --guidance 7.5 --images 8 --batch-size 4
  sdtune bench encode --arch sd15 --batch-size 4
  sdtune bench decode --arch sd15 --resolution 2048 --vae-tiling --steps 1 --warmup 0
  sdtune bench train --arch sdxl --resolution 1024 --precision bf16 --gradient-checkpointing --device cuda
  sdtune bench sample --arch sdxl --resolution 1024 --steps 30 --device cuda
  sdtune bench train --model ./stable-diffusion-v1-5 --resolution 512
  sdtune bench sample --arch sd15 --resolution 256 --libtorch-kernels   (libtorch's kernels, for A/B)
  sdtune bench train --arch tiny --dump-configs cfg     (write the configs and stop)

Models are built from a config with random weights (--arch) or loaded (--model), so no
download is needed. The training step is sdtune's own, on random cached latents and text
states of the right shapes. A table goes to stderr and one JSON line to stdout: steps_per_s
(or s_per_image, images_per_s), peak_mem_mb (peak RSS on CPU; on CUDA the caching
allocator's reserved peak, an upper bound of torch's max_memory_allocated), the model
GFLOP/s achieved (every linear, convolution and attention product counted as it runs, with
torch FlopCounterMode's rules), the machine's own matmul rate probed beside it and their
ratio, and on CUDA model FLOP utilisation. OMP_NUM_THREADS sets the CPU threads. scripts/bench-vs-diffusers.sh
runs the same configs through diffusers+peft in the same run.";


/// Flags of `sdtune bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure: train (LoRA optimizer steps), sample (text to image), encode (VAE +
    /// text encoder) or decode (the VAE decoder alone, as sample ends).
    #[arg(value_parser = ["train", "sample", "encode", "decode"])]
    pub kind: String,
    /// Model config with random weights: tiny (the test fixture's sizes), sd15, sd21 or sdxl (base 1.0).
    #[arg(long, default_value = "sd15", value_parser = ["tiny", "sd15", "sd21", "sdxl"], conflicts_with = "model")]
    pub arch: String,
    /// A diffusers model folder to load instead of random weights.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Image side in pixels [default: the model's own: 512 sd15, 768 sd21, 1024 sdxl, 64 tiny].
    #[arg(allow_negative_numbers = true, long, value_name = "PX")]
    pub resolution: Option<i64>,
    /// Images per training step, UNet batch when sampling, images per encode batch.
    #[arg(allow_negative_numbers = true, long, default_value_t = 1)]
    pub batch_size: usize,
    /// LoRA rank (alpha = rank).
    #[arg(allow_negative_numbers = true, long, default_value_t = 16)]
    pub rank: i64,
    /// Layers that get LoRA: cross-attn, attn or transformer.
    #[arg(long, default_value = "cross-attn")]
    pub targets: String,
    /// Timed optimizer steps (train), denoising steps (sample) or timed batches (encode, decode)
    /// [default: 20 train, 30 sample, 5 encode, 3 decode].
    #[arg(allow_negative_numbers = true, long)]
    pub steps: Option<usize>,
    /// Untimed rounds first: optimizer steps (train), images (sample) or batches (encode,
    /// decode) [default: 3, 1, 1, 1].
    #[arg(allow_negative_numbers = true, long, value_name = "N")]
    pub warmup: Option<usize>,
    /// Images rendered in the timed part of `sample` [default: --batch-size].
    #[arg(allow_negative_numbers = true, long, value_name = "N")]
    pub images: Option<usize>,
    /// Guidance scale of `sample` (above 1: classifier-free guidance, two UNet passes).
    #[arg(allow_hyphen_values = true, long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Sampler of `sample`.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Min-SNR-gamma of the training loss; 0 turns it off.
    #[arg(allow_hyphen_values = true, long, default_value_t = 5.0)]
    pub min_snr_gamma: f64,
    /// Train with the UNet's gradient checkpointing (as `sdtune train
    /// --gradient-checkpointing`), to compare peak memory and speed.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// `decode` tile by tile, as `sdtune sample --vae-tiling` does.
    #[arg(long)]
    pub vae_tiling: bool,
    /// CLIP tokenizer folder for `sample` with --arch [default: tests/fixtures/tiny-sd1/tokenizer;
    /// tests/fixtures/tiny-sdxl/tokenizer for sdxl].
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// SDXL's second tokenizer folder (pads with id 0) for `sample --arch sdxl`
    /// [default: tests/fixtures/tiny-sdxl/tokenizer_2].
    #[arg(long, value_name = "DIR")]
    pub tokenizer_2: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Frozen-weight precision: auto (as `sdtune train` picks it), fp32, bf16 or fp16.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// The device's peak dense TFLOP/s in this precision, for model FLOP utilisation [default: 790 on CUDA].
    #[arg(allow_hyphen_values = true, long, value_name = "TFLOPS")]
    pub peak_tflops: Option<f64>,
    /// Leave every CPU product and convolution to libtorch's own kernels (MKL, oneDNN's
    /// convolution) and bf16 weights in their plain layout, instead of sdtune's choices
    /// (its fp32 products, channels-last bf16 convolutions), to measure what those gain.
    #[arg(long)]
    pub libtorch_kernels: bool,
    /// Write the model's configs as diffusers config files into DIR and stop.
    #[arg(long, value_name = "DIR")]
    pub dump_configs: Option<PathBuf>,
}

/// H200 dense bf16/fp16 throughput the design's MFU figures use.
const DEFAULT_CUDA_PEAK_TFLOPS: f64 = 790.0;

pub fn run(args: BenchArgs) -> Result<()> {
    let spec = match &args.model {
        Some(dir) => ModelSpec::folder(dir)?,
        None => ModelSpec::arch(&args.arch)?,
    };
    if let Some(dir) = &args.dump_configs {
        spec.dump(dir)?;
        eprintln!("wrote the {} configs to {}", spec.name(), dir.display());
        return Ok(());
    }
    let device = parse_device(&args.device)?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let resolution = args.resolution.unwrap_or_else(|| spec.native_resolution());
    // Checked before `precision auto` measures the CPU, so a bad flag is the one line said.
    spec.latent_size(resolution)?;
    crate::models::onednn::set_enabled(!args.libtorch_kernels);
    let precision = match args.precision.as_str() {
        // What `sdtune train` would pick.
        "auto" => crate::runtime::auto_precision(device),
        other => Precision::parse(other)?,
    };
    if !supports(device, precision.kind()) {
        bail!("--precision {} does not compute on this device; use --precision fp32", precision.name());
    }
    let setup = Setup {
        resolution,
        spec,
        device,
        precision,
        batch_size: args.batch_size,
        peak_tflops: args.peak_tflops.or(device.is_cuda().then_some(DEFAULT_CUDA_PEAK_TFLOPS)),
    };
    let title = format!(
        "sdtune bench {} ({}, {} px, batch {}, {} on {})",
        args.kind,
        setup.spec.name(),
        setup.resolution,
        setup.batch_size,
        precision.name(),
        crate::bench::device_name(device)
    );
    let fields = match args.kind.as_str() {
        "train" => {
            let bench = TrainBench {
                rank: args.rank,
                targets: Targets::parse(&args.targets)?,
                min_snr_gamma: (args.min_snr_gamma > 0.0).then_some(args.min_snr_gamma),
                warmup: args.warmup.unwrap_or(3),
                steps: positive(args.steps.unwrap_or(20), "--steps")?,
                gradient_checkpointing: args.gradient_checkpointing,
            };
            train::run(&setup, &bench)?
        }
        "sample" => {
            let bench = SampleBench {
                steps: positive(args.steps.unwrap_or(30), "--steps")?,
                guidance: args.guidance,
                scheduler: SchedulerKind::parse(&args.scheduler)?,
                warmup: args.warmup.unwrap_or(1),
                images: positive(args.images.unwrap_or(args.batch_size), "--images")?,
                tokenizers: tokenizers(&args),
            };
            sample::run(&setup, &bench)?
        }
        "encode" => {
            let bench = EncodeBench {
                warmup: args.warmup.unwrap_or(1),
                batches: positive(args.steps.unwrap_or(5), "--steps")?,
                tokenizers: tokenizers(&args),
            };
            encode::run(&setup, &bench)?
        }
        "decode" => {
            let bench = DecodeBench {
                warmup: args.warmup.unwrap_or(1),
                batches: positive(args.steps.unwrap_or(3), "--steps")?,
                tiling: args.vae_tiling,
            };
            decode::run(&setup, &bench)?
        }
        other => bail!("sdtune bench {other:?}: say train, sample, encode or decode"),
    };
    measure::print(&title, &fields);
    Ok(())
}

fn tokenizers(args: &BenchArgs) -> Tokenizers {
    Tokenizers { first: args.tokenizer.clone(), second: args.tokenizer_2.clone() }
}

fn positive(n: usize, flag: &str) -> Result<usize> {
    if n == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(n)
}
