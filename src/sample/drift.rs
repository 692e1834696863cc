//! Prompt drift: how far a LoRA moved the images of prompts it was not
//! trained on (the class prompt, `sample.control_prompts`) from the base
//! model's. Per (prompt, seed) the palette distance (the Earth mover's
//! distance between CIELAB histograms, the consistency figures' metric)
//! between the base model's image and the LoRA's at that seed; the drift
//! is their mean. 0 is the base model itself; prior preservation should
//! keep it small while the brand prompts move towards the brand.
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
}

/// A grid's drift, as written to `<grid>.drift.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    pub metric: String,
    /// The base model's images it was measured against (their grid).
    pub base: String,
    /// Mean over every (prompt, seed).
    pub mean: f64,
    pub prompts: Vec<PromptDrift>,
}

/// The images of one prompt at each seed, base and LoRA alike ordered.
pub struct PromptImages<'a> {
    pub prompt: &'a str,
    pub base: Vec<RgbImage>,
    pub lora: Vec<&'a RgbImage>,
}

/// The palette distance of each LoRA image to the base image of its seed.
pub fn measure(rows: &[PromptImages], base: &Path) -> Result<Drift> {
    let mut prompts = Vec::with_capacity(rows.len());
    let mut all = Vec::new();
    for row in rows {
        if row.base.len() != row.lora.len() {
            bail!("internal: {} base images but {} LoRA images for {:?}", row.base.len(), row.lora.len(), row.prompt);
        }
        let per_seed: Vec<f64> =
            row.base.par_iter().zip(&row.lora).map(|(b, l)| emd(&LabHistogram::of(b), &LabHistogram::of(l))).collect();
        all.extend(&per_seed);
        prompts.push(PromptDrift { prompt: row.prompt.to_string(), mean: mean(&per_seed), per_seed });
    }
    Ok(Drift {
        metric: "palette distance (EMD of CIELAB histograms) of each LoRA image to the base model's image of the same seed".into(),
        base: base.display().to_string(),
        mean: mean(&all),
        prompts,
    })
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
}
