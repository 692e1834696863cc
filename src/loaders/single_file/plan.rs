//! Everything needed to build a single file's model, settled before any
//! weight is read.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::beside::{choose_prediction, Beside, PredictionSource};
use super::detect::{detect, Family, Layout, Shapes};
use super::infer::{check_norm_groups, infer_text_config, infer_text_config_2, infer_unet_config, infer_vae_config};
use crate::loaders::hub;
use crate::loaders::tensor_file::TensorFile;
use crate::models::config::{ClipTextConfig, Prediction, SchedulerConfig, UNetConfig, VaeConfig};

/// Everything needed to build the model of a single file, before any weight is read.
#[derive(Clone, Debug)]
pub struct Plan {
    pub path: PathBuf,
    pub layout: Layout,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text: ClipTextConfig,
    /// SDXL's second text encoder (OpenCLIP bigG with projection).
    pub text_2: Option<ClipTextConfig>,
    pub scheduler: SchedulerConfig,
    pub prediction_source: PredictionSource,
    pub warnings: Vec<String>,
    /// Where the tokenizer is, when known without a hub lookup.
    pub tokenizer_dir: Option<PathBuf>,
    /// SDXL's second tokenizer (`tokenizer_2/` beside the file).
    pub tokenizer_dir_2: Option<PathBuf>,
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
        let image_size = match layout.family {
            Family::Sdxl => 1024,
            Family::Sd2 if prediction == Prediction::V => 768,
            _ => 512,
        };
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
                // SDXL's VAE has the same layout as SD's but its own latent scale.
                let family_scale = (layout.family == Family::Sdxl).then_some(0.13025);
                let scale = beside.yaml.as_ref().and_then(|y| y.scale_factor).or(family_scale);
                let cfg = infer_vae_config(&shapes, scale, image_size).map_err(in_file)?;
                check_norm_groups("VAE", &cfg.block_out_channels, cfg.norm_num_groups, "vae/config.json")
                    .map_err(in_file)?;
                cfg
            }
        };
        let text = match beside.file("text_encoder/config.json") {
            Some(p) => ClipTextConfig::from_file(&p)?,
            None => infer_text_config(&shapes, &layout, None).map_err(in_file)?,
        };
        let text_2 = match (layout.family, beside.file("text_encoder_2/config.json")) {
            (Family::Sdxl, Some(p)) => Some(ClipTextConfig::from_file(&p)?),
            (Family::Sdxl, None) => Some(infer_text_config_2(&shapes, None).map_err(in_file)?),
            _ => None,
        };
        let mut scheduler = scheduler_cfg.unwrap_or_else(|| {
            // SDXL base's Euler config spaces its inference steps "leading".
            let mut s = SchedulerConfig::sd(prediction);
            if layout.family == Family::Sdxl {
                s.timestep_spacing = "leading".into();
            }
            if let Some(y) = &beside.yaml {
                s.beta_start = y.linear_start.unwrap_or(s.beta_start);
                s.beta_end = y.linear_end.unwrap_or(s.beta_end);
                s.num_train_timesteps = y.timesteps.unwrap_or(s.num_train_timesteps);
            }
            s
        });
        scheduler.prediction_type = prediction.as_config_str().to_string();
        let tokenizer_dir = beside.folder.as_ref().map(|f| f.join("tokenizer")).filter(|d| d.is_dir());
        let tokenizer_dir_2 = beside.folder.as_ref().map(|f| f.join("tokenizer_2")).filter(|d| d.is_dir());
        Ok(Plan {
            path: path.to_path_buf(),
            layout,
            unet,
            vae,
            text,
            text_2,
            scheduler,
            prediction_source,
            warnings: warning.into_iter().collect(),
            tokenizer_dir,
            tokenizer_dir_2,
        })
    }
}

impl Plan {
    /// The tokenizer folder: the one beside the file, else the family's
    /// tokenizer in the local Hugging Face cache. `second`: SDXL's `tokenizer_2`.
    pub fn find_tokenizer(&self, second: bool) -> Result<PathBuf> {
        let beside = if second { &self.tokenizer_dir_2 } else { &self.tokenizer_dir };
        if let Some(dir) = beside {
            return Ok(dir.clone());
        }
        let repos = match (self.layout.family, second) {
            (Family::Sdxl, false) => hub::SDXL_TOKENIZER_REPOS,
            (Family::Sdxl, true) => hub::SDXL_TOKENIZER_2_REPOS,
            (family, _) => hub::tokenizer_repos(family == Family::Sd2),
        };
        let folder = if second { "tokenizer_2/" } else { "tokenizer/" };
        hub::find_tokenizer(repos).map_err(|e| {
            e.context(format!(
                "{} holds no tokenizer, and a folder {} with a {folder} beside it would do",
                self.path.display(),
                self.path.with_extension("").display()
            ))
        })
    }
}
