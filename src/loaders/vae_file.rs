//! A VAE swapped in for the model's own (`--vae PATH`, as A1111's VAE
//! setting): a diffusers `vae/` folder (`config.json` + weights), or one
//! safetensors file in diffusers' names (the fp16-fix VAE's
//! `diffusion_pytorch_model.safetensors`) or LDM's (`encoder.down.0.block.0...`,
//! A1111's `*.vae.safetensors`, with or without `first_stage_model.`).
//!
//! A file's architecture comes from a VAE `config.json` beside it, else from
//! its tensors; its latent scale and fp16 upcast then stay the model's (the
//! latents must mean what the UNet was trained on).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind};

use super::folder::load_vae;
use super::ldm_names::{vae_ldm_name, VAE_PREFIX};
use super::single_file::{check_norm_groups, infer_vae_config, load_ldm_vae, Shapes};
use super::tensor_file::TensorFile;
use super::weights::component_weights;
use crate::models::built::Built;
use crate::models::config::VaeConfig;
use crate::models::vae::AutoencoderKL;

/// Where the swapped-in weights are and how they are named.
#[derive(Clone, Debug)]
enum Naming {
    /// diffusers names, in one file or a folder's shards.
    Diffusers(Vec<PathBuf>),
    /// LDM names under this prefix, in one file.
    Ldm(PathBuf, String),
}

/// A VAE given with `--vae`, ready to load.
#[derive(Clone, Debug)]
pub struct VaeSwap {
    pub path: PathBuf,
    pub config: VaeConfig,
    /// Every file the latents depend on (config and weights): its identity.
    pub files: Vec<PathBuf>,
    naming: Naming,
}

const DIFFUSERS_PROBE: &str = "encoder.down_blocks.0.resnets.0.conv1.weight";
const LDM_PROBE: &str = "encoder.down.0.block.0.conv1.weight";

impl VaeSwap {
    /// Reads what `path` holds; `base` is the model's own VAE config.
    pub fn open(path: &Path, base: &VaeConfig) -> Result<Self> {
        let shown = path.display();
        if path.is_dir() {
            let config_path = path.join("config.json");
            if !config_path.is_file() {
                bail!("{shown} has no config.json, so it is not a diffusers VAE folder; pass --vae a vae/ folder or a VAE .safetensors file");
            }
            let config = VaeConfig::from_file(&config_path)?;
            let weights = component_weights(path, "diffusion_pytorch_model", None)?;
            let files = std::iter::once(config_path).chain(weights.iter().cloned()).collect();
            return Self::checked(path, config, files, Naming::Diffusers(weights), base);
        }
        if !path.is_file() {
            bail!("{shown} does not exist; pass --vae a diffusers vae/ folder or a VAE .safetensors file");
        }
        if path.extension().is_none_or(|e| e != "safetensors") {
            bail!("{shown} is not a .safetensors file; sdtune reads VAEs only as safetensors (pickles can run code)");
        }
        let file = TensorFile::open(path)?;
        let names = file.names();
        let naming = if names.iter().any(|n| n == DIFFUSERS_PROBE) {
            Naming::Diffusers(vec![path.to_path_buf()])
        } else if let Some(prefix) = ["", VAE_PREFIX].into_iter().find(|p| names.contains(&format!("{p}{LDM_PROBE}"))) {
            Naming::Ldm(path.to_path_buf(), prefix.to_string())
        } else {
            bail!("{shown} holds no VAE encoder ({DIFFUSERS_PROBE} or {LDM_PROBE}); pass --vae a VAE file or a diffusers vae/ folder");
        };
        let beside = path.with_file_name("config.json");
        let (config, mut files) = match beside.is_file().then(|| VaeConfig::from_file(&beside)).transpose() {
            Ok(Some(config)) => (config, vec![beside]),
            _ => (inferred(&file, &naming, base).with_context(|| format!("{shown} cannot be used as the VAE"))?, Vec::new()),
        };
        files.push(path.to_path_buf());
        Self::checked(path, config, files, naming, base)
    }

    fn checked(path: &Path, config: VaeConfig, files: Vec<PathBuf>, naming: Naming, base: &VaeConfig) -> Result<Self> {
        if config.latent_channels != base.latent_channels {
            bail!(
                "{} is a VAE with {} latent channels but the model's UNet works on {}; pass --vae a VAE made for this model",
                path.display(),
                config.latent_channels,
                base.latent_channels
            );
        }
        Ok(VaeSwap { path: path.to_path_buf(), config, files, naming })
    }

    pub fn load(&self, device: Device, kind: Kind) -> Result<Built<AutoencoderKL>> {
        match &self.naming {
            Naming::Diffusers(files) => load_vae(files, device, kind, &self.config),
            Naming::Ldm(file, prefix) => load_ldm_vae(&TensorFile::open(file)?, &self.config, prefix, device, kind),
        }
    }
}

/// The config a VAE file's tensors describe, with the model's latent scale
/// and upcast rule.
fn inferred(file: &TensorFile, naming: &Naming, base: &VaeConfig) -> Result<VaeConfig> {
    let names = file.names();
    let blocks = (0..).take_while(|i| names.contains(&format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))).count();
    let mut shapes = BTreeMap::new();
    for name in names.iter().cloned() {
        let Some(info) = file.info(&name) else { continue };
        let shape = info.shape.iter().map(|&d| d as i64).collect();
        let ldm = match naming {
            Naming::Diffusers(_) => vae_ldm_name(&name, blocks),
            Naming::Ldm(_, prefix) => name.strip_prefix(prefix.as_str()).map(str::to_string),
        };
        if let Some(ldm) = ldm {
            shapes.insert(format!("{VAE_PREFIX}{ldm}"), shape);
        }
    }
    let mut cfg = infer_vae_config(&Shapes::from_map(shapes), Some(base.scaling_factor), base.sample_size.unwrap_or(512))?;
    check_norm_groups("VAE", &cfg.block_out_channels, cfg.norm_num_groups, "config.json beside the VAE file")?;
    cfg.shift_factor = base.shift_factor;
    cfg.force_upcast = base.force_upcast;
    Ok(cfg)
}
