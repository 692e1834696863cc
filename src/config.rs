//! `sdtune.yaml`: the run's config in the working folder. Schema, defaults,
//! validation and the file's reading and writing; command-line flags are
//! applied over it by each command.
//!
//! Unknown keys and wrong types are errors that name the file, the line and
//! the expected form. Each section's schema lives with its owner
//! (`data::config`, `train::config`); this file holds the document.
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::config::DataConfig;
use crate::train::config::TrainConfig;

/// The config file's name in the working folder.
pub const CONFIG_FILE: &str = "sdtune.yaml";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A diffusers model folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub sample: SampleConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

/// Prompts and seeds for sample grids.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig { prompts: Vec::new(), seeds: vec![1, 2, 3, 4] }
    }
}

impl Config {
    /// Reads `path`; an error names the file, the line and what was expected.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// `sdtune.yaml` in `dir`, or `None` when there is none.
    pub fn load_from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(CONFIG_FILE);
        if !path.exists() {
            return Ok(None);
        }
        Self::load(&path).map(Some)
    }

    /// Parses YAML text that came from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let config: Config = serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))?;
        config.data.validate().with_context(|| format!("{} is not valid", path.display()))?;
        config.train.validate().with_context(|| format!("{} is not valid", path.display()))?;
        Ok(config)
    }

    /// The config as YAML, with a header saying what the file is.
    pub fn to_yaml(&self) -> Result<String> {
        let body = serde_yaml::to_string(self).context("cannot write the config as YAML")?;
        Ok(format!(
            "# sdtune run config; `sdtune prepare`, `train` and `sample` read it from this folder.\n\
             # Flags given on the command line override it for that run.\n{body}"
        ))
    }

    /// Writes the config to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_atomic(path, self.to_yaml()?.as_bytes())
    }
}

/// One sentence: `sdtune.yaml line 3: data.resolution: expected a whole number, got a string "big"`.
fn yaml_error(path: &Path, err: &serde_yaml::Error) -> anyhow::Error {
    let mut message = err.to_string();
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    let message = friendly_expectations(&message);
    match err.location() {
        Some(loc) => anyhow::anyhow!(
            "{} line {}, column {}: {message}; fix that line or delete the file to have prepare write a fresh one",
            path.display(),
            loc.line(),
            loc.column()
        ),
        None => anyhow::anyhow!(
            "{}: {message}; fix the file or delete it to have prepare write a fresh one",
            path.display()
        ),
    }
}

/// serde's Rust type names in plain words.
fn friendly_expectations(message: &str) -> String {
    let mut out = message.to_string();
    for (rust, plain) in [
        ("expected u32", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected a boolean", "expected true or false"),
        ("expected a string", "expected text"),
        ("expected a sequence", "expected a list"),
    ] {
        out = out.replace(rust, plain);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::config::Background;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("sdtune.yaml"))
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = parse("").unwrap();
        assert_eq!(c.data.resolution, 512);
        assert_eq!((c.data.min_bucket, c.data.max_bucket, c.data.bucket_step), (256, 1024, 64));
        assert_eq!(c.data.min_side, 256);
        assert_eq!(c.data.background, Background::WHITE);
    }

    #[test]
    fn round_trips() {
        let mut c = Config { model: Some("./sd15".into()), ..Config::default() };
        c.data.path = Some("photos".into());
        c.data.trigger = Some("brandx".into());
        c.data.background = Background([1, 2, 3]);
        c.sample.prompts = vec!["a photo of brandx".into()];
        let back = parse(&c.to_yaml().unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let err = parse("model: x\ndata:\n  resolutoin: 512\n").unwrap_err().to_string();
        assert!(err.contains("sdtune.yaml line 3"), "{err}");
        assert!(err.contains("unknown field `resolutoin`"), "{err}");
        assert!(err.contains("resolution"), "{err}");
    }

    #[test]
    fn wrong_type_says_what_was_expected() {
        let err = parse("data:\n  resolution: big\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("data.resolution"), "{err}");
        assert!(err.contains("expected a whole number"), "{err}");
        let err = parse("data:\n  background: mauve\n").unwrap_err().to_string();
        assert!(err.contains("#rrggbb"), "{err}");
    }

    #[test]
    fn invalid_buckets_are_refused() {
        let err = parse("data:\n  resolution: 2048\n").unwrap_err();
        assert!(format!("{err:#}").contains("outside the bucket range"), "{err:#}");
        let err = parse("data:\n  bucket_step: 60\n").unwrap_err();
        assert!(format!("{err:#}").contains("multiple of 8"), "{err:#}");
    }
}
