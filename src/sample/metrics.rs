//! Consistency figures: how close a grid's colours are to the brand set's.
//!
//! Each image becomes a colour histogram in CIE L*a*b* (D65), 16 bins per
//! axis over L* 0..100 and a*, b* -110..110 (the sRGB gamut fits). Lab,
//! because distances there follow perceived colour difference (ΔE76).
//!
//! Distance between two histograms: the sliced Earth mover's distance, the
//! mean over 64 fixed directions of the exact 1-D EMD of the histograms
//! projected on each direction, scaled by 2 so that shifting every colour by
//! ΔE d reads as about d. Why sliced: a full 3-D EMD over 4096 bins is a
//! transport problem far too slow to run per image, and summing 1-D EMDs of
//! L*, a* and b* alone would call two images equal when they pair the same
//! lightnesses with different hues; slices through the joint space see
//! that, cost microseconds and are deterministic (the directions are fixed).
//!
//! The brand set's histogram pools its images (each weighted equally).
//! Figures for a grid: each image's distance to it, their mean, and the
//! spread across seeds of one prompt (std of those distances, and the mean
//! distance between the seeds' own histograms).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use image::RgbImage;
use rayon::prelude::*;
use serde::Serialize;

/// Bins per Lab axis.
pub const BINS: usize = 16;
const L_RANGE: (f64, f64) = (0.0, 100.0);
const AB_RANGE: (f64, f64) = (-110.0, 110.0);
/// Projection directions of the sliced EMD.
const DIRECTIONS: usize = 64;
/// Images are shrunk to at most this side before counting (enough for a palette; fast on big photos).
const MAX_SIDE: u32 = 256;

/// D65 reference white (CIE 1931 2°), as most sRGB→Lab converters use.
const WHITE: [f64; 3] = [0.95047, 1.0, 1.08883];

/// An 8-bit sRGB colour in CIE L*a*b* (D65).
pub fn srgb_to_lab(rgb: [u8; 3]) -> [f64; 3] {
    let lin = rgb.map(|c| linear_lut()[c as usize]);
    let x = 0.4124564 * lin[0] + 0.3575761 * lin[1] + 0.1804375 * lin[2];
    let y = 0.2126729 * lin[0] + 0.7151522 * lin[1] + 0.0721750 * lin[2];
    let z = 0.0193339 * lin[0] + 0.1191920 * lin[1] + 0.9503041 * lin[2];
    let f = |t: f64| {
        const E: f64 = 216.0 / 24389.0;
        const K: f64 = 24389.0 / 27.0;
        if t > E {
            t.cbrt()
        } else {
            (K * t + 16.0) / 116.0
        }
    };
    let (fx, fy, fz) = (f(x / WHITE[0]), f(y / WHITE[1]), f(z / WHITE[2]));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// sRGB 8-bit value -> linear light, once for all 256 values.
fn linear_lut() -> &'static [f64; 256] {
    static LUT: OnceLock<[f64; 256]> = OnceLock::new();
    LUT.get_or_init(|| {
        std::array::from_fn(|i| {
            let c = i as f64 / 255.0;
            if c <= 0.04045 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        })
    })
}

/// A normalized Lab histogram, `BINS`^3 weights summing to 1.
#[derive(Clone, Debug, PartialEq)]
pub struct LabHistogram {
    pub weights: Vec<f64>,
}

fn bin(v: f64, (lo, hi): (f64, f64)) -> usize {
    (((v - lo) / (hi - lo) * BINS as f64).floor().max(0.0) as usize).min(BINS - 1)
}

impl LabHistogram {
    /// The histogram of an image's pixels (shrunk to at most 256 px a side).
    pub fn of(img: &RgbImage) -> Self {
        let small;
        let longest = img.width().max(img.height());
        let img = if longest > MAX_SIDE {
            let scale = |side: u32| ((side as u64 * MAX_SIDE as u64 / longest as u64) as u32).max(1);
            small = image::imageops::thumbnail(img, scale(img.width()), scale(img.height()));
            &small
        } else {
            img
        };
        let mut weights = vec![0.0; BINS * BINS * BINS];
        for p in img.pixels() {
            let [l, a, b] = srgb_to_lab(p.0);
            weights[(bin(l, L_RANGE) * BINS + bin(a, AB_RANGE)) * BINS + bin(b, AB_RANGE)] += 1.0;
        }
        let n = (img.width() * img.height()).max(1) as f64;
        weights.iter_mut().for_each(|w| *w /= n);
        LabHistogram { weights }
    }

    /// The mean of several histograms: each image counts the same.
    pub fn pooled(hists: &[LabHistogram]) -> Option<Self> {
        let first = hists.first()?;
        let mut weights = vec![0.0; first.weights.len()];
        for h in hists {
            weights.iter_mut().zip(&h.weights).for_each(|(w, x)| *w += x / hists.len() as f64);
        }
        Some(LabHistogram { weights })
    }
}

/// Per direction: the bins in order of their centres' projection, and the
/// gaps between consecutive projections.
struct Slices {
    order: Vec<Vec<usize>>,
    gaps: Vec<Vec<f64>>,
}

fn slices() -> &'static Slices {
    static SLICES: OnceLock<Slices> = OnceLock::new();
    SLICES.get_or_init(|| {
        let centre = |i: usize, (lo, hi): (f64, f64)| lo + (i as f64 + 0.5) * (hi - lo) / BINS as f64;
        let centres: Vec<[f64; 3]> = (0..BINS * BINS * BINS)
            .map(|k| [centre(k / (BINS * BINS), L_RANGE), centre(k / BINS % BINS, AB_RANGE), centre(k % BINS, AB_RANGE)])
            .collect();
        let (mut order, mut gaps) = (Vec::new(), Vec::new());
        for u in directions() {
            let proj: Vec<f64> = centres.iter().map(|c| c[0] * u[0] + c[1] * u[1] + c[2] * u[2]).collect();
            let mut idx: Vec<usize> = (0..proj.len()).collect();
            idx.sort_by(|&a, &b| proj[a].total_cmp(&proj[b]));
            gaps.push(idx.windows(2).map(|w| proj[w[1]] - proj[w[0]]).collect());
            order.push(idx);
        }
        Slices { order, gaps }
    })
}

/// Unit vectors spread evenly over a hemisphere (a Fibonacci lattice); the
/// other hemisphere would repeat them, as u and -u give the same 1-D EMD.
fn directions() -> Vec<[f64; 3]> {
    let golden = std::f64::consts::PI * (3.0 - 5f64.sqrt());
    (0..DIRECTIONS)
        .map(|i| {
            let z = (i as f64 + 0.5) / DIRECTIONS as f64;
            let r = (1.0 - z * z).sqrt();
            let phi = golden * i as f64;
            [z, r * phi.cos(), r * phi.sin()]
        })
        .collect()
}

/// Sliced Earth mover's distance between two Lab histograms, in ΔE-like
/// units (2 x the mean 1-D EMD over the slices; see the module notes).
pub fn emd(a: &LabHistogram, b: &LabHistogram) -> f64 {
    let s = slices();
    let mut total = 0.0;
    for (order, gaps) in s.order.iter().zip(&s.gaps) {
        // 1-D EMD = integral of |CDF_a - CDF_b|.
        let mut cum = 0.0;
        for (k, gap) in order.iter().zip(gaps) {
            cum += a.weights[*k] - b.weights[*k];
            total += cum.abs() * gap;
        }
    }
    2.0 * total / DIRECTIONS as f64
}

/// Each image's palette distance to the brand histogram.
pub fn palette_distance(images: &[RgbImage], brand: &LabHistogram) -> Vec<f64> {
    images.par_iter().map(|img| emd(&LabHistogram::of(img), brand)).collect()
}

/// The brand set: where its images came from and their pooled histogram.
#[derive(Clone, Debug)]
pub struct Brand {
    pub source: String,
    pub images: usize,
    pub histogram: LabHistogram,
}

impl Brand {
    /// Pools the histograms of `files` (decoded upright, alpha on white).
    pub fn from_files(files: &[PathBuf], source: String) -> Result<Self> {
        let hists: Vec<Result<LabHistogram>> = files.par_iter().map(|f| read_rgb(f).map(|img| LabHistogram::of(&img))).collect();
        let hists: Vec<LabHistogram> = hists.into_iter().collect::<Result<_>>()?;
        let Some(histogram) = LabHistogram::pooled(&hists) else {
            bail!("the brand set {source} holds no images; pass --brand a folder of your brand's images");
        };
        Ok(Brand { source, images: hists.len(), histogram })
    }

    /// Every image under `dir` (by content; other files are passed over).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let scan = crate::data::scan::scan(dir, &mut |_| {}).with_context(|| format!("--brand {}", dir.display()))?;
        let files: Vec<PathBuf> = scan
            .candidates
            .into_iter()
            .map(|f| f.path)
            .filter(|p| std::fs::read(p).ok().is_some_and(|b| crate::data::decode::sniff(&b).is_some()))
            .collect();
        Self::from_files(&files, dir.display().to_string())
    }

    /// The images `sdtune prepare` used, from the cache under `work_dir`;
    /// `None` when nothing was prepared there.
    pub fn from_prepared(work_dir: &Path) -> Result<Option<Self>> {
        if !work_dir.join(crate::data::cache::CACHE_DIR).join("manifest.json").is_file() {
            return Ok(None);
        }
        let cache = crate::data::cache::CacheReader::open(work_dir)?;
        let dataset = cache.dataset();
        let data_dir = work_dir.join(&dataset.data_dir);
        // The recorded paths show names that are not UTF-8 lossily; find the files again.
        // Class images (prior preservation) are not the brand.
        let files: Vec<PathBuf> = (0..dataset.items.len())
            .filter(|&i| !cache.concept_of(i).is_some_and(|c| c.is_class))
            .map(|i| crate::data::scan::resolve(&data_dir.join(&dataset.items[i].path)))
            .collect();
        let missing: Vec<&PathBuf> = files.iter().filter(|f| !f.is_file()).collect();
        if let Some(first) = missing.first() {
            bail!(
                "the prepared image {} is gone ({} of {} missing); run `sdtune prepare` again or pass --brand DIR",
                first.display(),
                missing.len(),
                files.len()
            );
        }
        Self::from_files(&files, format!("{} (prepared)", data_dir.display())).map(Some)
    }
}

fn read_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read brand image {}", path.display()))?;
    let header = crate::data::decode::inspect(&bytes, crate::data::config::DEFAULT_MAX_PIXELS)
        .map_err(|r| anyhow::anyhow!("brand image {} {}; {}", path.display(), r.reason, r.fix))?;
    crate::data::decode::decode(&bytes, &header, crate::data::config::Background::WHITE, crate::data::config::DEFAULT_MAX_PIXELS)
        .map_err(|r| anyhow::anyhow!("brand image {} {}; {}", path.display(), r.reason, r.fix))
}

/// One image of a grid, for the figures.
pub struct Cell<'a> {
    pub file: String,
    pub prompt: &'a str,
    pub seed: u64,
    /// `base`, `lora`, `lora x0.5`...: images of different variants are not pooled.
    pub variant: &'a str,
    pub image: &'a RgbImage,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageFigure {
    pub file: String,
    pub prompt: String,
    pub seed: u64,
    pub variant: String,
    pub palette_distance: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PromptFigure {
    pub prompt: String,
    pub variant: String,
    pub mean: f64,
    /// Standard deviation of the seeds' distances to the brand set.
    pub seed_std: f64,
    /// Mean palette distance between the seeds' images (0 with one seed).
    pub seed_pairwise: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct VariantFigure {
    pub variant: String,
    /// Mean over all its images.
    pub mean: f64,
    /// Means over its prompts of the per-prompt spreads.
    pub seed_std: f64,
    pub seed_pairwise: f64,
}

/// The figures of one grid, as written to `<grid>.consistency.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Consistency {
    pub metric: String,
    pub brand: String,
    pub brand_images: usize,
    pub variants: Vec<VariantFigure>,
    pub prompts: Vec<PromptFigure>,
    pub images: Vec<ImageFigure>,
    /// Per concept: its prompts against its own images (sets with concepts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub concepts: Vec<ConceptFigures>,
}

/// One concept's figures in `<grid>.consistency.json`.
#[derive(Clone, Debug, Serialize)]
pub struct ConceptFigures {
    pub concept: String,
    pub brand: String,
    pub brand_images: usize,
    pub variants: Vec<VariantFigure>,
    pub prompts: Vec<PromptFigure>,
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

fn std(xs: &[f64]) -> f64 {
    let m = mean(xs);
    mean(&xs.iter().map(|x| (x - m).powi(2)).collect::<Vec<_>>()).sqrt()
}

/// Distances of every cell to the brand set, and their spreads.
pub fn consistency(cells: &[Cell], brand: &Brand) -> Consistency {
    let hists: Vec<LabHistogram> = cells.par_iter().map(|c| LabHistogram::of(c.image)).collect();
    let dist: Vec<f64> = hists.par_iter().map(|h| emd(h, &brand.histogram)).collect();
    let images = cells
        .iter()
        .zip(&dist)
        .map(|(c, &d)| ImageFigure { file: c.file.clone(), prompt: c.prompt.into(), seed: c.seed, variant: c.variant.into(), palette_distance: d })
        .collect();
    let mut variants = Vec::new();
    let mut prompts = Vec::new();
    for variant in unique(cells.iter().map(|c| c.variant)) {
        let in_variant: Vec<usize> = (0..cells.len()).filter(|&i| cells[i].variant == variant).collect();
        let mut per_prompt = Vec::new();
        for prompt in unique(in_variant.iter().map(|&i| cells[i].prompt)) {
            let idx: Vec<usize> = in_variant.iter().copied().filter(|&i| cells[i].prompt == prompt).collect();
            let d: Vec<f64> = idx.iter().map(|&i| dist[i]).collect();
            let pairs: Vec<f64> = idx
                .iter()
                .enumerate()
                .flat_map(|(n, &i)| idx[n + 1..].iter().map(move |&j| (i, j)))
                .map(|(i, j)| emd(&hists[i], &hists[j]))
                .collect();
            per_prompt.push(PromptFigure { prompt: prompt.into(), variant: variant.into(), mean: mean(&d), seed_std: std(&d), seed_pairwise: mean(&pairs) });
        }
        let all: Vec<f64> = in_variant.iter().map(|&i| dist[i]).collect();
        variants.push(VariantFigure {
            variant: variant.into(),
            mean: mean(&all),
            seed_std: mean(&per_prompt.iter().map(|p| p.seed_std).collect::<Vec<_>>()),
            seed_pairwise: mean(&per_prompt.iter().map(|p| p.seed_pairwise).collect::<Vec<_>>()),
        });
        prompts.extend(per_prompt);
    }
    Consistency {
        metric: format!(
            "sliced Earth mover's distance between CIE Lab (D65) histograms ({BINS}^3 bins, {DIRECTIONS} directions), in ΔE-like units; lower is closer to the brand set"
        ),
        brand: brand.source.clone(),
        brand_images: brand.images,
        variants,
        prompts,
        images,
        concepts: Vec::new(),
    }
}

/// Distinct values in first-seen order.
fn unique<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    for i in items {
        if !seen.contains(&i) {
            seen.push(i);
        }
    }
    seen
}

impl Consistency {
    /// A small table for the terminal.
    pub fn table(&self) -> String {
        let mut out = format!(
            "palette distance to the brand set ({} images from {}; sliced EMD in Lab, lower is closer)\n",
            self.brand_images, self.brand
        );
        out.push_str(&format!("  {:<12} {:>8} {:>9} {:>10}  {}\n", "variant", "mean", "seed std", "seed pair", "prompt"));
        for v in &self.variants {
            for p in self.prompts.iter().filter(|p| p.variant == v.variant) {
                out.push_str(&format!("  {:<12} {:>8.2} {:>9.2} {:>10.2}  {}\n", v.variant, p.mean, p.seed_std, p.seed_pairwise, p.prompt));
            }
            out.push_str(&format!("  {:<12} {:>8.2} {:>9.2} {:>10.2}  (all prompts)\n", v.variant, v.mean, v.seed_std, v.seed_pairwise));
        }
        out
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).context("cannot write the consistency figures as JSON")?;
        crate::fsutil::write_atomic(path, json.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: [f64; 3], b: [f64; 3], tol: f64) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn lab_matches_known_values() {
        // Reference values (D65, 2°) as Bruce Lindbloom's and colormine's converters give.
        let cases = [
            ([255, 255, 255], [100.0, 0.0, 0.0]),
            ([0, 0, 0], [0.0, 0.0, 0.0]),
            ([255, 0, 0], [53.2408, 80.0925, 67.2032]),
            ([0, 255, 0], [87.7347, -86.1827, 83.1793]),
            ([0, 0, 255], [32.2970, 79.1875, -107.8602]),
            ([128, 128, 128], [53.5850, 0.0, 0.0]),
            ([255, 128, 0], [67.0500, 42.8320, 74.0283]),
        ];
        for (rgb, want) in cases {
            let got = srgb_to_lab(rgb);
            assert!(close(got, want, 0.02), "{rgb:?}: got {got:?}, want {want:?}");
        }
    }

    fn solid(rgb: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(8, 8, image::Rgb(rgb))
    }

    #[test]
    fn emd_is_zero_for_equal_and_symmetric() {
        let a = LabHistogram::of(&solid([200, 30, 30]));
        let b = LabHistogram::of(&solid([30, 30, 200]));
        assert_eq!(emd(&a, &a), 0.0);
        assert!((emd(&a, &b) - emd(&b, &a)).abs() < 1e-9);
    }

    #[test]
    fn emd_of_a_shift_is_about_its_colour_difference() {
        // Two solid colours one L* bin apart (same a*, b* bins): the
        // distance is the gap between bin centres, 100/16 = 6.25.
        let dark = LabHistogram::of(&solid([100, 100, 100]));
        let light = LabHistogram::of(&solid([116, 116, 116]));
        let (l1, l2) = (srgb_to_lab([100, 100, 100])[0], srgb_to_lab([116, 116, 116])[0]);
        assert_eq!(bin(l1, L_RANGE) + 1, bin(l2, L_RANGE), "test colours must sit in adjacent L bins");
        let d = emd(&dark, &light);
        assert!((d - 6.25).abs() < 0.5, "got {d}");
    }

    #[test]
    fn emd_grows_with_colour_difference_and_pools_by_area() {
        let red = LabHistogram::of(&solid([220, 40, 40]));
        let orange = LabHistogram::of(&solid([230, 120, 40]));
        let blue = LabHistogram::of(&solid([40, 40, 220]));
        assert!(emd(&red, &orange) < emd(&red, &blue));
        let mut mix = RgbImage::from_pixel(8, 8, image::Rgb([220, 40, 40]));
        for x in 0..4 {
            for y in 0..8 {
                mix.put_pixel(x, y, image::Rgb([40, 40, 220]));
            }
        }
        let mixed = LabHistogram::of(&mix);
        let pooled = LabHistogram::pooled(&[red.clone(), blue.clone()]).unwrap();
        assert!(emd(&mixed, &pooled) < 1e-9, "a half/half image pools like its halves");
        assert!(emd(&mixed, &red) > 0.0 && emd(&mixed, &red) < emd(&blue, &red));
    }

    #[test]
    fn palette_distance_and_spread() {
        let brand = Brand { source: "test".into(), images: 1, histogram: LabHistogram::of(&solid([220, 40, 40])) };
        let imgs = [solid([220, 40, 40]), solid([200, 60, 40]), solid([40, 40, 220])];
        let d = palette_distance(&imgs, &brand.histogram);
        assert_eq!(d[0], 0.0);
        assert!(d[1] < d[2]);
        let cells: Vec<Cell> = imgs
            .iter()
            .enumerate()
            .map(|(i, img)| Cell { file: format!("{i}.png"), prompt: "p", seed: i as u64, variant: "base", image: img })
            .collect();
        let c = consistency(&cells, &brand);
        assert_eq!(c.images.len(), 3);
        assert_eq!(c.variants.len(), 1);
        assert!((c.variants[0].mean - (d[0] + d[1] + d[2]) / 3.0).abs() < 1e-9);
        assert!(c.prompts[0].seed_std > 0.0 && c.prompts[0].seed_pairwise > 0.0);
        assert!(c.table().contains("(all prompts)"));
    }
}
