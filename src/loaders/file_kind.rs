//! What a safetensors file holds, told from its tensor names alone: a
//! single-file checkpoint, a LoRA (and its key layout), one component of a
//! diffusers folder. Both model loading and LoRA reading ask it, so it
//! depends on no model or LoRA code.
use std::path::Path;

use super::ldm_names::UNET_PREFIX;

/// The on-disk layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// `lora_unet_<path_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
    /// `unet.<path>.lora_A.weight` / `.lora_B.weight` (what diffusers writes today).
    Peft,
    /// `unet.<path>.lora.down.weight` / `.lora.up.weight`, alpha = rank.
    DiffusersLegacy,
}

impl LoraFormat {
    pub fn name(self) -> &'static str {
        match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Peft => "diffusers (PEFT)",
            LoraFormat::DiffusersLegacy => "diffusers (legacy lora.down/up)",
        }
    }
}

/// The first tensor of each LyCORIS LoHa / LoKr module (`.hada_w1_a`, `.lokr_w1` or `.lokr_w1_a`).
const LYCORIS_MARKERS: &[&str] = &[".hada_w1_a", ".lokr_w1", ".lokr_w1_a"];

/// Which layout a file uses, from its tensor names. LoHa/LoKr modules count
/// as kohya under `lora_` names (LyCORIS' kohya layout), as peft's otherwise.
pub fn detect_lora(names: &[String]) -> Option<LoraFormat> {
    let lycoris = |n: &String| LYCORIS_MARKERS.iter().any(|m| n.ends_with(m));
    if names.iter().any(|n| (n.ends_with(".lora_down.weight") || lycoris(n)) && n.starts_with("lora_")) {
        Some(LoraFormat::Kohya)
    } else if names.iter().any(|n| n.ends_with(".lora_A.weight") || lycoris(n)) {
        Some(LoraFormat::Peft)
    } else if names.iter().any(|n| n.ends_with(".lora.down.weight") || n.ends_with("_lora.down.weight")) {
        Some(LoraFormat::DiffusersLegacy)
    } else {
        None
    }
}

/// True when the names are those of an LDM single-file checkpoint.
pub fn is_ldm(names: &[String]) -> bool {
    names.iter().any(|n| n.starts_with(UNET_PREFIX))
}

/// How a diffusers folder's CLIP text encoder names its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextEncoderLayout {
    /// `text_model.embeddings.token_embedding.weight`, ...: transformers 4.x,
    /// so nearly every SD folder published.
    Prefixed,
    /// `embeddings.token_embedding.weight`, ...: transformers 5.x, which
    /// diffusers' `save_pretrained` writes today.
    Unprefixed,
}

/// The prefix transformers 4.x puts before every text-encoder tensor.
pub const TEXT_MODEL_PREFIX: &str = "text_model.";

/// The text-encoder layout of a file's (or its shards') tensor names, by
/// where the token embedding is; `None` when it has none.
pub fn text_encoder_layout(names: &[String]) -> Option<TextEncoderLayout> {
    let token_embedding = "embeddings.token_embedding.weight";
    if names.iter().any(|n| n.strip_prefix(TEXT_MODEL_PREFIX) == Some(token_embedding)) {
        Some(TextEncoderLayout::Prefixed)
    } else if names.iter().any(|n| n == token_embedding) {
        Some(TextEncoderLayout::Unprefixed)
    } else {
        None
    }
}

/// What a safetensors file holds, from its tensor names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A single-file Stable Diffusion checkpoint (LDM names).
    Checkpoint,
    Lora(LoraFormat),
    /// One component of a diffusers folder (`"UNet"`, `"VAE"`, `"text encoder"`).
    Component(&'static str),
    Other,
}

pub fn classify(names: &[String]) -> FileKind {
    if is_ldm(names) {
        return FileKind::Checkpoint;
    }
    if let Some(format) = detect_lora(names) {
        return FileKind::Lora(format);
    }
    let any = |p: &str| names.iter().any(|n| n.starts_with(p));
    if any("down_blocks.") && any("time_embedding.") {
        FileKind::Component("UNet")
    } else if any("encoder.down_blocks.") || any("decoder.up_blocks.") {
        FileKind::Component("VAE")
    } else if any(TEXT_MODEL_PREFIX) || text_encoder_layout(names).is_some() {
        FileKind::Component("text encoder")
    } else {
        FileKind::Other
    }
}

/// One sentence for a file that is not a loadable checkpoint.
pub fn not_a_model_sentence(path: &Path, kind: FileKind, names: &[String]) -> String {
    let shown = path.display();
    match kind {
        FileKind::Checkpoint => format!("{shown} is a checkpoint"),
        FileKind::Lora(f) => format!(
            "{shown} is a LoRA ({}), not a base model; pass --model the Stable Diffusion model it was trained for (see it with `sdtune info {shown}`)",
            f.name()
        ),
        FileKind::Component(c) => format!(
            "{shown} holds only the weights of a diffusers {c}; pass --model the folder that holds model_index.json"
        ),
        FileKind::Other => format!(
            "{shown} is a safetensors file but neither a Stable Diffusion checkpoint nor a LoRA (its first tensor is {}); pass --model a diffusers folder, a single-file checkpoint or a Hugging Face id",
            names.first().map(String::as_str).unwrap_or("none, it is empty")
        ),
    }
}
