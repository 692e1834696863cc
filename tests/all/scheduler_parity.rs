//! The samplers behind `--scheduler` against diffusers' schedulers of the same
//! name (fixtures: scripts/fixtures/make_scheduler_cases.py):
//! - each sampler's 10-step loop around a fixed toy "model" ends on diffusers'
//!   latents, ancestral noise included (no UNet involved);
//! - `sdtune sample` on the tiny SD1 (epsilon) and SD2 (v-prediction) fixtures
//!   gives diffusers' StableDiffusionPipeline image within 1/255 mean abs.
use crate::common;

use std::process::Command;

use sdtune::models::config::SchedulerConfig;
use sdtune::schedulers::{Sampler, SchedulerKind};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

#[derive(Deserialize)]
struct Case {
    name: String,
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    seed: u64,
    steps: usize,
    guidance: f64,
    width: i64,
    height: i64,
    scheduler: String,
    png: String,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(common::reference("schedulers/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The stand-in for the UNet that make_scheduler_cases.py uses: 0.5 tanh(x) + 0.001 t.
fn toy_model(x: &Tensor, t: f64) -> Tensor {
    x.tanh() * 0.5 + 0.001 * t
}

/// StableDiffusionPipeline's loop around `toy_model`, drawing from the CPU
/// generator seeded with `seed` as pipeline.rs does: initial latents first,
/// then whatever the sampler asks for.
fn toy_denoise(sampler: &mut dyn Sampler, seed: u64) -> Tensor {
    let shape = [1i64, 4, 8, 8];
    tch::manual_seed(seed as i64);
    let mut latents = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * sampler.init_noise_sigma();
    let mut noise = || Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let timesteps = sampler.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let x = sampler.scale_model_input(&latents, i);
        latents = sampler.step(&toy_model(&x, t), i, &latents, &mut noise);
    }
    latents
}

#[test]
fn every_sampler_follows_diffusers_step_for_step() {
    let _rng = crate::common::torch_rng();
    let expected = common::read_tensors(&common::reference("schedulers/steps.safetensors"));
    let mut checked = 0;
    for model in ["sd1", "sd2"] {
        let cfg_path = common::fixtures().join(format!("tiny-{model}/scheduler/scheduler_config.json"));
        let cfg = SchedulerConfig::from_file(&cfg_path).unwrap();
        for &kind in SchedulerKind::ALL {
            let Some(theirs) = expected.get(&format!("{}_{model}", kind.name())) else { continue };
            let mut sampler = kind.build(&cfg, 10).unwrap();
            let ours = toy_denoise(sampler.as_mut(), 42);
            // relative to the latents' scale: the toy epsilon "model" lets them grow to ~10
            let scale = theirs.abs().max().double_value(&[]).max(1.0);
            common::assert_close(&format!("{} {model}", kind.name()), &ours, theirs, 1e-5 * scale);
            checked += 1;
        }
    }
    assert_eq!(checked, expected.len(), "a reference trajectory has no sampler");
}

#[test]
fn every_reference_case_matches_diffusers() {
    let _rng = crate::common::torch_rng();
    let cases = cases();
    assert!(cases.len() >= 8, "expected at least 8 reference cases");
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    for case in cases {
        let out = dir.path().join(format!("{}.png", case.name));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
        cmd.args(["sample", "--device", "cpu", "--model"])
            .arg(common::fixtures().join(&case.model))
            .args(["--prompt", &case.prompt])
            .args(["--seed", &case.seed.to_string()])
            .args(["--steps", &case.steps.to_string()])
            .args(["--guidance", &case.guidance.to_string()])
            .args(["--width", &case.width.to_string()])
            .args(["--height", &case.height.to_string()])
            .args(["--scheduler", &case.scheduler])
            .arg("--out")
            .arg(&out);
        if let Some(neg) = &case.negative_prompt {
            cmd.args(["--negative-prompt", neg]);
        }
        let run = cmd.output().unwrap();
        assert!(run.status.success(), "{}: {}", case.name, String::from_utf8_lossy(&run.stderr));
        let ours = common::read_rgb(&out);
        let theirs = common::read_rgb(&common::reference(&case.png));
        let diff = common::mean_abs_pixel_diff(&ours, &theirs);
        eprintln!("{}: mean abs pixel diff {diff:.4} (of 255)", case.name);
        assert!(diff <= 1.0, "{}: mean abs pixel difference {diff} > 1/255", case.name);
    }
}
