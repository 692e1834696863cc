//! Tiled VAE encode/decode against diffusers' `enable_tiling()` on tiny-sd1's
//! VAE (scripts/fixtures/make_vae_tiling_reference.py), and `sample
//! --vae-tiling` end to end.
use crate::common;

use std::process::Command;

use common::{assert_close, fixtures, max_abs_diff, read_tensors, reference};
use sdtune::loaders::weights::build_and_load;
use sdtune::models::config::VaeConfig;
use sdtune::models::vae::AutoencoderKL;
use tch::{Device, Kind};

/// fp32 against fp32: only summation order differs.
const TOL: f64 = 1e-4;

fn vae(tiled: bool) -> AutoencoderKL {
    let dir = fixtures().join("tiny-sd1").join("vae");
    let cfg = VaeConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let mut vae = build_and_load(&[weights], Device::Cpu, Kind::Float, |vb| AutoencoderKL::new(vb, &cfg)).unwrap().model;
    if tiled {
        vae.enable_tiling();
    }
    vae
}

#[test]
fn tiled_decode_and_encode_match_diffusers() {
    let r = read_tensors(&reference("vae_tiling.safetensors"));
    let (tiled, plain) = (vae(true), vae(false));
    assert_eq!(tiled.tiling().map(|t| (t.sample_tile, t.latent_tile)), Some((64, 8)));
    let decoded = tch::no_grad(|| tiled.decode(&r["latents"]));
    assert_close("decoded_tiled", &decoded, &r["decoded_tiled"], TOL);
    let dist = tch::no_grad(|| tiled.encode(&r["image"]));
    assert_close("encoded_tiled_mean", &dist.mean, &r["encoded_tiled_mean"], TOL);
    assert_close("encoded_tiled_logvar", &dist.logvar, &r["encoded_tiled_logvar"], TOL);
    // The untiled path is untouched, and tiling does change these sizes.
    let untiled = tch::no_grad(|| plain.decode(&r["latents"]));
    assert_close("decoded_plain", &untiled, &r["decoded_plain"], TOL);
    assert!(max_abs_diff(&decoded, &untiled) > 1e-2, "tiling made no difference: the test would not see it broken");
    let plain_mean = tch::no_grad(|| plain.encode(&r["image"]).mean);
    assert_close("encoded_plain_mean", &plain_mean, &r["encoded_plain_mean"], TOL);
}

#[test]
fn tiling_departs_from_the_untiled_decode_no_more_than_diffusers_does() {
    let r = read_tensors(&reference("vae_tiling.safetensors"));
    let ours = tch::no_grad(|| (vae(true).decode(&r["latents"]) - vae(false).decode(&r["latents"])).abs().mean(Kind::Float).double_value(&[]));
    let theirs = (&r["decoded_tiled"] - &r["decoded_plain"]).abs().mean(Kind::Float).double_value(&[]);
    assert!(ours <= theirs * 1.001 + 1e-6, "sdtune's tiled decode is {ours} from the untiled one on average, diffusers' {theirs}");
}

#[test]
fn inputs_within_one_tile_are_not_split() {
    let r = read_tensors(&reference("vae_tiling.safetensors"));
    let small = r["latents"].narrow(2, 0, 8).narrow(3, 0, 8);
    let (tiled, plain) = (vae(true), vae(false));
    let (a, b) = tch::no_grad(|| (tiled.decode(&small), plain.decode(&small)));
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

fn sdtune(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sdtune")).args(args).current_dir(dir).env("SDTUNE_CACHE_DIR", dir.join("cache")).output().unwrap()
}

#[test]
fn sample_with_vae_tiling_records_it_and_renders_again_alike() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let model = fixtures().join("tiny-sd1");
    let model = model.to_str().unwrap();
    let common = ["sample", "--model", model, "--prompt", "a red circle", "--steps", "2", "--width", "136", "--height", "104"];
    let tiled_args: Vec<&str> = common.iter().copied().chain(["--vae-tiling", "--out", "tiled.png"]).collect();
    let out = sdtune(&tiled_args, dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plain_args: Vec<&str> = common.iter().copied().chain(["--out", "plain.png"]).collect();
    let out = sdtune(&plain_args, dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (tiled, plain) = (dir.path().join("tiled.png"), dir.path().join("plain.png"));
    assert!(common::mean_abs_pixel_diff(&common::read_rgb(&tiled), &common::read_rgb(&plain)) > 0.0, "tiling changed no pixel of a 136x104 image");
    let recipe = common::png_settings(&tiled);
    assert_eq!(recipe["vae_tiling"], serde_json::Value::Bool(true), "{recipe}");
    assert!(common::png_settings(&plain).get("vae_tiling").is_none());
    let out = sdtune(&["sample", "--from", "tiled.png", "--out", "again.png"], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(common::read_rgb(&tiled), common::read_rgb(&dir.path().join("again.png")), "--from did not decode tiled again");
}
