//! `sdtune train`: sdtune.yaml + flags -> a training run on the prepared cache.
use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind};

use crate::config::{Config, CONFIG_FILE};
use crate::data::cache::CacheReader;
use crate::lora::format::LoraFormat;
use crate::lora::targets::Targets;
use crate::loaders::source::LoadOptions;
use crate::models::stable_diffusion::{Placement, StableDiffusion};
use crate::runtime::{parse_device, supports, Precision};
use crate::schedulers::SchedulerKind;
use crate::train::config::TrainConfig;
use crate::train::data::TrainingData;
use crate::train::lr::LrSchedule;
use crate::sample::concept_figures::{palettes, prepared_concepts, ConceptPalette};
use crate::sample::metrics::Brand;
use crate::sample::settings::Settings;
use crate::train::run::{self, Event, GridPlan, RunPlan};
use crate::train::distributed::{DataParallel, JobEnv};
use crate::train::sync::{GradientSync, SingleProcess};
use crate::train::trainer::StepSettings;

use clap::Args;
pub const EXAMPLES: &str = "\
Examples:
  sdtune train                                  # settings from ./sdtune.yaml
  sdtune train --steps 2000 --rank 32 --lr 1e-4 --precision bf16
  sdtune train --resume                         # continue from the newest save
  sdtune train --format diffusers --output runs --name acme-v2
  sdtune train --full --lr 1e-3 --name my-unet  # every UNet weight, not a LoRA
  sdtune train --gradient-checkpointing         # less GPU memory, slower steps
  sdtune train --train-text-encoder --text-encoder-lr 5e-5   # UNet + text-encoder LoRA
  sdtune train --ema --ema-decay 0.999          # save the weights' moving average
  sdtune train --prior-loss-weight 0.5          # prior preservation (class images from prepare)
  sdtune train --nproc 2                        # data parallel: 2 processes (Gloo on CPU, NCCL on CUDA)
  torchrun --nproc-per-node 4 --no-python sdtune train   # the same, started by torchrun

With --nproc N (or torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
each optimizer step takes N x --batch-size x --grad-accum images, shared out
over the processes; the result is the same as one process taking them all.
Rank 0 keeps the terminal and writes every file; the other ranks' output is
shown only when one fails.

Writes <output>/<name>/<name>.safetensors (kohya format: loads in A1111 and ComfyUI;
--format diffusers for load_lora_weights), lora/step-NNNNNN.safetensors and state/
every --save-every steps, samples/step-NNNNNN.png every --sample-every steps
(step 0 is the base model), and metrics.jsonl. Ctrl-C saves and stops cleanly.";


/// The lock file inside a run folder (`output/<name>/.lock`).
const RUN_LOCK: &str = ".lock";

/// Flags of `sdtune train`; each overrides the same key of `train:` in sdtune.yaml.
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// The config file; its folder is the working folder (cache, outputs) [default: ./sdtune.yaml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Base model: a diffusers folder, a single-file .safetensors checkpoint or a
    /// Hub id [default: the model the images were prepared with].
    #[arg(long, value_name = "DIR|FILE|ID")]
    pub model: Option<String>,
    /// Another VAE to decode the sample grids with instead of the model's: a
    /// diffusers vae/ folder or a VAE .safetensors file [default: vae in
    /// sdtune.yaml, else the one the images were prepared with].
    #[arg(long, value_name = "DIR|FILE")]
    pub vae: Option<String>,
    /// Optimizer steps [default: 1000].
    #[arg(allow_negative_numbers = true, long)]
    pub steps: Option<u64>,
    /// LoRA rank [default: 16].
    #[arg(allow_negative_numbers = true, long)]
    pub rank: Option<i64>,
    /// LoRA alpha; updates are scaled by alpha / rank [default: 16].
    #[arg(allow_hyphen_values = true, long)]
    pub alpha: Option<f64>,
    /// Learning rate [default: 1e-4].
    #[arg(allow_hyphen_values = true, long)]
    pub lr: Option<f64>,
    /// constant, constant_with_warmup or cosine [default: constant].
    #[arg(long, value_name = "NAME")]
    pub lr_schedule: Option<String>,
    /// Warm-up steps for the schedules that have one [default: 0].
    #[arg(allow_negative_numbers = true, long, value_name = "N")]
    pub warmup_steps: Option<u64>,
    /// Images per step (one bucket per batch) [default: 1].
    #[arg(allow_negative_numbers = true, long)]
    pub batch_size: Option<usize>,
    /// Batches whose gradients are summed per optimizer step [default: 1].
    #[arg(allow_negative_numbers = true, long)]
    pub grad_accum: Option<usize>,
    /// Seed of LoRA init, data order and noise [default: 42].
    #[arg(allow_negative_numbers = true, long)]
    pub seed: Option<u64>,
    /// auto (bf16 on CUDA and on CPUs with native bf16 where a probe finds it faster, else fp32), fp32, bf16 or fp16 (frozen weights; LoRA stays fp32).
    #[arg(long)]
    pub precision: Option<String>,
    /// auto, cpu, cuda or cuda:N [default: auto].
    #[arg(long)]
    pub device: Option<String>,
    /// Layers that get LoRA: cross-attn, attn, transformer, conv (cross-attn plus
    /// LoCon on the resnets' and samplers' 3x3 convs) or all (kohya's LoCon:
    /// transformer plus every resnet layer) [default: cross-attn].
    #[arg(long)]
    pub targets: Option<String>,
    /// Save LoRA + resumable state every N steps (0: only at the end) [default: 250].
    #[arg(allow_negative_numbers = true, long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Render the sample grid every N steps (0: never) [default: 250].
    #[arg(allow_negative_numbers = true, long, value_name = "N")]
    pub sample_every: Option<u64>,
    /// Resumable states kept [default: 3].
    #[arg(allow_negative_numbers = true, long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Folder of runs [default: output].
    #[arg(long, value_name = "DIR")]
    pub output: Option<String>,
    /// Run name; files go to <output>/<name>/ [default: brand-lora].
    #[arg(long)]
    pub name: Option<String>,
    /// kohya or diffusers [default: kohya].
    #[arg(long)]
    pub format: Option<String>,
    /// Extra per-channel noise, e.g. 0.05 [default: 0].
    #[arg(allow_hyphen_values = true, long)]
    pub noise_offset: Option<f64>,
    /// Min-SNR-gamma weighting; 0 turns it off [default: 5].
    #[arg(allow_hyphen_values = true, long)]
    pub min_snr_gamma: Option<f64>,
    /// Fraction of steps trained on the empty caption [default: 0.05].
    #[arg(allow_hyphen_values = true, long)]
    pub caption_dropout: Option<f64>,
    /// Keep only each UNet resnet's and transformer's inputs and compute
    /// their activations again in backward: much less activation memory,
    /// steps about 20-30% slower; the trained weights come out the same.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Keep an exponential moving average of the LoRA weights (fp32); the
    /// saved LoRA files and the sample grids use it.
    #[arg(long)]
    pub ema: bool,
    /// The EMA's decay, reached after diffusers' warm-up (1+s)/(10+s) [default: 0.999].
    #[arg(allow_hyphen_values = true, long, value_name = "D")]
    pub ema_decay: Option<f64>,
    /// Hold images out of training for a validation loss every
    /// --sample-every steps: a fraction below 1 or a count [default: 0; a
    /// validation/ folder in the data folder is held out instead].
    #[arg(allow_hyphen_values = true, long, value_name = "F|N")]
    pub validation_split: Option<f64>,
    /// Shuffle each caption's comma-separated tags per sample (kohya's
    /// shuffle_caption); the shuffled caption is encoded in the step.
    #[arg(long)]
    pub shuffle_captions: bool,
    /// Tags at the start of each caption that --shuffle-captions keeps in place [default: 0].
    #[arg(allow_negative_numbers = true, long, value_name = "N")]
    pub keep_tokens: Option<usize>,
    /// Also train a LoRA on the text encoder(s) (q/k/v/out_proj; fc1/fc2
    /// too with --targets transformer), as kohya does; captions are then
    /// encoded in every step instead of read from the cache.
    #[arg(long)]
    pub train_text_encoder: bool,
    /// The text encoders' learning rate [default: --lr].
    #[arg(allow_hyphen_values = true, long, value_name = "LR")]
    pub text_encoder_lr: Option<f64>,
    /// LoCon rank on 3x3 convs with --targets conv or all (kohya's conv_dim) [default: --rank].
    #[arg(allow_negative_numbers = true, long, value_name = "N")]
    pub conv_rank: Option<i64>,
    /// LoCon alpha (kohya's conv_alpha) [default: --alpha].
    #[arg(allow_hyphen_values = true, long)]
    pub conv_alpha: Option<f64>,
    /// Train DoRA (weight-decomposed LoRA, as PEFT's use_dora): each pair
    /// gets a magnitude per output row; files carry kohya's dora_scale or
    /// PEFT's lora_magnitude_vector.
    #[arg(long)]
    pub dora: bool,
    /// DreamBooth prior preservation: the loss of the class images (made by
    /// `sdtune prepare` from data.class_prompt, or a reg/ folder) is added
    /// times this; one class image goes with each brand image; 0 turns it
    /// off [default: 1.0].
    #[arg(allow_hyphen_values = true, long, value_name = "W")]
    pub prior_loss_weight: Option<f64>,
    /// Continue from the newest saved state of this run.
    #[arg(long)]
    pub resume: bool,
    /// Train every UNet weight (fp32) instead of a LoRA, e.g. to make a base
    /// model; writes a diffusers unet/ folder to <output>/<name>/unet/.
    #[arg(long)]
    pub full: bool,
    /// Data parallel on this machine: start N training processes (c10d:
    /// Gloo on the CPU, NCCL with one GPU per process on CUDA).
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// Seconds a process of a data-parallel job waits for the others
    /// (joining, each gradient exchange, rank 0's saves and grids) before
    /// it gives up [default: 1800].
    #[arg(long, value_name = "SECONDS")]
    pub dist_timeout: Option<f64>,
}

/// Default of `--dist-timeout`, torch.distributed's own.
const DIST_TIMEOUT_S: f64 = 1800.0;

/// This process's part in training: alone, starting N ranks, or one rank of a job.
enum Role {
    Alone,
    Launcher(usize),
    Rank(JobEnv),
}

fn role(args: &TrainArgs) -> Result<Role> {
    let job = JobEnv::from_env()?;
    match (args.nproc, job) {
        (Some(_), Some(_)) => bail!("--nproc starts its own processes, but RANK and WORLD_SIZE are already set (torchrun or another launcher started this one); leave out --nproc"),
        (Some(n), None) => {
            if let Some(missing) = crate::train::c10d::missing() {
                bail!("--nproc {n}: {missing}");
            }
            Ok(Role::Launcher(n))
        }
        (None, Some(job)) => Ok(Role::Rank(job)),
        (None, None) => Ok(Role::Alone),
    }
}

/// How long the processes of a job wait for each other.
fn dist_timeout(args: &TrainArgs) -> Result<Duration> {
    let seconds = args.dist_timeout.unwrap_or(DIST_TIMEOUT_S);
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("--dist-timeout {seconds} is not a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub fn run(args: TrainArgs) -> Result<()> {
    let role = role(&args)?;
    let timeout = dist_timeout(&args)?;
    if let Role::Launcher(n) = role {
        let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        return crate::train::launch::launch(n, &argv);
    }
    let job = match role {
        Role::Rank(job) => Some(job),
        _ => None,
    };
    let main = job.as_ref().is_none_or(|j| j.rank == 0);
    let (work_dir, config) = load_config(args.config.as_deref())?;
    let mut train = config.train.clone();
    apply_flags(&mut train, &args);
    train.validate().context("the training settings are not valid")?;
    for warning in train.warnings() {
        eprintln!("{warning}");
    }

    let cache = CacheReader::open(&work_dir)?;
    if cache.unfinished_prepare() {
        eprintln!("warning: a later `sdtune prepare` did not finish; training uses the images of the last one that did (run prepare again to include the rest)");
    }
    let dataset = cache.dataset().clone();
    check_concepts(&cache)?;
    check_prior(&args, &train, &cache)?;
    // Held for the whole run: two runs in one folder would mix their files.
    // The main process of a job holds it for the job (it alone writes).
    let _run_lock = if main {
        Some(crate::lock::exclusive(
            &work_dir.join(&train.output).join(&train.name),
            RUN_LOCK,
            "sdtune train",
            "wait for it to finish, or pass another --name",
        )?)
    } else {
        None
    };
    let mut model_spec = args.model.clone().or(config.model.clone()).unwrap_or_else(|| dataset.model.clone());
    if crate::loaders::builtin::is_builtin(&model_spec) {
        // Written again if its cached copy was removed since prepare.
        model_spec = crate::loaders::builtin::fallback()?.display().to_string();
    }
    if model_spec != dataset.model {
        eprintln!(
            "warning: the images were prepared with {}; training on {model_spec} uses the cached latents and caption embeddings of the former",
            dataset.model
        );
    }
    let device = parse_device(&train.device)?;
    let device = job.as_ref().map_or(device, |j| j.device(device));
    let precision = if args.full {
        full_precision(&train.precision)?
    } else {
        choose_precision(&train.precision, device)?
    };
    let vae_spec = args.vae.clone().or(config.vae.clone()).or(dataset.vae.clone());
    if vae_spec != dataset.vae {
        let named = |vae: &Option<String>| vae.clone().unwrap_or_else(|| "the model's own VAE".into());
        eprintln!(
            "warning: the images were encoded with {}; the sample grids decode with {}, so they show what that VAE makes of the trained latents",
            named(&dataset.vae),
            named(&vae_spec)
        );
    }
    let vae_path = vae_spec.as_deref().map(|v| resolve_against(&work_dir, v));
    // The grids' VAE in the run's precision, as `sdtune sample` places it for
    // that precision: a grid's recipe says the precision, and `sample --from`
    // must render the same pixels from it.
    let placement = Placement { device, kind: precision.kind(), vae_kind: precision.kind() };
    let model_path = resolve_against(&work_dir, &model_spec);
    let options = LoadOptions { vae: vae_path.clone(), ..LoadOptions::default() };
    let sync: Box<dyn GradientSync> = match &job {
        Some(job) => Box::new(DataParallel::join(job, device, timeout)?),
        None => Box::new(SingleProcess),
    };
    let model = StableDiffusion::load(&model_path.to_string_lossy(), placement, &options)?;
    let processes = match &job {
        Some(job) => format!(
            ", {} processes x {} images per step, store at {}:{} served by {}",
            job.world_size,
            train.batch_size * train.grad_accum,
            job.master_addr,
            job.master_port,
            if job.agent_store { "torchrun's agent" } else { "rank 0" }
        ),
        None => String::new(),
    };
    if let Some(job) = job.as_ref().filter(|_| !main) {
        // Kept by the launcher: the last line it shows if this rank fails.
        eprintln!("rank {} of {} joined the job on {} (pid {})", job.rank, job.world_size, device_name(device), std::process::id());
    }
    if main {
        let classes = cache.class_items().len();
        let class_note = if classes > 0 { format!(" (+ {classes} class images)") } else { String::new() };
        eprintln!(
            "training {} on {} images{class_note} from {} ({} on {}{processes})",
            train.name,
            dataset.items.len() - classes,
            dataset.data_dir,
            precision.name(),
            device_name(device)
        );
    }

    let grid = grid_settings(&train, &cache, &model_path, vae_path.as_deref(), &model, precision, device)?;
    let mut plan = plan(&train, &config, &work_dir, &cache, precision, &model_spec, args.resume, grid)?;
    plan.full = args.full;
    plan.processes = job.as_ref().map_or(1, |j| j.world_size);
    plan.grid.brand = brand_palette(&work_dir);
    if plan.grid.brand.is_some() {
        plan.grid.concepts = concept_palettes(&work_dir, &plan.grid.prompts);
    }
    let stop = crate::interrupt::flag();
    let bar = crate::progress::steps_bar(train.steps, "train");
    let mut on_event = |event: Event| match event {
        Event::Started { from, total } => {
            bar.set_length(total);
            bar.set_position(from);
        }
        Event::Step { step, outcome, smoothed_loss, world_size, samples_per_s, .. } => {
            bar.set_position(step);
            let skipped = if outcome.skipped { " (fp16 overflow: step skipped)" } else { "" };
            let world = if world_size > 1 { format!(" {world_size} processes") } else { String::new() };
            bar.set_message(format!("loss {smoothed_loss:.4} lr {:.2e}{world} {samples_per_s:.1} samples/s{skipped}", outcome.lr));
        }
        Event::Saved(path) => bar.suspend(|| eprintln!("saved {}", path.display())),
        Event::Grid(path) => bar.suspend(|| eprintln!("samples {}", path.display())),
        Event::Warning(w) => bar.suspend(|| eprintln!("{w}")),
    };
    let finished = run::run_with(&model, &cache as &dyn TrainingData, &plan, sync, stop, &mut on_event)?;
    bar.finish_and_clear();
    if finished.interrupted {
        // stderr, and exit 130: the final LoRA was not written.
        eprintln!(
            "stopped at step {} of {}; state saved in {} — `sdtune train --resume` continues",
            finished.steps_done,
            train.steps,
            plan.state_dir().display()
        );
        return Err(crate::interrupt::Interrupted.into());
    }
    if !main {
        return Ok(());
    }
    if let Some(path) = finished.final_output {
        println!("wrote {} ({} steps)", path.display(), finished.steps_done);
    }
    let report = crate::report::write(&plan.dir)?;
    println!("report {}", report.display());
    Ok(())
}

/// The working folder and its config (defaults when there is none).
fn load_config(path: Option<&Path>) -> Result<(PathBuf, Config)> {
    match path {
        Some(file) => {
            if !file.is_file() {
                bail!("--config {} {}; pass the path of an sdtune.yaml", file.display(), crate::fsutil::why_not_a_file(file));
            }
            let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
            Ok((dir, Config::load(file)?))
        }
        None => {
            let dir = PathBuf::from(".");
            let config = Config::load_from_dir(&dir)?.unwrap_or_default();
            if !dir.join(CONFIG_FILE).exists() {
                eprintln!("no {CONFIG_FILE} here; using defaults (sdtune prepare writes one)");
            }
            Ok((dir, config))
        }
    }
}

fn apply_flags(t: &mut TrainConfig, a: &TrainArgs) {
    macro_rules! set {
        ($field:ident) => {
            if let Some(v) = a.$field.clone() {
                t.$field = v;
            }
        };
    }
    set!(steps);
    set!(rank);
    set!(alpha);
    set!(lr);
    set!(lr_schedule);
    set!(warmup_steps);
    set!(batch_size);
    set!(grad_accum);
    set!(seed);
    set!(precision);
    set!(device);
    set!(targets);
    set!(save_every);
    set!(sample_every);
    set!(keep_last);
    set!(output);
    set!(name);
    set!(format);
    set!(noise_offset);
    set!(caption_dropout);
    set!(ema_decay);
    set!(validation_split);
    set!(keep_tokens);
    set!(prior_loss_weight);
    if a.shuffle_captions {
        t.shuffle_captions = true;
    }
    if a.ema {
        t.ema = true;
    }
    // 0 turns it off; anything else (negative, NaN too) is kept for validate() to judge.
    if let Some(g) = a.min_snr_gamma {
        t.min_snr_gamma = (g != 0.0).then_some(g);
    }
    // A switch: the flag turns it on, sdtune.yaml's `false` is the default.
    if a.gradient_checkpointing {
        t.gradient_checkpointing = true;
    }
    if let Some(r) = a.conv_rank {
        t.conv_rank = Some(r);
    }
    if let Some(al) = a.conv_alpha {
        t.conv_alpha = Some(al);
    }
    if a.dora {
        t.dora = true;
    }
    if a.train_text_encoder {
        t.train_text_encoder = true;
    }
    if let Some(lr) = a.text_encoder_lr {
        t.text_encoder_lr = Some(lr);
    }
}

/// Full training keeps fp32 weights: they are the master weights.
fn full_precision(spec: &str) -> Result<Precision> {
    match spec {
        "auto" | "fp32" => Ok(Precision::Fp32),
        other => bail!("--full trains the UNet's own weights, which stay fp32; use --precision fp32 (or auto) instead of {other}"),
    }
}

/// The prepared images' palette, for each grid's consistency figures
/// (none, with a warning, when the images cannot be read).
fn brand_palette(work_dir: &Path) -> Option<Brand> {
    match Brand::from_prepared(work_dir) {
        Ok(brand) => brand,
        Err(e) => {
            eprintln!("warning: no consistency figures for the grids: {}", crate::errors::one_sentence(&e));
            None
        }
    }
}

/// Says which concepts train how often; refuses a set with nothing to train.
fn check_concepts(cache: &CacheReader) -> Result<()> {
    let dataset = cache.dataset();
    if dataset.concepts.is_empty() {
        return Ok(());
    }

    if cache.items_by_bucket().iter().all(Vec::is_empty) {
        bail!("every prepared image belongs to a regularisation (class) concept; add a concept without is_class (or a kohya N_name folder outside reg/) and run `sdtune prepare` again");
    }
    if let Some(summary) = concept_summary(cache) {
        eprintln!("concepts: {summary}");
    }
    Ok(())
}

/// A prior weight asked for on a set without class images is refused in words.
fn check_prior(args: &TrainArgs, t: &TrainConfig, cache: &CacheReader) -> Result<()> {
    let classes = cache.class_items().len();
    if classes > 0 && t.prior_loss_weight == 0.0 {
        eprintln!("note: the prepared set holds {classes} class images, which prior_loss_weight 0 leaves out of this run");
    }
    if classes == 0 && args.prior_loss_weight.is_some_and(|w| w > 0.0) {
        bail!("--prior-loss-weight asks for prior preservation, but the prepared set holds no class images; set data.class_prompt and data.num_class_images in sdtune.yaml (or pass --class-prompt and --class-images to sdtune prepare), or add a reg/ folder of class images, and run `sdtune prepare` again");
    }
    Ok(())
}

/// `roadster 4 images x 10 repeats, logo 2 x 1 (weight 0.5)`: the training concepts in words.
fn concept_summary(cache: &CacheReader) -> Option<String> {
    let dataset = cache.dataset();
    let parts: Vec<String> = dataset
        .concepts
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.is_class)
        .map(|(i, c)| (c, dataset.items.iter().filter(|item| item.concept == Some(i)).count()))
        .filter(|&(_, images)| images > 0)
        .map(|(c, images)| {
            let weight = if c.loss_weight == 1.0 { String::new() } else { format!(", loss weight {}", c.loss_weight) };
            let plural = |n: usize| if n == 1 { "" } else { "s" };
            format!("{} ({images} image{} x {} repeat{}{weight})", c.name, plural(images), c.repeats, plural(c.repeats as usize))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Each training concept's palette and grid rows (none, with a warning,
/// when its images cannot be read).
fn concept_palettes(work_dir: &Path, prompts: &[String]) -> Vec<ConceptPalette> {
    match prepared_concepts(work_dir) {
        Ok(concepts) => palettes(prompts, concepts),
        Err(e) => {
            eprintln!("warning: no per-concept consistency figures: {}", crate::errors::one_sentence(&e));
            Vec::new()
        }
    }
}

/// The first caption of each training concept: one grid row per concept.
fn concept_prompts(cache: &CacheReader) -> Vec<String> {
    let dataset = cache.dataset();
    let mut prompts: Vec<String> = Vec::new();
    for (i, _) in dataset.concepts.iter().enumerate().filter(|(_, c)| !c.is_class) {
        if let Some(item) = dataset.items.iter().find(|item| item.concept == Some(i) && !prompts.contains(&item.caption)) {
            prompts.push(item.caption.clone());
        }
    }
    prompts
}

/// `auto`: bf16 on CUDA, and on CPUs where it is native and measured faster
/// (`runtime::auto_precision`), else fp32; bf16 falls back to fp16 where unsupported.
fn choose_precision(spec: &str, device: Device) -> Result<Precision> {
    let wanted = match spec {
        "auto" => crate::runtime::auto_precision(device),
        other => Precision::parse(other)?,
    };
    if wanted == Precision::Bf16 && !supports(device, Kind::BFloat16) {
        eprintln!("warning: bf16 is not supported on this device; using fp16 with loss scaling");
        return Ok(Precision::Fp16);
    }
    Ok(wanted)
}

fn plan(
    t: &TrainConfig,
    config: &Config,
    work_dir: &Path,
    cache: &CacheReader,
    precision: Precision,
    model_spec: &str,
    resume: bool,
    grid: Settings,
) -> Result<RunPlan> {
    let dataset = cache.dataset();
    let dir = work_dir.join(&t.output).join(&t.name);
    if !resume && dir.join("state").is_dir() && crate::train::checkpoint::latest(&dir.join("state"))?.is_some() {
        bail!(
            "{} already holds a run; pass --resume to continue it, or choose another --name",
            dir.display()
        );
    }
    let mut prompts = config.sample.prompts.clone();
    if prompts.is_empty() {
        prompts = concept_prompts(cache);
    }
    if prompts.is_empty() {
        prompts = dataset.items.iter().map(|i| i.caption.clone()).take(2).collect();
    }
    Ok(RunPlan {
        name: t.name.clone(),
        dir,
        rank: t.rank,
        alpha: t.alpha,
        targets: Targets::parse(&t.targets)?,
        step: StepSettings {
            batch_size: t.batch_size,
            grad_accum: t.grad_accum,
            lr: t.lr,
            lr_schedule: LrSchedule::parse(&t.lr_schedule, t.warmup_steps)?,
            total_steps: t.steps,
            seed: t.seed,
            noise_offset: t.noise_offset,
            min_snr_gamma: t.min_snr_gamma.filter(|&g| g > 0.0),
            caption_dropout: t.caption_dropout,
            clip_norm: t.clip_norm,
            latent_scale: dataset.scaling_factor,
            gradient_checkpointing: t.gradient_checkpointing,
        },
        precision,
        save_every: t.save_every,
        sample_every: t.sample_every,
        keep_last: t.keep_last,
        format: if t.format == "diffusers" { LoraFormat::Peft } else { LoraFormat::Kohya },
        resume,
        grid: GridPlan {
            prompts,
            seeds: config.sample.seeds.clone(),
            negative_prompt: None,
            settings: grid,
            brand: None,
            concepts: Vec::new(),
            control_prompts: control_prompts(config, cache),
        },
        resolution: dataset.resolution,
        num_images: dataset.items.len() - cache.class_items().len(),
        concepts: concept_summary(cache),
        base_model: model_spec.to_string(),
        full: false,
        ema: t.ema.then_some(t.ema_decay),
        validation: held_out(t, cache)?,
        shuffle_keep_tokens: t.shuffle_captions.then_some(t.keep_tokens),
        text_encoder_lr: t.train_text_encoder.then(|| t.text_encoder_lr.unwrap_or(t.lr)),
        dora: t.dora,
        prior_loss_weight: t.prior_loss_weight,
        class_images: cache.class_items().len(),
        conv: (t.conv_rank.unwrap_or(t.rank), t.conv_alpha.unwrap_or(t.alpha)),
        processes: 1,
    })
}

/// The class prompt (data.class_prompt, else a reg set's first caption)
/// and `sample.control_prompts`, each once: the prompts whose drift from
/// the base model the grids measure.
fn control_prompts(config: &Config, cache: &CacheReader) -> Vec<String> {
    let dataset = cache.dataset();
    let class = config.data.class_prompt.clone().or_else(|| cache.class_items().first().map(|&i| dataset.items[i].caption.clone()));
    let mut prompts: Vec<String> = Vec::new();
    for p in class.into_iter().chain(config.sample.control_prompts.iter().cloned()) {
        let p = p.trim().to_string();
        if !p.is_empty() && !prompts.contains(&p) {
            prompts.push(p);
        }
    }
    prompts
}

/// The items held out for the validation loss.
fn held_out(t: &TrainConfig, cache: &CacheReader) -> Result<Vec<usize>> {
    let paths: Vec<String> = cache.dataset().items.iter().map(|i| i.path.clone()).collect();
    let candidates: Vec<usize> = cache.items_by_bucket().into_iter().flatten().collect();
    let mut held = crate::train::validation::held_out(&paths, &candidates, t.validation_split, t.seed)?;
    held.sort_unstable();
    if !held.is_empty() {
        let names: Vec<&str> = held.iter().map(|&i| paths[i].as_str()).collect();
        eprintln!("validation: {} held out of training ({})", held.len(), names.join(", "));
    }
    Ok(held)
}

/// What the training grids' images record, as `sdtune sample` would:
/// DDIM at the training resolution, the model as loaded, this device.
fn grid_settings(
    t: &TrainConfig,
    cache: &CacheReader,
    model_path: &Path,
    vae: Option<&Path>,
    model: &StableDiffusion,
    precision: Precision,
    device: Device,
) -> Result<Settings> {
    let res = cache.dataset().resolution as i64;
    let model_hash = match &model.source {
        Some(source) => crate::sample::settings::model_hash(source, None)?,
        None => String::new(),
    };
    // As `sdtune sample --vae` records it, so `--from` a grid image decodes alike.
    let model_hash = match vae {
        Some(vae) => crate::sample::settings::with_vae(&model_hash, vae)?,
        None => model_hash,
    };
    Ok(Settings {
        steps: t.sample_steps,
        guidance: t.sample_guidance,
        width: res,
        height: res,
        scheduler: SchedulerKind::Ddim.name().to_string(),
        clip_skip: 0,
        model: crate::sample::settings::recorded_model(&model_path.to_string_lossy()),
        model_hash,
        variant: None,
        vae: vae.map(|v| crate::sample::settings::recorded_model(&v.to_string_lossy())),
        prediction_type: None,
        loras: Vec::new(),
        fuse: false,
        vae_tiling: false,
        precision: precision.name().to_string(),
        device: device_name(device),
        size_conditioning: None,
    })
}

/// A relative model path in a config is relative to the config's folder.
fn resolve_against(work_dir: &Path, spec: &str) -> PathBuf {
    let p = Path::new(spec);
    if p.is_absolute() || !work_dir.join(p).exists() {
        p.to_path_buf()
    } else {
        work_dir.join(p)
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}
