//! A whole training run: LoRA injected (or, with `--full`, every UNet
//! weight trained), resume, the step loop, periodic saves, sample grids with
//! their consistency figures, metrics, Ctrl-C, and the final file.
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::checkpoint::{self, Identity};
use super::data::TrainingData;
use super::ema::{Ema, WithEma};
use super::shuffle::ShuffledCaptions;
use super::text_encoder::{CaptionShuffle, TextEncoderTraining};
use super::validation::{self, Training};
use super::metadata::{lora_metadata, RunFacts};
use super::optimizer::{AdamW, AdamWConfig};
use super::precision::LossScaler;
use super::trainable::{FullUnet, Trainable};
use super::sync::{GradientSync, SingleProcess};
use super::trainer::{StepOutcome, StepSettings, Trainer};
use crate::lora::format::{self, LoraFormat};
use crate::lora::kohya_names::KohyaNames;
use crate::lora::network::{DownInit, LoraNetwork};
use crate::lora::targets::Targets;
use crate::models::finite::all_finite;
use crate::models::stable_diffusion::StableDiffusion;
use crate::runtime::Precision;
use crate::sample::concept_figures::{self, ConceptPalette};
use crate::sample::drift;
use crate::sample::metrics::Brand;
use crate::sample::render::{self, consistency_path, Job, Recipes};
use crate::sample::settings::{lora_hash, LoraUse, Settings};
use crate::schedulers::NoiseSchedule;

/// The fixed prompts x seeds rendered while training.
#[derive(Clone, Debug)]
pub struct GridPlan {
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
    pub negative_prompt: Option<String>,
    /// What every grid image records, as `sdtune sample` records it (model,
    /// sampler, steps, guidance, size, precision, device); the LoRA of the
    /// step is added per grid.
    pub settings: Settings,
    /// The brand set's palette: each grid gets its consistency figures.
    pub brand: Option<Brand>,
    /// Each concept's own palette and prompts, for per-concept figures.
    pub concepts: Vec<ConceptPalette>,
    /// Prompts the LoRA should leave alone (the class prompt,
    /// `sample.control_prompts`): each grid of a LoRA run renders them too,
    /// at the same seeds, and measures their drift from step 0's images
    /// (the base model's).
    pub control_prompts: Vec<String>,
}

/// Everything a run needs beyond the model and the data.
#[derive(Clone, Debug)]
pub struct RunPlan {
    pub name: String,
    /// `output/<name>`.
    pub dir: PathBuf,
    pub rank: i64,
    pub alpha: f64,
    pub targets: Targets,
    pub step: StepSettings,
    pub precision: Precision,
    pub save_every: u64,
    pub sample_every: u64,
    pub keep_last: usize,
    pub format: LoraFormat,
    pub resume: bool,
    pub grid: GridPlan,
    pub resolution: u32,
    pub num_images: usize,
    /// The concepts with their images and repeats, in words (sets with concepts).
    pub concepts: Option<String>,
    pub base_model: String,
    /// Train every UNet weight (fp32) instead of a LoRA; the result is a
    /// diffusers `unet/` folder.
    pub full: bool,
    /// The decay of an EMA of the trained weights, which the saved LoRA
    /// files and grids then hold; `None` trains without one.
    pub ema: Option<f64>,
    /// Items held out of training; their loss on fixed draws is logged at
    /// step 0, every `sample_every` steps, at each save and at the end.
    pub validation: Vec<usize>,
    /// Shuffle each sample's comma-separated tags, keeping this many first
    /// ones in place; `None` trains on the captions as written.
    pub shuffle_keep_tokens: Option<usize>,
    /// Also train a LoRA on the text encoders, at this learning rate
    /// (`--train-text-encoder`, `--text-encoder-lr`).
    pub text_encoder_lr: Option<f64>,
    /// Rank and alpha of the LoCon pairs on 3x3 convs (`--conv-rank`, `--conv-alpha`).
    pub conv: (i64, f64),
    /// Train DoRA (a magnitude per output row beside each pair) instead of plain LoRA.
    pub dora: bool,
    /// Processes training together (data parallel); 1 alone.
    pub processes: usize,
    /// DreamBooth's prior-preservation weight: the class images' loss is
    /// added times this (0, or a set without class images: off).
    pub prior_loss_weight: f64,
    /// Class images the prepared set holds (for the identity and the settings).
    pub class_images: usize,
}

/// Progress the command shows.
pub enum Event {
    Started { from: u64, total: u64 },
    /// `world_size` processes train together; `samples_per_s` counts all of theirs.
    Step { step: u64, outcome: StepOutcome, smoothed_loss: f64, steps_per_s: f64, world_size: usize, samples_per_s: f64 },
    Saved(PathBuf),
    Grid(PathBuf),
    Warning(String),
}

/// How the run ended.
pub struct Finished {
    pub steps_done: u64,
    /// The final LoRA file, or the `unet/` folder of a full run.
    pub final_output: Option<PathBuf>,
    pub interrupted: bool,
}

impl RunPlan {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn final_path(&self) -> PathBuf {
        if self.full {
            self.dir.join("unet")
        } else {
            self.dir.join(format!("{}.safetensors", self.name))
        }
    }

    fn identity(&self) -> Identity {
        let mut identity = self.base_identity();
        // The held-out images change the data order: a resume must hold out the same ones.
        if !self.validation.is_empty() {
            let held: Vec<String> = self.validation.iter().map(usize::to_string).collect();
            identity.0.push(("validation_items".into(), held.join(",")));
        }
        // Only when on, so states saved before EMA existed still resume.
        if let Some(decay) = self.ema {
            identity.0.push(("ema_decay".into(), decay.to_string()));
        }
        // Class samples change every step's loss: a resume must mix in the same ones.
        if self.prior_on() {
            identity.0.push(("prior_loss_weight".into(), self.prior_loss_weight.to_string()));
            identity.0.push(("class_images".into(), self.class_images.to_string()));
        }
        identity
    }

    /// Micro-batches of `batch_size` per optimizer step over all processes:
    /// with the seed and batch size they fix each step's samples, so a
    /// resume may split them differently (`--nproc 2` saved, `--nproc 1
    /// --grad-accum 2` resumed) and still continue the same run.
    fn micro_batches_per_step(&self) -> usize {
        self.step.grad_accum * self.processes.max(1)
    }

    /// Whether the class images' loss is added.
    pub fn prior_on(&self) -> bool {
        self.class_images > 0 && self.prior_loss_weight > 0.0
    }

    fn base_identity(&self) -> Identity {
        if self.full {
            return Identity(vec![
                ("mode".into(), "full".into()),
                ("seed".into(), self.step.seed.to_string()),
                ("batch_size".into(), self.step.batch_size.to_string()),
                (checkpoint::MICRO_BATCHES.into(), self.micro_batches_per_step().to_string()),
            ]);
        }
        Identity(vec![
            ("rank".into(), self.rank.to_string()),
            ("alpha".into(), self.alpha.to_string()),
            ("targets".into(), self.targets.name().into()),
            ("seed".into(), self.step.seed.to_string()),
            ("batch_size".into(), self.step.batch_size.to_string()),
            (checkpoint::MICRO_BATCHES.into(), self.micro_batches_per_step().to_string()),
        ])
        .with_text_encoder(self.text_encoder_lr.is_some())
        .with_dora(self.dora)
        .with_conv(self.targets, self.conv)
    }
}

impl Identity {
    /// Runs that train the text encoders say so (others keep the identity
    /// they always had, so their saved states still resume).
    fn with_text_encoder(mut self, on: bool) -> Self {
        if on {
            self.0.push(("text_encoder".into(), "on".into()));
        }
        self
    }

    /// Presets with 3x3 convs record their rank and alpha.
    fn with_conv(mut self, targets: Targets, (rank, alpha): (i64, f64)) -> Self {
        if matches!(targets, Targets::Conv | Targets::All) {
            self.0.push(("conv_rank".into(), rank.to_string()));
            self.0.push(("conv_alpha".into(), alpha.to_string()));
        }
        self
    }

    fn with_dora(mut self, on: bool) -> Self {
        if on {
            self.0.push(("dora".into(), "on".into()));
        }
        self
    }
}

/// A run in one process.
pub fn run(
    model: &StableDiffusion,
    data: &dyn TrainingData,
    plan: &RunPlan,
    stop: &AtomicBool,
    events: &mut dyn FnMut(Event),
) -> Result<Finished> {
    run_with(model, data, plan, Box::new(SingleProcess), stop, events)
}

/// A run as one process of a job whose gradients `sync` exchanges; only
/// the main process writes files and reports events.
pub fn run_with(
    model: &StableDiffusion,
    data: &dyn TrainingData,
    plan: &RunPlan,
    mut sync: Box<dyn GradientSync + '_>,
    stop: &AtomicBool,
    events: &mut dyn FnMut(Event),
) -> Result<Finished> {
    let device = model.device();
    let main = sync.is_main();
    let mut emit = |event: Event| {
        if main {
            events(event)
        }
    };
    // Built channels-last for sampling; a training step may be faster plain.
    crate::models::channels_last::lay_out_for_training(&model.unet.layers, crate::runtime::native_bf16_cpu());
    tch::manual_seed(plan.step.seed as i64);
    if plan.full && (plan.text_encoder_lr.is_some() || plan.dora) {
        bail!("--train-text-encoder and --dora train adapters and do not go with --full; drop one of them");
    }
    let trained = if plan.full {
        Trained::Full(FullUnet::new(&model.unet.vs)?)
    } else {
        let mut lora =
            LoraNetwork::inject_with(&model.unet.layers, plan.targets, (plan.rank, plan.alpha), plan.conv, DownInit::KaimingUniform, device, plan.dora)?;
        if plan.text_encoder_lr.is_some() {
            super::text_encoder::inject(&mut lora, &model.text, plan.targets)?;
        }
        Trained::Lora(lora)
    };
    let mut optimizer = AdamW::new(trained.as_dyn().parameters(), AdamWConfig::default());
    let mut ema = plan.ema.map(|decay| Ema::new(trained.as_dyn(), decay));
    if let (Some(te_lr), Trained::Lora(lora)) = (plan.text_encoder_lr, &trained) {
        optimizer = optimizer.with_lr_factors(&super::text_encoder::lr_factors(lora, plan.step.lr, te_lr))?;
    }
    let mut scaler = if plan.precision == Precision::Fp16 { LossScaler::fp16() } else { LossScaler::disabled() };
    let mut start = 0;
    if plan.resume {
        let Some((path, damaged)) = checkpoint::latest_good(&plan.state_dir())? else {
            bail!("--resume found no saved state in {}; train without --resume to start a new run", plan.state_dir().display());
        };
        for line in damaged {
            emit(Event::Warning(format!("warning: {line}; passing over it")));
        }
        let saved = checkpoint::load(&path, &stateful(&trained, ema.as_ref()), &mut optimizer, &plan.identity())?;
        if saved.step > plan.step.total_steps {
            bail!(
                "{} was saved after {} steps, more than --steps {}; pass --steps above {} to train further (a run is never cut back: the LoRA files of earlier steps are in {})",
                path.display(),
                saved.step,
                plan.step.total_steps,
                saved.step,
                plan.dir.join("lora").display()
            );
        }
        start = saved.step;
        scaler = saved.scaler;
        emit(Event::Warning(format!("resuming from {} (step {start})", path.display())));
    }
    // Every process starts from the main one's weights (and state).
    sync.share_from_main(&trained.as_dyn().parameters())?;
    let world = sync.world_size();
    let total = plan.step.total_steps;
    let mut outputs = Outputs::open(main, model, &trained, plan, start, world)?;
    if let Some(e) = &ema {
        emit(Event::Warning(format!("EMA of the LoRA weights on (decay {}): the saved LoRA files and the grids hold the average", e.decay)));
    }
    if start == 0 && plan.sample_every > 0 {
        if let Some(grid) = outputs.grid(0, ema.as_ref(), &mut |w| emit(Event::Warning(w)))? {
            emit(Event::Grid(grid));
        }
        sync.barrier()?;
    }
    let schedule = NoiseSchedule::from_config(&model.scheduler)?;
    if start == 0 {
        if let Some(line) = outputs.validate(&schedule, data, ema.as_ref(), 0)? {
            emit(Event::Warning(line));
        }
    }
    // A trained encoder shuffles in the step itself; the frozen one's shuffled embeddings would be thrown away.
    let frozen_shuffle = plan.shuffle_keep_tokens.filter(|_| plan.text_encoder_lr.is_none());
    let shuffled = frozen_shuffle.map(|keep_tokens| ShuffledCaptions { data, text: &model.text, keep_tokens, seed: plan.step.seed });
    let captioned: &dyn TrainingData = match &shuffled {
        Some(s) => s,
        None => data,
    };
    let training = Training { data: captioned, held_out: plan.validation.iter().copied().collect() };
    let mut trainer = Trainer::new(&model.unet.model, &schedule, &training, optimizer, scaler, plan.step.clone(), device)?
        .with_sync(sync)
        .with_prior(plan.prior_loss_weight);
    if let Some(prior) = trainer.prior() {
        emit(Event::Warning(format!(
            "prior preservation on: one of {} class images beside each brand image, prior loss weight {}",
            prior.items.len(),
            prior.weight
        )));
    }
    if plan.text_encoder_lr.is_some() {
        let shuffle = plan.shuffle_keep_tokens.map(|keep_tokens| CaptionShuffle { keep_tokens, seed: plan.step.seed });
        trainer = trainer.with_text_encoder(TextEncoderTraining::new(&model.text, data, shuffle)?);
    }
    emit(Event::Started { from: start, total });

    let began = Instant::now();
    let mut smoothed = f64::NAN;
    let mut last_save: Option<PathBuf> = None;
    let mut step = start;
    let samples_per_step = (plan.step.batch_size * plan.step.grad_accum * world) as f64;
    while step < total {
        // Decided together: a process stopping alone would leave the others waiting.
        if trainer.sync().any(stop.load(Ordering::SeqCst))? {
            if let Some(saved) = outputs.save(&trainer, ema.as_ref(), step)? {
                emit(Event::Saved(saved));
            }
            trainer.sync().barrier()?;
            return Ok(Finished { steps_done: step, final_output: None, interrupted: true });
        }
        let outcome = trainer.step(step)?;
        if !outcome.loss.is_finite() && plan.precision != Precision::Fp16 {
            let kept = last_save.as_ref().map_or("no save was made yet".to_string(), |p| format!("the last good save is {}", p.display()));
            bail!(
                "the loss became {} at step {}; training stopped and nothing after the last save was written ({kept}); lower --lr or use --precision fp32",
                outcome.loss,
                step + 1
            );
        }
        step += 1;
        if let Some(e) = &mut ema {
            e.update(trained.as_dyn(), step);
        }
        if outcome.loss.is_finite() {
            smoothed = if smoothed.is_nan() { outcome.loss } else { 0.9 * smoothed + 0.1 * outcome.loss };
        }
        let rate = (step - start) as f64 / began.elapsed().as_secs_f64().max(1e-9);
        let samples_per_s = rate * samples_per_step;
        outputs.record(step, &outcome, began.elapsed().as_secs_f64(), samples_per_s)?;
        emit(Event::Step { step, outcome, smoothed_loss: smoothed, steps_per_s: rate, world_size: world, samples_per_s });
        if plan.save_every > 0 && step % plan.save_every == 0 && step < total {
            if let Some(saved) = outputs.save(&trainer, ema.as_ref(), step)? {
                emit(Event::Saved(saved.clone()));
                last_save = Some(saved);
            }
            trainer.sync().barrier()?;
        }
        if plan.sample_every > 0 && step % plan.sample_every == 0 {
            if let Some(grid) = outputs.grid(step, ema.as_ref(), &mut |w| emit(Event::Warning(w)))? {
                emit(Event::Grid(grid));
            }
            trainer.sync().barrier()?;
        }
        // At each grid and each save, so every saved LoRA has its figure.
        let saved = plan.save_every > 0 && step % plan.save_every == 0 && step < total;
        if (plan.sample_every > 0 && step % plan.sample_every == 0) || saved || step == total {
            if let Some(line) = outputs.validate(&schedule, data, ema.as_ref(), step)? {
                emit(Event::Warning(line));
            }
        }
    }
    let final_output = outputs.finish(&trainer, ema.as_ref(), total)?;
    trainer.sync().barrier()?;
    if let Some(path) = &final_output {
        emit(Event::Saved(path.clone()));
    }
    Ok(Finished { steps_done: total, final_output: Some(plan.final_path()), interrupted: false })
}

/// Every side effect of a run (settings, metrics, saves, grids, the final
/// file), made by the main process alone: behind this one check the other
/// processes of a data-parallel job compute and write nothing.
struct Outputs<'a> {
    main: bool,
    model: &'a StableDiffusion,
    trained: &'a Trained,
    plan: &'a RunPlan,
    metrics: Option<Metrics>,
}

impl<'a> Outputs<'a> {
    fn open(main: bool, model: &'a StableDiffusion, trained: &'a Trained, plan: &'a RunPlan, start: u64, world: usize) -> Result<Self> {
        let metrics = if main {
            write_settings(model, plan)?;
            write_brand_palette(plan)?;
            Some(Metrics::open(&plan.dir.join("metrics.jsonl"), start, world, plan.prior_loss_weight)?)
        } else {
            None
        };
        Ok(Outputs { main, model, trained, plan, metrics })
    }

    fn record(&mut self, step: u64, outcome: &StepOutcome, seconds: f64, samples_per_s: f64) -> Result<()> {
        match &mut self.metrics {
            Some(m) => m.record(step, outcome, seconds, samples_per_s),
            None => Ok(()),
        }
    }

    fn save(&self, trainer: &Trainer, ema: Option<&Ema>, step: u64) -> Result<Option<PathBuf>> {
        if !self.main {
            return Ok(None);
        }
        save(self.model, self.trained, trainer, ema, self.plan, step).map(Some)
    }

    fn grid(&self, step: u64, ema: Option<&Ema>, warn: &mut dyn FnMut(String)) -> Result<Option<PathBuf>> {
        if !self.main {
            return Ok(None);
        }
        with_ema(self.trained, ema, || render_grid(self.model, self.trained, self.plan, step, warn)).map(Some)
    }

    /// The loss on the held-out images now (with the EMA weights when on),
    /// recorded in metrics.jsonl; a line saying it, or `None` when nothing
    /// is held out or this is not the main process.
    fn validate(&mut self, schedule: &NoiseSchedule, data: &dyn TrainingData, ema: Option<&Ema>, step: u64) -> Result<Option<String>> {
        let Some(metrics) = self.metrics.as_mut() else { return Ok(None) };
        if self.plan.validation.is_empty() {
            return Ok(None);
        }
        let (model, plan) = (self.model, self.plan);
        let s = &plan.step;
        let loss = with_ema(self.trained, ema, || {
            validation::loss(&model.unet.model, schedule, data, &plan.validation, s.seed, s.latent_scale, model.device())
        })?;
        metrics.record_validation(step, loss)?;
        Ok(Some(format!("validation loss {loss:.5} at step {step} ({} held-out images)", plan.validation.len())))
    }

    /// The last state and the final LoRA file (or `unet/` folder).
    fn finish(&self, trainer: &Trainer, ema: Option<&Ema>, total: u64) -> Result<Option<PathBuf>> {
        if !self.main {
            return Ok(None);
        }
        let (model, plan) = (self.model, self.plan);
        save(model, self.trained, trainer, ema, plan, total)?;
        let final_path = plan.final_path();
        match self.trained {
            Trained::Lora(lora) => with_ema(self.trained, ema, || write_lora(model, lora, plan, total, &final_path))?,
            Trained::Full(unet) => unet.write_diffusers(&final_path, &model.unet_config, settings_metadata(plan, total))?,
        }
        Ok(Some(final_path))
    }
}

/// What the run trains.
pub enum Trained {
    Lora(LoraNetwork),
    Full(FullUnet),
}

impl Trained {
    fn as_dyn(&self) -> &dyn Trainable {
        match self {
            Trained::Lora(lora) => lora,
            Trained::Full(unet) => unet,
        }
    }
}

/// What a state file holds: the trained tensors, and their EMA when on.
fn stateful<'a>(trained: &'a Trained, ema: Option<&'a Ema>) -> WithEma<'a> {
    WithEma { trained: trained.as_dyn(), ema }
}

/// Runs `f` with the EMA weights swapped in when there is an EMA.
fn with_ema<T>(trained: &Trained, ema: Option<&Ema>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match ema {
        Some(ema) => ema.applied(trained.as_dyn(), f),
        None => f(),
    }
}

/// The periodic LoRA file (LoRA runs) plus the resumable state after
/// `step` steps; returns the LoRA file, or the state of a full run. The
/// state holds the trained weights (and their EMA); the LoRA file the EMA
/// when there is one.
fn save(model: &StableDiffusion, trained: &Trained, trainer: &Trainer, ema: Option<&Ema>, plan: &RunPlan, step: u64) -> Result<PathBuf> {
    let state = checkpoint::save(&plan.state_dir(), step, &stateful(trained, ema), &trainer.optimizer, &trainer.scaler, &plan.identity(), plan.keep_last)?;
    let Trained::Lora(lora) = trained else { return Ok(state) };
    let path = lora_file(plan, step);
    with_ema(trained, ema, || write_lora(model, lora, plan, step, &path))?;
    Ok(path)
}

/// The run's settings as `(key, value)` pairs, for `settings.json` and the report.
pub fn settings_list(plan: &RunPlan) -> Vec<(String, String)> {
    let s = &plan.step;
    let mut list = vec![
        ("mode", if plan.full { "full UNet".to_string() } else { "LoRA".to_string() }),
        ("base model", plan.base_model.clone()),
        ("images", plan.num_images.to_string()),
        ("concepts", plan.concepts.clone().unwrap_or_default()),
        ("resolution", plan.resolution.to_string()),
        ("steps", s.total_steps.to_string()),
        ("learning rate", s.lr.to_string()),
        ("lr schedule", match s.lr_schedule {
            super::lr::LrSchedule::Constant => "constant".to_string(),
            super::lr::LrSchedule::ConstantWithWarmup { warmup } => format!("constant_with_warmup, {warmup} warm-up steps"),
            super::lr::LrSchedule::Cosine { warmup } => format!("cosine, {warmup} warm-up steps"),
        }),
        ("batch size", s.batch_size.to_string()),
        ("grad accumulation", s.grad_accum.to_string()),
        ("precision", plan.precision.name().to_string()),
        ("gradient checkpointing", if s.gradient_checkpointing { "on" } else { "off" }.to_string()),
        ("seed", s.seed.to_string()),
        ("noise offset", s.noise_offset.to_string()),
        ("min-SNR gamma", s.min_snr_gamma.map_or("off".to_string(), |g| g.to_string())),
        ("caption dropout", s.caption_dropout.to_string()),
        ("validation images", plan.validation.len().to_string()),
        ("caption shuffle", plan.shuffle_keep_tokens.map_or("off".to_string(), |k| format!("on, first {k} tags kept"))),
        ("EMA", plan.ema.map_or("off".to_string(), |d| format!("decay {d} (saves and grids use it)"))),
        ("grid", format!("{} prompts x {} seeds, {} {} steps, guidance {}", plan.grid.prompts.len(), plan.grid.seeds.len(), plan.grid.settings.steps, plan.grid.settings.scheduler, plan.grid.settings.guidance)),
    ];
    if !plan.full {
        list.insert(1, ("rank / alpha", format!("{} / {}", plan.rank, plan.alpha)));
        list.insert(2, ("targets", plan.targets.name().to_string()));
        list.push(("format", plan.format.name().to_string()));
    }
    if matches!(plan.targets, Targets::Conv | Targets::All) && !plan.full {
        list.push(("conv rank / alpha", format!("{} / {}", plan.conv.0, plan.conv.1)));
    }
    if plan.dora {
        list.push(("adapter", "DoRA".to_string()));
    }
    if plan.prior_on() {
        list.push(("prior preservation", format!("{} class images, prior loss weight {}", plan.class_images, plan.prior_loss_weight)));
    }
    if let Some(te_lr) = plan.text_encoder_lr {
        list.push(("text encoder", format!("LoRA, learning rate {te_lr}")));
    }
    list.into_iter().filter(|(k, v)| *k != "concepts" || !v.is_empty()).map(|(k, v)| (k.to_string(), v)).collect()
}

/// `settings.json` in the run folder: the settings in order, and the grid's prompts.
fn write_settings(model: &StableDiffusion, plan: &RunPlan) -> Result<()> {
    let settings: Vec<serde_json::Value> = settings_list(plan).into_iter().map(|(k, v)| serde_json::json!([k, v])).collect();
    let device = match model.device() {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    };
    let json = serde_json::json!({
        "name": plan.name, "settings": settings, "device": device, "prompts": plan.grid.prompts, "seeds": plan.grid.seeds,
    });
    std::fs::create_dir_all(&plan.dir).with_context(|| format!("cannot create {}", plan.dir.display()))?;
    crate::fsutil::write_atomic(&plan.dir.join("settings.json"), serde_json::to_string_pretty(&json)?.as_bytes())
}

/// `brand-palette.json` in the run folder: the palette the grids are
/// measured against, so the figures can be computed again without the
/// images (`sdtune serve` does, for this run's LoRA).
fn write_brand_palette(plan: &RunPlan) -> Result<()> {
    match &plan.grid.brand {
        Some(brand) => crate::sample::brand_palette::save(brand, &plan.dir.join(crate::sample::brand_palette::FILE_NAME)),
        None => Ok(()),
    }
}

/// The header metadata of a full run's UNet file.
fn settings_metadata(plan: &RunPlan, step: u64) -> HashMap<String, String> {
    let mut meta: HashMap<String, String> =
        settings_list(plan).into_iter().map(|(k, v)| (format!("sdtune.{}", k.replace([' ', '/'], "_")), v)).collect();
    meta.insert("sdtune.steps_done".into(), step.to_string());
    meta
}

fn write_lora(model: &StableDiffusion, lora: &LoraNetwork, plan: &RunPlan, step: u64, path: &Path) -> Result<()> {
    let weights = lora.to_weights();
    for m in &weights.modules {
        let finite = all_finite(&m.down) && all_finite(&m.up);
        if !finite {
            bail!("LoRA module {} holds NaN or infinite values at step {step}; it was not saved", m.layer);
        }
    }
    let facts = RunFacts {
        name: &plan.name,
        unet: &model.unet_config,
        prediction: model.scheduler.prediction()?,
        rank: plan.rank,
        alpha: plan.alpha,
        steps: step,
        total_steps: plan.step.total_steps,
        lr: plan.step.lr,
        lr_schedule: match plan.step.lr_schedule {
            super::lr::LrSchedule::Constant => "constant",
            super::lr::LrSchedule::ConstantWithWarmup { .. } => "constant_with_warmup",
            super::lr::LrSchedule::Cosine { .. } => "cosine",
        },
        batch_size: plan.step.batch_size,
        grad_accum: plan.step.grad_accum,
        resolution: plan.resolution,
        seed: plan.step.seed,
        precision: plan.precision.name(),
        targets: plan.targets.name(),
        num_images: plan.num_images,
        noise_offset: plan.step.noise_offset,
        min_snr_gamma: plan.step.min_snr_gamma,
        gradient_checkpointing: plan.step.gradient_checkpointing,
        base_model: &plan.base_model,
        text_encoder_lr: plan.text_encoder_lr,
        dora: plan.dora,
    };
    let mut metadata = lora_metadata(&facts);
    if let Some(decay) = plan.ema {
        // Its callers swap the EMA in first: the file holds the average.
        metadata.insert("sdtune_ema_decay".into(), decay.to_string());
    }
    format::write(path, &weights, plan.format, &KohyaNames::of(&model.unet_config)?, metadata)
}

/// Images per UNet batch of the training grids (bounds their memory).
const GRID_BATCH: usize = 4;

/// Renders the fixed prompts x seeds with the adapters as they are now,
/// through `sdtune sample`'s renderer. A LoRA run's images carry their
/// recipe with the LoRA of this step (saved for the grid when the step
/// saves none), so `sdtune sample --from` renders any of them again; a
/// full run's grid records the base model only and is for looking at.
pub fn render_grid(
    model: &StableDiffusion,
    trained: &Trained,
    plan: &RunPlan,
    step: u64,
    warn: &mut dyn FnMut(String),
) -> Result<PathBuf> {
    let g = &plan.grid;
    let mut settings = g.settings.clone();
    let (label, recipes) = match trained {
        Trained::Lora(lora) => {
            let file = lora_file(plan, step);
            if !file.is_file() {
                write_lora(model, lora, plan, step, &file)?;
            }
            settings.loras = vec![grid_lora_use(plan, &file)?];
            ("lora", Recipes::Written)
        }
        Trained::Full(_) => ("unet", Recipes::None),
    };
    let job = Job {
        prompts: g.prompts.clone(),
        negative_prompt: g.negative_prompt.clone(),
        seeds: g.seeds.clone(),
        compare: Vec::new(),
        batch_size: GRID_BATCH,
        settings,
        out: plan.dir.join("samples").join(format!("step-{step:06}.png")),
    };
    let rendered = render::render_attached(model, &job, label, recipes, warn, &mut |_, _| {})?;
    if let Some(brand) = &g.brand {
        let mut figures = render::consistency(&job, &rendered, brand);
        figures.concepts = concept_figures::per_concept(&render::cells(&job, &rendered), &job.prompts, &g.concepts);
        figures.save(&consistency_path(&job.out))?;
    }
    if recipes == Recipes::Written && !g.control_prompts.is_empty() {
        let control = Job { prompts: g.control_prompts.clone(), out: control_grid(plan, step), ..job.clone() };
        render_control(model, &control, step, &drift::drift_path(&job.out), warn)?;
    }
    Ok(job.out)
}

/// `samples/control-NNNNNN.png`: the control prompts' grid of `step`.
fn control_grid(plan: &RunPlan, step: u64) -> PathBuf {
    plan.dir.join("samples").join(format!("control-{step:06}.png"))
}

/// Renders the control prompts with the LoRA of this step and writes
/// their drift from step 0's images (the base model's, as the LoRA starts
/// as a no-op) to `figures`; step 0's drift is 0 by definition.
fn render_control(model: &StableDiffusion, job: &Job, step: u64, figures: &Path, warn: &mut dyn FnMut(String)) -> Result<()> {
    let rendered = render::render_attached(model, job, "lora", Recipes::Written, warn, &mut |_, _| {})?;
    let base_grid = job.out.with_file_name(format!("control-{:06}.png", 0));
    let base_job = Job { out: base_grid.clone(), ..job.clone() };
    let variant = render::Variant { label: "lora".into(), file_tag: String::new(), multiplier: 1.0 };
    let mut rows = Vec::with_capacity(job.prompts.len());
    for (row, prompt) in job.prompts.iter().enumerate() {
        let mut base = Vec::with_capacity(job.seeds.len());
        let mut lora = Vec::with_capacity(job.seeds.len());
        for &seed in &job.seeds {
            let image = &rendered.iter().find(|r| r.row == row && r.seed == seed).context("a control image is missing")?.image;
            lora.push(image);
            let file = base_job.image_path(row, seed, &variant);
            match if step == 0 { Ok(image.clone()) } else { drift::read_image(&file) } {
                Ok(b) => base.push(b),
                Err(e) => {
                    warn(format!("warning: no prompt drift at step {step}: {}", crate::errors::one_sentence(&e)));
                    return Ok(());
                }
            }
        }
        rows.push(drift::PromptImages { prompt, base, lora });
    }
    // Base images of another size (a resume with another sample size) leave
    // this step without figures, as a missing base image does; training goes on.
    match drift::measure(&rows, &base_grid) {
        Ok(drift) => drift.save(figures),
        Err(e) => {
            warn(format!("warning: no prompt drift at step {step}: {}", crate::errors::one_sentence(&e)));
            Ok(())
        }
    }
}

/// `lora/step-NNNNNN.safetensors`: the periodic LoRA file of `step`.
fn lora_file(plan: &RunPlan, step: u64) -> PathBuf {
    plan.dir.join("lora").join(format!("step-{step:06}.safetensors"))
}

/// How a grid image records the LoRA it was rendered with.
fn grid_lora_use(plan: &RunPlan, file: &Path) -> Result<LoraUse> {
    let path = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    Ok(LoraUse { name: plan.name.clone(), path: path.display().to_string(), scale: 1.0, hash: lora_hash(file)? })
}

/// `metrics.jsonl`: one line per step. On resume, lines past the resumed
/// step (written after the last save by the run that died) are dropped.
struct Metrics {
    file: std::fs::File,
    /// Processes training together.
    world_size: usize,
    /// The prior loss's weight, to log the brand images' own loss.
    prior_weight: f64,
}

impl Metrics {
    fn open(path: &Path, keep_through: u64, world_size: usize, prior_weight: f64) -> Result<Self> {
        let kept: String = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<HashMap<String, serde_json::Value>>(l)
                        .ok()
                        .and_then(|m| m.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s <= keep_through)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            Err(_) => String::new(),
        };
        crate::fsutil::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {} for appending", path.display()))?;
        Ok(Metrics { file, world_size, prior_weight })
    }

    fn record(&mut self, step: u64, o: &StepOutcome, seconds: f64, samples_per_s: f64) -> Result<()> {
        let num = |v: f64| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null };
        let line = serde_json::json!({
            "step": step, "loss": num(o.loss), "lr": o.lr, "grad_norm": num(o.grad_norm),
            "loss_scale": o.loss_scale, "skipped": o.skipped, "seconds": seconds,
            "world_size": self.world_size, "samples_per_s": num(samples_per_s),
        });
        let mut line = line;
        if let Some(prior) = o.prior_loss {
            // Both losses of prior preservation: the class images' and the brand images' own.
            line["prior_loss"] = num(prior);
            line["instance_loss"] = num(o.loss - self.prior_weight * prior);
        }
        writeln!(self.file, "{line}").context("cannot append to metrics.jsonl")
    }

    /// A line of its own, `{"step": N, "validation_loss": x}`, so the
    /// per-step lines keep their shape.
    fn record_validation(&mut self, step: u64, loss: f64) -> Result<()> {
        let line = serde_json::json!({ "step": step, "validation_loss": loss });
        writeln!(self.file, "{line}").context("cannot append to metrics.jsonl")
    }
}
