//! The render thread: it loads the base model once, then takes jobs off
//! the queue one at a time (a cancelled one stops at its next step), attaches each job's adapters (never fused, so
//! the next job starts from the plain base) and renders through the same
//! code as `sdtune sample`, so each PNG carries the recipe `sdtune sample
//! --from` renders again bit for bit. libtorch work stays off the async
//! runtime.
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use tch::Device;

use super::cache::AdapterCache;
use super::figures::{self, BrandSets, GridFigures};
use super::jobs::{Jobs, ServedImage, Work};
use crate::loaders::source::LoadOptions;
use crate::models::stable_diffusion::{Placement, StableDiffusion};
use crate::runtime::Precision;
use crate::sample::image_out::encode_png_with_text;
use crate::sample::pipeline::Stopped;
use crate::sample::render::{self, LoadedLora};
use crate::sample::settings::Member;
use crate::sample::{limits, session};

/// The model to serve, as `sdtune serve`'s flags name it.
#[derive(Clone, Debug)]
pub struct ModelChoice {
    pub model: String,
    pub options: LoadOptions,
    pub precision: Precision,
    pub device: Device,
    /// `--vae-tiling`: decode in tiles (recorded in each image's recipe).
    pub vae_tiling: bool,
}

/// What the HTTP side learns once the model is loaded.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub native_side: i64,
    pub model_hash: String,
    /// How images record the model.
    pub recorded_model: String,
    /// Layers of the shallowest text encoder.
    pub text_layers: usize,
    pub seconds: f64,
}

/// Starts the render thread; returns once the model is loaded (or failed to).
pub fn start(
    choice: ModelChoice,
    jobs: Arc<Jobs>,
    batch_size: usize,
    cache_bytes: u64,
    brands: BrandSets,
) -> Result<(std::thread::JoinHandle<()>, Loaded)> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Loaded>>();
    let handle = std::thread::Builder::new()
        .name("sdtune-render".into())
        .spawn(move || {
            let started = Instant::now();
            let placement = Placement { device: choice.device, kind: choice.precision.kind(), vae_kind: choice.precision.kind() };
            let (mut model, hash) = match session::load_and_hash(&choice.model, &choice.options, placement) {
                Ok(loaded) => loaded,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            if choice.vae_tiling {
                model.vae.model.enable_tiling();
            }
            let loaded = Loaded {
                native_side: session::native_side(&model),
                model_hash: hash.clone(),
                recorded_model: crate::sample::settings::recorded_model(&choice.model),
                text_layers: model.text.encoders.iter().map(|e| e.config.num_hidden_layers as usize).min().unwrap_or(0),
                seconds: started.elapsed().as_secs_f64(),
            };
            let _ = ready_tx.send(Ok(loaded));
            let mut renderer =
                Renderer { model, hash, choice, cache: AdapterCache::new(cache_bytes), brands, batch_size: batch_size.max(1) };
            while let Some(work) = jobs.next() {
                let started = Instant::now();
                let outcome = renderer.run(&work, &jobs);
                jobs.finish(work.id, outcome, started.elapsed().as_secs_f64());
            }
        })
        .context("cannot start the render thread")?;
    let loaded = ready_rx.recv().context("the render thread stopped while loading the model")??;
    Ok((handle, loaded))
}

struct Renderer {
    model: StableDiffusion,
    hash: String,
    choice: ModelChoice,
    cache: AdapterCache,
    brands: BrandSets,
    batch_size: usize,
}

impl Renderer {
    /// Renders every image of the job; `Err(None)` when it was cancelled.
    fn run(&mut self, work: &Work, jobs: &Jobs) -> Result<(), Option<String>> {
        self.render(work, jobs).map_err(|e| {
            if e.is::<Cancelled>() || e.is::<Stopped>() {
                None
            } else {
                Some(crate::errors::one_sentence(&e))
            }
        })
    }

    fn render(&mut self, work: &Work, jobs: &Jobs) -> Result<()> {
        let order = &work.order;
        let layers = render::layers(&self.model)?;
        let mut loras: Vec<LoadedLora> = Vec::with_capacity(order.adapters.len());
        for (adapter, scale) in &order.adapters {
            loras.push(self.cache.get(&adapter.path, &layers)?.at_scale(*scale));
        }
        render::apply_loras(&self.model, &loras, 1.0, false)?;
        let handling = session::Handling { precision: self.choice.precision, fuse: false, vae_tiling: self.choice.vae_tiling };
        let shared = session::shared_settings(&self.choice.model, &self.choice.options, handling, self.hash.clone(), &loras, self.choice.device);
        let mut settings = session::with_render_settings(shared, &order.settings);
        session::fill_sizes(&mut settings, &self.model);
        let batch = self.batch_size.min(order.seeds.len());
        limits::check_clip_skip(&self.model, settings.clip_skip)?;
        limits::check_render_size(&self.model, settings.width, settings.height, batch)?;
        let members: Vec<Member> = order
            .seeds
            .iter()
            .map(|&seed| Member { prompt: order.prompt.clone(), negative_prompt: order.negative_prompt.clone(), seed })
            .collect();
        let total = members.len().div_ceil(batch) * settings.steps;
        let mut done = 0;
        let mut pixels = Vec::with_capacity(members.len());
        for chunk in members.chunks(batch) {
            if work.cancel.load(Ordering::SeqCst) {
                return Err(Cancelled.into());
            }
            let images = render::render_batch(
                &self.model,
                &settings,
                chunk,
                &mut |w| jobs.add_warning(work.id, w),
                &mut |i, _| jobs.set_progress(work.id, done + i, total),
                Some(&work.cancel),
            )?;
            done += settings.steps;
            for (image, recipe) in images {
                let png = encode_png_with_text(&image, &recipe.text_chunks()?).context("cannot encode a rendered image as PNG")?;
                let parameters = recipe.to_parameters()?;
                jobs.add_image(work.id, ServedImage { seed: recipe.member.seed, png: Arc::new(png), parameters });
                pixels.push((recipe.member.seed, image));
            }
        }
        let figures = self.measure(work, jobs, &pixels);
        jobs.set_figures(work.id, figures);
        Ok(())
    }

    /// The grid against the brand set of each run adapter the job names;
    /// one that has none is said only when the request named it.
    fn measure(&mut self, work: &Work, jobs: &Jobs, pixels: &[(u64, image::RgbImage)]) -> Vec<GridFigures> {
        let order = &work.order;
        let mut out = Vec::new();
        for adapter in &order.brand_of {
            let Some(run_dir) = adapter.run_dir() else { continue };
            match self.brands.of_run(run_dir) {
                Ok(Some(brand)) => out.push(figures::measure(&adapter.name, &brand, &order.prompt, pixels)),
                Ok(None) if order.brand_named => jobs.add_warning(
                    work.id,
                    format!(
                        "no brand set is known for {}: its run folder holds no {} and no prepared images are cached where the server runs",
                        adapter.name,
                        crate::sample::brand_palette::FILE_NAME
                    ),
                ),
                Ok(None) => {}
                Err(e) => jobs.add_warning(work.id, format!("no consistency figures against {}'s brand set: {}", adapter.name, crate::errors::one_sentence(&e))),
            }
        }
        out
    }
}

/// The job was cancelled between batches.
#[derive(Debug)]
struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}
