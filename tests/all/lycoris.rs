//! LoCon, LoHa and LoKr files (peft's own layout and kohya/LyCORIS naming,
//! written by make_lycoris_cases.py) change sdtune's UNet as peft's adapters
//! change diffusers' UNet, attached and fused.
use crate::common;

use std::path::PathBuf;
use std::process::Command;

use sdtune::lora::kohya_names::KohyaNames;
use sdtune::lora::{self, format, ModelLayers};
use sdtune::models::conditioning::Conditioning;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use tch::Tensor;

/// (file under tests/fixtures/lora/lycoris, reference key).
const CASES: &[(&str, &str)] = &[
    ("kohya_locon.safetensors", "locon"),
    ("peft_locon/adapter_model.safetensors", "locon"),
    ("kohya_loha.safetensors", "loha"),
    ("peft_loha/adapter_model.safetensors", "loha"),
    ("kohya_loha_tucker.safetensors", "loha_tucker"),
    ("peft_loha_tucker/adapter_model.safetensors", "loha_tucker"),
    ("kohya_lokr.safetensors", "lokr"),
    ("peft_lokr/adapter_model.safetensors", "lokr"),
    ("kohya_lokr_both_tucker.safetensors", "lokr_both_tucker"),
    ("peft_lokr_both_tucker/adapter_model.safetensors", "lokr_both_tucker"),
];

fn model() -> StableDiffusion {
    StableDiffusion::from_diffusers_folder(&common::fixtures().join("tiny-sd1"), Placement::cpu_f32(), None).unwrap()
}

fn layers(m: &StableDiffusion) -> ModelLayers<'_> {
    ModelLayers { unet: &m.unet.layers, text_encoder: Some(&m.text.first().model.layers), text_encoder_2: None, kohya: KohyaNames::Diffusers }
}

fn unet_out(m: &StableDiffusion) -> Tensor {
    let r = common::read_tensors(&common::reference("unet_sd1.safetensors"));
    let context = Conditioning::text_only(r["encoder_hidden_states"].shallow_clone());
    tch::no_grad(|| m.unet.model.forward(&r["sample"], &r["timestep"], &context))
}

fn file(name: &str) -> PathBuf {
    common::fixtures().join("lora").join("lycoris").join(name)
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    common::read_tensors(&common::reference("lycoris.safetensors"))
}

#[test]
fn attached_files_match_peft() {
    let r = reference();
    let m = model();
    common::assert_close("base UNet", &unet_out(&m), &r["base"], 1e-4);
    for (name, key) in CASES {
        let weights = format::read(&file(name), &layers(&m)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        lora::attach(&weights, &layers(&m), 1.0, name).unwrap();
        common::assert_close(name, &unet_out(&m), &r[*key], 1e-4);
        m.unet.layers.for_each(|e| e.adapters.clear());
    }
}

#[test]
fn fused_files_match_peft() {
    let r = reference();
    for (name, key) in CASES {
        let m = model();
        let weights = format::read(&file(name), &layers(&m)).unwrap();
        lora::fuse(&weights, &layers(&m), 1.0, name).unwrap();
        common::assert_close(&format!("fused {name}"), &unet_out(&m), &r[*key], 1e-4);
    }
}

/// The per-file strength multiplies a LoHa's scale, as peft's `scale_layer`.
#[test]
fn strength_scales_a_loha_as_peft() {
    let r = reference();
    let m = model();
    let weights = format::read(&file("kohya_loha.safetensors"), &layers(&m)).unwrap();
    lora::attach(&weights, &layers(&m), 0.5, "loha").unwrap();
    common::assert_close("LoHa at 0.5", &unet_out(&m), &r["loha_half"], 1e-4);
    let fused = model();
    lora::fuse(&weights, &layers(&fused), 0.5, "loha").unwrap();
    common::assert_close("fused LoHa at 0.5", &unet_out(&fused), &r["loha_half"], 1e-4);
}

/// A LoHa module moved onto a layer of another shape (conv_in's factors
/// under conv_out's name) is one sentence naming the layer and the file.
#[test]
fn a_module_that_does_not_fit_its_layer_is_one_sentence() {
    let m = model();
    let source = common::read_tensors(&file("kohya_loha.safetensors"));
    let tensors: Vec<(String, Tensor)> = source
        .iter()
        .filter(|(k, _)| !k.starts_with("lora_unet_conv_out."))
        .map(|(k, t)| (k.replace("lora_unet_conv_in.", "lora_unet_conv_out."), t.shallow_clone()))
        .collect();
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let path = dir.path().join("moved.safetensors");
    sdtune::loaders::tensor_file::write_tensors(&path, &tensors, None).unwrap();
    let err = format!("{:#}", format::read(&path, &layers(&m)).err().expect("must fail"));
    assert!(err.contains("moved.safetensors") && err.contains("LoHa module for UNet layer conv_out"), "{err}");
    assert!(err.contains("[4, 16, 3, 3]") && !err.contains('\n'), "{err}");
}

#[test]
fn an_unknown_lycoris_key_is_one_sentence() {
    let m = model();
    let mut tensors: Vec<(String, Tensor)> =
        common::read_tensors(&file("kohya_lokr.safetensors")).into_iter().collect();
    tensors.push(("lora_unet_conv_in.dora_scale".into(), Tensor::ones([16, 1, 1, 1], (tch::Kind::Float, tch::Device::Cpu))));
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let path = dir.path().join("dora.safetensors");
    sdtune::loaders::tensor_file::write_tensors(&path, &tensors, None).unwrap();
    let err = format!("{:#}", format::read(&path, &layers(&m)).err().expect("must fail"));
    assert!(err.contains("dora.safetensors") && err.contains("lora_unet_conv_in.dora_scale"), "{err}");
}

fn sdtune(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sdtune")).args(args).output().unwrap()
}

#[test]
fn info_names_each_kind() {
    for (name, kind, rank) in [
        ("kohya_locon.safetensors", "LoCon", "2"),
        ("peft_locon/adapter_model.safetensors", "LoCon", "2"),
        ("kohya_loha.safetensors", "LoHa", "2"),
        ("peft_loha_tucker/adapter_model.safetensors", "LoHa", "2"),
        ("kohya_lokr.safetensors", "LoKr", "2"),
    ] {
        let path = file(name);
        let out = sdtune(&["info".as_ref(), path.as_os_str()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let line = |key: &str| text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{name}: no {key} in\n{text}")).to_string();
        assert!(line("format").contains(kind), "{name}: {text}");
        assert!(line("rank").contains(rank), "{name}: {text}");
        assert!(line("targets").contains("conv"), "{name}: {text}");
        line("base");
    }
    let plain = common::fixtures().join("lora").join("kohya_a.safetensors");
    let out = sdtune(&["info".as_ref(), plain.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("format") && l.contains("LoRA") && !l.contains("LoCon")), "{text}");
}

#[test]
fn sample_runs_with_a_loha() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let out = dir.path().join("loha.png");
    let base = dir.path().join("base.png");
    for (path, lora) in [(&out, true), (&base, false)] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
        cmd.args(["sample", "--device", "cpu", "--model"])
            .arg(common::fixtures().join("tiny-sd1"))
            .args(["--prompt", "a mug", "--seed", "3", "--steps", "4", "--width", "64", "--height", "64", "--out"])
            .arg(path);
        if lora {
            cmd.arg("--lora").arg(file("kohya_loha.safetensors"));
        }
        let run = cmd.output().unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    }
    let (a, b) = (image::open(&out).unwrap().to_rgb8(), image::open(&base).unwrap().to_rgb8());
    assert_ne!(a.as_raw(), b.as_raw(), "the LoHa changed nothing in the image");
}

/// kohya's SDXL LoCon names conv layers by SGM paths (sd-scripts' SDXL
/// networks use the original UNet's module names); the reader finds them
/// through the same map as every other kohya SDXL module.
#[test]
fn sdxl_conv_layers_have_sgm_kohya_names() {
    use sdtune::loaders::ldm_names::UnetLayout;
    use sdtune::lora::Component;
    let names = KohyaNames::Sgm(UnetLayout { layers_per_block: 2, up_attention: vec![true, true, false] });
    for (layer, kohya) in [
        ("down_blocks.0.resnets.0.conv1", "lora_unet_input_blocks_1_0_in_layers_2"),
        ("down_blocks.1.resnets.1.conv2", "lora_unet_input_blocks_5_0_out_layers_3"),
        ("down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
        ("up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
        ("conv_in", "lora_unet_input_blocks_0_0"),
        ("conv_out", "lora_unet_out_2"),
    ] {
        assert_eq!(names.name(Component::Unet, layer).as_deref(), Some(kohya), "{layer}");
    }
}

/// `sdtune sample` with the LoHa, and with a mixed stack (the LoHa at 0.5
/// plus the LoKr, attached and `--fuse`d), renders what diffusers' pipeline
/// renders with peft's adapters (make_lycoris_sample_cases.py), within 1/255.
#[test]
fn sample_with_lycoris_adapters_matches_diffusers_with_peft() {
    let r = common::read_tensors(&common::reference("lycoris_sample.safetensors"));
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let loha = file("kohya_loha.safetensors").display().to_string();
    let lokr = file("kohya_lokr.safetensors").display().to_string();
    let cases: [(&str, Vec<String>, bool, &str); 3] = [
        ("loha", vec![loha.clone()], false, "loha_image"),
        ("mixed", vec![format!("{loha}:0.5"), lokr.clone()], false, "loha05_lokr_image"),
        ("mixed fused", vec![format!("{loha}:0.5"), lokr], true, "loha05_lokr_image"),
    ];
    for (what, loras, fuse, key) in cases {
        let out = dir.path().join(format!("{}.png", what.replace(' ', "_")));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
        cmd.args(["sample", "--device", "cpu", "--model"])
            .arg(common::fixtures().join("tiny-sd1"))
            .args(["--prompt", "product shot of a blue ceramic mug on a wooden table", "--negative-prompt", "blurry"])
            .args(["--seed", "7", "--steps", "10", "--guidance", "7.5", "--width", "64", "--height", "64", "--scheduler", "ddim"]);
        for lora in &loras {
            cmd.arg("--lora").arg(lora);
        }
        if fuse {
            cmd.arg("--fuse");
        }
        let run = cmd.arg("--out").arg(&out).output().unwrap();
        assert!(run.status.success(), "{what}: {}", String::from_utf8_lossy(&run.stderr));
        let ours = image::open(&out).unwrap().to_rgb8();
        let ours = Tensor::from_slice(ours.as_raw()).view([64, 64, 3]).to_kind(tch::Kind::Double);
        let theirs = (&r[key] * 255.0).round().to_kind(tch::Kind::Double);
        let diff = (ours - theirs).abs().mean(tch::Kind::Double).double_value(&[]);
        eprintln!("{what}: mean abs pixel diff {diff:.4} of 255");
        assert!(diff <= 1.0, "{what}: mean abs pixel diff {diff} of 255 against diffusers with peft's adapters");
    }
}
