//! Text-encoder LoRA trained by sdtune (`--train-text-encoder`): the files
//! it wrote (tests/fixtures/lora/text_encoder/, SD1 with the MLP in kohya's
//! layout, SD1 attention-only and SDXL's two encoders in both layouts) change
//! the text conditioning exactly as diffusers' `load_lora_weights` makes them
//! change it (make_te_lora_cases.py), and a run that trains the encoder
//! resumes bit for bit.
use crate::common;
use crate::train_support;

use std::path::PathBuf;

use sdtune::loaders::tensor_file::TensorFile;
use sdtune::lora::{self, format, Component};
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use sdtune::sample::render;
use train_support::{lora_tensors, prepared, run_dir, train};

/// The prompt make_te_lora_cases.py encodes.
const PROMPT: &str = "an orange acme poster with a blue circle 3";

fn lora_file(stem: &str) -> PathBuf {
    common::fixtures().join("lora/text_encoder").join(format!("{stem}.safetensors"))
}

#[test]
fn sdtune_trained_text_encoder_lora_changes_the_conditioning_as_diffusers_does() {
    let r = common::read_tensors(&common::reference("text_encoder_lora.safetensors"));
    for (model, stems) in [("sd1", ["sd1_kohya", "sd1_diffusers"]), ("sdxl", ["sdxl_kohya", "sdxl_diffusers"])] {
        for stem in stems {
            let m = StableDiffusion::from_diffusers_folder(&common::fixtures().join(format!("tiny-{model}")), Placement::cpu_f32(), None)
                .unwrap();
            let layers = render::layers(&m).unwrap();
            let weights = format::read(&lora_file(stem), &layers).unwrap_or_else(|e| panic!("{e:#}"));
            let encoders: &[Component] =
                if model == "sdxl" { &[Component::TextEncoder, Component::TextEncoder2] } else { &[Component::TextEncoder] };
            for &c in encoders {
                assert!(weights.modules.iter().any(|x| x.component == c), "{stem}: no {} modules", c.name());
            }
            if stem == "sd1_kohya" {
                assert!(weights.modules.iter().any(|x| x.layer.ends_with(".mlp.fc1")), "{stem}: --targets transformer trained no fc1");
            }
            lora::attach(&weights, &layers, 1.0, stem).unwrap();
            let ours = tch::no_grad(|| m.text.encode(&[PROMPT], 0)).unwrap().conditioning;
            let mut outputs = vec![("text", ours.text)];
            if let Some(pooled) = ours.pooled {
                outputs.push(("pooled", pooled));
            }
            assert_eq!(outputs.len(), if model == "sdxl" { 2 } else { 1 });
            for (what, got) in outputs {
                let key = format!("{stem}.{what}");
                common::assert_close(&key, &got, &r[&key], 1e-4);
                let effect = common::max_abs_diff(&got, &r[&format!("{model}.base.{what}")]);
                assert!(effect > 1e-2, "{key}: the LoRA barely changes it ({effect}); the test would not discriminate");
            }
        }
    }
}

#[test]
fn a_run_training_the_text_encoder_resumes_bit_identically() {
    let dir = prepared();
    let te = ["--train-text-encoder", "--text-encoder-lr", "5e-4", "--caption-dropout", "0.3"];
    let args = |name: &'static str, steps: &'static str| -> Vec<&'static str> {
        te.iter().copied().chain(["--steps", steps, "--save-every", "1", "--name", name]).collect()
    };
    let out = train(dir.path(), &args("straight", "2"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = run_dir(dir.path(), "straight").join("straight.safetensors");
    let want = lora_tensors(&file);
    let te_modules: Vec<&String> = want.iter().map(|(n, _)| n).filter(|n| n.starts_with("lora_te_text_model_encoder_layers_")).collect();
    assert_eq!(te_modules.len(), 3 * 4 * 3, "q/k/v/out_proj of 3 layers, each down, up and alpha: {te_modules:?}");
    let meta = TensorFile::open(&file).unwrap().string_metadata();
    assert_eq!(meta["ss_text_encoder_lr"], "0.0005");
    assert_eq!(meta["ss_network_train_unet_only"], "false");
    let up = TensorFile::open(&file).unwrap().tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight").unwrap();
    assert!(up.abs().max().double_value(&[]) > 0.0, "the text encoder's LoRA never moved");

    let out = train(dir.path(), &args("resumed", "1"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let unet_only = train(dir.path(), &["--steps", "2", "--save-every", "1", "--name", "resumed", "--resume"]);
    let err = String::from_utf8_lossy(&unet_only.stderr);
    assert!(!unet_only.status.success() && err.contains("text_encoder"), "a text-encoder run resumed without it: {err}");
    let mut resume = args("resumed", "2");
    resume.push("--resume");
    let out = train(dir.path(), &resume);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = lora_tensors(&run_dir(dir.path(), "resumed").join("resumed.safetensors"));
    assert_eq!(want.len(), got.len());
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "LoRA tensor {name} differs between the straight and the resumed run");
    }
}
