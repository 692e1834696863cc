//! Which layers get LoRA: the `--targets` presets, by diffusers layer name.
use anyhow::{bail, Result};

/// `--targets cross-attn|attn|transformer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Targets {
    /// `attn2.{to_q,to_k,to_v,to_out.0}`: where the prompt meets the image (64 layers on SD1.5).
    CrossAttn,
    /// Self- and cross-attention projections.
    Attn,
    /// Attention plus `proj_in/out` and the feed-forward of each transformer block.
    Transformer,
}

const ATTN_PROJECTIONS: &[&str] = &["to_q", "to_k", "to_v", "to_out.0"];

impl Targets {
    pub const NAMES: &'static [&'static str] = &["cross-attn", "attn", "transformer"];

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "cross-attn" => Targets::CrossAttn,
            "attn" => Targets::Attn,
            "transformer" => Targets::Transformer,
            other => bail!("--targets {other:?} is not one of {}", Self::NAMES.join(", ")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Targets::CrossAttn => "cross-attn",
            Targets::Attn => "attn",
            Targets::Transformer => "transformer",
        }
    }

    /// Whether the text-encoder layer `name` (e.g.
    /// `text_model.encoder.layers.0.self_attn.q_proj`) is targeted: the
    /// attention projections always, the MLP (`fc1`/`fc2`) with
    /// `transformer`, as kohya's `CLIPAttention` + `CLIPMLP` modules.
    pub fn matches_text_encoder(self, name: &str) -> bool {
        let attn = ["q_proj", "k_proj", "v_proj", "out_proj"].iter().any(|p| name.ends_with(&format!(".self_attn.{p}")));
        let mlp = ["fc1", "fc2"].iter().any(|p| name.ends_with(&format!(".mlp.{p}")));
        attn || (self == Targets::Transformer && mlp)
    }

    /// Whether the UNet layer `name` (e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`) is targeted.
    pub fn matches(self, name: &str) -> bool {
        let in_attn = |attn: &str| ATTN_PROJECTIONS.iter().any(|p| name.ends_with(&format!(".{attn}.{p}")));
        match self {
            Targets::CrossAttn => in_attn("attn2"),
            Targets::Attn => in_attn("attn1") || in_attn("attn2"),
            Targets::Transformer => {
                let in_transformer = name.contains(".attentions.");
                in_attn("attn1")
                    || in_attn("attn2")
                    || (in_transformer
                        && ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"].iter().any(|s| name.ends_with(&format!(".{s}"))))
            }
        }
    }
}
