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
    /// Cross-attention plus LoCon: the 3x3 convs of the resnets (`conv1`,
    /// `conv2`) and of the down/upsamplers.
    Conv,
    /// kohya's LoCon network (`networks.lora` with conv_dim): `transformer`
    /// plus every layer of the resnets and samplers (3x3 convs,
    /// `conv_shortcut`, `time_emb_proj`), and the text encoder's MLP.
    All,
}

const ATTN_PROJECTIONS: &[&str] = &["to_q", "to_k", "to_v", "to_out.0"];

impl Targets {
    pub const NAMES: &'static [&'static str] = &["cross-attn", "attn", "transformer", "conv", "all"];

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "cross-attn" => Targets::CrossAttn,
            "attn" => Targets::Attn,
            "transformer" => Targets::Transformer,
            "conv" => Targets::Conv,
            "all" => Targets::All,
            other => bail!("--targets {other:?} is not one of {}", Self::NAMES.join(", ")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Targets::CrossAttn => "cross-attn",
            Targets::Attn => "attn",
            Targets::Transformer => "transformer",
            Targets::Conv => "conv",
            Targets::All => "all",
        }
    }

    /// Whether the text-encoder layer `name` (e.g.
    /// `text_model.encoder.layers.0.self_attn.q_proj`) is targeted: the
    /// attention projections always, the MLP (`fc1`/`fc2`) with
    /// `transformer`, as kohya's `CLIPAttention` + `CLIPMLP` modules.
    pub fn matches_text_encoder(self, name: &str) -> bool {
        let attn = ["q_proj", "k_proj", "v_proj", "out_proj"].iter().any(|p| name.ends_with(&format!(".self_attn.{p}")));
        let mlp = ["fc1", "fc2"].iter().any(|p| name.ends_with(&format!(".mlp.{p}")));
        attn || (matches!(self, Targets::Transformer | Targets::All) && mlp)
    }

    /// Whether the UNet layer `name` (e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`) is targeted.
    pub fn matches(self, name: &str) -> bool {
        let in_attn = |attn: &str| ATTN_PROJECTIONS.iter().any(|p| name.ends_with(&format!(".{attn}.{p}")));
        let ends = |suffixes: &[&str]| suffixes.iter().any(|s| name.ends_with(&format!(".{s}")));
        let conv3x3 = (name.contains(".resnets.") && ends(&["conv1", "conv2"]))
            || name.contains(".downsamplers.0.conv") || name.contains(".upsamplers.0.conv");
        let resnet_rest = name.contains(".resnets.") && ends(&["conv_shortcut", "time_emb_proj"]);
        match self {
            Targets::CrossAttn => in_attn("attn2"),
            Targets::Attn => in_attn("attn1") || in_attn("attn2"),
            Targets::Conv => in_attn("attn2") || conv3x3,
            Targets::All => Targets::Transformer.matches(name) || conv3x3 || resnet_rest,
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
