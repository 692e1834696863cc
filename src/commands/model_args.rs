//! The flags that choose the model and how it runs, shared by `sdtune
//! sample` and `sdtune serve` (flattened into both, under one heading).
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tch::Device;

use crate::loaders::source::{parse_prediction, LoadOptions};
use crate::runtime::{parse_device, Precision};

#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Model")]
pub struct ModelArgs {
    /// The model: a diffusers folder (holding model_index.json), a single-file
    /// .safetensors checkpoint (A1111/civitai: SD1.x, SD2.x or SDXL), or a Hugging
    /// Face id (org/name) found in the local Hugging Face cache. Pickles (.ckpt,
    /// .pt, .bin) are refused. A single file reads configs from a folder or
    /// NAME.yaml named like it, when present.
    /// [default: sdtune.yaml's model, else the built-in tiny model; with
    /// `sample --from`, the one the image was made with]
    #[arg(long, value_name = "DIR|FILE|ID")]
    pub model: Option<PathBuf>,
    /// Weight variant of a diffusers folder or Hub id, e.g. fp16 (*.fp16.safetensors).
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// Another VAE instead of the model's: a diffusers vae/ folder, or one VAE
    /// .safetensors file in diffusers' or LDM names (e.g. the fp16-fix SDXL VAE).
    /// It changes the model hash the images record.
    #[arg(long, value_name = "DIR|FILE")]
    pub vae: Option<PathBuf>,
    /// What the UNet predicts: epsilon or v [default: the model's config; for a
    /// single file without one, epsilon for SD1 and v for SD2, with a warning].
    #[arg(long, value_name = "epsilon|v")]
    pub prediction_type: Option<String>,
    /// Decode in overlapping tiles of the VAE's own size, blended (diffusers'
    /// enable_tiling): a 2048 px image then fits in a few GB; pixels near the
    /// seams differ slightly from an untiled decode (each image records it).
    /// Images that fit one tile are unchanged.
    #[arg(long)]
    pub vae_tiling: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weight precision: fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32")]
    pub precision: String,
}

impl ModelArgs {
    /// How the model's files are read (variant, prediction type, VAE).
    pub fn load_options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            variant: self.variant.clone(),
            prediction_type: self.prediction_type.as_deref().map(parse_prediction).transpose()?,
            vae: self.vae.clone(),
        })
    }

    pub fn precision(&self) -> Result<Precision> {
        Precision::parse(&self.precision)
    }

    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }
}
