//! The tiny demo model's scaffolding (scripts/make-tiny-sd.sh runs it):
//!
//!     cargo run --release --example tiny_sd -- init DIR [--seed 0]
//!     cargo run --release --example tiny_sd -- pack FROM TO
//!
//! `init` writes a diffusers Stable Diffusion 1.x folder whose UNet and text
//! encoder hold seeded random weights (torch's default initialisation), with
//! the real CLIP BPE tokenizer (copied from tests/fixtures/tiny-sd1) and
//! SD1's noise schedule. The text encoder stays at this random init: it is
//! frozen in training, and a random CLIP still gives every token sequence its
//! own embedding, which is all the UNet needs to learn colours and shapes
//! from captions. The VAE comes from `train_vae`, the UNet's weights from
//! `sdtune train --full`.
//!
//! `pack` copies a finished folder with every floating-point weight in fp16
//! (what `models/tiny-sd/` commits and sdtune embeds).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sdtune::models::clip::ClipTextModel;
use sdtune::models::config::{ClipTextConfig, UNetConfig};
use sdtune::models::layers::WeightInit;
use sdtune::models::built::build;
use sdtune::loaders::tensor_file::{write_tensors, TensorFile};
use sdtune::models::unet::UNet2DConditionModel;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// SD1.x's layout at a size a laptop CPU trains in minutes: 16x16 latents
/// (64-px images through a 4x VAE), three levels, one resnet per level.
fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "downsample_padding": 1,
        "use_linear_projection": false,
        "upcast_attention": false
    })
}

/// CLIP ViT-L/14's vocabulary and special tokens, at 64 wide and 2 layers deep.
fn text_encoder_config() -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 64,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "attention_dropout": 0.0,
        "dtype": "float32"
    })
}

fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.42.1",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// A model's variables by name, sorted (a stable file layout).
fn sorted(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn init(dir: &Path, seed: i64) -> Result<()> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    write_json(&dir.join("model_index.json"), &model_index())?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &scheduler_config())?;
    let tokenizer = dir.join("tokenizer");
    std::fs::create_dir_all(&tokenizer)?;
    for file in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
        let from = repo.join("tests/fixtures/tiny-sd1/tokenizer").join(file);
        std::fs::copy(&from, tokenizer.join(file)).with_context(|| format!("cannot copy {}", from.display()))?;
    }

    tch::manual_seed(seed);
    let text_value = text_encoder_config();
    let text_cfg: ClipTextConfig = serde_json::from_value(text_value.clone())?;
    let text = build(Device::Cpu, Kind::Float, WeightInit::Random, |vb| ClipTextModel::new(vb, &text_cfg))?;
    write_json(&dir.join("text_encoder/config.json"), &text_value)?;
    write_tensors(&dir.join("text_encoder/model.safetensors"), &sorted(&text.vs), None)?;

    let unet_value = unet_config();
    let unet_cfg: UNetConfig = serde_json::from_value(unet_value.clone())?;
    let unet = build(Device::Cpu, Kind::Float, WeightInit::Random, |vb| UNet2DConditionModel::new(vb, &unet_cfg))?;
    write_json(&dir.join("unet/config.json"), &unet_value)?;
    write_tensors(&dir.join("unet/diffusion_pytorch_model.safetensors"), &sorted(&unet.vs), None)?;
    let params = |vs: &tch::nn::VarStore| vs.variables().values().map(Tensor::numel).sum::<usize>();
    println!(
        "wrote {} (text encoder {} parameters, UNet {} parameters, both seeded random; the VAE comes from train_vae)",
        dir.display(),
        params(&text.vs),
        params(&unet.vs)
    );
    Ok(())
}

/// Copies `from` to `to`, configs and tokenizer as they are, weights in fp16.
fn pack(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to).with_context(|| format!("cannot replace {}", to.display()))?;
    }
    let mut total = 0u64;
    for entry in walk(from)? {
        let rel = entry.strip_prefix(from)?;
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().expect("a file has a folder"))?;
        if entry.extension().is_some_and(|e| e == "safetensors") {
            let file = TensorFile::open(&entry)?;
            let mut tensors = Vec::new();
            for name in file.names() {
                let t = file.tensor(&name)?;
                let t = if t.is_floating_point() { t.to_kind(Kind::Half) } else { t };
                tensors.push((name, t));
            }
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            write_tensors(&dest, &tensors, None)?;
        } else {
            std::fs::copy(&entry, &dest).with_context(|| format!("cannot copy {}", entry.display()))?;
        }
        total += std::fs::metadata(&dest)?.len();
    }
    std::fs::write(to.join("README.md"), MODEL_CARD).with_context(|| format!("cannot write {}", to.join("README.md").display()))?;
    println!("packed {} into {} ({:.1} MB, weights in fp16)", from.display(), to.display(), total as f64 / 1e6);
    Ok(())
}

const MODEL_CARD: &str = "\
# tiny-sd: sdtune's built-in demo model

A Stable Diffusion 1.x-architecture model (diffusers layout: CLIP text
encoder + the real CLIP BPE tokenizer, UNet2DConditionModel, AutoencoderKL,
DDIM scheduler config) small enough to train and run on a laptop CPU. sdtune
embeds it and uses it when no `--model` is given.

- 64 px images, 4x VAE (16x16x4 latents), UNet channels 32/64/64 with
  cross-attention, 64-wide 2-layer text encoder; weights in fp16.
- Made from scratch by `make tiny-sd` (scripts/make-tiny-sd.sh) from
  procedurally drawn images: 4000 captioned coloured shapes (\"a red circle
  on a blue background\") for the UNet, 4000 generic images in any colour and
  pattern for the VAE. The text encoder is a seeded random init, frozen.
- It draws coloured blobs that follow the prompt's shape and background
  colours, roughly. It is a demo and test model, not an image generator.
";

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["init", dir] => init(Path::new(dir), 0),
        ["init", dir, "--seed", seed] => init(Path::new(dir), seed.parse()?),
        ["pack", from, to] => pack(Path::new(from), Path::new(to)),
        _ => bail!("usage: tiny_sd init DIR [--seed S] | tiny_sd pack FROM TO"),
    }
}
