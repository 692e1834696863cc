//! `sdtune serve`: the base model loaded once, brand adapters switched per
//! request, an HTTP API and a web page for the people who make the images.
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::config::Config;
use crate::loaders::builtin;
use super::model_args::ModelArgs;
use crate::serve::limits::Limits;
use crate::serve::worker::ModelChoice;
use crate::serve::{self, ServeConfig};

pub const EXAMPLES: &str = "\
Examples:
  sdtune serve --model ./stable-diffusion-v1-5 --adapters ./loras
      then open http://127.0.0.1:7860/ (the page), or call the API:
  curl -s localhost:7860/v1/adapters
  curl -s localhost:7860/v1/images -d '{\"prompt\": \"acme mug on a desk\", \"adapters\": [{\"name\": \"acme\", \"scale\": 0.8}], \"seed\": 1}'
      -> {\"id\": \"1\", \"status\": \"queued\", ...}; then GET /v1/jobs/1 (or /v1/jobs/1/events, a
      server-sent event stream) until done, and GET /v1/jobs/1/images/0.png
  curl -s localhost:7860/sdapi/v1/txt2img -d '{\"prompt\": \"acme mug <lora:acme:0.8>\", \"steps\": 20}'
      A1111's route: base64 PNGs in \"images\", as A1111 answers
  sdtune serve --host 0.0.0.0 --token \"$(openssl rand -hex 16)\"     reachable from other machines
  sdtune serve                     in a training folder: sdtune.yaml's model, each run's LoRA by its name

Every LoRA file under --adapters, and each training run's final LoRA
(output/<name>/<name>.safetensors), is an adapter by its file name without
.safetensors; files added later appear without a restart. Requests name
adapters, never paths. Each image is a PNG carrying the same recipe as
`sdtune sample` writes, so `sdtune sample --from IMAGE.png` renders it again
bit for bit. Beyond --queue waiting jobs, requests get 429 with Retry-After.
Ctrl-C (or SIGTERM) stops taking requests, cancels queued jobs and finishes
the running one; a second Ctrl-C quits at once.";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Folder of LoRA files (searched 4 levels deep); each is an adapter by its file stem.
    #[arg(long, value_name = "DIR")]
    pub adapters: Option<PathBuf>,
    /// Folder of training runs: each run's final LoRA is an adapter by the run's
    /// name [default: sdtune.yaml's output folder, else ./output].
    #[arg(long, value_name = "DIR")]
    pub runs: Option<PathBuf>,
    /// Address to listen on; anything but a loopback address needs --token.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed as `listening on ...`).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Bearer token every API request must send (`Authorization: Bearer TOKEN`);
    /// the page asks for it. Required with a --host other machines can reach.
    #[arg(long, value_name = "SECRET")]
    pub token: Option<String>,
    /// Jobs that may wait behind the running one; more get 429 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub queue: usize,
    /// Largest width or height a request may ask for [default: twice the model's native size].
    #[arg(long, value_name = "PX")]
    pub max_side: Option<i64>,
    /// Most denoising steps a request may ask for.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub max_steps: usize,
    /// Most images (seeds) one request may ask for.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_images: usize,
    /// Images per UNet batch within a job.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub batch_size: usize,
    /// Memory for loaded adapters, in MB of their files (least recently used dropped first).
    #[arg(long, value_name = "MB", default_value_t = 1024)]
    pub adapter_cache_mb: u64,
    /// Finished jobs kept for GET /v1/jobs/{id} (oldest dropped first).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub keep_jobs: usize,
    // The model and how it runs, under a heading of its own in --help (last,
    // since the heading carries over to the flags after it).
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let host: IpAddr = args
        .host
        .parse()
        .with_context(|| format!("--host {:?} is not an IP address; use 127.0.0.1 (this machine only) or 0.0.0.0 (every network) with --token", args.host))?;
    serve::check_exposure(host, args.token.as_deref())?;
    if args.queue == 0 || args.max_images == 0 || args.max_steps == 0 || args.batch_size == 0 || args.keep_jobs == 0 {
        bail!("--queue, --max-images, --max-steps, --batch-size and --keep-jobs must each be 1 or more");
    }
    if let Some(side) = args.max_side {
        crate::ranges::check_side(Some(side), "--max-side")?;
    }
    if let Some(dir) = &args.adapters {
        if !dir.is_dir() {
            bail!("--adapters {} is not a folder; give the folder that holds your LoRA .safetensors files", dir.display());
        }
    }
    let config = Config::load_from_dir(Path::new("."))?;
    let model = match (&args.model.model, config.as_ref().and_then(|c| c.model.clone())) {
        (Some(m), _) => m.to_string_lossy().into_owned(),
        (None, Some(m)) => m,
        (None, None) => builtin::fallback()?.display().to_string(),
    };
    let runs = args.runs.clone().unwrap_or_else(|| config.as_ref().map_or_else(|| PathBuf::from("output"), |c| PathBuf::from(&c.train.output)));
    let choice = ModelChoice {
        model,
        options: args.model.load_options()?,
        precision: args.model.precision()?,
        device: args.model.device()?,
        vae_tiling: args.model.vae_tiling,
    };
    let limits = Limits {
        max_side: args.max_side.unwrap_or(0),
        max_steps: args.max_steps,
        max_images: args.max_images,
        queue: args.queue,
        batch_size: args.batch_size,
        adapter_cache_bytes: args.adapter_cache_mb.saturating_mul(1 << 20),
        keep_jobs: args.keep_jobs,
        max_prompt_chars: 4000,
        text_layers: 0,
    };
    serve::run(ServeConfig { choice, adapters: args.adapters, runs: Some(runs), work_dir: PathBuf::from("."), host, port: args.port, token: args.token, limits })
}
