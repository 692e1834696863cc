//! Everything needed to build a single file's model, settled before any
//! weight is read.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::beside::{choose_prediction, Beside, PredictionSource};
use super::detect::{detect, Family, Layout, Shapes};
use super::infer::{check_norm_groups, infer_text_config, infer_unet_config, infer_vae_config};
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

impl Plan {
    /// The tokenizer folder: the one beside the file, else the family's
    /// tokenizer in the local Hugging Face cache.
    pub fn find_tokenizer(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.tokenizer_dir {
            return Ok(dir.clone());
        }
        hub::find_tokenizer(hub::tokenizer_repos(self.layout.family == Family::Sd2)).map_err(|e| {
            e.context(format!(
                "{} holds no tokenizer, and a folder {} with a tokenizer/ beside it would do",
                self.path.display(),
                self.path.with_extension("").display()
            ))
        })
    }
}
