//! The original LDM/SGM tensor names of a diffusers weight: the map
//! between a single-file checkpoint (`model.diffusion_model.*`,
//! `first_stage_model.*`, `cond_stage_model.*`) and the diffusers names the
//! models are built with, as diffusers' `single_file_utils.py` converts them.
//! Single-file loading and export use it; kohya LoRA names of SGM blocks can.
use anyhow::{ensure, Result};

use crate::models::config::UNetConfig;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
/// OpenAI CLIP ViT-L/14 (SD1), a transformers `CLIPTextModel` state dict.
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// OpenCLIP ViT-H/14 (SD2), open_clip's own names.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL (SGM layout): OpenAI CLIP ViT-L/14 in transformers' names.
pub const SGM_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL (SGM layout): OpenCLIP ViT-bigG/14 in open_clip's names.
pub const SGM_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
/// The SDXL refiner's only text encoder (OpenCLIP bigG in the first slot).
pub const SGM_REFINER_PREFIX: &str = "conditioner.embedders.0.model.";
/// EMA copies of the UNet in full (non-pruned) files: `model_ema.diffusion_modelinput_blocks00weight`.
pub const EMA_PREFIX: &str = "model_ema.";

// ------------------------------------------------------------------- UNet

const RESNET_NAMES: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
];

fn resnet_rest(rest: &str) -> Option<String> {
    RESNET_NAMES
        .iter()
        .find_map(|(new, old)| rest.strip_prefix(new).filter(|r| r.starts_with('.')).map(|r| format!("{old}{r}")))
}

/// What the UNet name mapping needs from the config.
#[derive(Clone, Debug)]
pub struct UnetLayout {
    pub layers_per_block: usize,
    /// Per up block: whether it has attentions (its upsampler then sits at `.2`).
    pub up_attention: Vec<bool>,
}

impl UnetLayout {
    pub fn of(cfg: &UNetConfig) -> Result<Self> {
        let layers = cfg.layers_per_block();
        let lpb = layers[0];
        ensure!(
            layers.iter().all(|&l| l == lpb),
            "a different layers_per_block per block has no single-file (LDM) layout"
        );
        Ok(UnetLayout {
            layers_per_block: lpb as usize,
            up_attention: cfg.up_block_types.iter().map(|t| t.starts_with("CrossAttn")).collect(),
        })
    }
}

/// The LDM name (without `model.diffusion_model.`) of diffusers UNet weight `name`.
///
/// `down_blocks.1.resnets.0.norm1.weight` -> `input_blocks.4.0.in_layers.0.weight` (2 layers per block).
pub fn unet_ldm_name(name: &str, layout: &UnetLayout) -> Option<String> {
    let lpb = layout.layers_per_block;
    for (new, old) in [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        // SDXL's text/time embedding MLP.
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ] {
        if let Some(rest) = name.strip_prefix(new).filter(|r| r.starts_with('.')) {
            return Some(format!("{old}{rest}"));
        }
    }
    let parts: Vec<&str> = name.split('.').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let rest_from = |i: usize| parts.get(i..).map(|p| p.join("."));
    match *parts.first()? {
        "down_blocks" => {
            let b = num(1)?;
            match *parts.get(2)? {
                "downsamplers" => Some(format!("input_blocks.{}.0.op.{}", (b + 1) * (lpb + 1), parts.last()?)),
                kind => {
                    let i = 1 + b * (lpb + 1) + num(3)?;
                    let rest = rest_from(4)?;
                    match kind {
                        "resnets" => Some(format!("input_blocks.{i}.0.{}", resnet_rest(&rest)?)),
                        "attentions" => Some(format!("input_blocks.{i}.1.{rest}")),
                        _ => None,
                    }
                }
            }
        }
        "mid_block" => {
            let j = num(2)?;
            let rest = rest_from(3)?;
            match *parts.get(1)? {
                "resnets" => Some(format!("middle_block.{}.{}", 2 * j, resnet_rest(&rest)?)),
                "attentions" => Some(format!("middle_block.1.{rest}")),
                _ => None,
            }
        }
        "up_blocks" => {
            let b = num(1)?;
            match *parts.get(2)? {
                "upsamplers" => {
                    let slot = if *layout.up_attention.get(b)? { 2 } else { 1 };
                    Some(format!("output_blocks.{}.{slot}.conv.{}", b * (lpb + 1) + lpb, parts.last()?))
                }
                kind => {
                    let i = b * (lpb + 1) + num(3)?;
                    let rest = rest_from(4)?;
                    match kind {
                        "resnets" => Some(format!("output_blocks.{i}.0.{}", resnet_rest(&rest)?)),
                        "attentions" => Some(format!("output_blocks.{i}.1.{rest}")),
                        _ => None,
                    }
                }
            }
        }
        _ => None,
    }
}

// -------------------------------------------------------------------- VAE

/// The LDM name (without `first_stage_model.`) of diffusers VAE weight `name`
/// for a VAE with `blocks` levels.
///
/// `decoder.up_blocks.0.resnets.1.conv1.weight` -> `decoder.up.3.block.1.conv1.weight`.
pub fn vae_ldm_name(name: &str, blocks: usize) -> Option<String> {
    let renamed = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut");
    let parts: Vec<&str> = renamed.split('.').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let rest_from = |i: usize| parts.get(i..).map(|p| p.join("."));
    let owner = *parts.first()?;
    if !matches!(owner, "encoder" | "decoder") {
        return matches!(owner, "quant_conv" | "post_quant_conv").then(|| renamed.clone());
    }
    match *parts.get(1)? {
        "down_blocks" => {
            let i = num(2)?;
            match *parts.get(3)? {
                "downsamplers" => Some(format!("encoder.down.{i}.downsample.conv.{}", parts.last()?)),
                "resnets" => Some(format!("encoder.down.{i}.block.{}.{}", num(4)?, rest_from(5)?)),
                _ => None,
            }
        }
        "up_blocks" => {
            let i = blocks.checked_sub(1 + num(2)?)?;
            match *parts.get(3)? {
                "upsamplers" => Some(format!("decoder.up.{i}.upsample.conv.{}", parts.last()?)),
                "resnets" => Some(format!("decoder.up.{i}.block.{}.{}", num(4)?, rest_from(5)?)),
                _ => None,
            }
        }
        "mid_block" => match *parts.get(2)? {
            "resnets" => Some(format!("{owner}.mid.block_{}.{}", num(3)? + 1, rest_from(4)?)),
            "attentions" => {
                let layer = match *parts.get(4)? {
                    "group_norm" => "norm",
                    "to_q" | "query" => "q",
                    "to_k" | "key" => "k",
                    "to_v" | "value" => "v",
                    "to_out" | "proj_attn" => "proj_out",
                    _ => return None,
                };
                Some(format!("{owner}.mid.attn_1.{layer}.{}", parts.last()?))
            }
            _ => None,
        },
        _ => Some(renamed.clone()),
    }
}

// ----------------------------------------------------------- text encoder

/// Where a diffusers weight comes from: a whole tensor, `rows` of one
/// (OpenCLIP's fused `in_proj_weight` holds q, k and v), or one transposed
/// (OpenCLIP's `text_projection` is `x @ P`, transformers' a linear layer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    /// (start, length) along the first dimension.
    pub rows: Option<(i64, i64)>,
    pub transposed: bool,
}

impl Source {
    pub fn whole(name: String) -> Self {
        Source { name, rows: None, transposed: false }
    }
}

/// How a single file names its text encoder.
#[derive(Clone, Copy, Debug)]
pub enum ClipNames<'a> {
    /// OpenAI CLIP in transformers' names under this prefix (SD1).
    Transformers(&'a str),
    /// open_clip's own names under this prefix (SD2: `cond_stage_model.model.`,
    /// SDXL's bigG: `conditioner.embedders.1.model.`).
    OpenClip(&'a str),
}

/// The file tensor of text-encoder weight `name` (transformers naming,
/// `text_model.encoder.layers.3.self_attn.q_proj.weight`); `hidden` is the
/// model width (the split size of OpenCLIP's fused q/k/v).
pub fn clip_source(name: &str, names: ClipNames, hidden: i64) -> Option<Source> {
    if let (ClipNames::OpenClip(p), "text_projection.weight") = (names, name) {
        return Some(Source { name: format!("{p}text_projection"), rows: None, transposed: true });
    }
    let rest = name.strip_prefix("text_model.")?;
    let p = match names {
        ClipNames::Transformers(prefix) => return Some(Source::whole(format!("{prefix}{rest}"))),
        ClipNames::OpenClip(prefix) => prefix,
    };
    let fixed = match rest {
        "embeddings.token_embedding.weight" => Some("token_embedding.weight".to_string()),
        "embeddings.position_embedding.weight" => Some("positional_embedding".to_string()),
        "final_layer_norm.weight" => Some("ln_final.weight".to_string()),
        "final_layer_norm.bias" => Some("ln_final.bias".to_string()),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(Source::whole(format!("{p}{f}")));
    }
    let layer = rest.strip_prefix("encoder.layers.")?;
    let (i, inner) = layer.split_once('.')?;
    let block = format!("{p}transformer.resblocks.{i}.");
    let (module, param) = inner.rsplit_once('.')?;
    let qkv = match module {
        "self_attn.q_proj" => Some(0),
        "self_attn.k_proj" => Some(1),
        "self_attn.v_proj" => Some(2),
        _ => None,
    };
    if let Some(j) = qkv {
        return Some(Source {
            name: format!("{block}attn.in_proj_{param}"),
            rows: Some((j * hidden, hidden)),
            transposed: false,
        });
    }
    let ldm = match module {
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        "self_attn.out_proj" => "attn.out_proj",
        _ => return None,
    };
    Some(Source::whole(format!("{block}{ldm}.{param}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(lpb: usize) -> UnetLayout {
        UnetLayout { layers_per_block: lpb, up_attention: vec![false, true, true, true] }
    }

    #[test]
    fn unet_names_follow_diffusers_conversion() {
        let l = layout(2);
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("down_blocks.0.resnets.1.conv2.weight", "input_blocks.2.0.out_layers.3.weight"),
            ("down_blocks.1.attentions.0.proj_in.weight", "input_blocks.4.1.proj_in.weight"),
            ("down_blocks.2.downsamplers.0.conv.bias", "input_blocks.9.0.op.bias"),
            ("down_blocks.3.resnets.1.time_emb_proj.weight", "input_blocks.11.0.emb_layers.1.weight"),
            ("mid_block.resnets.1.norm1.weight", "middle_block.2.in_layers.0.weight"),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("up_blocks.0.resnets.2.conv_shortcut.weight", "output_blocks.2.0.skip_connection.weight"),
            ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
            ("up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
            ("up_blocks.3.attentions.2.proj_out.bias", "output_blocks.11.1.proj_out.bias"),
            ("conv_norm_out.weight", "out.0.weight"),
            ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(unet_ldm_name(diffusers, &l).as_deref(), Some(ldm), "{diffusers}");
        }
    }

    #[test]
    fn sdxl_unet_names_follow_the_config() {
        // SDXL base's shape: no attention in the first level, so up block 2 has none either.
        let l = UnetLayout { layers_per_block: 2, up_attention: vec![true, true, false] };
        let cases = [
            ("down_blocks.0.resnets.1.conv1.weight", "input_blocks.2.0.in_layers.2.weight"),
            ("down_blocks.1.attentions.1.proj_in.weight", "input_blocks.5.1.proj_in.weight"),
            ("down_blocks.1.downsamplers.0.conv.weight", "input_blocks.6.0.op.weight"),
            ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
            ("up_blocks.1.attentions.2.norm.weight", "output_blocks.5.1.norm.weight"),
            ("up_blocks.2.resnets.2.conv2.bias", "output_blocks.8.0.out_layers.3.bias"),
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(unet_ldm_name(diffusers, &l).as_deref(), Some(ldm), "{diffusers}");
        }
        // With one resnet per level the indices move with it.
        let l = UnetLayout { layers_per_block: 1, up_attention: vec![true, true, false] };
        assert_eq!(unet_ldm_name("down_blocks.2.attentions.0.proj_out.bias", &l).as_deref(), Some("input_blocks.5.1.proj_out.bias"));
    }

    #[test]
    fn vae_names_follow_diffusers_conversion() {
        let cases = [
            ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
            ("encoder.down_blocks.1.resnets.0.conv_shortcut.bias", "encoder.down.1.block.0.nin_shortcut.bias"),
            ("encoder.down_blocks.0.downsamplers.0.conv.weight", "encoder.down.0.downsample.conv.weight"),
            ("decoder.up_blocks.0.resnets.2.norm1.weight", "decoder.up.3.block.2.norm1.weight"),
            ("decoder.up_blocks.2.upsamplers.0.conv.bias", "decoder.up.1.upsample.conv.bias"),
            ("decoder.mid_block.resnets.1.conv2.weight", "decoder.mid.block_2.conv2.weight"),
            ("encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid.attn_1.proj_out.weight"),
            ("encoder.mid_block.attentions.0.group_norm.bias", "encoder.mid.attn_1.norm.bias"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(vae_ldm_name(diffusers, 4).as_deref(), Some(ldm), "{diffusers}");
        }
    }

    #[test]
    fn open_clip_splits_fused_qkv() {
        let l = ClipNames::OpenClip(OPEN_CLIP_PREFIX);
        let s = clip_source("text_model.encoder.layers.5.self_attn.k_proj.weight", l, 1024).unwrap();
        assert_eq!(s.name, "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight");
        assert_eq!(s.rows, Some((1024, 1024)));
        let s = clip_source("text_model.encoder.layers.0.mlp.fc2.bias", l, 1024).unwrap();
        assert_eq!(s.name, "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.bias");
        let s = clip_source("text_model.embeddings.position_embedding.weight", l, 1024).unwrap();
        assert_eq!(s.name, "cond_stage_model.model.positional_embedding");
        let s = clip_source("text_projection.weight", ClipNames::OpenClip(SGM_OPEN_CLIP_PREFIX), 1280).unwrap();
        assert_eq!((s.name.as_str(), s.transposed), ("conditioner.embedders.1.model.text_projection", true));
    }
}
