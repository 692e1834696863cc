//! The tiny SDXL fixture (tests/fixtures/tiny-sdxl, written by
//! scripts/fixtures/make_sdxl_fixture.py) against diffusers: the UNet with
//! its added text/time embedding, both text encoders as `encode_prompt`
//! joins them (pooled embedding, clip skip, zero unconditional), and
//! `sdtune sample` against `StableDiffusionXLPipeline` for every scheduler.
use crate::common;

use std::process::Command;

use sdtune::loaders::model_files::ModelFiles;
use sdtune::loaders::source::LoadOptions;
use sdtune::models::conditioning::Conditioning;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use serde::Deserialize;
use tch::{Device, Kind};

fn folder() -> std::path::PathBuf {
    common::fixtures().join("tiny-sdxl")
}

fn model() -> StableDiffusion {
    StableDiffusion::load(&folder().to_string_lossy(), Placement::cpu_f32(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn the_unet_with_pooled_text_and_time_ids_matches_diffusers() {
    let r = common::read_tensors(&common::reference("sdxl/unet.safetensors"));
    let files = ModelFiles::of(&folder().to_string_lossy(), &LoadOptions::default()).unwrap();
    assert!(files.unet_config.takes_text_time());
    let unet = files.load_unet(Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(unet.model.pooled_dim(), Some(32));
    let cond = Conditioning {
        text: r["encoder_hidden_states"].shallow_clone(),
        pooled: Some(r["text_embeds"].shallow_clone()),
        time_ids: Some(r["time_ids"].shallow_clone()),
    };
    let out = tch::no_grad(|| unet.model.forward(&r["sample"], &r["timestep"], &cond));
    common::assert_close("SDXL UNet output", &out, &r["output"], 1e-4);

    // The added embedding matters: other time ids give another output.
    let moved = Conditioning { time_ids: Some(r["time_ids"].flip([0])), ..cond.shallow_clone() };
    let other = tch::no_grad(|| unet.model.forward(&r["sample"], &r["timestep"], &moved));
    assert!(common::max_abs_diff(&other, &r["output"]) > 1e-3, "the time ids changed nothing");
}

#[derive(Deserialize)]
struct TextCase {
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
    clip_skip: usize,
}

#[test]
fn both_text_encoders_join_as_encode_prompt_does() {
    let model = model();
    let r = common::read_tensors(&common::reference("sdxl/text.safetensors"));
    let cases: Vec<TextCase> =
        serde_json::from_str(&std::fs::read_to_string(common::reference("sdxl/text.json")).unwrap()).unwrap();
    assert!(cases.len() >= 8);
    assert!(model.text.zeros_for_no_negative, "model_index.json says force_zeros_for_empty_prompt");
    for case in cases {
        let got = model.text.encode(&[&case.prompt], case.clip_skip).unwrap().conditioning;
        let key = |k: &str| format!("{}.{k}", case.name);
        common::assert_close(&key("prompt_embeds"), &got.text, &r[&key("prompt_embeds")], 1e-4);
        common::assert_close(&key("pooled"), got.pooled.as_ref().unwrap(), &r[&key("pooled_prompt_embeds")], 1e-4);
        if let Some(neg) = &case.negative_prompt {
            // diffusers reads the negative prompt at the penultimate layer whatever clip_skip is.
            let got = model.text.encode(&[neg], 0).unwrap().conditioning;
            common::assert_close(&key("negative"), &got.text, &r[&key("negative_prompt_embeds")], 1e-4);
            let pooled = got.pooled.as_ref().unwrap();
            common::assert_close(&key("negative pooled"), pooled, &r[&key("negative_pooled_prompt_embeds")], 1e-4);
        } else {
            let zero = r[&key("negative_prompt_embeds")].abs().max().double_value(&[]);
            assert_eq!(zero, 0.0, "{}: diffusers' unconditional side is zeros", case.name);
        }
    }
    let err = model.text.encode(&["x"], 3).err().expect("clip skip 3 leaves no layer of 3 before the last");
    assert!(format!("{err:#}").contains("clip skip 3"), "{err:#}");
}

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
    seed: u64,
    steps: usize,
    guidance: f64,
    width: i64,
    height: i64,
    scheduler: String,
    prediction_type: String,
    clip_skip: usize,
    /// (h, w), (top, left), (h, w) as diffusers takes them, when given.
    original_size: Option<[i64; 2]>,
    crops_coords_top_left: Option<[i64; 2]>,
    target_size: Option<[i64; 2]>,
    png: String,
}

#[test]
fn sample_matches_the_sdxl_pipeline_for_every_scheduler() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(common::reference("sdxl/cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 17, "every scheduler with and without a negative prompt, plus sizes and v");
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let mut worst = (0.0, String::new());
    for case in cases {
        let out = dir.path().join(format!("{}.png", case.name));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
        cmd.args(["sample", "--device", "cpu", "--model"])
            .arg(folder())
            .args(["--prompt", &case.prompt, "--seed", &case.seed.to_string(), "--steps", &case.steps.to_string()])
            .args(["--guidance", &case.guidance.to_string(), "--scheduler", &case.scheduler])
            .args(["--clip-skip", &case.clip_skip.to_string()])
            .args(["--width", &case.width.to_string(), "--height", &case.height.to_string()])
            .arg("--out")
            .arg(&out);
        if let Some(neg) = &case.negative_prompt {
            cmd.args(["--negative-prompt", neg]);
        }
        if let (Some([oh, ow]), Some([top, left]), Some([th, tw])) = (case.original_size, case.crops_coords_top_left, case.target_size) {
            cmd.args(["--original-size", &format!("{ow}x{oh}"), "--crop", &format!("{top},{left}")]);
            cmd.args(["--target-size", &format!("{tw}x{th}")]);
        }
        if case.prediction_type == "v_prediction" {
            cmd.args(["--prediction-type", "v"]);
        }
        let run = cmd.output().unwrap();
        assert!(run.status.success(), "{}: {}", case.name, String::from_utf8_lossy(&run.stderr));
        let diff = common::mean_abs_pixel_diff(&common::read_rgb(&out), &common::read_rgb(&common::reference(&case.png)));
        eprintln!("{}: mean abs pixel diff {diff:.4} (of 255)", case.name);
        if diff > worst.0 {
            worst = (diff, case.name.clone());
        }
    }
    assert!(worst.0 <= 1.0, "{}: mean abs pixel difference {} > 1/255", worst.1, worst.0);
}

#[test]
fn an_sdxl_unet_with_an_sd1_text_encoder_is_refused_in_one_sentence() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let copy = tmp.path().join("mixed");
    common::copy_dir(&folder(), &copy);
    // The first encoder alone: no pooled embedding for the UNet's added embedding.
    let index = std::fs::read_to_string(copy.join("model_index.json")).unwrap();
    std::fs::write(copy.join("model_index.json"), index.replace("StableDiffusionXLPipeline", "StableDiffusionPipeline")).unwrap();
    let err = StableDiffusion::load(&copy.to_string_lossy(), Placement::cpu_f32(), &LoadOptions::default())
        .err()
        .expect("an SDXL UNet without its second text encoder must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("pooled") || msg.contains("cross-attention"), "{msg}");

    // The refiner is an image-to-image model: said so, not half-loaded.
    std::fs::write(copy.join("model_index.json"), index.replace("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")).unwrap();
    let err = StableDiffusion::load(&copy.to_string_lossy(), Placement::cpu_f32(), &LoadOptions::default()).err().unwrap();
    assert!(format!("{err:#}").contains("refiner"), "{err:#}");
}

