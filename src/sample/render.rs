//! A render job: prompts x seeds (x LoRA strengths with `--compare`),
//! batched through the UNet, each image saved with the settings that made
//! it, plus the labelled grid.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use image::RgbImage;

use super::grid;
use super::image_out::{save_png_with_text, to_rgb8};
use super::metrics::{Brand, Cell, Consistency};
use super::pipeline::{text_to_images_until, SampleRequest, Warn};
use super::settings::{Batch, GridRecipe, ImageRecipe, LoraUse, Member, Recipe, Settings, PARAMETERS_KEY, SDTUNE_KEY};
use crate::lora::kohya_names::KohyaNames;
use crate::lora::{self, LoraWeights, ModelLayers};
use crate::models::stable_diffusion::StableDiffusion;
use crate::schedulers::SchedulerKind;

/// A LoRA file read once, applied at any strength. Clones share the
/// weights (`sdtune serve` keeps them cached and applies them at each
/// request's strength).
#[derive(Clone)]
pub struct LoadedLora {
    pub path: PathBuf,
    pub scale: f64,
    pub weights: Arc<LoraWeights>,
    pub hash: String,
}

impl LoadedLora {
    /// Reads `FILE[:SCALE]` as `--lora` takes it.
    pub fn read(spec: &str, layers: &ModelLayers) -> Result<Self> {
        let (path, scale) = lora::parse_spec(spec)?;
        lora::check_lora_path(&path)?;
        Self::from_file(path, scale, layers)
    }

    /// Reads the LoRA file at `path`, to be applied at `scale`.
    pub fn from_file(path: PathBuf, scale: f64, layers: &ModelLayers) -> Result<Self> {
        let weights = Arc::new(lora::format::read(&path, layers)?);
        let hash = super::settings::lora_hash(&path)?;
        Ok(LoadedLora { path, scale, weights, hash })
    }

    /// The same weights at another strength.
    pub fn at_scale(&self, scale: f64) -> Self {
        LoadedLora { scale, ..self.clone() }
    }

    /// How the image's settings record it at `scale`.
    pub fn usage(&self, scale: f64) -> LoraUse {
        let name = self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let path = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        LoraUse { name, path: path.display().to_string(), scale, hash: self.hash.clone() }
    }
}

/// Removes every adapter, then attaches each LoRA at its scale times
/// `multiplier` (0: the base model), or fuses them (only once, never undone).
pub fn apply_loras(model: &StableDiffusion, loras: &[LoadedLora], multiplier: f64, fuse: bool) -> Result<()> {
    let layers = layers(model)?;
    layers.unet.for_each(|e| e.adapters.clear());
    if let Some(te) = layers.text_encoder {
        te.for_each(|e| e.adapters.clear());
    }
    if multiplier == 0.0 {
        return Ok(());
    }
    for l in loras {
        let source = l.path.display().to_string();
        if fuse {
            lora::fuse(&l.weights, &layers, l.scale * multiplier, &source)?;
        } else {
            lora::attach(&l.weights, &layers, l.scale * multiplier, &source)?;
        }
    }
    Ok(())
}

/// The layers `--lora` files attach to: the UNet's and the first text encoder's.
pub fn layers(model: &StableDiffusion) -> Result<ModelLayers<'_>> {
    Ok(ModelLayers {
        unet: &model.unet.layers,
        text_encoder: Some(&model.text.first().model.layers),
        text_encoder_2: model.text.encoders.get(1).map(|e| &e.model.layers),
        kohya: KohyaNames::of(&model.unet_config)?,
    })
}

/// One column variant of a grid: the base model or the LoRAs at a multiplier.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// For labels and figures: `base`, `lora`, `lora x0.5`.
    pub label: String,
    /// For file names: `base`, `lora0.5`; empty without `--compare`.
    pub file_tag: String,
    pub multiplier: f64,
}

/// What to render.
#[derive(Clone, Debug)]
pub struct Job {
    pub prompts: Vec<String>,
    pub negative_prompt: Option<String>,
    pub seeds: Vec<u64>,
    /// LoRA strength multipliers to lay beside the base model; empty: none.
    pub compare: Vec<f64>,
    pub batch_size: usize,
    /// Shared settings; `loras` at the strengths given.
    pub settings: Settings,
    /// The grid PNG (images beside it), or the one image.
    pub out: PathBuf,
}

/// A rendered image and where it was written.
pub struct Rendered {
    pub row: usize,
    pub seed: u64,
    pub variant: Variant,
    pub image: RgbImage,
    pub file: PathBuf,
    pub recipe: ImageRecipe,
}

impl Job {
    /// One prompt, one seed, no comparison: a single PNG, no grid.
    pub fn is_single(&self) -> bool {
        self.prompts.len() == 1 && self.seeds.len() == 1 && self.compare.is_empty()
    }

    pub fn variants(&self) -> Vec<Variant> {
        if self.compare.is_empty() {
            let label = if self.settings.loras.is_empty() { "base" } else { "lora" };
            return vec![Variant { label: label.into(), file_tag: String::new(), multiplier: 1.0 }];
        }
        let base = Variant { label: "base".into(), file_tag: "base".into(), multiplier: 0.0 };
        let scaled = self.compare.iter().map(|&m| Variant { label: format!("lora x{m}"), file_tag: format!("lora{m}"), multiplier: m });
        std::iter::once(base).chain(scaled).collect()
    }

    /// `<stem>-p<row>-s<seed>[-<tag>].png` beside the grid (rows from 1).
    pub fn image_path(&self, row: usize, seed: u64, variant: &Variant) -> PathBuf {
        if self.is_single() {
            return self.out.clone();
        }
        let stem = self.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "grid".into());
        let tag = if variant.file_tag.is_empty() { String::new() } else { format!("-{}", variant.file_tag) };
        self.out.with_file_name(format!("{stem}-p{}-s{seed}{tag}.png", row + 1))
    }

    pub fn recipe(&self) -> GridRecipe {
        GridRecipe {
            prompts: self.prompts.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seeds: self.seeds.clone(),
            compare: self.compare.clone(),
            batch_size: self.batch_size,
            settings: self.settings.clone(),
        }
    }

    pub fn from_recipe(r: GridRecipe, out: PathBuf) -> Self {
        Job {
            prompts: r.prompts,
            negative_prompt: r.negative_prompt,
            seeds: r.seeds,
            compare: r.compare,
            batch_size: r.batch_size,
            settings: r.settings,
            out,
        }
    }

    /// Images to render, in grid order (row, seed, variant).
    pub fn count(&self) -> usize {
        self.prompts.len() * self.seeds.len() * self.variants().len()
    }
}

/// `<grid stem>.consistency.json` beside the grid.
pub fn consistency_path(out: &Path) -> PathBuf {
    out.with_extension("consistency.json")
}

fn request(settings: &Settings, member: &Member) -> Result<SampleRequest> {
    Ok(SampleRequest {
        prompt: member.prompt.clone(),
        negative_prompt: member.negative_prompt.clone(),
        seed: member.seed,
        steps: settings.steps,
        guidance: settings.guidance,
        width: settings.width,
        height: settings.height,
        scheduler: SchedulerKind::parse(&settings.scheduler)?,
        clip_skip: settings.clip_skip,
        size_conditioning: settings.size_conditioning,
    })
}

/// Settings with each LoRA's strength times `multiplier` (none at 0).
fn scaled(settings: &Settings, multiplier: f64) -> Settings {
    let mut s = settings.clone();
    s.loras = if multiplier == 0.0 {
        Vec::new()
    } else {
        s.loras.iter().map(|l| LoraUse { scale: l.scale * multiplier, ..l.clone() }).collect()
    };
    s
}

/// Renders the job: every image saved beside the grid with its settings,
/// then the grid itself (unless it is a single image). `on_step(done, total)`
/// counts denoising steps over the whole job.
pub fn render(
    model: &StableDiffusion,
    job: &Job,
    loras: &[LoadedLora],
    warn: Warn,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Rendered>> {
    if job.settings.fuse && !job.compare.is_empty() {
        bail!("--compare needs the LoRAs kept apart from the weights to switch them off; drop --fuse");
    }
    let variants = job.variants();
    let set_up = &mut |v: &Variant| apply_loras(model, loras, v.multiplier, job.settings.fuse);
    render_variants(model, job, &variants, set_up, Recipes::Written, warn, on_step)
}

/// Whether rendered images carry the recipe that renders them again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipes {
    /// Each image beside the grid with its recipe; the grid with the job's.
    Written,
    /// The grid alone, without a recipe: what rendered it cannot be loaded
    /// again (a UNet in training), and a recipe would name the wrong model.
    None,
}

/// Renders the job with the adapters the model holds now (a LoRA being
/// trained, already attached) as its one variant, named `label` in the
/// figures. With [`Recipes::Written`] the images and the grid are written as
/// [`render`] writes them, their recipes naming `job.settings.loras`, which
/// must be files holding those adapters.
pub fn render_attached(
    model: &StableDiffusion,
    job: &Job,
    label: &str,
    recipes: Recipes,
    warn: Warn,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Rendered>> {
    let variant = Variant { label: label.into(), file_tag: String::new(), multiplier: 1.0 };
    render_variants(model, job, &[variant], &mut |_| Ok(()), recipes, warn, on_step)
}

/// Each variant set up by `set_up`, then its cells rendered in batches of
/// `job.batch_size`; the grid last.
fn render_variants(
    model: &StableDiffusion,
    job: &Job,
    variants: &[Variant],
    set_up: &mut dyn FnMut(&Variant) -> Result<()>,
    recipes: Recipes,
    warn: Warn,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Rendered>> {
    let batch_size = job.batch_size.max(1);
    let per_variant = job.prompts.len() * job.seeds.len();
    let total = variants.len() * per_variant.div_ceil(batch_size) * job.settings.steps;
    let mut done = 0;
    let mut rendered = Vec::with_capacity(job.count());
    for variant in variants {
        set_up(variant)?;
        let settings = scaled(&job.settings, variant.multiplier);
        let member = |prompt: &String, seed: u64| Member { prompt: prompt.clone(), negative_prompt: job.negative_prompt.clone(), seed };
        let cells: Vec<(usize, Member)> = job
            .prompts
            .iter()
            .enumerate()
            .flat_map(|(row, p)| job.seeds.iter().map(move |&seed| (row, member(p, seed))))
            .collect();
        for chunk in cells.chunks(batch_size) {
            let members: Vec<Member> = chunk.iter().map(|(_, m)| m.clone()).collect();
            let images = render_batch(model, &settings, &members, warn, &mut |i, _| on_step(done + i, total), None)?;
            done += settings.steps;
            for ((row, member), (image, recipe)) in chunk.iter().zip(images) {
                let file = job.image_path(*row, member.seed, variant);
                if recipes == Recipes::Written {
                    save_png_with_text(&image, &file, &recipe.text_chunks()?)?;
                }
                rendered.push(Rendered { row: *row, seed: member.seed, variant: variant.clone(), image, file, recipe });
            }
        }
    }
    if !job.is_single() {
        save_grid(job, variants, &rendered, recipes)?;
    }
    Ok(rendered)
}

/// Each rendered image's palette distance to `brand`, pooled per prompt and variant.
pub fn consistency(job: &Job, rendered: &[Rendered], brand: &Brand) -> Consistency {
    super::metrics::consistency(&cells(job, rendered), brand)
}

/// The rendered images as the consistency figures take them.
pub fn cells<'a>(job: &'a Job, rendered: &'a [Rendered]) -> Vec<Cell<'a>> {
    rendered
        .iter()
        .map(|r| Cell {
            file: r.file.display().to_string(),
            prompt: &job.prompts[r.row],
            seed: r.seed,
            variant: &r.variant.label,
            image: &r.image,
        })
        .collect()
}

/// Renders `members` as one UNet batch with `settings` (the LoRAs they
/// name already applied), each image with the recipe that renders it again
/// (its batch-mates included when there are any). `sdtune sample` and
/// `sdtune serve` both render through it; a set `stop` flag ends it
/// between steps with [`super::pipeline::Stopped`].
pub fn render_batch(
    model: &StableDiffusion,
    settings: &Settings,
    members: &[Member],
    warn: Warn,
    on_step: &mut dyn FnMut(usize, usize),
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Vec<(RgbImage, ImageRecipe)>> {
    let images = render_members(model, settings, members, warn, on_step, stop)?;
    Ok(images
        .into_iter()
        .enumerate()
        .map(|(index, image)| {
            let batch = (members.len() > 1).then(|| Batch { index, members: members.to_vec() });
            (image, ImageRecipe { member: members[index].clone(), settings: settings.clone(), batch })
        })
        .collect())
}

/// Renders `members` as one UNet batch with `settings` (LoRAs already applied).
fn render_members(
    model: &StableDiffusion,
    settings: &Settings,
    members: &[Member],
    warn: Warn,
    on_step: &mut dyn FnMut(usize, usize),
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Vec<RgbImage>> {
    let reqs = members.iter().map(|m| request(settings, m)).collect::<Result<Vec<_>>>()?;
    let decoded = text_to_images_until(model, &reqs, warn, on_step, stop)?;
    to_rgb8(&decoded)
}

/// Renders the image `recipe` describes again: the LoRAs at their recorded
/// strengths, in the same batch it was first rendered in (so it comes out
/// bit for bit the same on the same device).
pub fn render_again(
    model: &StableDiffusion,
    recipe: &ImageRecipe,
    loras: &[LoadedLora],
    warn: Warn,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<RgbImage> {
    apply_loras(model, loras, 1.0, recipe.settings.fuse)?;
    let (members, index) = match &recipe.batch {
        Some(b) if b.index < b.members.len() => (b.members.clone(), b.index),
        _ => (vec![recipe.member.clone()], 0),
    };
    let mut images = render_members(model, &recipe.settings, &members, warn, on_step, None)?;
    Ok(images.swap_remove(index))
}

/// "seed 3", or with `--compare` "seed 3 lora x0.5"; cells too narrow for
/// that (the 64-px demo model) get "s3 x0.5" so seed and strength stay readable.
fn column_label(seed: u64, variant: &Variant, compare: bool, room: usize) -> String {
    if !compare {
        return format!("seed {seed}");
    }
    let long = format!("seed {seed} {}", variant.label);
    if long.chars().count() <= room {
        return long;
    }
    let short = variant.label.strip_prefix("lora ").unwrap_or(&variant.label);
    format!("s{seed} {short}")
}

/// Rows are prompts; columns seeds (times variants with `--compare`).
fn save_grid(job: &Job, variants: &[Variant], rendered: &[Rendered], recipes: Recipes) -> Result<()> {
    let find = |row: usize, seed: u64, v: &Variant| {
        rendered.iter().find(|r| r.row == row && r.seed == seed && &r.variant == v).map(|r| r.image.clone())
    };
    let mut rows = Vec::with_capacity(job.prompts.len());
    for row in 0..job.prompts.len() {
        let mut cells = Vec::new();
        for &seed in &job.seeds {
            for v in variants {
                cells.push(find(row, seed, v).context("an image of the grid is missing")?);
            }
        }
        rows.push(cells);
    }
    let compare = !job.compare.is_empty();
    let cell_width = rows.first().and_then(|r| r.first()).map_or(0, |i| i.width());
    let room = grid::label_chars(cell_width);
    let col_labels: Vec<String> =
        job.seeds.iter().flat_map(|&s| variants.iter().map(move |v| column_label(s, v, compare, room))).collect();
    let image = grid::compose(&rows, &job.prompts, &col_labels);
    let first = rendered.first().context("the grid has no images")?;
    let texts = match recipes {
        Recipes::Written => vec![
            (PARAMETERS_KEY.to_string(), first.recipe.to_parameters()?),
            (SDTUNE_KEY.to_string(), Recipe::Grid(job.recipe()).to_json()),
        ],
        Recipes::None => Vec::new(),
    };
    save_png_with_text(&image, &job.out, &texts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(label: &str) -> Variant {
        Variant { label: label.into(), file_tag: String::new(), multiplier: 1.0 }
    }

    #[test]
    fn column_labels_shrink_to_fit_narrow_cells() {
        assert_eq!(column_label(3, &variant("lora x0.5"), false, 8), "seed 3");
        assert_eq!(column_label(3, &variant("lora x0.5"), true, 32), "seed 3 lora x0.5");
        assert_eq!(column_label(3, &variant("lora x0.5"), true, grid::label_chars(64)), "s3 x0.5");
        assert_eq!(column_label(12, &variant("base"), true, grid::label_chars(64)), "s12 base");
        assert!(column_label(12, &variant("base"), true, 8).chars().count() <= 8);
    }
}
