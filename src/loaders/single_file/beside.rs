//! Configs beside a single file (`NAME/`, `NAME.yaml`) and the choice of
//! its prediction type.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::detect::Family;
use super::infer::HeadHints;
use crate::models::config::{Prediction, SchedulerConfig};

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
        // SDXL base predicts epsilon; v-prediction finetunes say so in metadata or need the flag.
        Family::Sd1 | Family::Sdxl => (Prediction::Epsilon, PredictionSource::Guess, None),
        Family::Sd2 => (
            Prediction::V,
            PredictionSource::Guess,
            Some(
                "this is a Stable Diffusion 2.x checkpoint with no config saying what it predicts, so sdtune takes it as a 768-px v-prediction model; for an SD2 base (512 px) model pass --prediction-type epsilon, else images come out as noise".into(),
            ),
        ),
    })
}
