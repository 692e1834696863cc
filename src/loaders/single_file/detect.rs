//! What a safetensors file is, from its header alone: the family (SD1,
//! SD2 or SDXL, by the text encoders), where each component's tensors are, and which
//! text-encoder tensors no diffusers weight takes.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::loaders::ldm_names::{
    ClipNames, CLIP_PREFIX, EMA_PREFIX, OPEN_CLIP_PREFIX, SGM_CLIP_PREFIX, SGM_OPEN_CLIP_PREFIX, SGM_REFINER_PREFIX,
    UNET_PREFIX, VAE_PREFIX,
};
use crate::loaders::tensor_file::TensorFile;

/// Stable Diffusion generation, told apart by the text encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP text encoder, 768-wide cross-attention for the real models.
    Sd1,
    /// OpenCLIP text encoder (penultimate layer), 1024-wide cross-attention.
    Sd2,
    /// SGM layout: CLIP ViT-L and OpenCLIP bigG (`conditioner.embedders.*`),
    /// 2048-wide cross-attention, text/time embedding (`label_emb`).
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "Stable Diffusion 1.x",
            Family::Sd2 => "Stable Diffusion 2.x",
            Family::Sdxl => "Stable Diffusion XL",
        }
    }
}

/// Tensor names and shapes of a file, from its header alone.
pub struct Shapes(BTreeMap<String, Vec<i64>>);

impl Shapes {
    pub fn of(file: &TensorFile) -> Self {
        Shapes(
            file.names()
                .into_iter()
                .filter_map(|n| {
                    let shape = file.info(&n)?.shape.iter().map(|&d| d as i64).collect();
                    Some((n, shape))
                })
                .collect(),
        )
    }

    pub fn from_map(map: BTreeMap<String, Vec<i64>>) -> Self {
        Shapes(map)
    }

    pub fn get(&self, name: &str) -> Option<&[i64]> {
        self.0.get(name).map(Vec::as_slice)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    pub(super) fn need(&self, name: &str) -> Result<&[i64]> {
        self.get(name).with_context(|| format!("the checkpoint has no tensor {name}"))
    }

    pub(super) fn count_while(&self, make: impl Fn(usize) -> String) -> usize {
        (0..).take_while(|&i| self.has(&make(i))).count()
    }
}

/// What kind of checkpoint a file is, from its tensor names and shapes.
#[derive(Clone, Debug)]
pub struct Layout {
    pub family: Family,
    /// Where the (first) text encoder's `text_model.*` tensors start (OpenAI CLIP).
    pub clip_prefix: String,
    /// Cross-attention width (768 SD1, 1024 SD2).
    pub cross_attention_dim: i64,
    pub in_channels: i64,
    /// Tensors of the EMA copy (full, non-pruned files); never loaded.
    pub ema_tensors: usize,
}

/// Tells the family and layout; errs in one sentence on anything that is
/// not a whole SD1/SD2/SDXL base checkpoint.
pub fn detect(path: &Path, shapes: &Shapes) -> Result<Layout> {
    let shown = path.display();
    let label_in = shapes.get(&format!("{UNET_PREFIX}label_emb.0.0.weight")).map(|s| s[1]);
    let refiner = shapes.names().any(|n| n.starts_with(SGM_REFINER_PREFIX))
        || shapes.names().any(|n| n.starts_with("conditioner.embedders.")) && label_in == Some(2560);
    if refiner {
        bail!(
            "{shown} is a Stable Diffusion XL refiner checkpoint (one OpenCLIP text encoder and aesthetic-score conditioning), which sdtune does not support; use an SDXL base checkpoint, or an SD 1.x/2.x one"
        );
    }
    if !shapes.names().any(|n| n.starts_with(UNET_PREFIX)) {
        bail!("{shown} holds no UNet (model.diffusion_model.* tensors), so it is not a single-file Stable Diffusion checkpoint");
    }
    if !shapes.names().any(|n| n.starts_with(VAE_PREFIX)) {
        bail!("{shown} holds a UNet but no VAE (first_stage_model.* tensors); use a full checkpoint, or a diffusers folder");
    }
    let sgm = shapes.names().any(|n| n.starts_with("conditioner.embedders."));
    let (family, clip_prefix) = if sgm {
        if !shapes.has(&format!("{SGM_CLIP_PREFIX}text_model.embeddings.token_embedding.weight")) {
            bail!("{shown} is a Stable Diffusion XL checkpoint without its CLIP ViT-L text encoder (conditioner.embedders.0.transformer.*); use a full checkpoint, or a diffusers folder");
        }
        if !shapes.has(&format!("{SGM_OPEN_CLIP_PREFIX}token_embedding.weight")) {
            bail!("{shown} is a Stable Diffusion XL checkpoint without its OpenCLIP bigG text encoder (conditioner.embedders.1.model.*); use a full checkpoint, or a diffusers folder");
        }
        if label_in.is_none() {
            bail!("{shown} holds SDXL text encoders but its UNet has no text/time embedding (label_emb.0.0.weight), so it is not an SDXL base checkpoint");
        }
        (Family::Sdxl, format!("{SGM_CLIP_PREFIX}text_model."))
    } else if shapes.names().any(|n| n.starts_with(OPEN_CLIP_PREFIX)) {
        (Family::Sd2, OPEN_CLIP_PREFIX.to_string())
    } else if shapes.has(&format!("{CLIP_PREFIX}text_model.embeddings.token_embedding.weight")) {
        (Family::Sd1, format!("{CLIP_PREFIX}text_model."))
    } else if shapes.has(&format!("{CLIP_PREFIX}embeddings.token_embedding.weight")) {
        (Family::Sd1, CLIP_PREFIX.to_string())
    } else {
        bail!("{shown} holds a UNet and a VAE but no text encoder (cond_stage_model.* tensors); use a full checkpoint, or a diffusers folder");
    };
    let cross_attention_dim = shapes
        .names()
        .find(|n| n.starts_with(UNET_PREFIX) && n.ends_with("attn2.to_k.weight"))
        .and_then(|n| shapes.get(n))
        .map(|s| s[1])
        .with_context(|| format!("{shown} has a UNet without cross-attention, which is not a Stable Diffusion UNet"))?;
    let in_channels = shapes
        .need(&format!("{UNET_PREFIX}input_blocks.0.0.weight"))
        .map(|s| s[1])
        .with_context(|| format!("{shown}"))?;
    let ema_tensors = shapes.names().filter(|n| n.starts_with(EMA_PREFIX)).count();
    Ok(Layout { family, clip_prefix, cross_attention_dim, in_channels, ema_tensors })
}

impl Layout {
    /// How the file names its (first) text encoder.
    pub fn clip_names(&self) -> ClipNames<'_> {
        match self.family {
            Family::Sd1 | Family::Sdxl => ClipNames::Transformers(&self.clip_prefix),
            Family::Sd2 => ClipNames::OpenClip(OPEN_CLIP_PREFIX),
        }
    }

    /// Where the file's (first) text encoder's tensors are.
    pub fn text_prefix(&self) -> &'static str {
        match self.family {
            Family::Sd1 => CLIP_PREFIX,
            Family::Sd2 => OPEN_CLIP_PREFIX,
            Family::Sdxl => SGM_CLIP_PREFIX,
        }
    }
}

pub(super) fn open_clip_resblocks(shapes: &Shapes, prefix: &str) -> usize {
    shapes.count_while(|i| format!("{prefix}transformer.resblocks.{i}.ln_1.weight"))
}

/// File tensors of the text encoders that no diffusers weight takes: the
/// OpenCLIP layer SD2 does not use (it conditions on the penultimate one),
/// OpenCLIP's projection (SD2) and logit scale, CLIP's position ids.
pub fn ignored_text_tensor(name: &str, layout: &Layout, shapes: &Shapes) -> bool {
    if name.ends_with("position_ids") {
        return true;
    }
    if layout.family == Family::Sdxl {
        let rest = name.strip_prefix(SGM_OPEN_CLIP_PREFIX).unwrap_or("");
        return matches!(rest, "logit_scale" | "attn_mask");
    }
    if layout.family == Family::Sd2 {
        let last = open_clip_resblocks(shapes, OPEN_CLIP_PREFIX).saturating_sub(1);
        let rest = name.strip_prefix(OPEN_CLIP_PREFIX).unwrap_or("");
        return matches!(rest, "text_projection" | "logit_scale" | "attn_mask")
            || rest.starts_with(&format!("transformer.resblocks.{last}."));
    }
    false
}

