//! Half-precision encoding: a latent that comes out non-finite in fp16 is
//! encoded again in fp32 and recorded as such; bf16 latents stay close to fp32.
use crate::prepare_support;

use std::path::Path;

use image::ImageFormat;
use prepare_support::*;
use sdtune::data::cache::CacheReader;
use sdtune::loaders::tensor_file::{write_tensors, TensorFile};

/// A copy of the tiny model whose VAE `conv_in` weights are scaled by
/// `scale`: the first activations overflow fp16 (max 65504) but not fp32,
/// and the group norm after it undoes the scale, so fp32 latents stay sane.
fn overflowing_model(dir: &Path, scale: f64) {
    for part in ["scheduler", "text_encoder", "tokenizer", "unet"] {
        std::os::unix::fs::symlink(tiny_model().join(part), dir.join(part)).unwrap();
    }
    std::fs::copy(tiny_model().join("model_index.json"), dir.join("model_index.json")).unwrap();
    std::fs::create_dir(dir.join("vae")).unwrap();
    std::fs::copy(tiny_model().join("vae/config.json"), dir.join("vae/config.json")).unwrap();
    let file = TensorFile::open(&tiny_model().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let tensors: Vec<_> = file
        .names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n).unwrap();
            let t = if n.starts_with("encoder.conv_in.") { t * scale } else { t };
            (n, t)
        })
        .collect();
    write_tensors(&dir.join("vae/diffusion_pytorch_model.safetensors"), &tensors, None).unwrap();
}

fn flags(model: &Path, precision: &str) -> Vec<String> {
    let mut f = small_flags(Path::new("data"));
    let at = f.iter().position(|a| a == "--model").unwrap();
    f[at + 1] = model.display().to_string();
    f.extend(["--precision".into(), precision.into()]);
    f
}

#[test]
fn non_finite_half_precision_latents_are_re_encoded_in_fp32() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    for i in 0..3 {
        write_picture(&work.join(format!("data/p{i}.png")), 64, 64, 20 + i, ImageFormat::Png);
    }
    let model = work.join("model");
    std::fs::create_dir(&model).unwrap();
    overflowing_model(&model, 1e6);

    run_ok(work, &flags(&model, "fp16"));
    let r = report(work);
    assert_eq!(count(&r, "usable"), 3, "{:#}", r["skipped"]);
    assert_eq!(count(&r, "fp32_fallbacks"), 3, "{:#}", r["counts"]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join(".sdtune/cache/manifest.json")).unwrap()).unwrap();
    assert!(manifest["latents"].as_object().unwrap().values().all(|e| e["fp32_fallback"] == true));
    let cache = CacheReader::open(work).unwrap();
    for i in 0..3 {
        let (mean, std, _) = cache.item(i, false).unwrap();
        assert_eq!(mean.isfinite().all().int64_value(&[]), 1);
        assert_eq!(std.isfinite().all().int64_value(&[]), 1);
    }
}

#[test]
fn bf16_latents_are_close_to_fp32_and_keyed_apart() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    write_picture(&work.join("data/p.png"), 64, 64, 30, ImageFormat::Png);
    run_ok(work, &flags(&tiny_model(), "fp32"));
    let fp32 = CacheReader::open(work).unwrap().item(0, false).unwrap().0;
    run_ok(work, &flags(&tiny_model(), "bf16"));
    let r = report(work);
    assert_eq!((count(&r, "encoded"), count(&r, "removed"), count(&r, "fp32_fallbacks")), (1, 1, 0));
    let bf16 = CacheReader::open(work).unwrap().item(0, false).unwrap().0;
    let diff = (&fp32 - &bf16).abs().max().double_value(&[]);
    let scale = fp32.abs().max().double_value(&[]);
    assert!(diff > 0.0 && diff < 0.05 * scale.max(1.0), "bf16 vs fp32 latent differ by {diff} (scale {scale})");
}
