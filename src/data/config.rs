//! The `data:` section of `sdtune.yaml`: the image set and how `sdtune
//! prepare` turns it into cached latents.
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest bucket side: a VAE encode of bigger images needs tens of GiB.
pub const MAX_BUCKET_SIDE: u32 = 4096;

/// Pillow's decompression-bomb error threshold (2 x `Image.MAX_IMAGE_PIXELS`).
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

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
    /// Several subjects, each its own folder and settings (instead of `path`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub concepts: Vec<super::concepts::ConceptConfig>,
    /// Prior preservation: the prompt of the class the brand belongs to
    /// ("a shape", "a photo of a car"); prepare renders `num_class_images`
    /// of it with the base model into `.sdtune/class/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_prompt: Option<String>,
    /// How many class images of `class_prompt` to render and cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_class_images: Option<usize>,
    /// The guidance scale the class images are rendered with (diffusers'
    /// DreamBooth script renders them at its pipeline's default, 7.5). A
    /// lower one, down to 1 (no guidance, the model's own conditional
    /// distribution), keeps a small model from training on its own
    /// over-guided images and drifting further at every guided sample.
    pub class_guidance: f64,
}

/// The class images' guidance scale when none is given.
pub const DEFAULT_CLASS_GUIDANCE: f64 = 7.5;

/// The most class images prepare renders (each is a full render).
pub const MAX_CLASS_IMAGES: usize = 100_000;

/// The training resolution of SDXL models when none is given (kohya's
/// `--resolution 1024` for SDXL; its buckets keep the default range).
pub const SDXL_RESOLUTION: u32 = 1024;

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
            concepts: Vec::new(),
            class_prompt: None,
            num_class_images: None,
            class_guidance: DEFAULT_CLASS_GUIDANCE,
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
        if res > MAX_BUCKET_SIDE {
            bail!("the resolution is {res} pixels; it can be at most {MAX_BUCKET_SIDE} (512 for SD1.x, 768 for SD2.x)");
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
        if max > MAX_BUCKET_SIDE {
            bail!("max_bucket is {max} pixels; buckets can be at most {MAX_BUCKET_SIDE} pixels a side (1024 is usual)");
        }
        if self.no_upscale && self.allow_upscale {
            bail!("no_upscale (--no-upscale) and allow_upscale (--allow-upscale) contradict each other: one forbids scaling images up, the other asks for it; keep one");
        }
        self.validate_class()?;
        super::concepts::validate(&self.concepts)
    }

    /// The class prompt and count come together, each usable.
    fn validate_class(&self) -> Result<()> {
        match (self.class_prompt.as_deref(), self.num_class_images) {
            (None, None) => Ok(()),
            (Some(p), _) if p.trim().is_empty() => bail!(
                "data.class_prompt (--class-prompt) is empty; give the prompt of the class your brand belongs to, e.g. \"a photo of a car\", or leave it out"
            ),
            (Some(_), None) => bail!(
                "data.class_prompt is set but data.num_class_images is not; give how many class images prepare should render (--class-images N; 100 to 200 is usual)"
            ),
            (None, Some(_)) => bail!(
                "data.num_class_images is set but data.class_prompt is not; give the prompt they are rendered from (--class-prompt \"a photo of a car\")"
            ),
            (Some(_), Some(0)) => bail!(
                "data.num_class_images (--class-images) is 0; render 1 or more (100 to 200 is usual), or remove class_prompt to train without prior preservation"
            ),
            (Some(_), Some(n)) if n > MAX_CLASS_IMAGES => bail!(
                "data.num_class_images (--class-images) is {n}; it can be at most {MAX_CLASS_IMAGES} (100 to 200 is usual)"
            ),
            _ if !(1.0..=30.0).contains(&self.class_guidance) => bail!(
                "data.class_guidance (--class-guidance) is {}; give a guidance scale from 1 (none) to 30 (7.5 is diffusers' default)",
                self.class_guidance
            ),
            _ => Ok(()),
        }
    }

    /// The class prompt and count when prior preservation's images are asked for.
    pub fn class_images(&self) -> Option<(&str, usize)> {
        Some((self.class_prompt.as_deref()?.trim(), self.num_class_images?))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backgrounds_parse() {
        assert_eq!(Background::parse("#FF8000").unwrap(), Background([255, 128, 0]));
        assert_eq!(Background::parse("black").unwrap().name(), "black");
        assert!(Background::parse("#12345").is_err());
    }
}
