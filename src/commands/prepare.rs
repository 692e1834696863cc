//! `sdtune prepare DIR`: flags over `sdtune.yaml`, then the data pipeline;
//! prints the report table and writes `sdtune.yaml` when there is none.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind};

use crate::config::{Config, CONFIG_FILE};
use crate::data::config::{Background, MAX_BUCKET_SIDE};
use crate::data::prepare::{self, sample_prompts, Options, REPORT_FILE};
use crate::data::class_set::CLASS_DIR;
use crate::loaders::builtin;
use crate::sample::class_images::{self, ClassRequest};
use crate::loaders::model_files::ModelFiles;
use crate::loaders::source::LoadOptions;
use crate::runtime::{parse_device, supports, Precision};

use clap::Args;
pub const EXAMPLES: &str = "\
Examples:
  sdtune prepare ./brand_photos --model ./stable-diffusion-v1-5 --trigger brandx
  sdtune prepare ./brand_photos --model ./v1-5-pruned-emaonly.safetensors --trigger brandx
  sdtune prepare ./brand_photos --resolution 768 --flip --no-upscale
  sdtune prepare ./brand_photos --model ./sd_xl_base_1.0.safetensors   (SDXL: 1024 px by default)
  sdtune prepare                    (the folder and model named in ./sdtune.yaml)
  sdtune prepare ./brand_photos --class-prompt \"a photo of a car\" --class-images 200
                                    (prior preservation: 200 class images by the base model)

Run it in your working folder: it reads ./sdtune.yaml (and writes one when there
is none) and caches into ./.sdtune/cache. Captions come from NAME.txt beside each
image, else metadata.jsonl (file_name, text), else --caption-template. Every file
that is not used is listed with the reason, also in .sdtune/prepare-report.json.
Run it again after adding, editing or removing images: only what changed is encoded.
Class images (--class-prompt) go to ./.sdtune/class/, image i with seed i and its recipe
in the PNG; only missing ones are rendered, and a deleted one comes back byte for byte.
Your own class images work too: a reg/N_name folder (kohya) or a concept with is_class.
Exits 0 when at least one image is usable.";


/// Flags override `sdtune.yaml`'s `data:` section for this run.
#[derive(Args, Debug, Default)]
pub struct PrepareArgs {
    /// The image folder, searched recursively [default: data.path in sdtune.yaml].
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The model whose VAE and text encoder encode the images and captions: a
    /// diffusers folder (holding model_index.json), a single-file .safetensors
    /// checkpoint (A1111/civitai, SD1.x or SD2.x) or a Hugging Face id (org/name)
    /// found in the local Hugging Face cache [default: model in sdtune.yaml].
    #[arg(long, value_name = "DIR|FILE|ID")]
    pub model: Option<String>,
    /// Another VAE to encode the images with instead of the model's: a diffusers
    /// vae/ folder, or one VAE .safetensors file in diffusers' or LDM names
    /// [default: vae in sdtune.yaml, else the model's]. Latents of another VAE
    /// are encoded again, never mixed.
    #[arg(long, value_name = "DIR|FILE")]
    pub vae: Option<String>,
    /// Training resolution: buckets hold about this many pixels squared [default: 512; 1024 for SDXL].
    #[arg(allow_negative_numbers = true, long, value_name = "PX")]
    pub resolution: Option<u32>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// VAE and text-encoder precision: auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Trigger word: replaces [trigger] in captions, else is prepended to them.
    #[arg(long, value_name = "WORD")]
    pub trigger: Option<String>,
    /// Caption for images with none, e.g. "a photo of [trigger]".
    #[arg(long, value_name = "TEXT")]
    pub caption_template: Option<String>,
    /// Also cache horizontally flipped latents (augmentation).
    #[arg(long)]
    pub flip: bool,
    /// Never scale an image up to fit a bucket; small images get smaller buckets.
    #[arg(long, conflicts_with = "allow_upscale")]
    pub no_upscale: bool,
    /// Keep images whose short side is under --min-side, scaled up.
    #[arg(long)]
    pub allow_upscale: bool,
    /// Skip images whose short side is under this many pixels [default: 256].
    #[arg(allow_negative_numbers = true, long, value_name = "PX")]
    pub min_side: Option<u32>,
    /// Smallest bucket side [default: 256].
    #[arg(allow_negative_numbers = true, long, value_name = "PX")]
    pub min_bucket: Option<u32>,
    /// Largest bucket side [default: 1024].
    #[arg(allow_negative_numbers = true, long, value_name = "PX")]
    pub max_bucket: Option<u32>,
    /// Bucket sides are multiples of this [default: 64].
    #[arg(allow_negative_numbers = true, long, value_name = "PX")]
    pub bucket_step: Option<u32>,
    /// Colour behind transparent pixels: white, black, gray or #rrggbb [default: white].
    #[arg(long, value_name = "COLOUR")]
    pub background: Option<String>,
    /// Refuse images with more pixels than this, before decoding [default: 178956970].
    #[arg(allow_negative_numbers = true, long, value_name = "N")]
    pub max_pixels: Option<u64>,
    /// Images per VAE-encode batch [default: 4].
    #[arg(allow_negative_numbers = true, long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Prior preservation (DreamBooth): the prompt of the class your brand
    /// belongs to, e.g. "a photo of a car"; prepare renders --class-images
    /// of it with the base model into .sdtune/class/ and caches them, and
    /// training adds their loss (train --prior-loss-weight) [default: data.class_prompt].
    #[arg(long, value_name = "TEXT")]
    pub class_prompt: Option<String>,
    /// How many class images of --class-prompt to keep; only the missing
    /// ones are rendered [default: data.num_class_images].
    #[arg(allow_negative_numbers = true, long = "class-images", value_name = "N")]
    pub class_images: Option<i64>,
    /// The guidance scale the class images are rendered with: 7.5 as
    /// diffusers' DreamBooth script; lower (1 = none) when a small model
    /// drifts on its own over-guided images [default: data.class_guidance].
    #[arg(allow_negative_numbers = true, long, value_name = "SCALE")]
    pub class_guidance: Option<f64>,
}

/// With no model named, the built-in tiny model; a folder with no
/// sdtune.yaml and no --resolution then gets its 64-px buckets.
fn default_model(args: &PrepareArgs, fresh: bool, data: &mut crate::data::config::DataConfig) -> Result<PathBuf> {
    if fresh && args.resolution.is_none() {
        let px = builtin::RESOLUTION;
        data.resolution = px;
        data.min_bucket = args.min_bucket.unwrap_or(px);
        data.max_bucket = args.max_bucket.unwrap_or(px);
        data.min_side = args.min_side.unwrap_or(px);
    }
    builtin::fallback()
}

/// An SDXL model in a folder with no sdtune.yaml and no --resolution
/// trains at SDXL's 1024 px, as kohya's SDXL scripts are run.
fn sdxl_resolution(model: &std::path::Path, data: &mut crate::data::config::DataConfig) -> Result<()> {
    let files = ModelFiles::of(&model.to_string_lossy(), &LoadOptions::default())?;
    if files.unet_config.takes_text_time() {
        data.resolution = crate::data::config::SDXL_RESOLUTION;
        data.validate()?;
    }
    Ok(())
}

pub fn run(args: PrepareArgs) -> Result<()> {
    let work_dir = std::env::current_dir().context("cannot read the current folder")?;
    let existing = Config::load_from_dir(&work_dir)?;
    let mut config = existing.clone().unwrap_or_default();
    apply_flags(&args, &mut config)?;
    config.data.validate()?;

    let data_dir = if config.data.concepts.is_empty() {
        args.dir.clone().or_else(|| config.data.path.clone()).with_context(|| {
            format!("no image folder given; run `sdtune prepare ./your_images`, or set data.path in {CONFIG_FILE}")
        })?
    } else {
        if let Some(dir) = &args.dir {
            bail!(
                "{CONFIG_FILE} lists the image folders in data.concepts, so {} would not be used; run `sdtune prepare` without a folder, or remove data.concepts",
                dir.display()
            );
        }
        // Concept paths are relative to the config's folder, the working folder.
        PathBuf::from(".")
    };
    let builtin_model = config.model.is_none();
    let model_dir = match config.model.clone() {
        Some(model) => PathBuf::from(model),
        None => default_model(&args, existing.is_none(), &mut config.data)?,
    };
    if existing.is_none() && args.resolution.is_none() && !builtin_model {
        sdxl_resolution(&model_dir, &mut config.data)?;
    }
    let device = parse_device(&args.device)?;
    let precision = match args.precision.as_str() {
        "auto" => auto_precision(device),
        other => Precision::parse(other)?,
    };

    if let Some((prompt, count)) = config.data.class_images() {
        let Some(model) = model_dir.to_str() else {
            bail!("the model path {} is not valid UTF-8, so sdtune cannot open it; rename the folder or file to UTF-8", model_dir.display());
        };
        let vae = config.vae.clone().map(PathBuf::from);
        let class = class_images::ensure(&ClassRequest {
            work_dir: &work_dir,
            model,
            vae: vae.as_deref(),
            device,
            precision,
            prompt,
            count,
            resolution: config.data.resolution,
            guidance: config.data.class_guidance,
        })?;
        say(&format!(
            "class images: {} of {prompt:?} in {CLASS_DIR}/ ({} rendered now, the rest kept)\n",
            class.files.len(),
            class.rendered
        ));
    }
    let prepared = prepare::run(&Options {
        data_dir: data_dir.clone(),
        work_dir: work_dir.clone(),
        config_file: work_dir.join(CONFIG_FILE),
        model_dir: model_dir.clone(),
        vae: config.vae.clone().map(PathBuf::from),
        device,
        precision,
        data: config.data.clone(),
        clip_skip: 0,
    })?;
    say(&format!("{}report: {REPORT_FILE}\n", prepared.report.table()));

    let usable = prepared.report.counts.usable;
    if usable == 0 {
        bail!(
            "none of the {} image files in {} is usable; the reasons are listed above and in {REPORT_FILE}",
            prepared.report.counts.files,
            data_dir.display()
        );
    }
    if existing.is_none() {
        let mut fresh = config;
        // The built-in model stays unnamed, so later runs find it wherever it is cached.
        fresh.model = (!builtin_model).then(|| model_dir.display().to_string());
        // YAML holds only UTF-8; a folder named otherwise is passed each time.
        let unrecorded = data_dir.to_str().is_none().then(|| data_dir.display().to_string());
        fresh.data.path = unrecorded.is_none().then_some(data_dir);
        fresh.sample.prompts = if prepared.concept_prompts.is_empty() {
            sample_prompts(&prepared.captions, fresh.data.trigger.as_deref(), 4)
        } else {
            prepared.concept_prompts.clone()
        };
        fresh.save(&work_dir.join(CONFIG_FILE))?;
        say(&format!(
            "wrote {CONFIG_FILE} (model, data folder, resolution, trigger word, sample prompts); edit it to change the defaults\n"
        ));
        if let Some(shown) = unrecorded {
            say(&format!(
                "{CONFIG_FILE} does not record the image folder {shown}: its name is not valid UTF-8, which YAML cannot hold; rename it to UTF-8, or name it to each `sdtune prepare`\n"
            ));
        }
    }
    Ok(())
}

/// Prints to stdout; a closed pipe (`sdtune prepare | head`) is not an error.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// fp32 on the CPU; bf16 on CUDA where it works, else fp16 (non-finite
/// latents are re-encoded in fp32 either way).
fn auto_precision(device: Device) -> Precision {
    match device {
        Device::Cpu => Precision::Fp32,
        _ if supports(device, Kind::BFloat16) => Precision::Bf16,
        _ => Precision::Fp16,
    }
}

fn apply_flags(args: &PrepareArgs, config: &mut Config) -> Result<()> {
    let d = &mut config.data;
    if let Some(model) = &args.model {
        config.model = Some(model.clone());
    }
    if let Some(vae) = &args.vae {
        config.vae = Some(vae.clone());
    }
    if let Some(v) = args.resolution {
        d.resolution = v;
        // A resolution outside the default bucket range moves the range with it.
        if args.min_bucket.is_none() && v < d.min_bucket {
            d.min_bucket = (v / 2 / d.bucket_step.max(1)).max(1) * d.bucket_step.max(1);
        }
        if args.max_bucket.is_none() && v > d.max_bucket {
            // Not past the largest bucket side, so a legal --resolution alone is never refused for it.
            d.max_bucket = v.saturating_mul(2).min(MAX_BUCKET_SIDE.max(v));
        }
    }
    if let Some(v) = args.min_bucket {
        d.min_bucket = v;
    }
    if let Some(v) = args.max_bucket {
        d.max_bucket = v;
    }
    if let Some(v) = args.bucket_step {
        d.bucket_step = v;
    }
    if let Some(v) = &args.trigger {
        d.trigger = Some(v.clone());
    }
    if let Some(v) = &args.caption_template {
        d.caption_template = Some(v.clone());
    }
    if let Some(v) = &args.background {
        d.background = Background::parse(v).map_err(|e| anyhow::anyhow!("--background: {e}"))?;
    }
    if let Some(v) = args.min_side {
        d.min_side = v;
    }
    if let Some(v) = args.max_pixels {
        d.max_pixels = v;
    }
    if let Some(v) = args.batch_size {
        d.encode_batch_size = v;
    }
    if let Some(v) = &args.class_prompt {
        d.class_prompt = Some(v.clone());
    }
    if let Some(v) = args.class_images {
        let Ok(count) = usize::try_from(v) else {
            bail!("--class-images {v} is negative; give how many class images to render (100 to 200 is usual)");
        };
        d.num_class_images = Some(count);
    }
    if let Some(v) = args.class_guidance {
        d.class_guidance = v;
    }
    d.flip |= args.flip;
    d.no_upscale |= args.no_upscale;
    d.allow_upscale |= args.allow_upscale;
    Ok(())
}
