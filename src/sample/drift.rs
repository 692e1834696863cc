//! Prompt drift: how far a LoRA moved the images of prompts it was not
//! trained on (the class prompt, `sample.control_prompts`) from the base
//! model's. Per (prompt, seed) two distances between the base model's
//! image and the LoRA's at that seed: the palette distance (the Earth
//! mover's distance between CIELAB histograms, the consistency figures'
//! metric), which sees colour only, and the pixel distance (the mean
//! absolute RGB difference, 0..255), which sees layout and shape as well.
//! The drift is their means. 0 is the base model itself; prior
//! preservation should keep it small while the brand prompts move towards
//! the brand.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::metrics::{emd, LabHistogram};

/// One prompt's drift.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptDrift {
    pub prompt: String,
    /// Mean over the seeds.
    pub mean: f64,
    /// Per seed, in the grid's seed order.
    pub per_seed: Vec<f64>,
    /// Mean pixel distance over the seeds; `None` in files written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixels: Option<f64>,
    /// Pixel distance per seed, in the grid's seed order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pixels_per_seed: Vec<f64>,
}

/// A grid's drift, as written to `<grid>.drift.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    pub metric: String,
    /// The base model's images it was measured against (their grid).
    pub base: String,
    /// Mean palette distance over every (prompt, seed).
    pub mean: f64,
    /// What `pixels` measures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_metric: Option<String>,
    /// Mean pixel distance over every (prompt, seed); `None` in files written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixels: Option<f64>,
    pub prompts: Vec<PromptDrift>,
}

/// The images of one prompt at each seed, base and LoRA alike ordered.
pub struct PromptImages<'a> {
    pub prompt: &'a str,
    pub base: Vec<RgbImage>,
    pub lora: Vec<&'a RgbImage>,
}

/// The palette and pixel distances of each LoRA image to the base image of its seed.
pub fn measure(rows: &[PromptImages], base: &Path) -> Result<Drift> {
    let mut prompts = Vec::with_capacity(rows.len());
    let (mut all, mut all_pixels) = (Vec::new(), Vec::new());
    for row in rows {
        if row.base.len() != row.lora.len() {
            bail!("internal: {} base images but {} LoRA images for {:?}", row.base.len(), row.lora.len(), row.prompt);
        }
        let per_seed: Vec<f64> =
            row.base.par_iter().zip(&row.lora).map(|(b, l)| emd(&LabHistogram::of(b), &LabHistogram::of(l))).collect();
        let pixels_per_seed =
            row.base.iter().zip(&row.lora).map(|(b, l)| pixel_distance(b, l, base)).collect::<Result<Vec<f64>>>()?;
        all.extend(&per_seed);
        all_pixels.extend(&pixels_per_seed);
        prompts.push(PromptDrift {
            prompt: row.prompt.to_string(),
            mean: mean(&per_seed),
            per_seed,
            pixels: Some(mean(&pixels_per_seed)),
            pixels_per_seed,
        });
    }
    Ok(Drift {
        metric: "palette distance (EMD of CIELAB histograms) of each LoRA image to the base model's image of the same seed".into(),
        base: base.display().to_string(),
        mean: mean(&all),
        pixel_metric: Some("mean absolute RGB difference (0..255) of each LoRA image to the base model's image of the same seed".into()),
        pixels: Some(mean(&all_pixels)),
        prompts,
    })
}

/// Mean absolute difference over every channel of every pixel, 0..255.
/// The two images of a seed are rendered at one size; `base` names the
/// base model's grid in the error when they are not.
pub fn pixel_distance(a: &RgbImage, b: &RgbImage, base: &Path) -> Result<f64> {
    if a.dimensions() != b.dimensions() {
        bail!(
            "a control image is {}x{} but the base model's image of its seed in {} is {}x{}, so their drift cannot be measured; the base images are written at step 0 of the run and must not change after it",
            b.width(),
            b.height(),
            base.display(),
            a.width(),
            a.height()
        );
    }
    let total: u64 = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| u64::from(x.abs_diff(y))).sum();
    Ok(if a.as_raw().is_empty() { 0.0 } else { total as f64 / a.as_raw().len() as f64 })
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// `<grid stem>.drift.json` beside the grid.
pub fn drift_path(grid: &Path) -> PathBuf {
    grid.with_extension("drift.json")
}

impl Drift {
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_atomic(path, serde_json::to_string_pretty(self)?.as_bytes())
    }

    /// The drift figures written at `path`, `None` when there are none.
    pub fn load(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Reads a rendered image back (the base model's, written at step 0).
pub fn read_image(path: &Path) -> Result<RgbImage> {
    Ok(image::open(path).with_context(|| format!("cannot read the base model's control image {}", path.display()))?.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_images_drift_zero_and_others_more() {
        let red = RgbImage::from_pixel(8, 8, image::Rgb([200, 30, 30]));
        let blue = RgbImage::from_pixel(8, 8, image::Rgb([30, 30, 200]));
        let pink = RgbImage::from_pixel(8, 8, image::Rgb([220, 60, 60]));
        let same = [PromptImages { prompt: "a shape", base: vec![red.clone()], lora: vec![&red] }];
        assert_eq!(measure(&same, Path::new("b.png")).unwrap().mean, 0.0);
        let near = [PromptImages { prompt: "a shape", base: vec![red.clone()], lora: vec![&pink] }];
        let far = [PromptImages { prompt: "a shape", base: vec![red.clone()], lora: vec![&blue] }];
        let (near, far) = (measure(&near, Path::new("b")).unwrap().mean, measure(&far, Path::new("b")).unwrap().mean);
        assert!(0.0 < near && near < far, "near {near} far {far}");
    }

    /// The pixel distance sees what the palette cannot: the same colours moved.
    #[test]
    fn pixels_see_a_moved_shape_that_the_palette_misses() {
        let left = RgbImage::from_fn(8, 8, |x, _| if x < 4 { image::Rgb([200, 30, 30]) } else { image::Rgb([30, 30, 200]) });
        let right = RgbImage::from_fn(8, 8, |x, _| if x >= 4 { image::Rgb([200, 30, 30]) } else { image::Rgb([30, 30, 200]) });
        let moved = [PromptImages { prompt: "a shape", base: vec![left.clone()], lora: vec![&right] }];
        let d = measure(&moved, Path::new("b")).unwrap();
        assert!(d.mean < 1e-6, "the palette is the same: {}", d.mean);
        // Every pixel differs by (170, 0, 170): a mean of 340 / 3 per channel.
        assert!((d.pixels.unwrap() - 340.0 / 3.0).abs() < 1e-9, "{:?}", d.pixels);
        assert_eq!(d.prompts[0].pixels_per_seed.len(), 1);
        let same = [PromptImages { prompt: "a shape", base: vec![left.clone()], lora: vec![&left] }];
        assert_eq!(measure(&same, Path::new("b")).unwrap().pixels, Some(0.0));
    }

    #[test]
    fn images_of_different_sizes_are_refused_in_words() {
        let small = RgbImage::new(4, 4);
        let big = RgbImage::new(8, 4);
        let rows = [PromptImages { prompt: "a shape", base: vec![small], lora: vec![&big] }];
        let err = measure(&rows, Path::new("samples/control-000000.png")).unwrap_err().to_string();
        assert!(err.contains("8x4") && err.contains("4x4") && err.contains("control-000000.png"), "{err}");
    }

    /// Files written before the pixel distance load, without it.
    #[test]
    fn older_drift_files_load_without_pixels() {
        let old = r#"{"metric":"m","base":"b","mean":2.5,"prompts":[{"prompt":"a shape","mean":2.5,"per_seed":[2.5]}]}"#;
        let d: Drift = serde_json::from_str(old).unwrap();
        assert_eq!((d.mean, d.pixels, d.prompts[0].pixels), (2.5, None, None));
    }
}
