//! Single-file checkpoints in the original LDM layout (A1111, civitai,
//! `v1-5-pruned-emaonly.safetensors`): `model.diffusion_model.*` (UNet),
//! `first_stage_model.*` (VAE) and `cond_stage_model.*` (text encoder) in one
//! safetensors file, or SDXL's SGM layout (`conditioner.embedders.0.transformer.*`
//! CLIP ViT-L, `conditioner.embedders.1.model.*` OpenCLIP bigG), as diffusers' `single_file_utils.py` reads them
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
//! - Rules otherwise: SD1 has 8 heads per block, SD2 and SDXL 64-wide heads;
//!   LDM norms have 32 groups; SD1 and SDXL predict epsilon (v-prediction
//!   SDXL files need `--prediction-type v`); SD2 files are taken as the
//!   768 v-prediction models, with a warning (SD2 base models are epsilon).
pub mod beside;
pub mod census;
pub mod detect;
pub mod export;
pub mod fill;
pub mod infer;
pub mod plan;

pub use beside::{choose_prediction, Beside, LdmYaml, PredictionSource};
pub use census::{census, Census};
pub use detect::{detect, ignored_text_tensor, Family, Layout, Shapes};
pub use crate::loaders::file_kind::is_ldm;
pub use export::to_ldm;
pub use fill::{load_ldm_vae, load_text_encoder, load_text_encoder_2, load_unet, load_vae};
pub use infer::{
    check_norm_groups, infer_text_config, infer_text_config_2, infer_unet_config, infer_vae_config, HeadHints,
};
pub use plan::Plan;

