//! `sdtune bench encode`: what `sdtune prepare` computes per image, VAE
//! encode of a batch of images and the text encoder on their captions.
use anyhow::Result;
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

use super::measure::{insert_flop_rate, num, timed, MemoryMeter};
use crate::models::flop_count::counted;
use super::sample::{build_model, Tokenizers, PROMPT};
use super::Setup;
use crate::models::stable_diffusion::Placement;

/// Encoding settings of the benchmark.
#[derive(Clone, Debug)]
pub struct EncodeBench {
    pub warmup: usize,
    /// Timed batches.
    pub batches: usize,
    pub tokenizers: Tokenizers,
}

pub fn run(setup: &Setup, bench: &EncodeBench) -> Result<Map<String, Value>> {
    let (device, precision, spec) = (setup.device, setup.precision, &setup.spec);
    spec.latent_size(setup.resolution)?;
    let mut memory = MemoryMeter::start(device);
    // As prepare: the VAE in fp32 unless asked otherwise, on the device.
    let placement = Placement { device, kind: precision.kind(), vae_kind: precision.kind() };
    let model = build_model(spec, placement, &bench.tokenizers)?;
    let rss_after_build = super::measure::rss_mb();
    let b = setup.batch_size as i64;
    tch::manual_seed(4);
    let images = (Tensor::rand([b, 3, setup.resolution, setup.resolution], (Kind::Float, Device::Cpu)) * 2.0 - 1.0)
        .to_device(device);
    model.tokenizer()?;
    let prompts = vec![PROMPT; setup.batch_size];

    let encode_images = || {
        tch::no_grad(|| {
            let dist = model.vae.model.encode(&images);
            // What the cache stores: mean and std, fp32 on the CPU.
            let _ = (dist.mean.to_kind(Kind::Float).to_device(Device::Cpu), dist.std().to_kind(Kind::Float).to_device(Device::Cpu));
        })
    };
    let encode_text = || -> Result<()> {
        tch::no_grad(|| {
            // As prepare: through the text stack, fp32 on the CPU.
            let encoded = model.text.encode(&prompts, 0)?;
            let _ = encoded.conditioning.to_kind(Kind::Float).to_device(Device::Cpu);
            Ok(())
        })
    };
    for _ in 0..bench.warmup {
        encode_images();
        encode_text()?;
    }
    memory.sample();
    let probed_peak = crate::matmul_probe::matmul_gflops(device, precision.kind());
    let ((_, vae_flops), vae) = timed(device, || counted(|| (0..bench.batches).for_each(|_| encode_images())));
    let ((result, text_flops), text) = timed(device, || counted(|| (0..bench.batches).try_for_each(|_| encode_text())));
    result?;
    memory.sample();

    let (vae_s, text_s) = (vae.wall, text.wall);
    let n = (bench.batches * setup.batch_size) as f64;
    let mut out = setup.record("encode");
    out.insert("batches".into(), Value::from(bench.batches));
    out.insert("vae_seconds".into(), num(Some(vae_s)));
    out.insert("images_per_s".into(), num(Some(n / vae_s)));
    out.insert("s_per_image".into(), num(Some(vae_s / n)));
    out.insert("cpu_s_per_image".into(), num(vae.cpu.map(|c| c / n)));
    out.insert("text_seconds".into(), num(Some(text_s)));
    out.insert("captions_per_s".into(), num(Some(n / text_s)));
    out.insert("vae_tflop_per_image".into(), num(Some(vae_flops as f64 / n / 1e12)));
    out.insert("text_gflop_per_caption".into(), num(Some(text_flops as f64 / n / 1e9)));
    // The rate figures are the VAE's, the part that dominates.
    insert_flop_rate(&mut out, vae_flops as f64, vae_s, probed_peak, setup.peak_tflops);
    out.insert("rss_after_build_mb".into(), num(rss_after_build));
    memory.report(&mut out);
    Ok(out)
}
