//! A whole Stable Diffusion model: its text stack (tokenizers + text
//! encoders), UNet, VAE and the training noise schedule, wherever its weights came from (see
//! `loaders`), or built from configs with random weights.
use std::path::PathBuf;

use anyhow::{bail, Result};
use tch::{Device, Kind};

use super::clip::ClipTextModel;
use super::built::{build, Built};
use super::config::{ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
use super::layers::WeightInit;
use super::text_stack::{TextEncoder, TextStack};
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
    /// The folder or file it came from, or `None` when built from configs.
    pub source: Option<PathBuf>,
    pub text: TextStack,
    pub unet: Built<UNet2DConditionModel>,
    pub unet_config: UNetConfig,
    pub vae: Built<AutoencoderKL>,
    pub vae_config: VaeConfig,
    pub scheduler: SchedulerConfig,
}

/// A model's loaded parts, before they are checked to fit each other.
pub struct Parts {
    pub source: Option<PathBuf>,
    pub text: TextStack,
    pub unet: Built<UNet2DConditionModel>,
    pub unet_config: UNetConfig,
    pub vae: Built<AutoencoderKL>,
    pub vae_config: VaeConfig,
    pub scheduler: SchedulerConfig,
}

impl StableDiffusion {
    /// The one place a model is put together, wherever its parts came from
    /// (a diffusers folder, a single file, the Hub cache, the built-in
    /// model, random weights): errs in one sentence when they do not fit.
    pub fn assemble(parts: Parts) -> Result<Self> {
        let from = parts.source.as_ref().map_or("the model".to_string(), |p| p.display().to_string());
        let text_width = parts.text.hidden_size();
        if let Some(width) = parts.unet_config.cross_attention_dims().into_iter().find(|&w| w != text_width) {
            bail!(
                "{from}: the UNet's cross-attention is {width} wide but its text encoder gives {text_width}-wide states; the UNet and the text encoder come from different models"
            );
        }
        if parts.unet.model.pooled_dim() != parts.text.pooled_size() {
            let said = |d: Option<i64>| d.map_or("none".to_string(), |d| format!("{d} wide"));
            bail!(
                "{from}: the UNet takes a pooled text embedding of {} but the text encoders give {}; the UNet and the text encoders come from different models",
                said(parts.unet.model.pooled_dim()),
                said(parts.text.pooled_size())
            );
        }
        if parts.unet_config.in_channels != parts.vae_config.latent_channels {
            bail!(
                "{from}: the UNet takes {}-channel latents but the VAE makes {}-channel ones; the UNet and the VAE come from different models",
                parts.unet_config.in_channels,
                parts.vae_config.latent_channels
            );
        }
        Ok(StableDiffusion {
            source: parts.source,
            text: parts.text,
            unet: parts.unet,
            unet_config: parts.unet_config,
            vae: parts.vae,
            vae_config: parts.vae_config,
            scheduler: parts.scheduler,
        })
    }

    /// Builds every component from configs with random weights (benchmarks).
    /// Random weights from configs: one text encoder (SD1, SD2) or two
    /// (SDXL: the last with its projection). Tokenizers are left to the caller.
    pub fn random(
        text_configs: Vec<ClipTextConfig>,
        unet_config: UNetConfig,
        vae_config: VaeConfig,
        scheduler: SchedulerConfig,
        placement: Placement,
    ) -> Result<Self> {
        let two = text_configs.len() == 2;
        let mut encoders = Vec::with_capacity(text_configs.len());
        for config in text_configs {
            let model = build(placement.device, placement.kind, WeightInit::Random, |vb| ClipTextModel::new(vb, &config))?;
            encoders.push(TextEncoder { tokenizer: None, model, config });
        }
        let unet = build(placement.device, placement.kind, WeightInit::Random, |vb| {
            UNet2DConditionModel::new(vb, &unet_config)
        })?;
        let vae = build(placement.device, placement.vae_kind, WeightInit::Random, |vb| {
            AutoencoderKL::new(vb, &vae_config)
        })?;
        // SDXL base's `force_zeros_for_empty_prompt` is true.
        let text = if two { TextStack::sdxl(encoders, true)? } else { TextStack::new(encoders)? };
        Self::assemble(Parts { source: None, text, unet, unet_config, vae, vae_config, scheduler })
    }

    pub fn device(&self) -> Device {
        self.unet.vs.device()
    }

    /// The tokenizer of the first text encoder.
    pub fn tokenizer(&self) -> Result<&ClipTokenizer> {
        self.text.first().tokenizer()
    }
}
