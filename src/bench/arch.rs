//! The model a benchmark runs: a named config with random weights
//! (`--arch tiny|sd15|sd21|sdxl`) or a diffusers folder (`--model`).
//!
//! `--dump-configs` writes the configs as diffusers reads them, so the
//! diffusers side of `scripts/bench-vs-diffusers.sh` builds the very same model.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::models::config::{ClipTextConfig, Prediction, SchedulerConfig, UNetConfig, VaeConfig};

/// Where the model comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Built from configs with random weights.
    Arch(String),
    /// A diffusers folder, loaded.
    Folder(PathBuf),
}

/// The configs of every component.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub source: Source,
    pub text: ClipTextConfig,
    /// SDXL's second text encoder (OpenCLIP bigG with projection).
    pub text_2: Option<ClipTextConfig>,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
}

impl ModelSpec {
    /// `tiny` (the sizes of the tests' tiny SD1 fixture), `sd15`, `sd21` or `sdxl` (base 1.0).
    pub fn arch(name: &str) -> Result<Self> {
        if name == "sdxl" {
            return Ok(ModelSpec {
                source: Source::Arch(name.into()),
                text: ClipTextConfig::sdxl_vit_l(),
                text_2: Some(ClipTextConfig::sdxl_bigg()),
                unet: UNetConfig::sdxl(),
                vae: VaeConfig::sdxl(),
                scheduler: SchedulerConfig::sd(Prediction::Epsilon),
            });
        }
        let (text, unet, vae, scheduler) = match name {
            "tiny" => (tiny_text(), tiny_unet(), tiny_vae(), SchedulerConfig::sd(Prediction::Epsilon)),
            "sd15" => (ClipTextConfig::sd15(), UNetConfig::sd15(), VaeConfig::sd(), SchedulerConfig::sd(Prediction::Epsilon)),
            "sd21" => (ClipTextConfig::sd21(), UNetConfig::sd21(), VaeConfig::sd(), SchedulerConfig::sd(Prediction::V)),
            other => bail!("--arch {other:?} is not one of tiny, sd15, sd21, sdxl"),
        };
        Ok(ModelSpec { source: Source::Arch(name.into()), text, text_2: None, unet, vae, scheduler })
    }

    /// The configs of a diffusers folder (its weights are loaded later).
    pub fn folder(dir: &Path) -> Result<Self> {
        crate::loaders::folder::check_is_diffusers_folder(dir)?;
        Ok(ModelSpec {
            source: Source::Folder(dir.to_path_buf()),
            text: ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?,
            text_2: match dir.join("text_encoder_2/config.json") {
                path if path.exists() => Some(ClipTextConfig::from_file(&path)?),
                _ => None,
            },
            unet: UNetConfig::from_file(&dir.join("unet/config.json"))?,
            vae: VaeConfig::from_file(&dir.join("vae/config.json"))?,
            scheduler: SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?,
        })
    }

    pub fn name(&self) -> String {
        match &self.source {
            Source::Arch(name) => name.clone(),
            Source::Folder(dir) => dir.display().to_string(),
        }
    }

    /// The resolution the model was trained at (`sample_size` latents x the VAE factor).
    pub fn native_resolution(&self) -> i64 {
        self.unet.sample_size.unwrap_or(64) * self.vae.scale_factor()
    }

    /// Latent [h, w] of a square image `resolution` pixels wide.
    pub fn latent_size(&self, resolution: i64) -> Result<(i64, i64)> {
        let f = self.vae.scale_factor();
        if resolution <= 0 || resolution % f != 0 {
            bail!("--resolution must be a positive multiple of {f} for this model, got {resolution}");
        }
        Ok((resolution / f, resolution / f))
    }

    /// Writes `unet.json`, `text_encoder.json` (and `text_encoder_2.json`
    /// for SDXL), `vae.json` and `scheduler.json` into `dir` (created), as diffusers/transformers
    /// `config.json` files: keys are diffusers' own.
    pub fn dump(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let write = |name: &str, value: Value| -> Result<()> {
            let path = dir.join(name);
            std::fs::write(&path, serde_json::to_string_pretty(&value)? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))
        };
        write("unet.json", serde_json::to_value(&self.unet)?)?;
        write("text_encoder.json", serde_json::to_value(&self.text)?)?;
        if let Some(text_2) = &self.text_2 {
            write("text_encoder_2.json", serde_json::to_value(text_2)?)?;
        }
        write("vae.json", serde_json::to_value(&self.vae)?)?;
        write("scheduler.json", serde_json::to_value(&self.scheduler)?)?;
        Ok(())
    }
}

/// The UNet of `tests/fixtures/tiny-sd1` (diffusers' tiny test pipeline sizes).
fn tiny_unet() -> UNetConfig {
    serde_json::from_value(serde_json::json!({
        "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [16, 32, 32], "layers_per_block": 2, "norm_num_groups": 8,
        "cross_attention_dim": 32, "attention_head_dim": 8
    }))
    .expect("the built-in tiny UNet config is valid")
}

fn tiny_text() -> ClipTextConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37,
        "num_hidden_layers": 3, "num_attention_heads": 4, "hidden_act": "quick_gelu",
        "projection_dim": 32, "eos_token_id": 49407
    }))
    .expect("the built-in tiny text encoder config is valid")
}

fn tiny_vae() -> VaeConfig {
    serde_json::from_value(serde_json::json!({
        "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "latent_channels": 4, "sample_size": 64, "scaling_factor": 0.18215
    }))
    .expect("the built-in tiny VAE config is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_matches_the_fixture_sizes() {
        let spec = ModelSpec::arch("tiny").unwrap();
        assert_eq!(spec.native_resolution(), 64);
        assert_eq!(spec.latent_size(256).unwrap(), (32, 32));
        let sd15 = ModelSpec::arch("sd15").unwrap();
        assert_eq!(sd15.native_resolution(), 512);
        let sdxl = ModelSpec::arch("sdxl").unwrap();
        assert_eq!(sdxl.native_resolution(), 1024);
        assert_eq!(sdxl.text_2.as_ref().map(|t| t.hidden_size), Some(1280));
    }
}
