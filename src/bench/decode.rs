//! `sdtune bench decode`: the VAE decode `sdtune sample` ends with, alone
//! (random weights from the config), with or without tiling: how long a
//! large image takes and how much memory it needs.
use anyhow::Result;
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

use super::measure::{insert_flop_rate, num, timed, MemoryMeter};
use super::Setup;
use crate::models::built::build;
use crate::models::layers::WeightInit;
use crate::models::vae::AutoencoderKL;

/// Decoding settings of the benchmark.
#[derive(Clone, Debug)]
pub struct DecodeBench {
    pub warmup: usize,
    /// Timed decodes.
    pub batches: usize,
    pub tiling: bool,
}

pub fn run(setup: &Setup, bench: &DecodeBench) -> Result<Map<String, Value>> {
    let (device, precision, spec) = (setup.device, setup.precision, &setup.spec);
    let (lh, lw) = spec.latent_size(setup.resolution)?;
    let mut memory = MemoryMeter::start(device);
    let mut vae = build(device, precision.kind(), WeightInit::Random, |vb| AutoencoderKL::new(vb, &spec.vae))?;
    if bench.tiling {
        vae.model.enable_tiling();
    }
    let rss_after_build = super::measure::rss_mb();
    tch::manual_seed(5);
    let latents = Tensor::randn([setup.batch_size as i64, spec.vae.latent_channels, lh, lw], (Kind::Float, Device::Cpu))
        .to_device(device)
        .to_kind(precision.kind());
    // As sample: decode, then the image back to fp32 on the CPU.
    let decode = || -> Result<bool> {
        tch::no_grad(|| {
            let images = vae.model.f_decode(&latents)?.to_kind(Kind::Float).to_device(Device::Cpu);
            Ok(crate::models::finite::all_finite(&images))
        })
    };
    for _ in 0..bench.warmup {
        decode()?;
    }
    memory.sample();
    let probed_peak = crate::matmul_probe::matmul_gflops(device, precision.kind());
    let ((finite, flops), timing) =
        timed(device, || crate::models::flop_count::counted(|| (0..bench.batches).map(|_| decode()).collect::<Result<Vec<bool>>>()));
    let finite = finite?.into_iter().all(|f| f);
    memory.sample();

    let n = (bench.batches * setup.batch_size) as f64;
    let mut out = setup.record("decode");
    out.insert("vae_tiling".into(), Value::from(bench.tiling));
    out.insert("tile_px".into(), num(vae.model.tiling().map(|t| t.sample_tile as f64)));
    out.insert("batches".into(), Value::from(bench.batches));
    out.insert("seconds".into(), num(Some(timing.wall)));
    out.insert("s_per_image".into(), num(Some(timing.wall / n)));
    out.insert("cpu_s_per_image".into(), num(timing.cpu.map(|c| c / n)));
    out.insert("finite".into(), Value::from(finite));
    out.insert("model_tflop_per_image".into(), num(Some(flops as f64 / n / 1e12)));
    insert_flop_rate(&mut out, flops as f64, timing.wall, probed_peak, setup.peak_tflops);
    out.insert("rss_after_build_mb".into(), num(rss_after_build));
    memory.report(&mut out);
    Ok(out)
}
