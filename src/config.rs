//! `sdtune.yaml`: the run's config in the working folder. Schema, defaults,
//! validation and the file's reading and writing; command-line flags are
//! applied over it by each command.
//!
//! Unknown keys and wrong types are errors that name the file, the line and
//! the expected form. Sections are added by the commands that need them
//! (`data:` and `sample:` now, `train:` with training).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The config file's name in the working folder.
pub const CONFIG_FILE: &str = "sdtune.yaml";

/// Pillow's decompression-bomb error threshold (2 x `Image.MAX_IMAGE_PIXELS`).
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

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
    pub train: crate::train::config::TrainConfig,
}

/// The image set and how `sdtune prepare` turns it into cached latents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The image folder, relative to the working folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Training side length: buckets hold about resolution^2 pixels.
    pub resolution: u32,
    pub min_bucket: u32,
    pub max_bucket: u32,
    pub bucket_step: u32,
    /// Never scale an image up to fit its bucket (kohya's `bucket_no_upscale`).
    pub no_upscale: bool,
    /// Also cache horizontally flipped latents.
    pub flip: bool,
    /// Replaces `[trigger]` in captions, else is prepended to them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Caption for images with none (may hold `[trigger]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_template: Option<String>,
    /// What transparent pixels are composited on.
    pub background: Background,
    /// Images whose short side is under this are skipped.
    pub min_side: u32,
    /// Keep images under `min_side` (they are scaled up).
    pub allow_upscale: bool,
    /// Images with more pixels than this are refused before decoding.
    pub max_pixels: u64,
    /// Images per VAE-encode batch.
    pub encode_batch_size: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: None,
            resolution: 512,
            min_bucket: 256,
            max_bucket: 1024,
            bucket_step: 64,
            no_upscale: false,
            flip: false,
            trigger: None,
            caption_template: None,
            background: Background::WHITE,
            min_side: 256,
            allow_upscale: false,
            max_pixels: DEFAULT_MAX_PIXELS,
            encode_batch_size: 4,
        }
    }
}

impl DataConfig {
    /// Rejects settings no bucket set can be built from, in words.
    pub fn validate(&self) -> Result<()> {
        let (res, min, max, step) = (self.resolution, self.min_bucket, self.max_bucket, self.bucket_step);
        if step == 0 || step % 8 != 0 {
            bail!("the bucket step is {step} pixels; it must be a positive multiple of 8 (64 is usual)");
        }
        if res == 0 || res % 8 != 0 {
            bail!("the resolution is {res} pixels; it must be a positive multiple of 8 (512 for SD1.x)");
        }
        if min == 0 || min > max {
            bail!("the bucket range {min}..{max} is empty; set min_bucket to at most max_bucket");
        }
        if min % step != 0 || max % step != 0 {
            bail!("min_bucket {min} and max_bucket {max} must be multiples of the bucket step {step}");
        }
        if res < min || res > max {
            bail!("the resolution {res} lies outside the bucket range {min}..{max}; widen min_bucket/max_bucket");
        }
        if self.max_pixels == 0 {
            bail!("max_pixels is 0; no image could be read");
        }
        if self.encode_batch_size == 0 {
            bail!("encode_batch_size is 0; use 1 or more");
        }
        Ok(())
    }
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

/// An opaque RGB colour, written `white`, `black`, `gray` or `#rrggbb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Background(pub [u8; 3]);

impl Background {
    pub const WHITE: Background = Background([255, 255, 255]);

    pub fn parse(spec: &str) -> Result<Self> {
        let s = spec.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "white" => Background([255, 255, 255]),
            "black" => Background([0, 0, 0]),
            "gray" | "grey" => Background([128, 128, 128]),
            hex if hex.starts_with('#') && hex.len() == 7 && hex[1..].chars().all(|c| c.is_ascii_hexdigit()) => {
                let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).unwrap_or(0);
                Background([byte(1), byte(3), byte(5)])
            }
            _ => bail!("background {spec:?} is not white, black, gray or a #rrggbb colour"),
        })
    }

    pub fn name(self) -> String {
        match self.0 {
            [255, 255, 255] => "white".into(),
            [0, 0, 0] => "black".into(),
            [128, 128, 128] => "gray".into(),
            [r, g, b] => format!("#{r:02x}{g:02x}{b:02x}"),
        }
    }
}

impl Serialize for Background {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Background {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Background::parse(&s).map_err(|_| {
            serde::de::Error::custom(format!("{s:?} is not a colour: expected white, black, gray or #rrggbb"))
        })
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
    fn backgrounds_parse() {
        assert_eq!(Background::parse("#FF8000").unwrap(), Background([255, 128, 0]));
        assert_eq!(Background::parse("black").unwrap().name(), "black");
        assert!(Background::parse("#12345").is_err());
    }
}
