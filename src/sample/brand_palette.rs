//! The brand set's pooled palette as a file: training writes it into the
//! run folder (`brand-palette.json`), so the run's consistency figures can
//! be computed again later without the brand images at hand (`sdtune
//! serve` measures served grids against it). The histogram is stored
//! sparse: a brand set fills a few hundred of the 4096 bins.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::metrics::{Brand, LabHistogram, BINS};

/// The palette file's name inside a run folder.
pub const FILE_NAME: &str = "brand-palette.json";
const FORMAT: &str = "sdtune brand palette 1";

#[derive(Serialize, Deserialize)]
struct PaletteFile {
    format: String,
    /// Where the images came from (as the figures name it).
    source: String,
    images: usize,
    /// Bins per Lab axis.
    bins: usize,
    /// `[bin index, weight]` of every non-empty bin.
    weights: Vec<(usize, f64)>,
}

/// Writes `brand`'s palette to `path` (temp file + rename).
pub fn save(brand: &Brand, path: &Path) -> Result<()> {
    let weights = brand.histogram.weights.iter().copied().enumerate().filter(|&(_, w)| w != 0.0).collect();
    let file = PaletteFile { format: FORMAT.into(), source: brand.source.clone(), images: brand.images, bins: BINS, weights };
    let json = serde_json::to_string(&file).context("cannot write the brand palette as JSON")?;
    crate::fsutil::write_atomic(path, json.as_bytes())
}

/// The palette recorded at `path`; a damaged or foreign file is one sentence.
pub fn load(path: &Path) -> Result<Brand> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the brand palette {}", path.display()))?;
    let damaged = |why: &str| anyhow::anyhow!("the brand palette {} {why}; delete it (training writes it again) or train the run again", path.display());
    let file: PaletteFile = serde_json::from_str(&text).map_err(|e| damaged(&format!("is not sdtune's palette JSON ({e})")))?;
    if file.format != FORMAT || file.bins != BINS {
        bail!(damaged(&format!("is in another format ({:?}, {} bins; this sdtune reads {FORMAT:?}, {BINS} bins)", file.format, file.bins)));
    }
    let mut weights = vec![0.0; BINS * BINS * BINS];
    for &(bin, w) in &file.weights {
        if bin >= weights.len() || !w.is_finite() || w < 0.0 {
            bail!(damaged(&format!("holds bin {bin} with weight {w}, outside the histogram")));
        }
        weights[bin] = w;
    }
    let total: f64 = weights.iter().sum();
    if file.images == 0 || (total - 1.0).abs() > 1e-6 {
        bail!(damaged(&format!("holds {} images with weights summing to {total}, not a histogram of them", file.images)));
    }
    Ok(Brand { source: file.source, images: file.images, histogram: LabHistogram { weights } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brand() -> Brand {
        let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 90]));
        let hist = LabHistogram::of(&img);
        Brand { source: "shots (prepared)".into(), images: 1, histogram: hist }
    }

    #[test]
    fn a_saved_palette_loads_back_with_the_same_weights() {
        let dir = crate::scratch::ScratchDir::new().unwrap();
        let path = dir.path().join(FILE_NAME);
        let b = brand();
        save(&b, &path).unwrap();
        let back = load(&path).unwrap();
        assert_eq!((back.source.as_str(), back.images), ("shots (prepared)", 1));
        for (x, y) in b.histogram.weights.iter().zip(&back.histogram.weights) {
            assert!((x - y).abs() <= 1e-15 * x.abs().max(1e-300), "{x} vs {y}");
        }
    }

    #[test]
    fn a_damaged_palette_is_one_sentence_naming_the_file() {
        let dir = crate::scratch::ScratchDir::new().unwrap();
        let path = dir.path().join(FILE_NAME);
        for text in ["{", r#"{"format":"other","source":"","images":1,"bins":16,"weights":[]}"#,
            r#"{"format":"sdtune brand palette 1","source":"","images":1,"bins":16,"weights":[[99999,1.0]]}"#,
            r#"{"format":"sdtune brand palette 1","source":"","images":1,"bins":16,"weights":[[3,0.5]]}"#] {
            std::fs::write(&path, text).unwrap();
            let err = load(&path).unwrap_err().to_string();
            assert!(err.contains(FILE_NAME) && err.contains("delete it") && !err.contains('\n'), "{err}");
        }
    }
}
