//! `sdtune sample`: images from prompts and seeds, a labelled grid of them,
//! consistency figures against the brand set; or an image rendered again
//! from the settings in its PNG (`--from`).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::config::Config;
use crate::loaders::builtin;
use crate::loaders::source::{parse_prediction, LoadOptions};
use super::model_args::ModelArgs;
use crate::models::stable_diffusion::{Placement, StableDiffusion};
use crate::runtime::Precision;
use crate::ranges;
use crate::sample::limits;
use crate::sample::pipeline::SizeConditioning;
use crate::sample::metrics::Brand;
use crate::sample::render::{self, consistency_path, Job, LoadedLora};
use crate::sample::session;
use crate::sample::settings::{self, Found, ImageRecipe, Recipe, Settings};
use crate::schedulers::SchedulerKind;

use clap::Args;
pub const EXAMPLES: &str = "\
Examples:
  sdtune sample --model ./stable-diffusion-v1-5 --prompt \"a red car by the sea\" --seed 42 --out car.png
  sdtune sample --model ./sd21 --prompt \"product shot, white background\" \\
      --negative-prompt \"blurry\" --steps 30 --guidance 7.5 --width 768 --height 768
  sdtune sample --model ./sd15 --prompt \"acme mug on a desk\" --lora output/acme/acme.safetensors:0.8
  sdtune sample --model ./sd15 --prompt \"acme mug\" --prompt \"acme bag\" --seeds 1,2,3,4 --out grid.png
  sdtune sample --model ./sd15 --prompts prompts.txt --seed 1 --count 4 \\
      --lora acme.safetensors --compare 0.5,1     (base | LoRA x0.5 | LoRA x1 for each seed)
  sdtune sample --model stabilityai/stable-diffusion-xl-base-1.0 --prompt \"acme mug\" \\
      --width 1024 --height 1024 --vae ./sdxl-vae-fp16-fix --lora output/acme-xl/acme-xl.safetensors
  sdtune sample                     in a training folder: sdtune.yaml's prompts x seeds, run's LoRA
  sdtune sample --from grid-p1-s2.png             render an image again from its PNG's settings

The same model, prompt, seed, scheduler and steps give the same image as
diffusers' StableDiffusionPipeline with torch.Generator(\"cpu\").manual_seed(seed);
noise is drawn on the CPU, so a seed gives the same image on CUDA up to precision.
A grid (several prompts or seeds) is written to --out with each image beside it
as <stem>-p<row>-s<seed>.png; every PNG carries its settings (A1111's
`parameters` text plus sdtune's own), which `--from` reads back. With a brand
set (--brand DIR, or the images `sdtune prepare` cached here) the palette
distance of each image to it is printed and written to <stem>.consistency.json.";


#[derive(Args, Debug)]
pub struct SampleArgs {
    /// What to render; repeat for more grid rows. Without any prompt, sdtune.yaml's
    /// sample prompts and seeds are rendered with the run's trained LoRA.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Vec<String>,
    /// A text file of prompts, one a line (blank lines and # comments skipped).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// What to steer away from (used when --guidance > 1).
    #[arg(long, value_name = "TEXT")]
    pub negative_prompt: Option<String>,
    /// Seed of the initial noise; the same seed gives the same image.
    #[arg(allow_negative_numbers = true, long, default_value_t = 42, conflicts_with = "seeds")]
    pub seed: u64,
    /// Grid columns: --count seeds from --seed on (--seed 1 --count 4: seeds 1,2,3,4).
    #[arg(allow_negative_numbers = true, long, default_value_t = 1, value_name = "N", conflicts_with = "seeds")]
    pub count: usize,
    /// Grid columns: these seeds, e.g. 1,2,3,4.
    #[arg(allow_negative_numbers = true, long, value_name = "S,S,...", value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Denoising steps [default: 30; sdtune.yaml's sample_steps for the run's grid].
    #[arg(allow_negative_numbers = true, long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale, 0 to 100; 1 turns guidance off (no unconditional pass)
    /// [default: 7.5; sdtune.yaml's sample_guidance for the run's grid].
    #[arg(allow_hyphen_values = true, long)]
    pub guidance: Option<f64>,
    /// Image width in pixels, a multiple of 8 [default: the model's native size].
    #[arg(allow_negative_numbers = true, long)]
    pub width: Option<i64>,
    /// Image height in pixels, a multiple of 8 [default: the model's native size].
    #[arg(allow_negative_numbers = true, long)]
    pub height: Option<i64>,
    /// Sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, heun, lms or pndm.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Skip this many final text-encoder layers (A1111's "clip skip" minus one).
    #[arg(allow_negative_numbers = true, long, default_value_t = 0)]
    pub clip_skip: usize,
    /// SDXL: the original image size the UNet is told of, WIDTHxHEIGHT (larger
    /// reads as sharper, smaller as softer) [default: the image's size].
    #[arg(long, value_name = "WxH")]
    pub original_size: Option<String>,
    /// SDXL: the crop's top-left corner the UNet is told of, TOP,LEFT in pixels
    /// (0,0 asks for a centred, uncropped look) [default: 0,0].
    #[arg(long, value_name = "TOP,LEFT")]
    pub crop: Option<String>,
    /// SDXL: the target size the UNet is told of, WIDTHxHEIGHT [default: the image's size].
    #[arg(long, value_name = "WxH")]
    pub target_size: Option<String>,
    /// A LoRA to apply, with an optional strength (default 1, at most 100 either
    /// way); repeat to stack several. kohya (A1111/ComfyUI) and diffusers/PEFT files load.
    /// A training run's folder (output/<name>) takes the saved step `sdtune pick` recommends.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<String>,
    /// Fuse the LoRAs into the weights (faster; same image up to rounding).
    #[arg(long)]
    pub fuse: bool,
    /// Put the base model's image beside the LoRAs' for each seed: alone, the LoRAs
    /// at the strengths given; with values (0.5,1), at those multiples of them.
    #[arg(allow_negative_numbers = true, long, value_name = "M,M,...", num_args = 0.., value_delimiter = ',')]
    pub compare: Option<Vec<f64>>,
    /// Render the image (or grid) a PNG written by sdtune again, from the settings
    /// it carries (A1111 PNGs too, with --model); --model and --lora replace the recorded ones.
    #[arg(long, value_name = "IMAGE.png", conflicts_with_all = [
        "prompt", "prompts", "negative_prompt", "seed", "count", "seeds", "steps", "guidance",
        "width", "height", "scheduler", "clip_skip", "compare", "precision", "fuse", "vae_tiling",
        "original_size", "crop", "target_size",
    ])]
    pub from: Option<PathBuf>,
    /// Folder of brand images for the consistency figures [default: the images
    /// `sdtune prepare` cached in this folder, for grids].
    #[arg(long, value_name = "DIR")]
    pub brand: Option<PathBuf>,
    /// Images per UNet batch (more is faster until memory runs out).
    #[arg(allow_negative_numbers = true, long, value_name = "N", default_value_t = 4)]
    pub batch_size: usize,
    /// Where to write the PNG; for a grid, the grid (its images go beside it)
    /// [default: sample.png; output/<name>/samples/final.png for the run's grid;
    /// IMAGE-again.png with --from].
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
    // The model and how it runs, under a heading of its own in --help (last,
    // since the heading carries over to the flags after it).
    #[command(flatten)]
    pub model: ModelArgs,
}

/// What to render, decided before the model is loaded.
enum Work {
    /// A grid, or one image, from flags or sdtune.yaml. Width and height
    /// of 0 mean the model's native size.
    Job(Job),
    /// One image again, from its recorded settings.
    Again { recipe: ImageRecipe, out: PathBuf },
}

/// Where the brand set for the consistency figures comes from.
enum BrandFrom {
    None,
    Dir(PathBuf),
    /// The prepared cache in this folder, when there is one (skipped quietly otherwise).
    Prepared,
}

struct Plan {
    model: String,
    options: LoadOptions,
    precision: Precision,
    fuse: bool,
    vae_tiling: bool,
    /// `FILE[:SCALE]` each.
    loras: Vec<String>,
    work: Work,
    brand: BrandFrom,
    /// The model hash the `--from` image was made with.
    expected_model_hash: Option<String>,
    /// The LoRA files (path, hash) the `--from` image was made with, when
    /// they are the ones loaded (no `--lora` given).
    expected_lora_hashes: Vec<(String, String)>,
}

pub fn run(args: SampleArgs) -> Result<()> {
    let device = args.model.device()?;
    let plan = plan(&args)?;
    let placement = Placement { device, kind: plan.precision.kind(), vae_kind: plan.precision.kind() };
    let (mut model, model_hash) = session::load_and_hash(&plan.model, &plan.options, placement)?;
    if plan.vae_tiling {
        model.vae.model.enable_tiling();
    }
    check_for_model(&plan.work, &model)?;
    let layers = render::layers(&model)?;
    let specs = plan.loras.iter().map(|spec| picked_step(spec)).collect::<Result<Vec<_>>>()?;
    let loras = specs.iter().map(|spec| LoadedLora::read(spec, &layers)).collect::<Result<Vec<_>>>()?;
    check_lora_hashes(&plan, &loras)?;
    let handling = session::Handling { precision: plan.precision, fuse: plan.fuse, vae_tiling: plan.vae_tiling };
    let shared = session::shared_settings(&plan.model, &plan.options, handling, model_hash, &loras, device);
    if let Some(want) = plan.expected_model_hash.as_ref().filter(|&h| h != &shared.model_hash) {
        eprintln!("warning: the model's hash is {}, the image was made with {want}; the image will differ", shared.model_hash);
    }
    match plan.work {
        Work::Again { recipe, out } => again(&model, recipe, shared, &loras, &out),
        Work::Job(mut job) => {
            fill_settings(&mut job, shared, &model);
            run_job(&model, &job, &loras, &plan.brand)
        }
    }
}

/// `--lora RUN_DIR[:SCALE]`: a training run's folder stands for the saved
/// step `sdtune pick` recommends; any other spec is returned as it is.
fn picked_step(spec: &str) -> Result<String> {
    let (path, scale) = match spec.rsplit_once(':') {
        Some((p, s)) if s.parse::<f64>().is_ok() => (p, Some(s)),
        _ => (spec, None),
    };
    let dir = std::path::Path::new(path);
    if !dir.is_dir() || !dir.join("lora").is_dir() {
        return Ok(spec.to_string());
    }
    let candidates = crate::pick::candidates(dir)?;
    let best = crate::pick::choice(&candidates).expect("candidates refuses a run without saves");
    eprintln!("--lora {path}: step {} ({}), sdtune pick's choice", best.step, best.lora.display());
    let file = best.lora.display().to_string();
    Ok(match scale {
        Some(s) => format!("{file}:{s}"),
        None => file,
    })
}

/// `--from`: a recorded LoRA file that changed since would silently render
/// another image, so it is refused; `--lora` renders with the file as it is.
fn check_lora_hashes(plan: &Plan, loras: &[LoadedLora]) -> Result<()> {
    for ((path, want), lora) in plan.expected_lora_hashes.iter().zip(loras) {
        if !want.is_empty() && &lora.hash != want {
            bail!(
                "the LoRA {path} has changed since the image was made (hash {} now, {want} then); restore that file, or pass --lora {path}:SCALE to render with it as it is now",
                lora.hash
            );
        }
    }
    Ok(())
}

/// What only the loaded model can judge: clip skip against its text
/// encoder, the image size against its VAE and this machine's memory.
fn check_for_model(work: &Work, model: &StableDiffusion) -> Result<()> {
    let native = session::native_side(model);
    let (settings, batch) = match work {
        Work::Job(job) => (&job.settings, job.batch_size.min(job.prompts.len() * job.seeds.len())),
        Work::Again { recipe, .. } => (&recipe.settings, recipe.batch.as_ref().map_or(1, |b| b.members.len())),
    };
    limits::check_clip_skip(model, settings.clip_skip)?;
    if settings.size_conditioning.is_some() && !model.unet_config.takes_text_time() {
        bail!("--original-size, --crop and --target-size condition SDXL models on image sizes; this model's UNet takes no such conditioning, so leave them out");
    }
    let side = |px: i64| if px == 0 { native } else { px };
    limits::check_render_size(model, side(settings.width), side(settings.height), batch)
}

/// Decides the model, LoRAs and images from `--from`, the flags or sdtune.yaml.
fn plan(args: &SampleArgs) -> Result<Plan> {
    let options = args.model.load_options()?;
    let mut plan = Plan {
        model: args.model.model.as_ref().map(|m| m.to_string_lossy().into_owned()).unwrap_or_default(),
        options,
        precision: args.model.precision()?,
        fuse: args.fuse,
        vae_tiling: args.model.vae_tiling,
        loras: args.loras.clone(),
        work: Work::Job(empty_job()),
        brand: args.brand.clone().map_or(BrandFrom::None, BrandFrom::Dir),
        expected_model_hash: None,
        expected_lora_hashes: Vec::new(),
    };
    if let Some(from) = &args.from {
        plan_again(args, from, &mut plan)?;
    } else if args.prompts.is_none() && args.prompt.is_empty() {
        plan_run_grid(args, &mut plan)?;
    } else {
        let mut job = job_from_flags(args)?;
        job.out = args.out.clone().unwrap_or_else(|| "sample.png".into());
        plan.work = Work::Job(job);
        if plan.model.is_empty() {
            plan.model = builtin::fallback()?.display().to_string();
        }
        if matches!(plan.brand, BrandFrom::None) {
            plan.brand = BrandFrom::Prepared;
        }
    }
    if matches!(&plan.work, Work::Job(job) if !job.compare.is_empty()) && plan.loras.is_empty() {
        bail!("--compare lays the base model beside its LoRAs, but no --lora was given");
    }
    let origin = args.from.as_ref().map(|f| format!(" recorded in {}", f.display()));
    check_work(&plan.work, origin.as_deref())?;
    Ok(plan)
}

/// Refuses values no image can be rendered with, naming the flag (or the
/// PNG they were recorded in, with `--from`); prints a line for suspicious ones.
fn check_work(work: &Work, origin: Option<&str>) -> Result<()> {
    let name = |flag: &str| match origin {
        Some(origin) => format!("the {} value{origin}", flag.trim_start_matches('-')),
        None => flag.to_string(),
    };
    let (settings, seeds, batch_size) = match work {
        Work::Job(job) => (&job.settings, job.seeds.as_slice(), job.batch_size),
        Work::Again { recipe, .. } => (&recipe.settings, std::slice::from_ref(&recipe.member.seed), 1),
    };
    if let Some(warning) = ranges::check_guidance(settings.guidance, &name("--guidance"))? {
        eprintln!("{warning}");
    }
    if settings.steps == 0 {
        bail!("{} is 0; use 1 or more denoising steps (30 is usual)", name("--steps"));
    }
    if batch_size == 0 {
        bail!("{} is 0; use 1 or more images per UNet batch", name("--batch-size"));
    }
    if let Work::Job(job) = work {
        for m in &job.compare {
            ranges::check_lora_scale(*m, &name("--compare"))?;
        }
    }
    check_seeds(seeds, &name("--seeds"))
}

/// Each seed once: a repeated seed gives the same image under the same file name.
fn check_seeds(seeds: &[u64], what: &str) -> Result<()> {
    for (i, seed) in seeds.iter().enumerate() {
        if seeds[..i].contains(seed) {
            bail!("{what} lists seed {seed} more than once; the same seed gives the same image, so list each seed once");
        }
    }
    Ok(())
}

fn empty_job() -> Job {
    Job {
        prompts: Vec::new(),
        negative_prompt: None,
        seeds: Vec::new(),
        compare: Vec::new(),
        batch_size: 1,
        settings: session::default_settings(),
        out: PathBuf::new(),
    }
}

/// Prompts, seeds and settings from the flags.
fn job_from_flags(args: &SampleArgs) -> Result<Job> {
    let mut prompts = args.prompt.clone();
    if let Some(file) = &args.prompts {
        prompts.extend(read_prompts(file)?);
    }
    if args.count == 0 {
        bail!("--count 0 renders nothing; use --count 1 or more");
    }
    if args.count > ranges::MAX_COUNT {
        bail!("--count {} is more seeds than one grid can hold; use at most {}", args.count, ranges::MAX_COUNT);
    }
    let seeds = if args.seeds.is_empty() {
        let last = args.seed.checked_add(args.count as u64 - 1).with_context(|| {
            format!("--seed {} --count {} runs past the largest seed {}; start from a smaller --seed", args.seed, args.count, u64::MAX)
        })?;
        (args.seed..=last).collect()
    } else {
        args.seeds.clone()
    };
    ranges::check_side(args.width, "--width")?;
    ranges::check_side(args.height, "--height")?;
    let mut job = empty_job();
    job.prompts = prompts;
    job.negative_prompt = args.negative_prompt.clone();
    job.seeds = seeds;
    job.compare = compare_multipliers(args);
    job.batch_size = args.batch_size;
    job.settings.steps = args.steps.unwrap_or(30);
    job.settings.guidance = args.guidance.unwrap_or(7.5);
    job.settings.width = args.width.unwrap_or(0);
    job.settings.height = args.height.unwrap_or(0);
    job.settings.scheduler = SchedulerKind::parse(&args.scheduler)?.name().into();
    job.settings.clip_skip = args.clip_skip;
    job.settings.size_conditioning = size_conditioning(args)?;
    Ok(job)
}

/// `--original-size`, `--crop`, `--target-size`; a size left out is 0x0
/// here, which [`fill_settings`] turns into the image's size.
fn size_conditioning(args: &SampleArgs) -> Result<Option<SizeConditioning>> {
    if args.original_size.is_none() && args.crop.is_none() && args.target_size.is_none() {
        return Ok(None);
    }
    let size = |flag: &str, value: &Option<String>| -> Result<[i64; 2]> {
        let Some(text) = value else { return Ok([0, 0]) };
        let parsed = text.split_once(['x', 'X']).and_then(|(w, h)| Some((w.trim().parse::<i64>().ok()?, h.trim().parse::<i64>().ok()?)));
        match parsed {
            Some((w, h)) if (1..=ranges::MAX_CONDITIONED_SIDE).contains(&w) && (1..=ranges::MAX_CONDITIONED_SIDE).contains(&h) => Ok([h, w]),
            _ => bail!("{flag} {text:?} is not a size; give WIDTHxHEIGHT in pixels, e.g. 1024x1024 (each 1 to {})", ranges::MAX_CONDITIONED_SIDE),
        }
    };
    let crop = match &args.crop {
        None => [0, 0],
        Some(text) => {
            let parsed = text.split_once(',').and_then(|(t, l)| Some((t.trim().parse::<i64>().ok()?, l.trim().parse::<i64>().ok()?)));
            match parsed {
                Some((top, left)) if (0..=ranges::MAX_CONDITIONED_SIDE).contains(&top) && (0..=ranges::MAX_CONDITIONED_SIDE).contains(&left) => [top, left],
                _ => bail!("--crop {text:?} is not a corner; give TOP,LEFT in pixels, e.g. 0,0 (each 0 to {})", ranges::MAX_CONDITIONED_SIDE),
            }
        }
    };
    Ok(Some(SizeConditioning {
        original: size("--original-size", &args.original_size)?,
        crop_top_left: crop,
        target: size("--target-size", &args.target_size)?,
    }))
}

/// `--compare` alone: base beside the LoRAs as given; with values: beside
/// the LoRAs at each multiple of their strengths.
fn compare_multipliers(args: &SampleArgs) -> Vec<f64> {
    match &args.compare {
        None => Vec::new(),
        Some(m) if m.is_empty() => vec![1.0],
        Some(m) => m.clone(),
    }
}

/// One prompt a line; blank lines and lines starting with `#` are skipped.
fn read_prompts(file: &Path) -> Result<Vec<String>> {
    if !file.is_file() {
        bail!("--prompts {} {}; give a UTF-8 text file with one prompt a line", file.display(), crate::fsutil::why_not_a_file(file));
    }
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--prompts {} cannot be read; give a UTF-8 text file with one prompt a line", file.display()))?;
    let prompts: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
    if prompts.is_empty() {
        bail!("--prompts {} holds no prompt; write one prompt a line", file.display());
    }
    Ok(prompts)
}

/// No prompt given: the run's standard grid from sdtune.yaml, with its
/// trained LoRA, as `sdtune train` renders it.
fn plan_run_grid(args: &SampleArgs, plan: &mut Plan) -> Result<()> {
    let work_dir = Path::new(".");
    let Some(config) = Config::load_from_dir(work_dir)? else {
        bail!("no prompt given and no sdtune.yaml here; pass --prompt TEXT (or --prompts FILE), or run in the folder of a training run");
    };
    let dataset = crate::data::cache::CacheReader::open(work_dir).ok().map(|c| c.dataset().clone());
    let mut job = job_from_flags(args)?;
    job.prompts = config.sample.prompts.clone();
    if job.prompts.is_empty() {
        job.prompts = dataset.iter().flat_map(|d| d.items.iter().map(|i| i.caption.clone())).take(2).collect();
    }
    if job.prompts.is_empty() {
        bail!("sdtune.yaml has no sample prompts and nothing is prepared; add `sample: prompts:` to sdtune.yaml or pass --prompt");
    }
    if args.seeds.is_empty() && args.count == 1 {
        job.seeds = config.sample.seeds.clone();
    }
    let t = &config.train;
    job.settings.steps = args.steps.unwrap_or(t.sample_steps);
    job.settings.guidance = args.guidance.unwrap_or(t.sample_guidance);
    let res = dataset.as_ref().map_or(config.data.resolution, |d| d.resolution) as i64;
    job.settings.width = args.width.unwrap_or(res);
    job.settings.height = args.height.unwrap_or(res);
    let run_dir = work_dir.join(&t.output).join(&t.name);
    job.out = args.out.clone().unwrap_or_else(|| run_dir.join("samples").join("final.png"));
    if plan.loras.is_empty() {
        let lora = run_dir.join(format!("{}.safetensors", t.name));
        if !lora.is_file() {
            bail!("{} does not exist yet; run `sdtune train` first, or pass --prompt to sample without the run's LoRA", lora.display());
        }
        plan.loras.push(lora.display().to_string());
    }
    if plan.model.is_empty() {
        plan.model = config.model.clone().or_else(|| dataset.as_ref().map(|d| d.model.clone())).context(
            "sdtune.yaml names no model and nothing is prepared; add `model:` to sdtune.yaml or pass --model",
        )?;
        // The run's model, with the VAE its images were prepared with.
        if plan.options.vae.is_none() {
            plan.options.vae = config.vae.clone().or_else(|| dataset.as_ref().and_then(|d| d.vae.clone())).map(PathBuf::from);
        }
    }
    if matches!(plan.brand, BrandFrom::None) {
        plan.brand = BrandFrom::Prepared;
    }
    plan.work = Work::Job(job);
    Ok(())
}

/// `--from IMAGE.png`: its recorded settings; `--model` and `--lora` given
/// beside it replace the recorded ones (e.g. a model that moved).
fn plan_again(args: &SampleArgs, from: &Path, plan: &mut Plan) -> Result<()> {
    let out = args.out.clone().unwrap_or_else(|| again_path(from));
    match settings::read_png(from)? {
        Found::Recipe(recipe) => {
            let s = match &recipe {
                Recipe::Image(r) => &r.settings,
                Recipe::Grid(g) => &g.settings,
            };
            if plan.model.is_empty() {
                plan.model = if s.model == builtin::SPEC { builtin::path()?.display().to_string() } else { s.model.clone() };
            }
            if plan.loras.is_empty() {
                plan.loras = s.loras.iter().map(|l| format!("{}:{}", l.path, l.scale)).collect();
                plan.expected_lora_hashes = s.loras.iter().map(|l| (l.path.clone(), l.hash.clone())).collect();
            }
            plan.precision = Precision::parse(&s.precision)?;
            plan.fuse = s.fuse;
            plan.vae_tiling = s.vae_tiling;
            plan.options.variant = plan.options.variant.take().or(s.variant.clone());
            plan.options.vae = plan.options.vae.take().or(s.vae.as_ref().map(PathBuf::from));
            if plan.options.prediction_type.is_none() {
                plan.options.prediction_type = s.prediction_type.as_deref().map(parse_prediction).transpose()?;
            }
            plan.expected_model_hash = Some(s.model_hash.clone());
            plan.work = match recipe {
                Recipe::Image(recipe) => Work::Again { recipe, out },
                Recipe::Grid(g) => {
                    if matches!(plan.brand, BrandFrom::None) {
                        plan.brand = BrandFrom::Prepared;
                    }
                    Work::Job(Job::from_recipe(g, out))
                }
            };
        }
        Found::Parameters(p) => {
            if plan.model.is_empty() {
                let hash = p.model_hash.as_deref().unwrap_or("unknown");
                bail!("{} names its model only by hash ({hash}); pass --model the model it was made with", from.display());
            }
            if plan.loras.is_empty() {
                let named = p.lora_tags.iter().map(|t| format!("<lora:{t}>")).chain(p.lora_hashes.iter().map(|h| format!("hashes {h}")));
                let named: Vec<String> = named.collect();
                if !named.is_empty() {
                    eprintln!("warning: {} was made with LoRAs ({}); pass them with --lora FILE:SCALE", from.display(), named.join("; "));
                }
            }
            plan.expected_model_hash = p.model_hash.clone();
            let mut job = empty_job();
            job.prompts = vec![p.prompt];
            job.negative_prompt = p.negative_prompt;
            job.seeds = vec![p.seed];
            job.settings.steps = p.steps;
            job.settings.guidance = p.guidance;
            job.settings.width = p.width;
            job.settings.height = p.height;
            job.settings.scheduler = p.scheduler.name().into();
            job.settings.clip_skip = p.clip_skip;
            job.out = out;
            plan.work = Work::Job(job);
        }
    }
    Ok(())
}

/// `IMAGE-again.png` beside the image.
fn again_path(from: &Path) -> PathBuf {
    let stem = from.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "sample".into());
    from.with_file_name(format!("{stem}-again.png"))
}

/// The job's settings completed; size 0 becomes the model's native size.
fn fill_settings(job: &mut Job, shared: Settings, model: &StableDiffusion) {
    job.settings = session::with_render_settings(shared, &job.settings);
    session::fill_sizes(&mut job.settings, model);
}

fn run_job(model: &StableDiffusion, job: &Job, loras: &[LoadedLora], brand: &BrandFrom) -> Result<()> {
    let bar = crate::progress::steps_bar(0, "sampling");
    let started = Instant::now();
    let rendered = render::render(model, job, loras, &mut |w| bar.suspend(|| eprintln!("warning: {w}")), &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if job.is_single() {
        println!("wrote {}", job.out.display());
    } else {
        println!("wrote {} ({} images beside it)", job.out.display(), rendered.len());
    }
    let n = rendered.len();
    let images = if n == 1 { "1 image".to_string() } else { format!("{n} images") };
    eprintln!("rendered {images} in {seconds:.2} s ({:.3} s/image)", seconds / n.max(1) as f64);
    let Some(brand) = load_brand(brand, job.is_single())? else { return Ok(()) };
    let figures = render::consistency(job, &rendered, &brand);
    print!("{}", figures.table());
    let path = consistency_path(&job.out);
    figures.save(&path)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The brand set, when one was named or (for a grid) prepared here.
fn load_brand(from: &BrandFrom, single: bool) -> Result<Option<Brand>> {
    match from {
        BrandFrom::None => Ok(None),
        BrandFrom::Dir(dir) => Brand::from_dir(dir).map(Some),
        BrandFrom::Prepared if single => Ok(None),
        BrandFrom::Prepared => match Brand::from_prepared(Path::new(".")) {
            Ok(brand) => Ok(brand),
            Err(e) => {
                eprintln!("warning: no consistency figures: {}", crate::errors::one_sentence(&e));
                Ok(None)
            }
        },
    }
}

/// Renders a recorded image again and writes it with the same recipe
/// (model path, hash and device as used now).
fn again(model: &StableDiffusion, mut recipe: ImageRecipe, shared: Settings, loras: &[LoadedLora], out: &Path) -> Result<()> {
    recipe.settings = session::with_render_settings(shared, &recipe.settings);
    let bar = crate::progress::steps_bar(recipe.settings.steps as u64, "sampling");
    let image = render::render_again(model, &recipe, loras, &mut |w| bar.suspend(|| eprintln!("warning: {w}")), &mut |i, _| {
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    crate::sample::image_out::save_png_with_text(&image, out, &recipe.text_chunks()?)?;
    println!("wrote {}", out.display());
    Ok(())
}
