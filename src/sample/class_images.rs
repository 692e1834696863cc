//! Class images for DreamBooth's prior preservation: `sdtune prepare`
//! renders `data.num_class_images` images of `data.class_prompt` with the
//! base model through `sdtune sample`'s own renderer, into
//! `.sdtune/class/class-NNNNN.png`, each with its recipe as `sdtune
//! sample` writes it; they are then cached like the brand images.
//!
//! Image `i` has seed `i` and is rendered in the fixed batch
//! `i / CLASS_BATCH` (its batch-mates are in its recipe), so one deleted
//! and rendered again comes out byte for byte the same on the same
//! device; an image whose recipe no longer matches the prompt, size or
//! model is rendered again, and a prepare with nothing missing renders none.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind};

use crate::data::class_set::{self, CLASS_DIR};
use crate::loaders::source::LoadOptions;
use crate::models::stable_diffusion::Placement;
use crate::runtime::Precision;
use crate::sample::image_out::save_png_with_text;
use crate::sample::render::render_batch;
use crate::sample::session::{self, Handling};
use crate::sample::settings::{self, Member, Recipe, Settings, SDTUNE_KEY};

/// Images per UNet batch; fixed, because the batch an image is rendered in
/// changes its last bits.
pub const CLASS_BATCH: usize = 4;

/// What to render.
pub struct ClassRequest<'a> {
    pub work_dir: &'a Path,
    /// The model as prepare names it (a folder, a file, a Hub id).
    pub model: &'a str,
    pub vae: Option<&'a Path>,
    pub device: Device,
    pub precision: Precision,
    pub prompt: &'a str,
    pub count: usize,
    /// The training resolution: each image is this many pixels square.
    pub resolution: u32,
    /// The guidance scale they are rendered with (data.class_guidance).
    pub guidance: f64,
}

/// The class images after [`ensure`]: every file in index order, and how
/// many of them this run rendered.
pub struct ClassImages {
    pub files: Vec<PathBuf>,
    pub rendered: usize,
}

/// Renders the class images that are missing (or whose recipe differs).
pub fn ensure(req: &ClassRequest) -> Result<ClassImages> {
    let dir = req.work_dir.join(CLASS_DIR);
    if dir.exists() && !dir.is_dir() {
        bail!("{} is a file, but prepare keeps the class images for prior preservation in a folder of that name; move the file away", dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the class image folder {}", dir.display()))?;
    let files = class_set::files(req.work_dir, req.count);
    let wanted = wanted_settings(req);
    let missing: Vec<usize> = (0..req.count).filter(|&i| !matches_recipe(&files[i], req.prompt, i as u64, &wanted)).collect();
    if missing.is_empty() {
        return Ok(ClassImages { files, rendered: 0 });
    }
    render_missing(req, &files, &missing)?;
    Ok(ClassImages { files, rendered: missing.len() })
}

/// The settings every class image records, before the model is loaded
/// (its hash, precision and device are not compared).
fn wanted_settings(req: &ClassRequest) -> Settings {
    let mut s = session::default_settings();
    s.width = req.resolution as i64;
    s.height = req.resolution as i64;
    s.guidance = req.guidance;
    s.model = settings::recorded_model(req.model);
    s.vae = req.vae.map(|v| settings::recorded_model(&v.to_string_lossy()));
    s
}

/// Whether `path` is class image `seed` of `prompt` as `wanted` renders it.
fn matches_recipe(path: &Path, prompt: &str, seed: u64, wanted: &Settings) -> bool {
    let Ok(Found(Recipe::Image(r))) = read_recipe(path) else { return false };
    let s = &r.settings;
    r.member.prompt == prompt
        && r.member.seed == seed
        && r.member.negative_prompt.is_none()
        && (s.steps, s.guidance, s.width, s.height) == (wanted.steps, wanted.guidance, wanted.width, wanted.height)
        && (&s.scheduler, &s.model, &s.vae) == (&wanted.scheduler, &wanted.model, &wanted.vae)
}

struct Found(Recipe);

fn read_recipe(path: &Path) -> Result<Found> {
    if !path.is_file() {
        bail!("missing");
    }
    let texts = crate::sample::image_out::read_png_text(path)?;
    let json = texts.iter().find(|(k, _)| k == SDTUNE_KEY).map(|(_, v)| v.as_str()).context("no recipe")?;
    Ok(Found(Recipe::from_json(json, path)?))
}

/// Loads the model and renders each batch holding a missing image, whole
/// (so its images come out as they first did), writing only the missing ones.
fn render_missing(req: &ClassRequest, files: &[PathBuf], missing: &[usize]) -> Result<()> {
    let options = LoadOptions { vae: req.vae.map(Path::to_path_buf), ..LoadOptions::default() };
    let placement = Placement { device: req.device, kind: req.precision.kind(), vae_kind: Kind::Float };
    let (model, hash) = session::load_and_hash(req.model, &options, placement)?;
    let handling = Handling { precision: req.precision, fuse: false, vae_tiling: false };
    let shared = session::shared_settings(req.model, &options, handling, hash, &[], req.device);
    let settings = session::with_render_settings(shared, &wanted_settings(req));
    let mut batches: Vec<usize> = missing.iter().map(|i| i / CLASS_BATCH).collect();
    batches.dedup();
    let bar = crate::progress::steps_bar((batches.len() * settings.steps) as u64, "class images");
    let mut warnings = Vec::new();
    for b in batches {
        let indices: Vec<usize> = (b * CLASS_BATCH..((b + 1) * CLASS_BATCH).min(req.count)).collect();
        let members: Vec<Member> =
            indices.iter().map(|&i| Member { prompt: req.prompt.to_string(), negative_prompt: None, seed: i as u64 }).collect();
        let images = render_batch(&model, &settings, &members, &mut |w| warnings.push(w), &mut |_, _| bar.inc(1), None)?;
        for (&i, (image, recipe)) in indices.iter().zip(images) {
            if missing.contains(&i) {
                save_png_with_text(&image, &files[i], &recipe.text_chunks()?)?;
            }
        }
    }
    bar.finish_and_clear();
    for w in warnings {
        eprintln!("{w}");
    }
    Ok(())
}
