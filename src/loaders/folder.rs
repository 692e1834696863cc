//! Diffusers pipeline folders: `model_index.json` plus `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/` and `scheduler/`, each component built by
//! its config and filled from its weight files.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use tch::{Device, Kind};

use super::file_kind::{text_encoder_layout, TextEncoderLayout, TEXT_MODEL_PREFIX};
use super::tensor_file::TensorFile;
use super::weights::build_and_load_renamed;
use crate::models::built::Built;
use crate::models::clip::ClipTextModel;
use crate::models::config::{read_json, ClipTextConfig, ModelIndex, VaeConfig};
use crate::models::vae::AutoencoderKL;

/// A diffusers VAE from `files`, whichever of the two attention namings
/// they use (see [`vae_weight_name`]).
pub fn load_vae(files: &[PathBuf], device: Device, kind: Kind, cfg: &VaeConfig) -> Result<Built<AutoencoderKL>> {
    build_and_load_renamed(files, device, kind, &vae_weight_name, |vb| AutoencoderKL::new(vb, cfg))
}

/// A diffusers CLIP text encoder from `files`, saved by transformers 4 or
/// 5 (see [`TextEncoderLayout`]). The model is built with the prefixed
/// names either way, so LoRA layer names do not depend on who saved it.
pub fn load_text_encoder(
    files: &[PathBuf],
    device: Device,
    kind: Kind,
    cfg: &ClipTextConfig,
) -> Result<Built<ClipTextModel>> {
    let prefix = match text_encoder_layout_of(files)? {
        TextEncoderLayout::Prefixed => "",
        TextEncoderLayout::Unprefixed => TEXT_MODEL_PREFIX,
    };
    build_and_load_renamed(files, device, kind, &|name| Some(format!("{prefix}{name}")), |vb| {
        ClipTextModel::new(vb, cfg)
    })
}

/// The layout of a text encoder's weight files (one file or its shards),
/// from their headers; one sentence naming them when it is neither.
pub fn text_encoder_layout_of(files: &[PathBuf]) -> Result<TextEncoderLayout> {
    let mut names = Vec::new();
    for file in files {
        names.extend(TensorFile::open(file)?.names());
    }
    if let Some(layout) = text_encoder_layout(&names) {
        return Ok(layout);
    }
    let shown = match files {
        [one] => one.display().to_string(),
        many => {
            let all: Vec<String> = many.iter().map(|f| f.display().to_string()).collect();
            format!("the {} shards {}", many.len(), all.join(", "))
        }
    };
    bail!(
        "{shown} is not a CLIP text encoder: it has neither text_model.embeddings.token_embedding.weight (transformers 4) nor embeddings.token_embedding.weight (transformers 5); put the model's CLIPTextModel weights in text_encoder/"
    )
}

/// One sentence when `dir` is not a diffusers pipeline folder; its index otherwise.
pub fn check_is_diffusers_folder(dir: &Path) -> Result<ModelIndex> {
    if !dir.exists() {
        bail!("{} does not exist; pass --model a diffusers model folder", dir.display());
    }
    if !dir.is_dir() {
        bail!(
            "{} is a file, but only diffusers model folders can be loaded so far; pass --model the folder that holds model_index.json",
            dir.display()
        );
    }
    let index = dir.join("model_index.json");
    if !index.is_file() {
        bail!(
            "{} is not a diffusers model folder (it has no model_index.json); pass --model the folder that holds model_index.json, unet/, vae/, text_encoder/ and tokenizer/",
            dir.display()
        );
    }
    let parsed: ModelIndex = read_json(&index)?;
    if parsed.class_name.starts_with("StableDiffusionXL") && !parsed.is_sdxl() {
        bail!(
            "{} describes a {}, such as the SDXL refiner (image to image, with aesthetic-score conditioning); sdtune supports SDXL base models (StableDiffusionXLPipeline) and SD 1.x/2.x",
            index.display(),
            parsed.class_name
        );
    }
    if !parsed.class_name.starts_with("StableDiffusion") || parsed.class_name.starts_with("StableDiffusion3") {
        bail!(
            "{} describes a {} model; sdtune supports Stable Diffusion 1.x, 2.x and XL pipelines",
            index.display(),
            parsed.class_name
        );
    }
    let mut parts = vec!["unet", "vae", "text_encoder", "tokenizer", "scheduler"];
    if parsed.is_sdxl() {
        parts.extend(["text_encoder_2", "tokenizer_2"]);
    }
    for part in parts {
        if !dir.join(part).is_dir() {
            bail!("{} has no {part}/ folder; the model folder is incomplete", dir.display());
        }
    }
    Ok(parsed)
}

/// The diffusers name of a legacy VAE attention tensor, `None` for any other
/// name. Older diffusers VAEs name the mid-block attention `query`, `key`,
/// `value`, `proj_attn`; current ones `to_q`, `to_k`, `to_v`, `to_out.0`
/// (diffusers converts them the same way on load).
///
/// `encoder.mid_block.attentions.0.proj_attn.weight` ->
/// `encoder.mid_block.attentions.0.to_out.0.weight`
pub fn legacy_vae_name(name: &str) -> Option<String> {
    let (owner, rest) = name.split_once(".mid_block.attentions.")?;
    let (index, rest) = rest.split_once('.')?;
    let (layer, param) = rest.split_once('.')?;
    let new_layer = match layer {
        "query" => "to_q",
        "key" => "to_k",
        "value" => "to_v",
        "proj_attn" => "to_out.0",
        _ => return None,
    };
    Some(format!("{owner}.mid_block.attentions.{index}.{new_layer}.{param}"))
}

/// The rename [`super::weights::load_var_store`] needs for a diffusers
/// VAE file of either naming: legacy attention names mapped, the rest kept.
pub fn vae_weight_name(name: &str) -> Option<String> {
    Some(legacy_vae_name(name).unwrap_or_else(|| name.to_string()))
}
