//! `sdtune bench train|sample|encode`: flags -> a benchmark -> a table on
//! stderr and one JSON line on stdout.
use anyhow::{bail, Result};

use crate::bench::arch::ModelSpec;
use crate::bench::encode::EncodeBench;
use crate::bench::sample::SampleBench;
use crate::bench::train::TrainBench;
use crate::bench::{encode, measure, sample, train, Setup};
use crate::cli::BenchArgs;
use crate::lora::targets::Targets;
use crate::runtime::{parse_device, supports, Precision};
use crate::schedulers::SchedulerKind;

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
    let precision = match args.precision.as_str() {
        "auto" if device.is_cuda() && supports(device, tch::Kind::BFloat16) => Precision::Bf16,
        "auto" => Precision::Fp32,
        other => Precision::parse(other)?,
    };
    if !supports(device, precision.kind()) {
        bail!("--precision {} does not compute on this device; use --precision fp32", precision.name());
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let setup = Setup {
        resolution: args.resolution.unwrap_or_else(|| spec.native_resolution()),
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
                tokenizer: args.tokenizer.clone(),
            };
            sample::run(&setup, &bench)?
        }
        "encode" => {
            let bench = EncodeBench {
                warmup: args.warmup.unwrap_or(1),
                batches: positive(args.steps.unwrap_or(5), "--steps")?,
                tokenizer: args.tokenizer.clone(),
            };
            encode::run(&setup, &bench)?
        }
        other => bail!("sdtune bench {other:?}: say train, sample or encode"),
    };
    measure::print(&title, &fields);
    Ok(())
}

fn positive(n: usize, flag: &str) -> Result<usize> {
    if n == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(n)
}
