//! `sdtune train --full` on the tiny SD1 fixture: every UNet weight trains,
//! the result is a diffusers unet/ folder sdtune loads back, a run resumed
//! from its saved state ends bit-identical to one never stopped, and
//! half-precision weights are refused in one sentence.
use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use sdtune::models::config::UNetConfig;
use sdtune::loaders::weights::build_and_load;
use sdtune::models::unet::UNet2DConditionModel;
use tch::{Device, Kind, Tensor};

fn sdtune(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdtune")).current_dir(dir).args(args).output().unwrap()
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "sdtune failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A working folder with 4 prepared 64-px images of the tiny fixture model.
fn prepared() -> sdtune::scratch::ScratchDir {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let images = dir.path().join("shapes");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..4u32 {
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            if (x as i64 - 32).pow(2) + (y as i64 - 32).pow(2) < 200 + 50 * i as i64 { image::Rgb([200, 30, 30]) } else { image::Rgb([30, 30, 200 - 20 * i as u8]) }
        });
        img.save(images.join(format!("s{i}.png"))).unwrap();
        std::fs::write(images.join(format!("s{i}.txt")), format!("a red circle on a blue background {i}")).unwrap();
    }
    let model = common::fixtures().join("tiny-sd1");
    ok(sdtune(dir.path(), &[
        "prepare", "shapes", "--device", "cpu", "--resolution", "64", "--min-bucket", "64", "--max-bucket", "64",
        "--min-side", "64", "--model", model.to_str().unwrap(),
    ]));
    dir
}

const FULL: &[&str] = &["train", "--full", "--device", "cpu", "--sample-every", "0", "--lr", "1e-3", "--batch-size", "2"];

fn train(dir: &Path, extra: &[&str]) -> Output {
    let args: Vec<&str> = FULL.iter().chain(extra).copied().collect();
    sdtune(dir, &args)
}

/// The trained UNet folder, loaded by sdtune as a model would be.
fn load_unet(dir: &Path) -> Vec<(String, Tensor)> {
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let built = build_and_load(&[dir.join("diffusion_pytorch_model.safetensors")], Device::Cpu, Kind::Float, |vb| {
        UNet2DConditionModel::new(vb, &cfg)
    })
    .unwrap();
    let mut v: Vec<(String, Tensor)> = built.vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn full_training_writes_a_unet_folder_and_resumes_bit_identically() {
    let dir = prepared();
    let d = dir.path();
    let out = ok(train(d, &["--steps", "4", "--name", "straight"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unet"), "{}", String::from_utf8_lossy(&out.stdout));
    let straight = load_unet(&d.join("output/straight/unet"));
    let base = load_unet(&common::fixtures().join("tiny-sd1/unet"));
    let changed = straight.iter().zip(&base).filter(|((_, a), (_, b))| !a.equal(b)).count();
    assert!(changed > straight.len() / 2, "only {changed} of {} UNet tensors changed", straight.len());
    assert!(d.join("output/straight/report.html").is_file());

    ok(train(d, &["--steps", "2", "--name", "resumed"]));
    ok(train(d, &["--steps", "4", "--name", "resumed", "--resume"]));
    let resumed = load_unet(&d.join("output/resumed/unet"));
    for ((name, a), (_, b)) in straight.iter().zip(&resumed) {
        assert!(a.equal(b), "UNet weight {name} differs after resume");
    }

    // A LoRA run cannot resume a full run's state.
    let out = sdtune(d, &["train", "--device", "cpu", "--sample-every", "0", "--steps", "6", "--name", "resumed", "--resume"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mode"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn full_training_refuses_half_precision_weights() {
    let dir = prepared();
    let out = train(dir.path(), &["--steps", "2", "--precision", "bf16"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().count() == 1 && err.contains("fp32"), "{err}");
}
