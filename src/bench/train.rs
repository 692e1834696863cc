//! `sdtune bench train`: optimizer steps of LoRA training per second.
//!
//! The step is sdtune's own ([`Trainer::step`]) on a [`TrainingData`] that
//! serves random cached latents and text states of the right shapes, as the
//! prepare cache would: only the UNet is built, as in training.
use anyhow::{Context, Result};
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

use super::arch::{ModelSpec, Source};
use super::measure::{insert_flop_rate, num, timed, MemoryMeter};
use super::Setup;
use crate::lora::network::{DownInit, LoraNetwork};
use crate::lora::targets::Targets;
use crate::models::layers::WeightInit;
use crate::loaders::weights::{build_and_load, component_weights};
use crate::models::built::{build, Built};
use crate::models::conditioning::Conditioning;
use crate::models::unet::UNet2DConditionModel;
use crate::runtime::Precision;
use crate::schedulers::NoiseSchedule;
use crate::train::data::{TrainSample, TrainingData};
use crate::train::lr::LrSchedule;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::precision::LossScaler;
use crate::train::trainer::{StepSettings, Trainer};

/// LoRA training settings of the benchmark.
#[derive(Clone, Debug)]
pub struct TrainBench {
    pub rank: i64,
    pub targets: Targets,
    pub min_snr_gamma: Option<f64>,
    pub warmup: usize,
    pub steps: usize,
    /// Measure with the UNet's gradient checkpointing on.
    pub gradient_checkpointing: bool,
}

/// `batch_size` cached images of one bucket: latent distributions and
/// caption states drawn once, on the CPU, as the cache holds them; for
/// SDXL-style UNets also the pooled embedding and the size/crop time ids.
pub struct RandomCache {
    means: Vec<Tensor>,
    stds: Vec<Tensor>,
    texts: Vec<Conditioning>,
    empty: Conditioning,
    time_ids: Option<[f32; 6]>,
}

impl RandomCache {
    /// `pooled`: the width of the pooled text embedding the UNet takes, if any.
    pub fn new(items: usize, latent_channels: i64, latent: (i64, i64), text_dim: i64, pooled: Option<i64>, pixels: (i64, i64)) -> Self {
        tch::manual_seed(1);
        let cpu = (Kind::Float, Device::Cpu);
        let shape = [latent_channels, latent.0, latent.1];
        let caption = || Conditioning {
            text: Tensor::randn([1, 77, text_dim], cpu),
            pooled: pooled.map(|width| Tensor::randn([1, width], cpu)),
            time_ids: None,
        };
        // Original size = bucket, no crop: what prepare stores for an image already at its bucket.
        let (h, w) = (pixels.0 as f32, pixels.1 as f32);
        RandomCache {
            means: (0..items).map(|_| Tensor::randn(shape, cpu) * 5.0).collect(),
            stds: (0..items).map(|_| Tensor::full(shape, 0.05, cpu)).collect(),
            texts: (0..items).map(|_| caption()).collect(),
            empty: caption(),
            time_ids: pooled.map(|_| [h, w, 0.0, 0.0, h, w]),
        }
    }
}

impl TrainingData for RandomCache {
    fn buckets(&self) -> Vec<Vec<usize>> {
        vec![(0..self.means.len()).collect()]
    }
    fn sample(&self, index: usize, _flip: bool) -> Result<TrainSample> {
        Ok(TrainSample {
            latent_mean: self.means[index].shallow_clone(),
            latent_std: self.stds[index].shallow_clone(),
            text: self.texts[index].shallow_clone(),
        })
    }
    fn has_flips(&self) -> bool {
        false
    }
    fn empty_caption(&self) -> Result<Conditioning> {
        Ok(self.empty.shallow_clone())
    }
    fn time_ids(&self, _index: usize, _flip: bool) -> Result<Option<[f32; 6]>> {
        Ok(self.time_ids)
    }
}

/// Builds the UNet alone, frozen, in `kind` on `device`.
pub fn build_unet(spec: &ModelSpec, device: Device, kind: Kind) -> Result<Built<UNet2DConditionModel>> {
    match &spec.source {
        Source::Arch(_) => {
            tch::manual_seed(0);
            build(device, kind, WeightInit::Random, |vb| UNet2DConditionModel::new(vb, &spec.unet))
        }
        Source::Folder(dir) => {
            let files = component_weights(&dir.join("unet"), "diffusion_pytorch_model", None)?;
            build_and_load(&files, device, kind, |vb| UNet2DConditionModel::new(vb, &spec.unet))
        }
    }
}

pub fn run(setup: &Setup, bench: &TrainBench) -> Result<Map<String, Value>> {
    let (device, precision, spec) = (setup.device, setup.precision, &setup.spec);
    let latent = spec.latent_size(setup.resolution)?;
    let mut memory = MemoryMeter::start(device);
    let unet = build_unet(spec, device, precision.kind()).context("cannot build the UNet")?;
    // As `sdtune train` lays it out.
    crate::models::channels_last::lay_out_for_training(&unet.layers, crate::runtime::native_bf16_cpu());
    let rss_after_build = super::measure::rss_mb();
    let unet_params: i64 = unet.vs.variables().values().map(|t| t.numel() as i64).sum();
    let text_dim = spec.unet.cross_attention_dims()[0];
    let pooled = unet.model.pooled_dim();
    let pixels = (setup.resolution, setup.resolution);
    let data = RandomCache::new(setup.batch_size, spec.unet.in_channels, latent, text_dim, pooled, pixels);
    tch::manual_seed(2);
    let alpha = bench.rank as f64;
    let lora = LoraNetwork::inject(&unet.layers, bench.targets, bench.rank, alpha, DownInit::KaimingUniform, device)?;
    let lora_params: i64 = lora.parameters().iter().map(|p| p.numel() as i64).sum();
    let optimizer = AdamW::new(lora.parameters(), AdamWConfig::default());
    let scaler = if precision == Precision::Fp16 { LossScaler::fp16() } else { LossScaler::disabled() };
    let total = (bench.warmup + bench.steps) as u64;
    let settings = StepSettings {
        batch_size: setup.batch_size,
        grad_accum: 1,
        lr: 1e-4,
        lr_schedule: LrSchedule::Constant,
        total_steps: total,
        seed: 3,
        noise_offset: 0.0,
        min_snr_gamma: bench.min_snr_gamma,
        caption_dropout: 0.0,
        clip_norm: 1.0,
        latent_scale: spec.vae.scaling_factor,
        gradient_checkpointing: bench.gradient_checkpointing,
    };
    let schedule = NoiseSchedule::from_config(&spec.scheduler)?;
    let mut trainer = Trainer::new(&unet.model, &schedule, &data, optimizer, scaler, settings, device)?;

    let mut last = None;
    let (_, warmup) = timed(device, || -> Result<()> {
        for step in 0..bench.warmup as u64 {
            last = Some(trainer.step(step)?);
        }
        Ok(())
    });
    memory.sample();
    let forward_flops = counted_forward(&unet.model, &data, setup.batch_size, spec.unet.in_channels, latent, device, precision.kind())?;
    let probed_peak = crate::matmul_probe::matmul_gflops(device, precision.kind());
    let (result, timing) = timed(device, || -> Result<()> {
        for step in bench.warmup as u64..total {
            last = Some(trainer.step(step)?);
        }
        Ok(())
    });
    result?;
    memory.sample();

    let seconds = timing.wall;
    let steps_per_s = bench.steps as f64 / seconds;
    let mut out = setup.record("train");
    out.insert("rank".into(), Value::from(bench.rank));
    out.insert("targets".into(), Value::from(bench.targets.name()));
    out.insert("unet_params".into(), Value::from(unet_params));
    out.insert("lora_modules".into(), Value::from(lora.modules.len()));
    out.insert("lora_params".into(), Value::from(lora_params));
    out.insert("min_snr_gamma".into(), num(bench.min_snr_gamma));
    out.insert("gradient_checkpointing".into(), Value::from(bench.gradient_checkpointing));
    out.insert("warmup_steps".into(), Value::from(bench.warmup));
    out.insert("steps".into(), Value::from(bench.steps));
    out.insert("warmup_s".into(), num(Some(warmup.wall)));
    out.insert("seconds".into(), num(Some(seconds)));
    out.insert("steps_per_s".into(), num(Some(steps_per_s)));
    out.insert("s_per_step".into(), num(Some(seconds / bench.steps as f64)));
    out.insert("cpu_s_per_step".into(), num(timing.cpu.map(|c| c / bench.steps as f64)));
    out.insert("samples_per_s".into(), num(Some(steps_per_s * setup.batch_size as f64)));
    out.insert("loss".into(), num(last.as_ref().map(|o| o.loss)));
    // A LoRA step costs about 2.1 UNet forwards (forward, backward to the
    // activations only, the small LoRA weight gradients); checkpointing's
    // recomputed forward is not model work and is not counted.
    let flops_per_step = 2.1 * forward_flops as f64;
    out.insert("model_tflop_per_step".into(), num(Some(flops_per_step / 1e12)));
    insert_flop_rate(&mut out, flops_per_step * bench.steps as f64, seconds, probed_peak, setup.peak_tflops);
    out.insert("rss_after_build_mb".into(), num(rss_after_build));
    memory.report(&mut out);
    Ok(out)
}

/// The FLOPs of one UNet forward of a training batch of `data`'s shapes
/// (without gradients; the LoRA adapters attached, as in the step).
fn counted_forward(unet: &UNet2DConditionModel, data: &RandomCache, batch: usize, channels: i64, latent: (i64, i64), device: Device, kind: Kind) -> Result<u64> {
    let texts: Vec<Conditioning> = data.texts.iter().take(batch).map(Conditioning::shallow_clone).collect();
    let mut context = Conditioning::cat(&texts)?.to_device(device).to_kind(kind);
    if context.pooled.is_some() {
        context.time_ids = Some(Tensor::zeros([batch as i64, 6], (kind, device)));
    }
    let sample = Tensor::zeros([batch as i64, channels, latent.0, latent.1], (kind, device));
    let t = Tensor::full([batch as i64], 500.0, (Kind::Float, device));
    let (_, flops) = crate::models::flop_count::counted(|| tch::no_grad(|| unet.forward(&sample, &t, &context)));
    Ok(flops)
}
