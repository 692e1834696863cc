//! A single-file checkpoint samples with no Hugging Face cache, no network
//! and nothing beside it: the binary's own CLIP BPE files tokenize it,
//! padded as its family's tokenizer pads (SD1 with EOS, SD2 with `!`, id 0).
use crate::model_support;

use std::path::Path;
use std::process::Command;

use model_support::*;
use sdtune::loaders::bundled_tokenizer;
use sdtune::loaders::single_file::{to_ldm, Family};
use sdtune::models::config::{ClipTextConfig, Prediction, SchedulerConfig, UNetConfig, VaeConfig};
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use sdtune::models::tokenizer::ClipTokenizer;
use serde::Deserialize;

/// `sdtune` as on a machine that never saw the Hub: `HF_HOME` an empty
/// folder, `HF_HUB_OFFLINE=1`, no other cache variable.
fn sdtune_offline(hf_home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
    for key in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"] {
        cmd.env_remove(key);
    }
    cmd.env("HF_HOME", hf_home).env("HF_HUB_OFFLINE", "1").env("OMP_NUM_THREADS", "1");
    cmd
}

fn sample(cmd: &mut Command, model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    run(cmd
        .args(["sample", "--device", "cpu", "--prompt", "a red car by the sea", "--seed", "7"])
        .args(extra)
        .args(["--steps", "4", "--width", "64", "--height", "64", "--model"])
        .arg(model)
        .arg("--out")
        .arg(out))
}

/// A small model whose configs SD's own rules read back from its tensors
/// (32 norm groups, 64-wide text heads; SD1 8 UNet heads, SD2 64-wide), so
/// its single file needs no config beside it. Random weights: this is
/// about loading and tokenizing, not about the image.
fn sd_rule_model(family: Family) -> StableDiffusion {
    let sd2 = family == Family::Sd2;
    let unet: UNetConfig = serde_json::from_value(serde_json::json!({
        "sample_size": 32, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": if sd2 { [64, 128] } else { [32, 64] }, "layers_per_block": 1,
        "norm_num_groups": 32, "cross_attention_dim": 64,
        "attention_head_dim": if sd2 { serde_json::json!([1, 2]) } else { serde_json::json!(8) },
        "use_linear_projection": sd2, "upcast_attention": sd2
    }))
    .unwrap();
    let vae: VaeConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32,
        "latent_channels": 4, "sample_size": 64, "scaling_factor": 0.18215
    }))
    .unwrap();
    let text: ClipTextConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 1, "hidden_act": if sd2 { "gelu" } else { "quick_gelu" },
        "projection_dim": 64, "eos_token_id": 49407
    }))
    .unwrap();
    let prediction = if sd2 { Prediction::V } else { Prediction::Epsilon };
    StableDiffusion::random(vec![text], unet, vae, SchedulerConfig::sd(prediction), Placement::cpu_f32())
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn sd1_and_sd2_files_alone_sample_offline_with_an_empty_hf_home() {
    for (family, stem) in [(Family::Sd1, "sd1"), (Family::Sd2, "sd2")] {
        let alone = sdtune::scratch::ScratchDir::new().unwrap();
        let hf_home = sdtune::scratch::ScratchDir::new().unwrap();
        let tensors = to_ldm(&sd_rule_model(family), family).unwrap_or_else(|e| panic!("{e:#}"));
        let path = write_file(alone.path(), &format!("{stem}.safetensors"), &tensors, None);
        let out = sdtune::scratch::ScratchDir::new().unwrap();
        let png = out.path().join("x.png");
        // SD2: say what it predicts, so the only line is the tokenizer's.
        let extra: &[&str] = if family == Family::Sd2 { &["--prediction-type", "v"] } else { &[] };
        let res = sample(&mut sdtune_offline(hf_home.path()), &path, &png, extra);
        stdout_ok(&res);
        let stderr = String::from_utf8_lossy(&res.stderr).to_string();
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("tokenizer")).collect();
        assert_eq!(lines.len(), 1, "{stem}: {stderr}");
        eprintln!("{stem}: {}", lines[0]);
        let shown = path.display().to_string();
        assert!(lines[0].contains("bundled CLIP tokenizer") && lines[0].contains(&shown), "{stem}: {stderr}");
        assert!(lines[0].contains(bundled_tokenizer::pad_token(family)), "{stem}: {stderr}");
        assert!(!pixels(&png).is_empty());
        // Nothing was fetched or cached, and nothing written beside the file.
        assert_eq!(std::fs::read_dir(hf_home.path()).unwrap().count(), 0, "{stem}: HF_HOME was written to");
        assert_eq!(std::fs::read_dir(alone.path()).unwrap().count(), 1, "{stem}: files appeared beside the checkpoint");
    }
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    sd1: Vec<i64>,
    sd2: Vec<i64>,
}

#[test]
fn bundled_tokenizer_gives_the_reference_ids_with_each_familys_padding() {
    let text = std::fs::read_to_string(fixture("reference/tokenizer_ids.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() > 10);
    let sd1 = bundled_tokenizer::tokenizer(Family::Sd1).unwrap();
    let sd2 = bundled_tokenizer::tokenizer(Family::Sd2).unwrap();
    let folder1 = ClipTokenizer::from_folder(&fixture("tiny-sd1/tokenizer")).unwrap();
    let folder2 = ClipTokenizer::from_folder(&fixture("tiny-sd2/tokenizer")).unwrap();
    for c in &cases {
        assert_eq!(sd1.encode(&c.prompt).ids, c.sd1, "sd1 {:?}", c.prompt);
        assert_eq!(sd2.encode(&c.prompt).ids, c.sd2, "sd2 {:?}", c.prompt);
        assert_eq!(sd1.encode(&c.prompt).ids, folder1.encode(&c.prompt).ids, "sd1 folder {:?}", c.prompt);
        assert_eq!(sd2.encode(&c.prompt).ids, folder2.encode(&c.prompt).ids, "sd2 folder {:?}", c.prompt);
    }
    // The padding is what tells them apart.
    assert_ne!(sd1.encode("x").ids, sd2.encode("x").ids);
}

/// The tiny fixtures need their configs beside them (8 norm groups, 4 text
/// heads), but no tokenizer: with the bundled one they give the image their
/// folders give with their own tokenizers, padding included.
#[test]
fn tiny_files_without_a_tokenizer_sample_their_folders_image() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    for name in ["tiny-sd1", "tiny-sd2"] {
        let hf_home = sdtune::scratch::ScratchDir::new().unwrap();
        let path = write_single_file(dir.path(), name, name, None);
        write_beside(dir.path(), name, name, &["unet", "vae", "text_encoder", "scheduler"]);
        let mut images = Vec::new();
        for (label, model) in [("file", path.clone()), ("folder", fixture(name))] {
            let out = dir.path().join(format!("{name}-{label}.png"));
            let res = sample(&mut sdtune_offline(hf_home.path()), &model, &out, &[]);
            stdout_ok(&res);
            let stderr = String::from_utf8_lossy(&res.stderr);
            assert_eq!(stderr.contains("bundled CLIP tokenizer"), label == "file", "{name} {label}: {stderr}");
            images.push(pixels(&out));
        }
        assert!(images[0] == images[1], "{name}: the bundled tokenizer's image differs from the folder's");
    }
}
