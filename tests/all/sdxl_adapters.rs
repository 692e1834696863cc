//! LoCon and DoRA trained by sdtune on SDXL (tests/fixtures/lora/sdxl_adapters/,
//! made by scripts/fixtures/train_sdxl_adapters.sh): in sdtune they give the
//! UNet output the reference stack gives with them (make_sdxl_adapter_cases.py):
//! the LoCon files (kohya's SGM block names and the diffusers layout) through
//! diffusers' `load_lora_weights`, the DoRA through PEFT's `use_dora` layer;
//! the text-encoder DoRA (`--dora --train-text-encoder`) also changes both
//! encoders' conditioning as PEFT's DoRA on them does.
//! And sdtune still writes those files' layout today.
use crate::common;
use crate::train_support;

use std::path::{Path, PathBuf};

use sdtune::loaders::tensor_file::TensorFile;
use sdtune::lora::{self, format, LoraWeights};
use sdtune::models::stable_diffusion::StableDiffusion;
use sdtune::sample::render;

use common::sdxl::{model, unet_out};
use train_support::{prepared_with, run_dir, train};

fn adapter_file(stem: &str) -> PathBuf {
    common::fixtures().join("lora/sdxl_adapters").join(format!("sdtune_{stem}.safetensors"))
}

fn read(m: &StableDiffusion, path: &Path) -> LoraWeights {
    format::read(path, &render::layers(m).unwrap()).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

fn reference() -> std::collections::HashMap<String, tch::Tensor> {
    common::read_tensors(&common::reference("sdxl/adapters_from_sdtune.safetensors"))
}

#[test]
fn sdtune_trained_sdxl_locon_gives_diffusers_unet_output() {
    let r = reference();
    common::assert_close("base", &unet_out(&model()), &r["base"], 1e-4);
    for stem in ["locon_kohya", "locon_diffusers"] {
        for fused in [false, true] {
            let m = model();
            let weights = read(&m, &adapter_file(stem));
            let convs = weights.modules.iter().filter(|x| x.down.dim() == 4 && x.down.size()[3] == 3).count();
            assert!(convs > 0, "{stem}: no 3x3 LoCon pairs");
            for part in ["resnets", "downsamplers", "upsamplers"] {
                assert!(weights.modules.iter().any(|x| x.layer.contains(part)), "{stem}: no LoCon pair on the {part}");
            }
            let layers = render::layers(&m).unwrap();
            if fused {
                lora::fuse(&weights, &layers, 1.0, stem).unwrap();
            } else {
                lora::attach(&weights, &layers, 1.0, stem).unwrap();
            }
            let got = unet_out(&m);
            common::assert_close(&format!("{stem} (fused: {fused})"), &got, &r[stem], 1e-4);
            let effect = common::max_abs_diff(&got, &r["base"]);
            assert!(effect > 1e-2, "{stem}: the LoCon barely changes the UNet ({effect}); the test would not discriminate");
        }
    }
}

/// The kohya file (`dora_scale`, SGM names) and the diffusers file
/// (`lora_magnitude_vector`) of two identical runs give PEFT's output.
#[test]
fn sdtune_trained_sdxl_dora_gives_peft_unet_output() {
    let r = reference();
    for stem in ["dora_kohya", "dora_diffusers"] {
        for fused in [false, true] {
            let m = model();
            let weights = read(&m, &adapter_file(stem));
            assert!(weights.modules.iter().all(|x| x.dora_scale.is_some()), "{stem}: a module was read without its magnitude");
            let layers = render::layers(&m).unwrap();
            if fused {
                lora::fuse(&weights, &layers, 1.0, stem).unwrap();
            } else {
                lora::attach(&weights, &layers, 1.0, stem).unwrap();
            }
            let got = unet_out(&m);
            common::assert_close(&format!("{stem} (fused: {fused})"), &got, &r["dora_diffusers"], 1e-4);
            let effect = common::max_abs_diff(&got, &r["base"]);
            assert!(effect > 1e-2, "{stem}: the DoRA barely changes the UNet ({effect}); the test would not discriminate");
        }
    }
}

/// `--dora --train-text-encoder` files (kohya's `lora_te1_`/`lora_te2_` with
/// `dora_scale`, and the diffusers layout's `text_encoder.`/`text_encoder_2.`
/// with `lora_magnitude_vector`) give PEFT's UNet output and PEFT's joined text
/// states and pooled output, attached and fused.
#[test]
fn sdtune_trained_sdxl_text_encoder_dora_gives_peft_conditioning_and_unet_output() {
    use sdtune::lora::Component;
    let r = reference();
    let conditioning = |m: &StableDiffusion| {
        let c = tch::no_grad(|| m.text.encode(&[common::sdxl::TE_PROMPT], 0)).unwrap().conditioning;
        [("text", c.text), ("pooled", c.pooled.expect("SDXL pools the prompt"))]
    };
    for stem in ["te_dora_kohya", "te_dora_diffusers"] {
        for fused in [false, true] {
            let m = model();
            let weights = read(&m, &adapter_file(stem));
            assert!(weights.modules.iter().all(|x| x.dora_scale.is_some()), "{stem}: a module was read without its magnitude");
            for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
                let n = weights.modules.iter().filter(|x| x.component == c).count();
                assert!(n >= 12, "{stem}: {n} {} modules", c.name());
            }
            let layers = render::layers(&m).unwrap();
            if fused {
                lora::fuse(&weights, &layers, 1.0, stem).unwrap();
            } else {
                lora::attach(&weights, &layers, 1.0, stem).unwrap();
            }
            let label = format!("{stem} (fused: {fused})");
            common::assert_close(&format!("{label} UNet"), &unet_out(&m), &r["te_dora_diffusers"], 1e-4);
            for (what, got) in conditioning(&m) {
                let theirs = &r[&format!("te_dora_diffusers.{what}")];
                common::assert_close(&format!("{label} {what}"), &got, theirs, 1e-4);
                let effect = common::max_abs_diff(theirs, &r[&format!("base.{what}")]);
                assert!(effect > 1e-2, "{stem}: the DoRA barely changes the {what} conditioning ({effect})");
            }
        }
    }
}

/// Tensor names and shapes of a LoRA file, sorted.
fn layout(path: &Path) -> Vec<(String, Vec<i64>)> {
    let file = TensorFile::open(path).unwrap_or_else(|e| panic!("{e:#}"));
    let mut names = file.names();
    names.sort();
    names.into_iter().map(|n| { let size = file.tensor(&n).unwrap().size(); (n, size) }).collect()
}

/// One step of the fixtures' commands writes the tensors the fixtures hold
/// (names and shapes), so what diffusers and PEFT were shown to load is
/// what `sdtune train` writes now.
#[test]
fn sdtune_still_writes_the_fixtures_layout() {
    let dir = prepared_with(&common::fixtures().join("tiny-sdxl"));
    let runs: [(&str, &[&str]); 3] = [
        ("locon_kohya", &["--targets", "conv", "--conv-rank", "2", "--conv-alpha", "1", "--format", "kohya"]),
        ("dora_diffusers", &["--dora", "--format", "diffusers"]),
        ("te_dora_kohya", &["--dora", "--train-text-encoder", "--format", "kohya"]),
    ];
    for (stem, flags) in runs {
        let args: Vec<&str> = ["--steps", "1", "--save-every", "0", "--rank", "2", "--alpha", "4", "--name", stem].iter().chain(flags).copied().collect();
        let out = train(dir.path(), &args);
        assert!(out.status.success(), "{stem}: {}", String::from_utf8_lossy(&out.stderr));
        let written = run_dir(dir.path(), stem).join(format!("{stem}.safetensors"));
        assert_eq!(layout(&written), layout(&adapter_file(stem)), "{stem}: sdtune train writes another layout than the fixture's");
    }
}
