//! `sdtune.yaml`: the run's config in the working folder. Schema, defaults,
//! validation and the file's reading and writing; command-line flags are
//! applied over it by each command.
//!
//! Unknown keys and wrong types are errors that name the file, the line and
//! the expected form. Each section's schema lives with its owner
//! (`data::config`, `train::config`); this file holds the document.
use std::path::Path;

use anyhow::{bail, Context, Result};
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
    /// A VAE used instead of the model's (a diffusers vae/ folder or a VAE
    /// .safetensors file): prepare encodes the images with it, and train's
    /// sample grids decode with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
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
    /// Prompts the LoRA should leave alone: training's grids render them
    /// too, and `sdtune pick` and the report rank steps by how far their
    /// images drift from the base model's (the class prompt is one of them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub control_prompts: Vec<String>,
}

impl SampleConfig {
    pub fn validate(&self) -> Result<()> {
        for (i, seed) in self.seeds.iter().enumerate() {
            if self.seeds[..i].contains(seed) {
                bail!("sample.seeds lists seed {seed} more than once; the same seed gives the same image, so list each seed once");
            }
        }
        Ok(())
    }
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig { prompts: Vec::new(), seeds: vec![1, 2, 3, 4], control_prompts: Vec::new() }
    }
}

impl Config {
    /// Reads `path`; an error names the file, the line and what was expected.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            bail!("{} is a folder, not a file; sdtune reads its settings from a YAML file of that name, so rename or remove the folder", path.display());
        }
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
        // Windows editors save a byte-order mark; it is not part of the YAML.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let config: Config = serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))?;
        config.data.validate().with_context(|| format!("{} is not valid", path.display()))?;
        config.sample.validate().with_context(|| format!("{} is not valid", path.display()))?;
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

/// serde's messages in plain words: no Rust type names (`u64`, `struct
/// TrainConfig`), the value got and the kind of value the key wants.
fn friendly_expectations(message: &str) -> String {
    if message.contains("more than one document") {
        return "it holds more than one YAML document (a line of just `---` starts a second one); keep a single document".into();
    }
    if let Some((key, field)) = message.split_once("duplicate field `") {
        let field = field.trim_end_matches('`');
        return format!("{key}the key {field} is given twice; keep one");
    }
    for marker in ["invalid type: ", "invalid value: "] {
        let Some(at) = message.find(marker) else { continue };
        let (key, rest) = (&message[..at], &message[at + marker.len()..]);
        let Some((got, want)) = rest.rsplit_once(", expected ") else { continue };
        let out_of_range = marker == "invalid value: " && (got.starts_with("integer") || got.starts_with("floating"));
        let got = plain_value(got);
        let got = if out_of_range { format!("{got}, which is out of range") } else { got };
        return format!("{key}expected {}, got {got}", plain_kind(want));
    }
    message.to_string()
}

/// What serde calls the value it found: `string "x"`, `integer `5``, `sequence`.
fn plain_value(got: &str) -> String {
    let quoted = |s: &str| s.trim_matches('`').to_string();
    if let Some(text) = got.strip_prefix("string ") {
        return format!("the text {text}");
    }
    for prefix in ["integer ", "floating point ", "boolean ", "character "] {
        if let Some(v) = got.strip_prefix(prefix) {
            return quoted(v);
        }
    }
    match got {
        "sequence" => "a list".into(),
        "map" => "a section of keys".into(),
        "unit value" => "nothing".into(),
        other => other.to_string(),
    }
}

/// What serde says a key expects, as a kind of value.
fn plain_kind(want: &str) -> String {
    match want {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number of 0 or more".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a string" | "a borrowed string" | "a character" => "text".into(),
        "path string" => "a path (text)".into(),
        "a sequence" => "a list".into(),
        "struct Config" => "`key: value` lines (model, data, sample, train)".into(),
        w if w.starts_with("struct ") || w == "a map" => "a section of `key: value` lines".into(),
        w if w.starts_with("option") => "a value".into(),
        // Our own messages (e.g. colours) already read as words.
        other => other.to_string(),
    }
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

    #[test]
    fn errors_name_kinds_of_value_not_rust_types() {
        for yaml in [
            "train:\n  lr: fast\n",
            "train:\n  steps: -1\n",
            "train:\n  rank: 1.5\n",
            "train: 5\n",
            "data: [1]\n",
            "[1, 2]\n",
            "sample:\n  seeds: {a: 1}\n",
            "data:\n  max_pixels: 1e99\n",
            "train:\n  steps: 1\n  steps: 2\n",
        ] {
            let err = parse(yaml).unwrap_err().to_string();
            for rust in ["u32", "u64", "usize", "i64", "f64", "struct", "invalid type", "invalid value", "sequence", "map,"] {
                assert!(!err.contains(rust), "{yaml:?}: {rust:?} in {err}");
            }
            assert!(err.contains("expected") || err.contains("twice"), "{yaml:?}: {err}");
        }
    }

    #[test]
    fn a_byte_order_mark_is_not_a_second_document() {
        let c = parse("\u{feff}data:\n  resolution: 768\n  max_bucket: 1024\n").unwrap();
        assert_eq!(c.data.resolution, 768);
        let err = parse("data: {}\n---\ntrain: {}\n").unwrap_err().to_string();
        assert!(err.contains("more than one YAML document"), "{err}");
    }

    #[test]
    fn contradicting_and_oversized_data_settings_are_refused() {
        let err = format!("{:#}", parse("data:\n  no_upscale: true\n  allow_upscale: true\n").unwrap_err());
        assert!(err.contains("no_upscale") && err.contains("allow_upscale"), "{err}");
        let err = format!("{:#}", parse("data:\n  max_bucket: 65536\n").unwrap_err());
        assert!(err.contains("at most 4096"), "{err}");
    }

    #[test]
    fn every_bundled_preset_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 2, "configs/ should hold demo.yaml and sdxl.yaml");
        let sdxl = Config::load(&dir.join("sdxl.yaml")).unwrap();
        assert_eq!(sdxl.data.resolution, 1024);
    }
}
