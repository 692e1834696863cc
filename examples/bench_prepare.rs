//! Benchmark of `sdtune prepare`'s two costly stages (scripts/bench-prepare.sh
//! runs it beside diffusers and prints the table for BENCHMARKS.md):
//!
//! 1. check + decode + crop + Lanczos3 resize of camera-sized JPEGs to their
//!    512-px bucket, on a rayon pool of 1 and of 2 threads;
//! 2. VAE encode (SD1.x-sized VAE, weights from `--vae DIR`) of the
//!    preprocessed images one at a time, fp32 on the CPU; the exact pixels are
//!    saved for diffusers to encode in the same run.
//!
//! cargo run --release --example bench_prepare -- --out DIR [--vae DIR] [--images N] [--encode N] [--threads T] [--rounds R]
//! Without --vae only stage 1 runs; --skip-decode runs only stage 2.
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use rayon::prelude::*;
use sdtune::data::config::{Background, DataConfig};
use sdtune::data::buckets::{crop_and_resize, crop_for, Buckets};
use sdtune::data::decode;
use sdtune::data::encode::to_tensor;
use sdtune::models::config::VaeConfig;
use sdtune::loaders::tensor_file::write_tensors;
use sdtune::loaders::folder::load_vae;
use tch::{Device, Kind};

struct Args {
    out: PathBuf,
    vae: Option<PathBuf>,
    images: usize,
    encode: usize,
    threads: i32,
    rounds: usize,
    skip_decode: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        out: PathBuf::from("target/bench-prepare"),
        vae: None,
        images: 48,
        encode: 4,
        threads: 2,
        rounds: 3,
        skip_decode: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--skip-decode" {
            args.skip_decode = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--out" => args.out = value.into(),
            "--vae" => args.vae = Some(value.into()),
            "--images" => args.images = value.parse()?,
            "--encode" => args.encode = value.parse()?,
            "--threads" => args.threads = value.parse()?,
            "--rounds" => args.rounds = value.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

/// A 1600x1200 photo-like JPEG (smooth fields plus noise), different per `seed`.
fn photo(seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let img = RgbImage::from_fn(1600, 1200, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 24) as f32 - 12.0;
        let fx = x as f32 / 1600.0;
        let fy = y as f32 / 1200.0;
        let px = |v: f32| (v + noise).clamp(0.0, 255.0) as u8;
        Rgb([
            px(128.0 + 100.0 * (fx * 6.3 + seed as f32).sin() * (fy * 3.1).cos()),
            px(128.0 + 90.0 * ((fx + fy) * 4.7).cos()),
            px(60.0 + 150.0 * fx * fy),
        ])
    });
    let mut buf = Vec::new();
    DynamicImage::ImageRgb8(img).write_to(&mut Cursor::new(&mut buf), ImageFormat::Jpeg).expect("JPEG encodes");
    buf
}

/// What prepare does to a new image before the VAE: hash, header, decode, bucket.
fn preprocess(path: &Path, cfg: &DataConfig, buckets: &Buckets) -> Result<RgbImage> {
    let bytes = std::fs::read(path)?;
    let _hash = decode::content_hash(&bytes);
    let header = decode::inspect(&bytes, cfg.max_pixels).map_err(|r| anyhow::anyhow!("{}", r.reason))?;
    let image = decode::decode(&bytes, &header, Background::WHITE, cfg.max_pixels)
        .map_err(|r| anyhow::anyhow!("{}", r.reason))?;
    let bucket = buckets.assign(header.width, header.height);
    Ok(crop_and_resize(&image, crop_for(header.width, header.height, bucket), bucket))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let photos = args.out.join("photos");
    std::fs::create_dir_all(&photos)?;
    let files: Vec<PathBuf> = (0..args.images as u32).map(|i| photos.join(format!("photo_{i:03}.jpg"))).collect();
    files.par_iter().enumerate().try_for_each(|(i, f)| -> Result<()> {
        if !f.exists() {
            std::fs::write(f, photo(i as u32))?;
        }
        Ok(())
    })?;
    let mb: u64 = files.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum::<u64>() >> 20;

    let cfg = DataConfig::default();
    let buckets = Buckets::new(&cfg);
    // Alternate 1 and 2 threads a few times and keep each one's best pass:
    // the machine may be shared, and this keeps both sides under the same load.
    let mut best = [0.0f64; 2];
    for _ in 0..if args.skip_decode { 0 } else { args.rounds } {
        for (slot, threads) in [1usize, 2].into_iter().enumerate() {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
            let start = Instant::now();
            pool.install(|| files.par_iter().try_for_each(|f| preprocess(f, &cfg, &buckets).map(|_| ())))?;
            best[slot] = best[slot].max(files.len() as f64 / start.elapsed().as_secs_f64());
        }
    }
    for (slot, threads) in [1, 2].into_iter().enumerate().filter(|_| !args.skip_decode) {
        println!(
            "{{\"side\": \"sdtune\", \"stage\": \"decode+resize\", \"threads\": {threads}, \"images\": {}, \"images_per_s\": {:.2}, \"input\": \"1600x1200 JPEG, {mb} MiB total\"}}",
            files.len(),
            best[slot]
        );
    }

    let Some(vae_dir) = &args.vae else {
        return Ok(());
    };
    tch::set_num_threads(args.threads);
    let cfg_vae = VaeConfig::from_file(&vae_dir.join("config.json"))?;
    let vae = load_vae(
        &[vae_dir.join("diffusion_pytorch_model.safetensors")],
        Device::Cpu,
        Kind::Float,
        &cfg_vae,
    )?;
    let images: Vec<RgbImage> =
        files.iter().take(args.encode).map(|f| preprocess(f, &cfg, &buckets)).collect::<Result<_>>()?;
    let refs: Vec<&RgbImage> = images.iter().collect();
    let pixels = to_tensor(&refs)?;
    write_tensors(&args.out.join("pixels.safetensors"), &[("pixels".to_string(), pixels.shallow_clone())], None)?;
    tch::no_grad(|| -> Result<()> {
        let _ = vae.model.f_encode(&pixels.narrow(0, 0, 1))?; // warm-up
        let start = Instant::now();
        for i in 0..images.len() as i64 {
            let dist = vae.model.f_encode(&pixels.narrow(0, i, 1))?;
            let _ = (dist.mean.to_device(Device::Cpu), dist.std().to_device(Device::Cpu));
        }
        let seconds = start.elapsed().as_secs_f64();
        let (w, h) = images[0].dimensions();
        println!(
            "{{\"side\": \"sdtune\", \"stage\": \"vae-encode\", \"threads\": {}, \"images\": {}, \"seconds\": {seconds:.3}, \"images_per_s\": {:.4}, \"size\": [{h}, {w}]}}",
            args.threads,
            images.len(),
            images.len() as f64 / seconds
        );
        Ok(())
    })
}
