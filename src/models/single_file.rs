//! Single-file checkpoints in the original LDM layout (A1111, civitai,
//! `v1-5-pruned-emaonly.safetensors`): `model.diffusion_model.*` (UNet),
//! `first_stage_model.*` (VAE) and `cond_stage_model.*` (text encoder) in one
//! safetensors file, as diffusers' `single_file_utils.py` reads them
//! (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
//! `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`).
//!
//! The models are still built by their diffusers names; each diffusers
//! weight is filled from the LDM tensor it comes from ([`unet_ldm_name`],
//! [`vae_ldm_name`], [`clip_source`]), straight from the memory mapping into
//! the target dtype and device. Sizes are read from the tensors
//! ([`infer_unet_config`], ...); what tensors cannot tell (head counts,
//! norm groups of non-SD models, the prediction type) comes from a config
//! beside the file or from SD's own rules:
//!
//! - `NAME/` beside `NAME.safetensors`: a diffusers config folder (what
//!   diffusers' `from_single_file(config=...)` takes: `unet/config.json`,
//!   `vae/config.json`, `text_encoder/config.json`,
//!   `scheduler/scheduler_config.json`, `tokenizer/`); any file it has
//!   replaces the inferred one.
//! - `NAME.yaml` beside it: the original LDM inference config, as A1111 reads
//!   it (`parameterization: "v"`, `num_heads` / `num_head_channels`,
//!   `scale_factor`, `linear_start` / `linear_end`).
//! - Rules otherwise: SD1 has 8 heads per block, SD2 64-wide heads; LDM
//!   norms have 32 groups; SD1 predicts epsilon; SD2 files are taken as the
//!   768 v-prediction models, with a warning (SD2 base models are epsilon).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::clip::ClipTextModel;
use super::config::{ClipTextConfig, Prediction, SchedulerConfig, UNetConfig, VaeConfig};
use super::layers::WeightInit;
use super::load::{build, copy_into, Built};
use super::stable_diffusion::{Placement, StableDiffusion};
use super::tensor_file::TensorFile;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKL;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
/// OpenAI CLIP ViT-L/14 (SD1), a transformers `CLIPTextModel` state dict.
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// OpenCLIP ViT-H/14 (SD2), open_clip's own names.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// EMA copies of the UNet in full (non-pruned) files: `model_ema.diffusion_modelinput_blocks00weight`.
pub const EMA_PREFIX: &str = "model_ema.";

/// Stable Diffusion generation, told apart by the text encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP text encoder, 768-wide cross-attention for the real models.
    Sd1,
    /// OpenCLIP text encoder (penultimate layer), 1024-wide cross-attention.
    Sd2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "Stable Diffusion 1.x",
            Family::Sd2 => "Stable Diffusion 2.x",
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

    fn need(&self, name: &str) -> Result<&[i64]> {
        self.get(name).with_context(|| format!("the checkpoint has no tensor {name}"))
    }

    fn count_while(&self, make: impl Fn(usize) -> String) -> usize {
        (0..).take_while(|&i| self.has(&make(i))).count()
    }
}

/// What kind of checkpoint a file is, from its tensor names and shapes.
#[derive(Clone, Debug)]
pub struct Layout {
    pub family: Family,
    /// Where the text encoder's `text_model.*` tensors start (OpenAI CLIP).
    pub clip_prefix: String,
    /// Cross-attention width (768 SD1, 1024 SD2).
    pub cross_attention_dim: i64,
    pub in_channels: i64,
    /// Tensors of the EMA copy (full, non-pruned files); never loaded.
    pub ema_tensors: usize,
}

/// True when the names are those of an LDM single-file checkpoint.
pub fn is_ldm(names: &[String]) -> bool {
    names.iter().any(|n| n.starts_with(UNET_PREFIX))
}

/// Tells the family and layout; errs in one sentence on anything that is
/// not a whole SD1/SD2 checkpoint.
pub fn detect(path: &Path, shapes: &Shapes) -> Result<Layout> {
    let shown = path.display();
    if shapes.names().any(|n| n.starts_with("conditioner.embedders.")) {
        bail!("{shown} is a Stable Diffusion XL checkpoint; sdtune supports Stable Diffusion 1.x and 2.x so far");
    }
    if !shapes.names().any(|n| n.starts_with(UNET_PREFIX)) {
        bail!("{shown} holds no UNet (model.diffusion_model.* tensors), so it is not a single-file Stable Diffusion checkpoint");
    }
    if !shapes.names().any(|n| n.starts_with(VAE_PREFIX)) {
        bail!("{shown} holds a UNet but no VAE (first_stage_model.* tensors); use a full checkpoint, or a diffusers folder");
    }
    let (family, clip_prefix) = if shapes.names().any(|n| n.starts_with(OPEN_CLIP_PREFIX)) {
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

/// One level of the UNet's down path as the tensors show it.
#[derive(Default)]
struct Level {
    channels: i64,
    resnets: usize,
    attention: bool,
    depth: usize,
    linear: bool,
}

/// How many attention heads each block gets when no config says.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeadHints {
    /// LDM `num_heads`: the same head count in every block (SD1: 8).
    pub num_heads: Option<i64>,
    /// LDM `num_head_channels`: the same head width everywhere (SD2: 64).
    pub num_head_channels: Option<i64>,
}

/// The UNet config the tensors describe. Head counts come from `hints`,
/// else SD's rules (SD1: 8 heads; SD2: 64-wide heads); norms have 32 groups
/// (LDM's `normalization`). `sample_size` is left for the caller.
pub fn infer_unet_config(shapes: &Shapes, family: Family, hints: HeadHints) -> Result<UNetConfig> {
    let p = |s: String| format!("{UNET_PREFIX}{s}");
    let conv_in = shapes.need(&p("input_blocks.0.0.weight".into()))?.to_vec();
    let conv_out = shapes.need(&p("out.2.weight".into()))?.to_vec();
    let mut levels: Vec<Level> = Vec::new();
    let mut current = Level::default();
    let mut i = 1;
    loop {
        if shapes.has(&p(format!("input_blocks.{i}.0.op.weight"))) {
            levels.push(std::mem::take(&mut current));
            i += 1;
            continue;
        }
        let Some(conv2) = shapes.get(&p(format!("input_blocks.{i}.0.out_layers.3.weight"))) else { break };
        current.channels = conv2[0];
        current.resnets += 1;
        let attn = p(format!("input_blocks.{i}.1."));
        if let Some(proj_in) = shapes.get(&format!("{attn}proj_in.weight")) {
            current.attention = true;
            current.linear = proj_in.len() == 2;
            current.depth = shapes.count_while(|n| format!("{attn}transformer_blocks.{n}.attn1.to_q.weight"));
        }
        i += 1;
    }
    levels.push(current);
    let lpb = levels[0].resnets;
    ensure!(lpb > 0, "the UNet has no down blocks");
    ensure!(
        levels.iter().all(|l| l.resnets == lpb),
        "the UNet's levels have different numbers of resnets, which no SD1/SD2 UNet has"
    );
    let n = levels.len();
    let up_attention: Vec<bool> =
        (0..n).map(|j| shapes.has(&p(format!("output_blocks.{}.1.proj_in.weight", j * (lpb + 1))))).collect();
    ensure!(
        shapes.has(&p(format!("output_blocks.{}.0.out_layers.3.weight", n * (lpb + 1) - 1)))
            && !shapes.has(&p(format!("output_blocks.{}.0.out_layers.3.weight", n * (lpb + 1)))),
        "the UNet's up path does not mirror its {n} down levels"
    );
    ensure!(
        shapes.has(&p("middle_block.1.proj_in.weight".into())),
        "the UNet has no attention in its middle block, which no SD1/SD2 UNet lacks"
    );
    let first_attn = levels.iter().position(|l| l.attention).context("the UNet has no attention blocks")?;
    let channels: Vec<i64> = levels.iter().map(|l| l.channels).collect();
    let attn_prefix =
        p(format!("input_blocks.{}.1.transformer_blocks.0.attn2.to_k.weight", 1 + first_attn * (lpb + 1)));
    let cross_attention_dim = shapes.need(&attn_prefix)?[1];
    let heads: Vec<i64> = match (hints.num_heads.filter(|&h| h > 0), hints.num_head_channels.filter(|&c| c > 0)) {
        (Some(h), _) => vec![h; n],
        (None, Some(width)) => channels.iter().map(|c| c / width).collect(),
        (None, None) => match family {
            Family::Sd1 => vec![8; n],
            Family::Sd2 => channels.iter().map(|c| c / 64).collect(),
        },
    };
    for (level, (&c, &h)) in levels.iter().zip(channels.iter().zip(&heads)) {
        if level.attention && (h <= 0 || c % h != 0) {
            bail!(
                "cannot tell the UNet's attention heads from its tensors ({c} channels do not split into {h} heads by the SD rule); put a diffusers unet/config.json in a folder named like the file beside it"
            );
        }
    }
    let depths: Vec<i64> = levels.iter().map(|l| if l.attention { l.depth as i64 } else { 1 }).collect();
    let depth =
        if depths.iter().all(|&d| d == depths[0]) { serde_json::json!(depths[0]) } else { serde_json::json!(depths) };
    let down: Vec<&str> =
        levels.iter().map(|l| if l.attention { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
    let up: Vec<&str> = up_attention.iter().map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
    let cfg: UNetConfig = serde_json::from_value(serde_json::json!({
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": conv_out[2],
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": levels[first_attn].linear,
        // diffusers' SD2 single-file config (stabilityai/stable-diffusion-2-1) upcasts.
        "upcast_attention": family == Family::Sd2,
    }))
    .context("the UNet config inferred from the tensors is invalid")?;
    cfg.check()?;
    Ok(cfg)
}

/// LDM's norms have 32 groups: channels that do not split into them mean a
/// non-SD model whose config must come from beside the file.
pub fn check_norm_groups(what: &str, channels: &[i64], groups: i64, config: &str) -> Result<()> {
    if let Some(c) = channels.iter().find(|&&c| c % groups != 0) {
        bail!(
            "the {what}'s {c} channels do not split into LDM's {groups} norm groups, so this is not a standard SD model; put a diffusers {config} (with norm_num_groups) in a folder named like the file beside it"
        );
    }
    Ok(())
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

/// The VAE config the tensors describe (32 norm groups, as LDM's).
pub fn infer_vae_config(shapes: &Shapes, scaling_factor: Option<f64>, image_size: i64) -> Result<VaeConfig> {
    let v = |s: String| format!("{VAE_PREFIX}{s}");
    let blocks = shapes.count_while(|i| v(format!("encoder.down.{i}.block.0.conv1.weight")));
    ensure!(blocks > 0, "the VAE has no encoder blocks");
    let channels: Vec<i64> = (0..blocks)
        .map(|i| shapes.need(&v(format!("encoder.down.{i}.block.0.conv2.weight"))).map(|s| s[0]))
        .collect::<Result<_>>()?;
    let layers = shapes.count_while(|j| v(format!("encoder.down.0.block.{j}.conv1.weight")));
    let in_channels = shapes.need(&v("encoder.conv_in.weight".into()))?[1];
    let out_channels = shapes.need(&v("decoder.conv_out.weight".into()))?[0];
    let latent = shapes.need(&v("decoder.conv_in.weight".into()))?[1];
    ensure!(
        shapes.has(&v("quant_conv.weight".into())) && shapes.has(&v("post_quant_conv.weight".into())),
        "the VAE has no quant_conv / post_quant_conv, which every SD VAE has"
    );
    let cfg: VaeConfig = serde_json::from_value(serde_json::json!({
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent,
        "sample_size": image_size,
        "scaling_factor": scaling_factor.unwrap_or(0.18215),
        "down_block_types": vec!["DownEncoderBlock2D"; blocks],
        "up_block_types": vec!["UpDecoderBlock2D"; blocks],
        "mid_block_add_attention": shapes.has(&v("encoder.mid.attn_1.q.weight".into())),
    }))
    .context("the VAE config inferred from the tensors is invalid")?;
    Ok(cfg)
}

// ----------------------------------------------------------- text encoder

/// Where a diffusers weight comes from: a whole tensor, or `rows` of one
/// (OpenCLIP's fused `in_proj_weight` holds q, k and v).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    /// (start, length) along the first dimension.
    pub rows: Option<(i64, i64)>,
}

impl Source {
    fn whole(name: String) -> Self {
        Source { name, rows: None }
    }
}

/// The file tensor of text-encoder weight `name` (transformers naming,
/// `text_model.encoder.layers.3.self_attn.q_proj.weight`); `hidden` is the
/// model width (the split size of OpenCLIP's fused q/k/v).
pub fn clip_source(name: &str, layout: &Layout, hidden: i64) -> Option<Source> {
    let rest = name.strip_prefix("text_model.")?;
    if layout.family == Family::Sd1 {
        return Some(Source::whole(format!("{}{rest}", layout.clip_prefix)));
    }
    let p = OPEN_CLIP_PREFIX;
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
        return Some(Source { name: format!("{block}attn.in_proj_{param}"), rows: Some((j * hidden, hidden)) });
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

fn open_clip_resblocks(shapes: &Shapes) -> usize {
    shapes.count_while(|i| format!("{OPEN_CLIP_PREFIX}transformer.resblocks.{i}.ln_1.weight"))
}

/// File tensors of the text encoder that no diffusers weight takes: the
/// OpenCLIP layer SD2 does not use (it conditions on the penultimate one),
/// OpenCLIP's projection and logit scale, CLIP's position ids.
pub fn ignored_text_tensor(name: &str, layout: &Layout, shapes: &Shapes) -> bool {
    if name.ends_with("position_ids") {
        return true;
    }
    if layout.family == Family::Sd2 {
        let last = open_clip_resblocks(shapes).saturating_sub(1);
        let rest = name.strip_prefix(OPEN_CLIP_PREFIX).unwrap_or("");
        return matches!(rest, "text_projection" | "logit_scale" | "attn_mask")
            || rest.starts_with(&format!("transformer.resblocks.{last}."));
    }
    false
}

/// The text-encoder config the tensors describe: OpenAI CLIP (quick_gelu,
/// every layer) for SD1, OpenCLIP (gelu, all layers but the last) for SD2;
/// 64-wide heads.
pub fn infer_text_config(shapes: &Shapes, layout: &Layout, heads: Option<i64>) -> Result<ClipTextConfig> {
    let (token, position, layers, fc1, act) = match layout.family {
        Family::Sd1 => {
            let p = &layout.clip_prefix;
            (
                format!("{p}embeddings.token_embedding.weight"),
                format!("{p}embeddings.position_embedding.weight"),
                shapes.count_while(|i| format!("{p}encoder.layers.{i}.self_attn.q_proj.weight")),
                format!("{p}encoder.layers.0.mlp.fc1.weight"),
                "quick_gelu",
            )
        }
        Family::Sd2 => {
            let p = OPEN_CLIP_PREFIX;
            let blocks = open_clip_resblocks(shapes);
            ensure!(blocks >= 2, "the OpenCLIP text encoder has {blocks} layer(s); SD2 uses all but the last");
            (
                format!("{p}token_embedding.weight"),
                format!("{p}positional_embedding"),
                blocks - 1,
                format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
                "gelu",
            )
        }
    };
    ensure!(layers > 0, "the text encoder has no layers");
    let token = shapes.need(&token)?;
    let (vocab, hidden) = (token[0], token[1]);
    let heads = heads.unwrap_or(hidden / 64);
    ensure!(
        heads > 0 && hidden % heads == 0,
        "cannot tell the text encoder's attention heads from its tensors ({hidden} wide, not a multiple of 64); put a diffusers text_encoder/config.json in a folder named like the file beside it"
    );
    let cfg: ClipTextConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes.need(&fc1)?[0],
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": shapes.need(&position)?[0],
        "hidden_act": act,
        "projection_dim": if layout.family == Family::Sd1 { 768 } else { 512 },
    }))
    .context("the text-encoder config inferred from the tensors is invalid")?;
    Ok(cfg)
}

// ------------------------------------------------------- configs beside it

/// What the original LDM inference config (`NAME.yaml`, A1111's convention)
/// says that tensors cannot.
#[derive(Clone, Debug)]
pub struct LdmYaml {
    pub path: PathBuf,
    pub prediction: Prediction,
    pub heads: HeadHints,
    pub scale_factor: Option<f64>,
    pub linear_start: Option<f64>,
    pub linear_end: Option<f64>,
    pub timesteps: Option<i64>,
}

impl LdmYaml {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).with_context(|| {
            format!("{} is not valid YAML; it should be the model's LDM inference config", path.display())
        })?;
        let params = &doc["model"]["params"];
        let unet = &params["unet_config"]["params"];
        let prediction = match params["parameterization"].as_str() {
            None | Some("eps") => Prediction::Epsilon,
            Some("v") => Prediction::V,
            Some(other) => bail!("{}: parameterization {other:?} is not \"eps\" or \"v\"", path.display()),
        };
        Ok(LdmYaml {
            path: path.to_path_buf(),
            prediction,
            heads: HeadHints {
                num_heads: unet["num_heads"].as_i64(),
                num_head_channels: unet["num_head_channels"].as_i64(),
            },
            scale_factor: params["scale_factor"].as_f64(),
            linear_start: params["linear_start"].as_f64(),
            linear_end: params["linear_end"].as_f64(),
            timesteps: params["timesteps"].as_i64(),
        })
    }
}

/// Configs found beside `NAME.safetensors`.
#[derive(Clone, Debug, Default)]
pub struct Beside {
    /// `NAME/`, a (possibly partial) diffusers config folder.
    pub folder: Option<PathBuf>,
    pub yaml: Option<LdmYaml>,
}

impl Beside {
    pub fn find(path: &Path) -> Result<Self> {
        let folder = path.with_extension("");
        let folder = (folder != path && folder.is_dir()).then_some(folder);
        let yaml = [path.with_extension("yaml"), path.with_extension("yml")].into_iter().find(|p| p.is_file());
        Ok(Beside { folder, yaml: yaml.map(|y| LdmYaml::read(&y)).transpose()? })
    }

    /// `relative` inside the folder beside the file, when both exist.
    pub fn file(&self, relative: &str) -> Option<PathBuf> {
        self.folder.as_ref().map(|f| f.join(relative)).filter(|p| p.is_file())
    }
}

/// Where the prediction type came from.
#[derive(Clone, Debug, PartialEq)]
pub enum PredictionSource {
    Flag,
    Config(PathBuf),
    Metadata(String),
    /// Guessed from the family; the string says how to be sure.
    Guess,
}

/// The prediction type of a single file and where it came from, plus a
/// warning when it was guessed for a family where it matters (SD2).
pub fn choose_prediction(
    family: Family,
    flag: Option<Prediction>,
    scheduler: Option<&SchedulerConfig>,
    scheduler_path: Option<&Path>,
    beside: &Beside,
    metadata: &HashMap<String, String>,
) -> Result<(Prediction, PredictionSource, Option<String>)> {
    if let Some(p) = flag {
        return Ok((p, PredictionSource::Flag, None));
    }
    if let (Some(s), Some(path)) = (scheduler, scheduler_path) {
        return Ok((s.prediction()?, PredictionSource::Config(path.to_path_buf()), None));
    }
    if let Some(y) = &beside.yaml {
        return Ok((y.prediction, PredictionSource::Config(y.path.clone()), None));
    }
    if let Some(v) = metadata.get("modelspec.prediction_type") {
        let p = match v.as_str() {
            "v" | "v_prediction" => Some(Prediction::V),
            "epsilon" | "eps" => Some(Prediction::Epsilon),
            _ => None,
        };
        if let Some(p) = p {
            return Ok((p, PredictionSource::Metadata("modelspec.prediction_type".into()), None));
        }
    }
    Ok(match family {
        Family::Sd1 => (Prediction::Epsilon, PredictionSource::Guess, None),
        Family::Sd2 => (
            Prediction::V,
            PredictionSource::Guess,
            Some(
                "this is a Stable Diffusion 2.x checkpoint with no config saying what it predicts, so sdtune takes it as a 768-px v-prediction model; for an SD2 base (512 px) model pass --prediction-type epsilon, else images come out as noise".into(),
            ),
        ),
    })
}

// ------------------------------------------------------------ the whole file

/// Everything needed to build the model of a single file, before any weight is read.
#[derive(Clone, Debug)]
pub struct Plan {
    pub path: PathBuf,
    pub layout: Layout,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text: ClipTextConfig,
    pub scheduler: SchedulerConfig,
    pub prediction_source: PredictionSource,
    pub warnings: Vec<String>,
    /// Where the tokenizer is, when known without a hub lookup.
    pub tokenizer_dir: Option<PathBuf>,
}

impl Plan {
    /// Detects the layout and settles every config: the folder beside the
    /// file first, then `NAME.yaml`, then the tensors and SD's rules.
    pub fn new(path: &Path, file: &TensorFile, prediction_flag: Option<Prediction>) -> Result<Self> {
        let shapes = Shapes::of(file);
        let layout = detect(path, &shapes)?;
        if layout.in_channels != 4 {
            bail!(
                "{} is an inpainting or other {}-channel checkpoint; sdtune trains and samples 4-channel text-to-image models",
                path.display(),
                layout.in_channels
            );
        }
        let beside = Beside::find(path)?;
        let in_file = |e: anyhow::Error| e.context(format!("{} cannot be loaded", path.display()));
        let hints = beside.yaml.as_ref().map(|y| y.heads).unwrap_or_default();
        let scheduler_path = beside.file("scheduler/scheduler_config.json");
        let scheduler_cfg = scheduler_path.as_deref().map(SchedulerConfig::from_file).transpose()?;
        let (prediction, prediction_source, warning) = choose_prediction(
            layout.family,
            prediction_flag,
            scheduler_cfg.as_ref(),
            scheduler_path.as_deref(),
            &beside,
            &file.string_metadata(),
        )?;
        let image_size = if layout.family == Family::Sd2 && prediction == Prediction::V { 768 } else { 512 };
        let unet = match beside.file("unet/config.json") {
            Some(p) => UNetConfig::from_file(&p)?,
            None => {
                let mut cfg = infer_unet_config(&shapes, layout.family, hints).map_err(in_file)?;
                check_norm_groups("UNet", &cfg.block_out_channels, cfg.norm_num_groups, "unet/config.json")
                    .map_err(in_file)?;
                cfg.sample_size = Some(image_size / 8);
                cfg
            }
        };
        let vae = match beside.file("vae/config.json") {
            Some(p) => VaeConfig::from_file(&p)?,
            None => {
                let cfg = infer_vae_config(&shapes, beside.yaml.as_ref().and_then(|y| y.scale_factor), image_size)
                    .map_err(in_file)?;
                check_norm_groups("VAE", &cfg.block_out_channels, cfg.norm_num_groups, "vae/config.json")
                    .map_err(in_file)?;
                cfg
            }
        };
        let text = match beside.file("text_encoder/config.json") {
            Some(p) => ClipTextConfig::from_file(&p)?,
            None => infer_text_config(&shapes, &layout, None).map_err(in_file)?,
        };
        let mut scheduler = scheduler_cfg.unwrap_or_else(|| {
            let mut s = SchedulerConfig::sd(prediction);
            if let Some(y) = &beside.yaml {
                s.beta_start = y.linear_start.unwrap_or(s.beta_start);
                s.beta_end = y.linear_end.unwrap_or(s.beta_end);
                s.num_train_timesteps = y.timesteps.unwrap_or(s.num_train_timesteps);
            }
            s
        });
        scheduler.prediction_type = prediction.as_config_str().to_string();
        let tokenizer_dir = beside.folder.as_ref().map(|f| f.join("tokenizer")).filter(|d| d.is_dir());
        Ok(Plan {
            path: path.to_path_buf(),
            layout,
            unet,
            vae,
            text,
            scheduler,
            prediction_source,
            warnings: warning.into_iter().collect(),
            tokenizer_dir,
        })
    }
}

/// Fills every variable of `vs` from `file` through `map` (diffusers name ->
/// file tensor), then checks that every file tensor under `prefix` was used
/// or is `ignored`: a checkpoint that does not fit the config is an error
/// naming the tensor, never half-loaded.
fn fill(
    vs: &VarStore,
    file: &TensorFile,
    what: &str,
    prefix: &str,
    map: &dyn Fn(&str) -> Option<Source>,
    ignored: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let shown = file.path().display();
    let variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    let mut used: HashSet<String> = HashSet::new();
    for name in names {
        let var = &variables[name];
        let source = map(name).with_context(|| format!("sdtune has no LDM name for the {what}'s {name}"))?;
        if file.info(&source.name).is_none() {
            bail!(
                "{shown} has no tensor {} (the {what}'s {name}); the checkpoint does not match the architecture read from it or the config beside it",
                source.name
            );
        }
        file.with_view(&source.name, |src| {
            let src = match source.rows {
                Some((start, len)) => {
                    ensure!(
                        src.dim() >= 1 && src.size()[0] >= start + len,
                        "{shown}: tensor {} has shape {:?}, too small to hold rows {start}..{} (the {what}'s {name})",
                        source.name,
                        src.size(),
                        start + len
                    );
                    src.narrow(0, start, len)
                }
                None => src.shallow_clone(),
            };
            let (have, want) = (src.size(), var.size());
            let src = if have == want {
                src
            } else if drop_unit_dims(&have) == drop_unit_dims(&want) {
                // LDM keeps the VAE's mid attention as 1x1 convs: [C, C, 1, 1] -> [C, C].
                src.reshape(&want)
            } else {
                bail!(
                    "{shown}: tensor {} has shape {have:?} but the {what}'s {name} needs {want:?}; the checkpoint does not match the architecture read from it or the config beside it",
                    source.name
                );
            };
            copy_into(var, &src).with_context(|| format!("{shown}: cannot load tensor {}", source.name))
        })?;
        file.release(&source.name);
        used.insert(source.name);
    }
    let mut unused: Vec<String> =
        file.names().into_iter().filter(|n| n.starts_with(prefix) && !used.contains(n) && !ignored(n)).collect();
    if !unused.is_empty() {
        unused.sort();
        bail!(
            "{shown} holds {} {what} tensor(s) the model has no place for (first: {}); the checkpoint does not match the architecture read from it or the config beside it",
            unused.len(),
            unused.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

fn drop_unit_dims(shape: &[i64]) -> Vec<i64> {
    shape.iter().copied().filter(|&d| d != 1).collect()
}

impl Plan {
    /// The tokenizer folder: the one beside the file, else the family's
    /// tokenizer in the local Hugging Face cache.
    pub fn find_tokenizer(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.tokenizer_dir {
            return Ok(dir.clone());
        }
        super::hub::find_tokenizer(super::hub::tokenizer_repos(self.layout.family == Family::Sd2)).map_err(|e| {
            e.context(format!(
                "{} holds no tokenizer, and a folder {} with a tokenizer/ beside it would do",
                self.path.display(),
                self.path.with_extension("").display()
            ))
        })
    }
}

/// The UNet of a single file, filled from `file` (opened from `plan.path`).
pub fn load_unet(file: &TensorFile, plan: &Plan, device: Device, kind: Kind) -> Result<Built<UNet2DConditionModel>> {
    let layout = UnetLayout::of(&plan.unet)?;
    let unet = build(device, kind, WeightInit::Zeros, |vb| UNet2DConditionModel::new(vb, &plan.unet))?;
    fill(
        &unet.vs,
        file,
        "UNet",
        UNET_PREFIX,
        &|n| unet_ldm_name(n, &layout).map(|l| Source::whole(format!("{UNET_PREFIX}{l}"))),
        &|_| false,
    )?;
    Ok(unet)
}

/// The VAE of a single file.
pub fn load_vae(file: &TensorFile, plan: &Plan, device: Device, kind: Kind) -> Result<Built<AutoencoderKL>> {
    let blocks = plan.vae.block_out_channels.len();
    let vae = build(device, kind, WeightInit::Zeros, |vb| AutoencoderKL::new(vb, &plan.vae))?;
    fill(
        &vae.vs,
        file,
        "VAE",
        VAE_PREFIX,
        &|n| vae_ldm_name(n, blocks).map(|l| Source::whole(format!("{VAE_PREFIX}{l}"))),
        &|_| false,
    )?;
    Ok(vae)
}

/// The text encoder of a single file (OpenAI CLIP or OpenCLIP names).
pub fn load_text_encoder(file: &TensorFile, plan: &Plan, device: Device, kind: Kind) -> Result<Built<ClipTextModel>> {
    let layout = &plan.layout;
    let hidden = plan.text.hidden_size;
    let shapes = Shapes::of(file);
    let text_encoder = build(device, kind, WeightInit::Zeros, |vb| ClipTextModel::new(vb, &plan.text))?;
    let prefix = if layout.family == Family::Sd2 { OPEN_CLIP_PREFIX } else { CLIP_PREFIX };
    fill(&text_encoder.vs, file, "text encoder", prefix, &|n| clip_source(n, layout, hidden), &|n| {
        ignored_text_tensor(n, layout, &shapes)
    })?;
    Ok(text_encoder)
}

impl StableDiffusion {
    /// Loads a single-file LDM checkpoint (`.safetensors`), every weight read
    /// from the memory mapping straight into `placement`'s dtype and device.
    /// `warn` receives what the user should know (a guessed prediction type).
    pub fn from_single_file(
        path: &Path,
        placement: Placement,
        prediction: Option<Prediction>,
        warn: &mut dyn FnMut(String),
    ) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let plan = Plan::new(path, &file, prediction)?;
        for w in &plan.warnings {
            warn(w.clone());
        }
        let tokenizer = ClipTokenizer::from_folder(&plan.find_tokenizer()?)?;
        let unet = load_unet(&file, &plan, placement.device, placement.kind)?;
        let vae = load_vae(&file, &plan, placement.device, placement.vae_kind)?;
        let text_encoder = load_text_encoder(&file, &plan, placement.device, placement.kind)?;
        Ok(StableDiffusion {
            source: Some(path.to_path_buf()),
            tokenizer: Some(tokenizer),
            text_encoder,
            text_config: plan.text,
            unet,
            unet_config: plan.unet,
            vae,
            vae_config: plan.vae,
            scheduler: plan.scheduler,
        })
    }
}

// ---------------------------------------------------------------- export

/// The model as a single-file LDM state dict (what A1111 and diffusers'
/// `from_single_file` read): UNet, VAE (mid attention as 1x1 convs), text
/// encoder (SD2: OpenCLIP names, fused q/k/v, plus the unused last layer as
/// a copy of the last one and an identity `text_projection`), and the
/// schedule buffers LDM files carry. For benchmarks and fixtures.
pub fn to_ldm(model: &StableDiffusion, family: Family) -> Result<Vec<(String, Tensor)>> {
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let layout = UnetLayout::of(&model.unet_config)?;
    for (name, t) in sorted(&model.unet.vs) {
        let ldm = unet_ldm_name(&name, &layout).with_context(|| format!("no LDM name for UNet {name}"))?;
        out.push((format!("{UNET_PREFIX}{ldm}"), t));
    }
    let blocks = model.vae_config.block_out_channels.len();
    for (name, t) in sorted(&model.vae.vs) {
        let ldm = vae_ldm_name(&name, blocks).with_context(|| format!("no LDM name for VAE {name}"))?;
        let t = if ldm.contains(".mid.attn_1.") && ldm.ends_with(".weight") && t.dim() == 2 {
            t.unsqueeze(-1).unsqueeze(-1)
        } else {
            t
        };
        out.push((format!("{VAE_PREFIX}{ldm}"), t));
    }
    let text: BTreeMap<String, Tensor> = sorted(&model.text_encoder.vs).into_iter().collect();
    let cfg = &model.text_config;
    match family {
        Family::Sd1 => {
            for (name, t) in &text {
                out.push((format!("{CLIP_PREFIX}{name}"), t.shallow_clone()));
            }
            let ids = Tensor::arange(cfg.max_position_embeddings, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
            out.push((format!("{CLIP_PREFIX}text_model.embeddings.position_ids"), ids));
        }
        Family::Sd2 => {
            let get =
                |n: &str| text.get(n).map(|t| t.shallow_clone()).with_context(|| format!("text encoder has no {n}"));
            let p = OPEN_CLIP_PREFIX;
            out.push((format!("{p}token_embedding.weight"), get("text_model.embeddings.token_embedding.weight")?));
            out.push((format!("{p}positional_embedding"), get("text_model.embeddings.position_embedding.weight")?));
            out.push((format!("{p}ln_final.weight"), get("text_model.final_layer_norm.weight")?));
            out.push((format!("{p}ln_final.bias"), get("text_model.final_layer_norm.bias")?));
            let layers = cfg.num_hidden_layers as usize;
            for i in 0..=layers {
                let src = format!("text_model.encoder.layers.{}.", i.min(layers - 1));
                let dst = format!("{p}transformer.resblocks.{i}.");
                for (new, old) in [
                    ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"),
                    ("self_attn.out_proj", "attn.out_proj"),
                ] {
                    for param in ["weight", "bias"] {
                        let t = get(&format!("{src}{new}.{param}"))?;
                        // The stand-in last layer must own its data (no shared storage in a file).
                        let t = if i == layers { t.copy() } else { t };
                        out.push((format!("{dst}{old}.{param}"), t));
                    }
                }
                for param in ["weight", "bias"] {
                    let parts = ["q", "k", "v"]
                        .iter()
                        .map(|x| get(&format!("{src}self_attn.{x}_proj.{param}")))
                        .collect::<Result<Vec<_>>>()?;
                    out.push((format!("{dst}attn.in_proj_{param}"), Tensor::cat(&parts, 0)));
                }
            }
            let kind = text["text_model.final_layer_norm.weight"].kind();
            out.push((format!("{p}text_projection"), Tensor::eye(cfg.hidden_size, (kind, tch::Device::Cpu))));
        }
    }
    out.extend(schedule_buffers(&model.scheduler));
    Ok(out)
}

/// `betas`, `alphas_cumprod`, `alphas_cumprod_prev` (fp32) as LDM saves them.
fn schedule_buffers(s: &SchedulerConfig) -> Vec<(String, Tensor)> {
    let opts = (Kind::Double, tch::Device::Cpu);
    let n = s.num_train_timesteps;
    let betas = if s.beta_schedule == "scaled_linear" {
        Tensor::linspace(s.beta_start.powf(0.5), s.beta_end.powf(0.5), n, opts).pow_tensor_scalar(2)
    } else {
        Tensor::linspace(s.beta_start, s.beta_end, n, opts)
    };
    let alphas_cumprod = (Tensor::ones_like(&betas) - &betas).cumprod(0, Kind::Double);
    let prev = Tensor::cat(&[Tensor::ones([1], opts), alphas_cumprod.narrow(0, 0, n - 1)], 0);
    vec![
        ("betas".into(), betas.to_kind(Kind::Float)),
        ("alphas_cumprod".into(), alphas_cumprod.to_kind(Kind::Float)),
        ("alphas_cumprod_prev".into(), prev.to_kind(Kind::Float)),
    ]
}

fn sorted(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Parameter counts of a single file by component (the text encoder counts
/// only what SD uses), and how many tensors each dtype holds.
#[derive(Clone, Debug, Default)]
pub struct Census {
    pub unet: i64,
    pub vae: i64,
    pub text_encoder: i64,
    pub ema: i64,
    pub other: i64,
    pub dtypes: BTreeMap<String, usize>,
}

pub fn census(file: &TensorFile, layout: &Layout) -> Census {
    let shapes = Shapes::of(file);
    let mut c = Census::default();
    for name in file.names() {
        let Some(info) = file.info(&name) else { continue };
        let n: i64 = info.shape.iter().map(|&d| d as i64).product();
        *c.dtypes.entry(format!("{:?}", info.dtype)).or_default() += 1;
        if name.starts_with(UNET_PREFIX) {
            c.unet += n;
        } else if name.starts_with(VAE_PREFIX) {
            c.vae += n;
        } else if name.starts_with("cond_stage_model.") {
            if !ignored_text_tensor(&name, layout, &shapes) {
                c.text_encoder += n;
            }
        } else if name.starts_with(EMA_PREFIX) {
            c.ema += n;
        } else {
            c.other += n;
        }
    }
    c
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
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(unet_ldm_name(diffusers, &l).as_deref(), Some(ldm), "{diffusers}");
        }
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
        let l = Layout {
            family: Family::Sd2,
            clip_prefix: OPEN_CLIP_PREFIX.into(),
            cross_attention_dim: 1024,
            in_channels: 4,
            ema_tensors: 0,
        };
        let s = clip_source("text_model.encoder.layers.5.self_attn.k_proj.weight", &l, 1024).unwrap();
        assert_eq!(s.name, "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight");
        assert_eq!(s.rows, Some((1024, 1024)));
        let s = clip_source("text_model.encoder.layers.0.mlp.fc2.bias", &l, 1024).unwrap();
        assert_eq!(s.name, "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.bias");
        let s = clip_source("text_model.embeddings.position_embedding.weight", &l, 1024).unwrap();
        assert_eq!(s.name, "cond_stage_model.model.positional_embedding");
    }

    #[test]
    fn sd_head_rules() {
        // Shapes of an SD2.1-like UNet reduced to the tensors inference reads.
        let mut m = BTreeMap::new();
        let p = |s: &str| format!("{UNET_PREFIX}{s}");
        m.insert(p("input_blocks.0.0.weight"), vec![320, 4, 3, 3]);
        m.insert(p("out.2.weight"), vec![4, 320, 3, 3]);
        let channels = [320, 640, 1280, 1280];
        let mut i = 1;
        for (level, c) in channels.iter().enumerate() {
            for _ in 0..2 {
                m.insert(p(&format!("input_blocks.{i}.0.out_layers.3.weight")), vec![*c, *c, 3, 3]);
                if level < 3 {
                    let a = format!("input_blocks.{i}.1.");
                    m.insert(p(&format!("{a}proj_in.weight")), vec![*c, *c]);
                    m.insert(p(&format!("{a}transformer_blocks.0.attn1.to_q.weight")), vec![*c, *c]);
                    m.insert(p(&format!("{a}transformer_blocks.0.attn2.to_k.weight")), vec![*c, 1024]);
                }
                i += 1;
            }
            if level < 3 {
                m.insert(p(&format!("input_blocks.{i}.0.op.weight")), vec![*c, *c, 3, 3]);
                i += 1;
            }
        }
        for j in 0..12 {
            m.insert(p(&format!("output_blocks.{j}.0.out_layers.3.weight")), vec![1, 1, 3, 3]);
            if j >= 3 {
                m.insert(p(&format!("output_blocks.{j}.1.proj_in.weight")), vec![1, 1]);
            }
        }
        m.insert(p("middle_block.1.proj_in.weight"), vec![1280, 1280]);
        let shapes = Shapes::from_map(m);
        let cfg = infer_unet_config(&shapes, Family::Sd2, HeadHints::default()).unwrap();
        assert_eq!(cfg.heads_per_block(), vec![5, 10, 20, 20]);
        assert!(cfg.use_linear_projection && cfg.upcast_attention);
        assert_eq!(cfg.cross_attention_dims(), vec![1024; 4]);
        assert_eq!(cfg.down_block_types[3], "DownBlock2D");
        assert_eq!(cfg.up_block_types[0], "UpBlock2D");
        let cfg = infer_unet_config(&shapes, Family::Sd1, HeadHints::default()).unwrap();
        assert_eq!(cfg.heads_per_block(), vec![8; 4]);
        let cfg = infer_unet_config(&shapes, Family::Sd1, HeadHints { num_heads: None, num_head_channels: Some(64) })
            .unwrap();
        assert_eq!(cfg.heads_per_block(), vec![5, 10, 20, 20]);
    }
}
