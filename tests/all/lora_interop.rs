//! LoRA files written by diffusers/peft and in kohya layout change sdtune's
//! UNet exactly as diffusers' `load_lora_weights` changes its own.
use crate::common;

use std::path::PathBuf;
use std::process::Command;

use sdtune::lora::kohya_names::KohyaNames;
use sdtune::lora::{self, format, ModelLayers};
use sdtune::models::stable_diffusion::StableDiffusion;
use tch::Tensor;

use common::sd1::{model, unet_out};

fn lora_file(name: &str) -> PathBuf {
    common::fixtures().join("lora").join(name)
}

fn attach(m: &StableDiffusion, name: &str, strength: f64) {
    let layers = ModelLayers { unet: &m.unet.layers, text_encoder: Some(&m.text.first().model.layers), text_encoder_2: None, kohya: KohyaNames::Diffusers };
    let weights = format::read(&lora_file(name), &layers).unwrap();
    lora::attach(&weights, &layers, strength, name).unwrap();
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    common::read_tensors(&common::reference("lora_interop.safetensors"))
}

#[test]
fn peft_and_kohya_files_match_diffusers() {
    let r = reference();
    let m = model();
    common::assert_close("base UNet", &unet_out(&m), &r["base"], 1e-4);
    for (file, key) in [("peft_a.safetensors", "lora_a"), ("kohya_a.safetensors", "lora_a_kohya")] {
        attach(&m, file, 1.0);
        common::assert_close(file, &unet_out(&m), &r[key], 1e-4);
        m.unet.layers.for_each(|e| e.adapters.clear());
    }
}

#[test]
fn two_loras_with_strengths_match_set_adapters() {
    let r = reference();
    let m = model();
    attach(&m, "peft_a.safetensors", 0.7);
    attach(&m, "kohya_b.safetensors", 0.4);
    common::assert_close("a x 0.7 + b x 0.4", &unet_out(&m), &r["a07_b04"], 1e-4);
}

#[test]
fn fused_equals_attached() {
    let r = reference();
    let m = model();
    let layers = ModelLayers { unet: &m.unet.layers, text_encoder: Some(&m.text.first().model.layers), text_encoder_2: None, kohya: KohyaNames::Diffusers };
    let weights = format::read(&lora_file("peft_a.safetensors"), &layers).unwrap();
    lora::fuse(&weights, &layers, 1.0, "peft_a").unwrap();
    common::assert_close("fused peft_a", &unet_out(&m), &r["lora_a"], 1e-4);
}

#[test]
fn written_files_read_back_identically() {
    let m = model();
    let layers = ModelLayers { unet: &m.unet.layers, text_encoder: None, text_encoder_2: None, kohya: KohyaNames::Diffusers };
    let original = format::read(&lora_file("kohya_a.safetensors"), &layers).unwrap();
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    for fmt in [format::LoraFormat::Kohya, format::LoraFormat::Peft] {
        let path = dir.path().join(format!("{}.safetensors", fmt.name().split(' ').next().unwrap()));
        format::write(&path, &original, fmt, &KohyaNames::Diffusers, Default::default()).unwrap();
        let back = format::read(&path, &layers).unwrap();
        assert_eq!(back.modules.len(), original.modules.len());
        for (a, b) in original.modules.iter().zip(&back.modules) {
            assert_eq!(a.layer, b.layer);
            // The PEFT layout folds alpha/rank into up; compare the effective deltas.
            let da = a.up.matmul(&a.down) * a.scale();
            let db = b.up.matmul(&b.down) * b.scale();
            common::assert_close(&format!("{} {}", fmt.name(), a.layer), &da, &db, 1e-6);
        }
    }
}

#[test]
fn a_lora_for_other_layers_is_an_error_naming_the_key() {
    let m = model();
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let path = dir.path().join("alien.safetensors");
    let tensors = vec![
        ("lora_unet_input_blocks_1_1_proj_in.lora_down.weight".to_string(), Tensor::zeros([4, 16], (tch::Kind::Float, tch::Device::Cpu))),
        ("lora_unet_input_blocks_1_1_proj_in.lora_up.weight".to_string(), Tensor::zeros([16, 4], (tch::Kind::Float, tch::Device::Cpu))),
    ];
    sdtune::loaders::tensor_file::write_tensors(&path, &tensors, None).unwrap();
    let layers = ModelLayers { unet: &m.unet.layers, text_encoder: Some(&m.text.first().model.layers), text_encoder_2: None, kohya: KohyaNames::Diffusers };
    let err = format!("{:#}", format::read(&path, &layers).err().expect("must fail"));
    assert!(err.contains("lora_unet_input_blocks_1_1_proj_in") && err.contains("matches no layer"), "{err}");
}

#[test]
fn sample_with_two_loras_matches_diffusers_image() {
    let r = reference();
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let out = dir.path().join("two.png");
    let run = Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .args(["sample", "--device", "cpu", "--model"])
        .arg(common::fixtures().join("tiny-sd1"))
        .args(["--prompt", "product shot of a blue ceramic mug on a wooden table", "--negative-prompt", "blurry"])
        .args(["--seed", "7", "--steps", "10", "--guidance", "7.5", "--width", "64", "--height", "64", "--scheduler", "ddim"])
        .arg("--lora")
        .arg(format!("{}:0.7", lora_file("peft_a.safetensors").display()))
        .arg("--lora")
        .arg(format!("{}:0.4", lora_file("kohya_b.safetensors").display()))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let ours = image::open(&out).unwrap().to_rgb8();
    let theirs = &r["a07_b04_image"]; // [H, W, 3] in [0, 1]
    let theirs = (theirs * 255.0).round().to_kind(tch::Kind::Uint8);
    let ours = Tensor::from_slice(ours.as_raw()).view([64, 64, 3]);
    let diff = (ours.to_kind(tch::Kind::Double) - theirs.to_kind(tch::Kind::Double)).abs().mean(tch::Kind::Double).double_value(&[]);
    eprintln!("two-LoRA image: mean abs pixel diff {diff:.4} of 255");
    assert!(diff <= 1.0, "mean abs pixel diff {diff}");
}

/// LoRA files written by `sdtune train` (both formats) change diffusers'
/// UNet (`load_lora_weights`, in make_lora_cases.py) exactly as sdtune's.
#[test]
fn sdtune_written_files_load_in_diffusers_identically() {
    let r = common::read_tensors(&common::reference("lora_from_sdtune.safetensors"));
    let base = reference()["base"].shallow_clone();
    for name in ["sdtune_kohya", "sdtune_diffusers"] {
        let m = model();
        attach(&m, &format!("{name}.safetensors"), 1.0);
        let ours = unet_out(&m);
        common::assert_close(name, &ours, &r[name], 1e-4);
        let effect = common::max_abs_diff(&ours, &base);
        assert!(effect > 1e-2, "{name} barely changes the UNet ({effect}); the test would not discriminate");
    }
}
