//! The `config.json` of each diffusers component, read as diffusers reads it.
//!
//! Sizes always come from these files; nothing here is one model's numbers,
//! except the named constructors used to build random-weight models
//! (`UNetConfig::sd15()`, ...) for benchmarks.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Reads a JSON config, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!("{} is not a valid config file; it should be the config.json diffusers saved", path.display())
    })
}

/// A config value given either once for all blocks or per block.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `blocks` blocks.
    pub fn expand(&self, blocks: usize) -> Vec<T> {
        match self {
            PerBlock::One(v) => vec![v.clone(); blocks],
            PerBlock::Each(v) => v.clone(),
        }
    }
}

fn default_silu() -> String {
    "silu".into()
}
fn default_true() -> bool {
    true
}
fn default_one() -> i64 {
    1
}
fn default_norm_groups() -> i64 {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_three() -> i64 {
    3
}
fn default_transformer_layers() -> PerBlock<i64> {
    PerBlock::One(1)
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_resnet_time_scale_shift() -> String {
    "default".into()
}

/// `unet/config.json` of a `UNet2DConditionModel`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct UNetConfig {
    #[serde(default)]
    pub sample_size: Option<i64>,
    pub in_channels: i64,
    pub out_channels: i64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: i64,
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: PerBlock<i64>,
    #[serde(default = "default_one")]
    pub downsample_padding: i64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_norm_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<i64>,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock<i64>,
    /// SD1/SD2 configs give the head *count* here (a long-standing diffusers
    /// misnomer); `num_attention_heads` overrides it when present.
    pub attention_head_dim: PerBlock<i64>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<i64>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: Option<PerBlock<bool>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    #[serde(default = "default_resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "default_three")]
    pub conv_in_kernel: i64,
    #[serde(default = "default_three")]
    pub conv_out_kernel: i64,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    /// Options SD1/SD2 leave at their defaults; read so that a model which
    /// changes them is refused instead of silently computed wrong.
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub mid_block_scale_factor: Option<f64>,
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default)]
    pub resnet_out_scale_factor: Option<f64>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.check().with_context(|| format!("{} describes a UNet sdtune cannot build", path.display()))?;
        Ok(cfg)
    }

    /// Rejects what this UNet code does not implement, in words.
    pub fn check(&self) -> Result<()> {
        if let Some(kind) = self.class_embed_type.as_deref() {
            bail!("class embeddings (class_embed_type {kind:?}) are not supported");
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                if self.addition_time_embed_dim.is_none_or(|d| d <= 0) || self.projection_class_embeddings_input_dim.is_none_or(|d| d <= 0) {
                    bail!("addition_embed_type \"text_time\" needs positive addition_time_embed_dim and projection_class_embeddings_input_dim");
                }
            }
            Some(other) => bail!("addition_embed_type {other:?} is not supported (only SDXL's \"text_time\")"),
        }
        if self.dual_cross_attention {
            bail!("dual cross-attention is not supported");
        }
        let unsupported = [
            ("center_input_sample", self.center_input_sample),
            ("mid_block_scale_factor", self.mid_block_scale_factor.is_some_and(|v| v != 1.0)),
            ("time_embedding_dim", self.time_embedding_dim.is_some()),
            ("time_embedding_act_fn", self.time_embedding_act_fn.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
            ("resnet_skip_time_act", self.resnet_skip_time_act),
            ("resnet_out_scale_factor", self.resnet_out_scale_factor.is_some_and(|v| v != 1.0)),
            ("reverse_transformer_layers_per_block", self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null())),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, set)| *set) {
            bail!("{key} is set to a non-default value, which this UNet code does not implement");
        }
        if self.resnet_time_scale_shift != "default" {
            bail!("resnet_time_scale_shift {:?} is not supported", self.resnet_time_scale_shift);
        }
        let blocks = self.block_out_channels.len();
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            bail!("down_block_types, up_block_types and block_out_channels must have the same length");
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(
                t.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                bail!("block type {t} is not supported");
            }
        }
        if let Some(mid) = &self.mid_block_type {
            if mid != "UNetMidBlock2DCrossAttn" {
                bail!("mid block type {mid} is not supported");
            }
        }
        Ok(())
    }

    /// Attention heads per down block (the config's `attention_head_dim`
    /// is the head count for SD1/SD2, as diffusers interprets it).
    pub fn heads_per_block(&self) -> Vec<i64> {
        let heads = self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim);
        heads.expand(self.block_out_channels.len())
    }

    pub fn layers_per_block(&self) -> Vec<i64> {
        self.layers_per_block.expand(self.block_out_channels.len())
    }

    pub fn cross_attention_dims(&self) -> Vec<i64> {
        self.cross_attention_dim.expand(self.block_out_channels.len())
    }

    pub fn transformer_layers(&self) -> Vec<i64> {
        self.transformer_layers_per_block.expand(self.block_out_channels.len())
    }

    /// Whether the UNet takes SDXL's added conditioning (a pooled text
    /// embedding and six size/crop time ids) besides the text states.
    pub fn takes_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// The SD1.5 UNet, for random-weight benchmarks.
    pub fn sd15() -> Self {
        serde_json::from_value(serde_json::json!({
            "sample_size": 64, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "cross_attention_dim": 768, "attention_head_dim": 8
        }))
        .expect("the built-in SD1.5 UNet config is valid")
    }

    /// The SD2.1 (768, v-prediction) UNet, for random-weight benchmarks.
    pub fn sd21() -> Self {
        serde_json::from_value(serde_json::json!({
            "sample_size": 96, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": true, "upcast_attention": true
        }))
        .expect("the built-in SD2.1 UNet config is valid")
    }

    /// The SDXL base 1.0 UNet (2.6 B parameters), for random-weight benchmarks.
    pub fn sdxl() -> Self {
        serde_json::from_value(serde_json::json!({
            "sample_size": 128, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
            "use_linear_projection": true,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816
        }))
        .expect("the built-in SDXL UNet config is valid")
    }
}

fn default_scaling_factor() -> f64 {
    0.18215
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: i64,
    #[serde(default = "default_three")]
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    #[serde(default = "default_one")]
    pub layers_per_block: i64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    pub latent_channels: i64,
    #[serde(default = "default_norm_groups")]
    pub norm_num_groups: i64,
    #[serde(default)]
    pub sample_size: Option<i64>,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub force_upcast: Option<bool>,
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// Pixels per latent along each side: 2^(blocks - 1), 8 for SD.
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() as i64 - 1)
    }

    /// The SD1/SD2 VAE, for random-weight benchmarks.
    pub fn sd() -> Self {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215
        }))
        .expect("the built-in SD VAE config is valid")
    }

    /// SDXL's VAE: SD's layout with its own scaling factor; fp16 needs the upcast.
    pub fn sdxl() -> Self {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025,
            "force_upcast": true
        }))
        .expect("the built-in SDXL VAE config is valid")
    }
}

fn default_quick_gelu() -> String {
    "quick_gelu".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_positions() -> i64 {
    77
}
fn default_eos() -> i64 {
    2
}

/// `text_encoder/config.json` of a `CLIPTextModel`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<i64>,
    /// transformers pools at the first EOS id when this is not the legacy 2,
    /// else at the argmax of the ids.
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    /// `["CLIPTextModelWithProjection"]` for SDXL's second encoder, whose
    /// pooled output goes through `text_projection`.
    #[serde(default)]
    pub architectures: Vec<String>,
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// Whether the model has a `text_projection` (transformers'
    /// `CLIPTextModelWithProjection`).
    pub fn with_projection(&self) -> bool {
        self.architectures.iter().any(|a| a == "CLIPTextModelWithProjection")
    }

    /// The SD1 text encoder (OpenAI CLIP ViT-L/14), for random-weight benchmarks.
    pub fn sd15() -> Self {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu",
            "projection_dim": 768, "eos_token_id": 49407
        }))
        .expect("the built-in SD1.5 text encoder config is valid")
    }

    /// The SD2 text encoder (OpenCLIP ViT-H, penultimate layer), for benchmarks.
    pub fn sd21() -> Self {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 23, "num_attention_heads": 16, "hidden_act": "gelu",
            "projection_dim": 512, "eos_token_id": 49407
        }))
        .expect("the built-in SD2.1 text encoder config is valid")
    }

    /// SDXL's first text encoder: CLIP ViT-L/14 as SDXL base ships it
    /// (legacy special-token ids), for benchmarks.
    pub fn sdxl_vit_l() -> Self {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu",
            "projection_dim": 768, "eos_token_id": 2,
            "architectures": ["CLIPTextModel"]
        }))
        .expect("the built-in SDXL text encoder config is valid")
    }

    /// SDXL's second text encoder: OpenCLIP ViT-bigG/14 with its projection, for benchmarks.
    pub fn sdxl_bigg() -> Self {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
            "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu",
            "projection_dim": 1280, "eos_token_id": 2,
            "architectures": ["CLIPTextModelWithProjection"]
        }))
        .expect("the built-in SDXL second text encoder config is valid")
    }
}

fn default_train_steps() -> i64 {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_beta_schedule() -> String {
    "scaled_linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_spacing() -> String {
    "leading".into()
}

/// `scheduler/scheduler_config.json`: the training noise schedule plus the
/// sampler options diffusers schedulers read from it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: i64,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: i64,
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// PNDM only: skip the Runge-Kutta warm-up (SD1.x's own PNDM config sets it).
    #[serde(default)]
    pub skip_prk_steps: bool,
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.prediction().with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    pub fn prediction(&self) -> Result<Prediction> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::V),
            "sample" => Ok(Prediction::Sample),
            other => bail!("prediction_type {other:?} is not one of epsilon, v_prediction, sample"),
        }
    }

    /// SD1/SD2 training schedule with the given prediction type.
    pub fn sd(prediction: Prediction) -> Self {
        serde_json::from_value(serde_json::json!({
            "prediction_type": prediction.as_config_str(),
            "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false
        }))
        .expect("the built-in SD scheduler config is valid")
    }
}

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
    Sample,
}

impl Prediction {
    pub fn as_config_str(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v_prediction",
            Prediction::Sample => "sample",
        }
    }
}

/// `model_index.json` of a diffusers pipeline folder (only what we need).
#[derive(Clone, Debug, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// SDXL pipelines: with no negative prompt, guidance uses zero
    /// conditioning (diffusers' default for them is true).
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
}

impl ModelIndex {
    pub fn is_sdxl(&self) -> bool {
        self.class_name == "StableDiffusionXLPipeline"
    }
}
