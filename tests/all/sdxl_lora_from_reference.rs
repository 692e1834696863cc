//! SDXL LoRA files written by the reference stack (make_sdxl_lora_reference.py):
//! diffusers/PEFT, kohya with diffusers' module names, kohya with SGM block
//! names, each on the UNet and both text encoders with an alpha that is not
//! the rank. sdtune loads each with the effect diffusers' `load_lora_weights`
//! gives, samples with it, and names the file when a LoRA is for the other
//! model family.
use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sdtune::lora::{self, format, Component};
use sdtune::models::conditioning::Conditioning;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use sdtune::sample::render;
use tch::Tensor;

const FILES: [&str; 3] = ["ref_sdxl_peft", "ref_sdxl_kohya_diffusers", "ref_sdxl_kohya_sgm"];
/// The prompt make_sdxl_lora_reference.py encodes.
const PROMPT: &str = "a red car parked in front of a modern glass building";

fn tiny(name: &str) -> PathBuf {
    common::fixtures().join(name)
}

fn lora_file(stem: &str) -> PathBuf {
    common::fixtures().join("lora").join(format!("{stem}.safetensors"))
}

fn model() -> StableDiffusion {
    StableDiffusion::from_diffusers_folder(&tiny("tiny-sdxl"), Placement::cpu_f32(), None).unwrap()
}

/// The UNet output, joined text states and pooled embedding the reference records.
fn outputs(m: &StableDiffusion) -> [(&'static str, Tensor); 3] {
    let r = common::read_tensors(&common::reference("sdxl/unet.safetensors"));
    let cond = Conditioning {
        text: r["encoder_hidden_states"].shallow_clone(),
        pooled: Some(r["text_embeds"].shallow_clone()),
        time_ids: Some(r["time_ids"].shallow_clone()),
    };
    let unet = tch::no_grad(|| m.unet.model.forward(&r["sample"], &r["timestep"], &cond));
    let text = m.text.encode(&[PROMPT], 0).unwrap().conditioning;
    [("unet", unet), ("text", text.text), ("pooled", text.pooled.unwrap())]
}

#[test]
fn reference_files_change_unet_and_both_text_encoders_as_diffusers_does() {
    let r = common::read_tensors(&common::reference("sdxl/lora_from_reference.safetensors"));
    for stem in FILES {
        let m = model();
        for (what, base) in outputs(&m) {
            common::assert_close(&format!("base.{what}"), &base, &r[&format!("base.{what}")], 1e-4);
        }
        let layers = render::layers(&m).unwrap();
        let weights = format::read(&lora_file(stem), &layers).unwrap_or_else(|e| panic!("{e:#}"));
        for component in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
            assert!(weights.modules.iter().any(|m| m.component == component), "{stem}: no {} modules read", component.name());
        }
        lora::attach(&weights, &layers, 1.0, stem).unwrap();
        for (what, ours) in outputs(&m) {
            let key = format!("{stem}.{what}");
            common::assert_close(&key, &ours, &r[&key], 1e-4);
            let effect = common::max_abs_diff(&ours, &r[&format!("base.{what}")]);
            assert!(effect > 1e-2, "{key}: the LoRA barely changes it ({effect}); the test would not discriminate");
        }
    }
}

fn sample(model: &Path, lora: Option<&Path>, out: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
    cmd.args(["sample", "--device", "cpu", "--model"]).arg(model);
    cmd.args(["--prompt", PROMPT, "--seed", "3", "--steps", "2", "--width", "64", "--height", "64"]);
    if let Some(lora) = lora {
        cmd.arg("--lora").arg(lora);
    }
    cmd.arg("--out").arg(out).output().unwrap()
}

#[test]
fn sample_runs_with_each_reference_file() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let without = dir.path().join("without.png");
    let run = sample(&tiny("tiny-sdxl"), None, &without);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let without = image::open(without).unwrap().to_rgb8();
    for stem in FILES {
        let out = dir.path().join(format!("{stem}.png"));
        let run = sample(&tiny("tiny-sdxl"), Some(&lora_file(stem)), &out);
        assert!(run.status.success(), "{stem}: {}", String::from_utf8_lossy(&run.stderr));
        let with = image::open(&out).unwrap().to_rgb8();
        assert_ne!(with.as_raw(), without.as_raw(), "{stem} changed nothing in the image");
    }
}

/// A LoRA of the other family is refused in one sentence that names the file.
fn assert_refused(model: &str, stem: &str) {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let run = sample(&tiny(model), Some(&lora_file(stem)), &dir.path().join("x.png"));
    assert!(!run.status.success(), "{stem} on {model} was not refused");
    let stderr = String::from_utf8_lossy(&run.stderr);
    let message = stderr.trim();
    assert!(message.contains(&format!("{stem}.safetensors")), "{stem} on {model}: the error does not name the file: {message}");
    assert_eq!(message.lines().count(), 1, "{stem} on {model}: not one line: {message}");
    assert!(!message.contains("panicked") && !message.contains("Caused by"), "{stem} on {model}: {message}");
}

#[test]
fn an_sd1_lora_on_sdxl_and_an_sdxl_lora_on_sd1_are_refused_naming_the_file() {
    assert_refused("tiny-sdxl", "sdtune_kohya");
    assert_refused("tiny-sdxl", "peft_a");
    assert_refused("tiny-sd1", "ref_sdxl_kohya_sgm");
    assert_refused("tiny-sd1", "ref_sdxl_peft");
}
