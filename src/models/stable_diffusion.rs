//! A whole Stable Diffusion model: tokenizer, text encoder, UNet, VAE and
//! the training noise schedule, loaded from a diffusers folder or built
//! from configs with random weights.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind};

use super::clip::ClipTextModel;
use super::config::{ClipTextConfig, ModelIndex, SchedulerConfig, UNetConfig, VaeConfig};
use super::layers::WeightInit;
use super::load::{build, build_and_load, component_weights, Built};
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKL;

/// Where and in what precision to put the model.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub device: Device,
    /// Kind of the frozen UNet and text encoder weights.
    pub kind: Kind,
    /// Kind of the VAE weights (fp16 VAEs overflow; callers may keep fp32).
    pub vae_kind: Kind,
}

impl Placement {
    pub fn cpu_f32() -> Self {
        Placement { device: Device::Cpu, kind: Kind::Float, vae_kind: Kind::Float }
    }
}

pub struct StableDiffusion {
    /// The folder it came from, or `None` when built from configs.
    pub source: Option<PathBuf>,
    pub tokenizer: Option<ClipTokenizer>,
    pub text_encoder: Built<ClipTextModel>,
    pub text_config: ClipTextConfig,
    pub unet: Built<UNet2DConditionModel>,
    pub unet_config: UNetConfig,
    pub vae: Built<AutoencoderKL>,
    pub vae_config: VaeConfig,
    pub scheduler: SchedulerConfig,
}

impl StableDiffusion {
    /// Loads a diffusers pipeline folder (`model_index.json` + components).
    pub fn from_diffusers_folder(dir: &Path, placement: Placement, variant: Option<&str>) -> Result<Self> {
        check_is_diffusers_folder(dir)?;
        let text_config = ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?;
        let unet_config = UNetConfig::from_file(&dir.join("unet/config.json"))?;
        let vae_config = VaeConfig::from_file(&dir.join("vae/config.json"))?;
        let scheduler = SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        let tokenizer = ClipTokenizer::from_folder(&dir.join("tokenizer"))?;

        let files = component_weights(&dir.join("text_encoder"), "model", variant)?;
        let text_encoder = build_and_load(&files, placement.device, placement.kind, |vb| {
            ClipTextModel::new(vb, &text_config)
        })?;
        let files = component_weights(&dir.join("unet"), "diffusion_pytorch_model", variant)?;
        let unet = build_and_load(&files, placement.device, placement.kind, |vb| {
            UNet2DConditionModel::new(vb, &unet_config)
        })?;
        let files = component_weights(&dir.join("vae"), "diffusion_pytorch_model", variant)?;
        // Accepts both VAE attention namings (to_q/... and query/...).
        let vae = AutoencoderKL::load(&files, placement.device, placement.vae_kind, &vae_config)?;
        Ok(StableDiffusion {
            source: Some(dir.to_path_buf()),
            tokenizer: Some(tokenizer),
            text_encoder,
            text_config,
            unet,
            unet_config,
            vae,
            vae_config,
            scheduler,
        })
    }

    /// Builds every component from configs with random weights (benchmarks).
    pub fn random(
        text_config: ClipTextConfig,
        unet_config: UNetConfig,
        vae_config: VaeConfig,
        scheduler: SchedulerConfig,
        placement: Placement,
    ) -> Result<Self> {
        let text_encoder = build(placement.device, placement.kind, WeightInit::Random, |vb| {
            ClipTextModel::new(vb, &text_config)
        })?;
        let unet = build(placement.device, placement.kind, WeightInit::Random, |vb| {
            UNet2DConditionModel::new(vb, &unet_config)
        })?;
        let vae = build(placement.device, placement.vae_kind, WeightInit::Random, |vb| {
            AutoencoderKL::new(vb, &vae_config)
        })?;
        Ok(StableDiffusion {
            source: None,
            tokenizer: None,
            text_encoder,
            text_config,
            unet,
            unet_config,
            vae,
            vae_config,
            scheduler,
        })
    }

    pub fn device(&self) -> Device {
        self.unet.vs.device()
    }

    pub fn tokenizer(&self) -> Result<&ClipTokenizer> {
        self.tokenizer.as_ref().context("this model was built without a tokenizer")
    }
}

/// One sentence when `dir` is not a diffusers pipeline folder.
pub fn check_is_diffusers_folder(dir: &Path) -> Result<()> {
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
    let parsed: ModelIndex = super::config::read_json(&index)?;
    if !parsed.class_name.starts_with("StableDiffusion") || parsed.class_name.contains("XL") {
        bail!(
            "{} describes a {} model; sdtune supports Stable Diffusion 1.x and 2.x pipelines",
            index.display(),
            parsed.class_name
        );
    }
    for part in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        if !dir.join(part).is_dir() {
            bail!("{} has no {part}/ folder; the model folder is incomplete", dir.display());
        }
    }
    Ok(())
}
