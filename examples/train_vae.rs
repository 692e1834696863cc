//! Trains the tiny demo model's VAE: an SD-style `AutoencoderKL` (diffusers
//! weight names, built by sdtune's own `AutoencoderKL::new`) on a folder of
//! images, on the CPU, and writes `vae/config.json` +
//! `vae/diffusion_pytorch_model.safetensors` into a model folder.
//!
//!     cargo run --release --example train_vae -- --data DIR --model DIR [--steps 1500] [--batch 32]
//!         [--lr 2e-3] [--channels 16,32,32] [--crop 32] [--seed 0]
//!
//! Objective: mean squared error of the reconstruction (decoded from a
//! sample of the latent posterior) plus 1e-6 x the KL divergence to N(0, 1),
//! as SD's VAE keeps its latent space only lightly regularised (no
//! perceptual or adversarial loss: flat-coloured shapes do not need them).
//! Three levels of channels (16, 32, 32 by default) make the scale factor 4:
//! 64-px images give 4 x 16 x 16 latents. It trains on random 32-px crops
//! (convolutions see the same statistics at a quarter of the cost; the
//! mid-block attention sees the whole image at inference, as SD's VAE,
//! trained on 256-px crops, does at 512). After training, `scaling_factor`
//! is set to 1 / std of the latents of the training images, as SD's
//! 0.18215 was. `vae-preview.png` beside the model folder shows eight
//! images over their reconstructions.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use sdtune::models::config::VaeConfig;
use sdtune::models::layers::WeightInit;
use sdtune::models::built::build;
use sdtune::loaders::tensor_file::write_tensors;
use sdtune::models::vae::AutoencoderKL;
use sdtune::train::lr::LrSchedule;
use sdtune::train::optimizer::{clip_grad_norm, AdamW, AdamWConfig};
use serde_json::json;
use tch::{Device, Kind, Tensor};

const KL_WEIGHT: f64 = 1e-6;

fn config_json(channels: &[i64], scaling_factor: f64) -> serde_json::Value {
    let blocks = channels.len();
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; blocks],
        "up_block_types": vec!["UpDecoderBlock2D"; blocks],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": true,
        "force_upcast": true,
        "use_quant_conv": true,
        "use_post_quant_conv": true
    })
}

struct Args {
    data: PathBuf,
    model: PathBuf,
    steps: u64,
    batch: i64,
    lr: f64,
    seed: i64,
    channels: Vec<i64>,
    /// Train on random crops of this side (convolutions see the same
    /// statistics at a fraction of the cost); 0: whole images.
    crop: i64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { data: PathBuf::new(), model: PathBuf::new(), steps: 1500, batch: 32, lr: 2e-3, seed: 0, channels: vec![16, 32, 32], crop: 32 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--data" => a.data = value.into(),
            "--model" => a.model = value.into(),
            "--steps" => a.steps = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--lr" => a.lr = value.parse()?,
            "--seed" => a.seed = value.parse()?,
            "--channels" => a.channels = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--crop" => a.crop = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    if a.data.as_os_str().is_empty() || a.model.as_os_str().is_empty() {
        bail!("usage: train_vae --data DIR --model DIR [--steps N] [--batch N] [--lr LR] [--seed S]");
    }
    Ok(a)
}

/// Every PNG in `dir` as one uint8 tensor [N, 3, H, W] (all the same size).
fn load_images(dir: &Path) -> Result<Tensor> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no PNG images", dir.display());
    }
    let images: Vec<image::RgbImage> = files
        .par_iter()
        .map(|f| Ok(image::open(f).with_context(|| format!("cannot read {}", f.display()))?.to_rgb8()))
        .collect::<Result<_>>()?;
    let (w, h) = images[0].dimensions();
    let mut bytes = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for (img, f) in images.iter().zip(&files) {
        if img.dimensions() != (w, h) {
            bail!("{} is {:?}, the others {w}x{h}", f.display(), img.dimensions());
        }
        bytes.extend_from_slice(img.as_raw());
    }
    Ok(Tensor::from_slice(&bytes).view([images.len() as i64, h as i64, w as i64, 3]).permute([0, 3, 1, 2]).contiguous())
}

fn to_unit(batch: &Tensor) -> Tensor {
    batch.to_kind(Kind::Float) / 127.5 - 1.0
}

/// Eight training images (top row) over their reconstructions from the latent mean.
fn write_preview(vae: &AutoencoderKL, images: &Tensor, path: &Path) -> Result<()> {
    let n = images.size()[0].min(8);
    let step = (images.size()[0] / n).max(1);
    let idx = Tensor::arange_start_step(0, n * step, step, (Kind::Int64, Device::Cpu));
    let x = to_unit(&images.index_select(0, &idx));
    let recon = tch::no_grad(|| -> Result<Tensor> { vae.f_decode(&vae.f_encode(&x)?.mean) })?;
    let both = Tensor::cat(&[x, recon], 0);
    let pixels = ((both.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to_kind(Kind::Uint8);
    let (h, w) = (pixels.size()[2], pixels.size()[3]);
    // [2, n, 3, h, w] -> [2h, n w, 3]
    let grid = pixels.view([2, n, 3, h, w]).permute([0, 3, 1, 4, 2]).reshape([2 * h, n * w, 3]).contiguous();
    let mut bytes = vec![0u8; grid.numel()];
    grid.copy_data_u8(&mut bytes, grid.numel());
    let img = image::RgbImage::from_raw((n * w) as u32, (2 * h) as u32, bytes).context("preview size")?;
    img.save(path).with_context(|| format!("cannot write {}", path.display()))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    tch::manual_seed(args.seed);
    let images = load_images(&args.data)?;
    let n = images.size()[0];
    println!("{} images of {}x{} from {}", n, images.size()[3], images.size()[2], args.data.display());

    let cfg: VaeConfig = serde_json::from_value(config_json(&args.channels, 1.0))?;
    let vae = build(Device::Cpu, Kind::Float, WeightInit::Random, |vb| AutoencoderKL::new(vb, &cfg))?;
    let mut named: Vec<(String, Tensor)> = vae.vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let params: Vec<Tensor> = named.iter().map(|(_, t)| t.set_requires_grad(true)).collect();
    let count: i64 = params.iter().map(|p| p.numel() as i64).sum();
    println!("VAE: {count} parameters, scale factor {}", cfg.scale_factor());
    let mut opt = AdamW::new(params, AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() });
    let schedule = LrSchedule::Cosine { warmup: 50 };

    let started = Instant::now();
    let mut smoothed = f64::NAN;
    for step in 0..args.steps {
        let idx = Tensor::randint(n, [args.batch], (Kind::Int64, Device::Cpu));
        let mut x = to_unit(&images.index_select(0, &idx));
        let side = images.size()[2];
        if args.crop > 0 && args.crop < side {
            let (top, left) = (Tensor::randint(side - args.crop + 1, [1], (Kind::Int64, Device::Cpu)), Tensor::randint(side - args.crop + 1, [1], (Kind::Int64, Device::Cpu)));
            x = x.narrow(2, top.int64_value(&[0]), args.crop).narrow(3, left.int64_value(&[0]), args.crop);
        }
        if step % 2 == 1 {
            x = x.flip([3]);
        }
        let dist = vae.model.f_encode(&x)?;
        let z = dist.sample_with(&dist.mean.randn_like());
        let recon = vae.model.f_decode(&z)?;
        let mse = (&recon - &x).square().mean(Kind::Float);
        let var = dist.logvar.exp();
        let kl = (dist.mean.square() + &var - 1.0 - &dist.logvar).mean(Kind::Float) * 0.5;
        let loss = &mse + kl * KL_WEIGHT;
        loss.f_backward()?;
        let mut grad = opt.flat_grad();
        clip_grad_norm(&mut grad, 1.0);
        opt.step(&grad, schedule.lr(args.lr, step, args.steps));
        opt.zero_grad();
        let m = mse.double_value(&[]);
        smoothed = if smoothed.is_nan() { m } else { 0.95 * smoothed + 0.05 * m };
        if (step + 1) % 50 == 0 || step + 1 == args.steps {
            println!(
                "step {:5}/{}  mse {smoothed:.5}  ({:.2} s/step)",
                step + 1,
                args.steps,
                started.elapsed().as_secs_f64() / (step + 1) as f64
            );
        }
    }

    // scaling_factor: 1 / std of the latent means over (up to) 512 images.
    let (scaling, recon_mse) = tch::no_grad(|| -> Result<(f64, f64)> {
        let sample = images.narrow(0, 0, n.min(512));
        let mut means = Vec::new();
        let mut err = 0.0;
        for chunk in sample.split(64, 0) {
            let x = to_unit(&chunk);
            let dist = vae.model.f_encode(&x)?;
            err += (vae.model.f_decode(&dist.mean)? - &x).square().sum(Kind::Float).double_value(&[]);
            means.push(dist.mean);
        }
        let means = Tensor::cat(&means, 0);
        Ok((1.0 / means.std(true).double_value(&[]), err / sample.numel() as f64))
    })?;
    let dir = args.model.join("vae");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = config_json(&args.channels, (scaling * 1e5).round() / 1e5);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    let tensors: Vec<(String, Tensor)> = named.iter().map(|(k, t)| (k.clone(), t.detach())).collect();
    write_tensors(&dir.join("diffusion_pytorch_model.safetensors"), &tensors, None)?;
    let preview = args.model.with_file_name("vae-preview.png");
    write_preview(&vae.model, &images, &preview)?;
    println!(
        "wrote {} in {:.1} min: reconstruction MSE {recon_mse:.5} (pixels in [-1, 1]), scaling_factor {:.5}",
        dir.display(),
        started.elapsed().as_secs_f64() / 60.0,
        scaling
    );
    Ok(())
}
