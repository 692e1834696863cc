//! The consistency figures of a served grid against an adapter's brand set:
//! the palette distance and the spread across seeds, computed by the same
//! code as the training run's grids (`sample::metrics`), whose figures
//! `sdtune pick` ranks. Known for adapters that come from a training run
//! (`<runs>/<name>/`): its brand set is the palette the run recorded
//! (`brand-palette.json`), else, for runs trained before training recorded
//! it, the images `sdtune prepare` cached in the folder the server was
//! started in (as `sdtune sample` measures a grid there).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Result;
use image::RgbImage;
use serde::Serialize;

use crate::sample::brand_palette;
use crate::sample::metrics::{self, Brand, Cell};

/// A served grid's figures against one adapter's brand set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GridFigures {
    /// The training run's adapter whose brand set the images are measured against.
    pub adapter: String,
    /// Where the brand set's images came from, and how many there are.
    pub brand: String,
    pub brand_images: usize,
    /// Mean palette distance of the images to the brand set (`sdtune pick`'s "palette").
    pub palette_distance: f64,
    /// Standard deviation of those distances across the seeds (`sdtune pick`'s "seed-spread").
    pub seed_spread: f64,
    /// Mean palette distance between the seeds' own images.
    pub seed_pairwise: f64,
    /// Each image's distance to the brand set, in the job's result order.
    pub images: Vec<f64>,
}

/// `images` (seed, pixels) of one prompt measured against `brand`.
pub fn measure(adapter: &str, brand: &Brand, prompt: &str, images: &[(u64, RgbImage)]) -> GridFigures {
    let cells: Vec<Cell> = images
        .iter()
        .enumerate()
        .map(|(i, (seed, image))| Cell { file: i.to_string(), prompt, seed: *seed, variant: "served", image })
        .collect();
    let c = metrics::consistency(&cells, brand);
    let (mean, seed_std, seed_pairwise) = c.variants.first().map_or((0.0, 0.0, 0.0), |v| (v.mean, v.seed_std, v.seed_pairwise));
    GridFigures {
        adapter: adapter.to_string(),
        brand: c.brand,
        brand_images: c.brand_images,
        palette_distance: mean,
        seed_spread: seed_std,
        seed_pairwise,
        images: c.images.iter().map(|i| i.palette_distance).collect(),
    }
}

/// Brand sets read so far, by the file they came from, read again when it changes.
pub struct BrandSets {
    /// Where `sdtune prepare`'s cache is looked for.
    work_dir: PathBuf,
    known: HashMap<PathBuf, (u64, SystemTime, Arc<Brand>)>,
}

impl BrandSets {
    pub fn new(work_dir: PathBuf) -> Self {
        BrandSets { work_dir, known: HashMap::new() }
    }

    /// The brand set of the training run in `run_dir`; `None` when none is known.
    pub fn of_run(&mut self, run_dir: &Path) -> Result<Option<Arc<Brand>>> {
        let recorded = run_dir.join(brand_palette::FILE_NAME);
        if recorded.is_file() {
            return self.cached(&recorded, |p| brand_palette::load(p).map(Some));
        }
        let manifest = self.work_dir.join(crate::data::cache::CACHE_DIR).join("manifest.json");
        if !manifest.is_file() {
            return Ok(None);
        }
        let work_dir = self.work_dir.clone();
        self.cached(&manifest, |_| Brand::from_prepared(&work_dir))
    }

    fn cached(&mut self, file: &Path, read: impl FnOnce(&Path) -> Result<Option<Brand>>) -> Result<Option<Arc<Brand>>> {
        let meta = std::fs::metadata(file)?;
        let stamp = (meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        if let Some((len, modified, brand)) = self.known.get(file) {
            if (*len, *modified) == stamp {
                return Ok(Some(brand.clone()));
            }
        }
        let Some(brand) = read(file)? else { return Ok(None) };
        let brand = Arc::new(brand);
        self.known.insert(file.to_path_buf(), (stamp.0, stamp.1, brand.clone()));
        Ok(Some(brand))
    }
}
