//! `sdtune bench sample`: seconds per image of text to image, the pipeline
//! `sdtune sample` runs (tokenize, encode, denoise with guidance, VAE decode).
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::{Map, Value};

use super::arch::{ModelSpec, Source};
use super::measure::{insert_flop_rate, num, timed, MemoryMeter};
use super::Setup;
use crate::models::stable_diffusion::{Placement, StableDiffusion};
use crate::models::tokenizer::ClipTokenizer;
use crate::sample::pipeline::{text_to_images_batched, SampleRequest};
use crate::schedulers::SchedulerKind;

/// Sampling settings of the benchmark.
#[derive(Clone, Debug)]
pub struct SampleBench {
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    /// Images rendered untimed first, then timed.
    pub warmup: usize,
    pub images: usize,
    /// Tokenizer folders for random-weight models (the second is SDXL's).
    pub tokenizers: Tokenizers,
}

/// The tokenizer folders a random-weight model samples with.
#[derive(Clone, Debug, Default)]
pub struct Tokenizers {
    pub first: Option<PathBuf>,
    /// SDXL's `tokenizer_2`.
    pub second: Option<PathBuf>,
}

/// The prompt every benchmark image uses (the diffusers side uses it too).
pub const PROMPT: &str = "a studio photo of a red ceramic mug with a white logo on a wooden desk, soft light";

/// The tokenizer folder used with `--arch` when none is given.
pub const DEFAULT_TOKENIZER: &str = "tests/fixtures/tiny-sd1/tokenizer";
/// SDXL's two (the second pads with id 0), from the tiny SDXL fixture.
pub const DEFAULT_SDXL_TOKENIZERS: [&str; 2] = ["tests/fixtures/tiny-sdxl/tokenizer", "tests/fixtures/tiny-sdxl/tokenizer_2"];

/// Builds (random weights) or loads the whole pipeline.
pub fn build_model(spec: &ModelSpec, placement: Placement, tokenizers: &Tokenizers) -> Result<StableDiffusion> {
    match &spec.source {
        Source::Folder(dir) => StableDiffusion::from_diffusers_folder(dir, placement, None),
        Source::Arch(_) => {
            tch::manual_seed(0);
            let configs = std::iter::once(spec.text.clone()).chain(spec.text_2.clone()).collect();
            let mut model =
                StableDiffusion::random(configs, spec.unet.clone(), spec.vae.clone(), spec.scheduler.clone(), placement)?;
            let sdxl = spec.text_2.is_some();
            let defaults = if sdxl { DEFAULT_SDXL_TOKENIZERS } else { [DEFAULT_TOKENIZER, DEFAULT_SDXL_TOKENIZERS[1]] };
            let chosen = [&tokenizers.first, &tokenizers.second];
            for (i, encoder) in model.text.encoders.iter_mut().enumerate() {
                let dir = chosen[i].clone().unwrap_or_else(|| PathBuf::from(defaults[i]));
                let flag = if i == 0 { "--tokenizer" } else { "--tokenizer-2" };
                encoder.tokenizer = Some(ClipTokenizer::from_folder(&dir).with_context(|| {
                    format!("a CLIP tokenizer is needed to sample; pass {flag} DIR (a folder with vocab.json and merges.txt), not {}", dir.display())
                })?);
            }
            Ok(model)
        }
    }
}

fn requests(bench: &SampleBench, resolution: i64, count: usize, first_seed: u64) -> Vec<SampleRequest> {
    (0..count as u64)
        .map(|i| SampleRequest {
            prompt: PROMPT.into(),
            negative_prompt: None,
            seed: first_seed + i,
            steps: bench.steps,
            guidance: bench.guidance,
            width: resolution,
            height: resolution,
            scheduler: bench.scheduler,
            clip_skip: 0,
            size_conditioning: None,
        })
        .collect()
}

pub fn run(setup: &Setup, bench: &SampleBench) -> Result<Map<String, Value>> {
    let (device, precision, spec) = (setup.device, setup.precision, &setup.spec);
    spec.latent_size(setup.resolution)?;
    let mut memory = MemoryMeter::start(device);
    let placement = Placement { device, kind: precision.kind(), vae_kind: precision.kind() };
    let model = build_model(spec, placement, &bench.tokenizers)?;
    let rss_after_build = super::measure::rss_mb();
    let mut ignore = |_: String| {};
    if bench.warmup > 0 {
        let warm = requests(bench, setup.resolution, bench.warmup, 1000);
        text_to_images_batched(&model, &warm, setup.batch_size, &mut ignore, &mut |_, _| {})?;
    }
    memory.sample();
    let reqs = requests(bench, setup.resolution, bench.images, 0);
    let probed_peak = crate::matmul_probe::matmul_gflops(device, precision.kind());
    let ((images, flops), timing) = timed(device, || {
        crate::models::flop_count::counted(|| text_to_images_batched(&model, &reqs, setup.batch_size, &mut ignore, &mut |_, _| {}))
    });
    let seconds = timing.wall;
    let images = images?;
    memory.sample();
    let finite = images.iter().all(crate::models::finite::all_finite);

    let n = bench.images as f64;
    let mut out = setup.record("sample");
    out.insert("scheduler".into(), Value::from(bench.scheduler.name()));
    out.insert("steps".into(), Value::from(bench.steps));
    out.insert("guidance".into(), num(Some(bench.guidance)));
    out.insert("warmup_images".into(), Value::from(bench.warmup));
    out.insert("images".into(), Value::from(bench.images));
    out.insert("seconds".into(), num(Some(seconds)));
    out.insert("s_per_image".into(), num(Some(seconds / n)));
    out.insert("images_per_s".into(), num(Some(n / seconds)));
    out.insert("cpu_s_per_image".into(), num(timing.cpu.map(|c| c / n)));
    out.insert("finite".into(), Value::from(finite));
    // Counted as the layers ran: text encoders, every UNet pass, VAE decode.
    out.insert("model_tflop_per_image".into(), num(Some(flops as f64 / n / 1e12)));
    insert_flop_rate(&mut out, flops as f64, seconds, probed_peak, setup.peak_tflops);
    out.insert("rss_after_build_mb".into(), num(rss_after_build));
    memory.report(&mut out);
    Ok(out)
}
