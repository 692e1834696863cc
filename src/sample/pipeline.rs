//! Text to image, step for step as diffusers' `StableDiffusionPipeline`:
//! tokenize, encode (with the negative prompt for guidance), draw the
//! initial latents on the CPU from the seed, denoise, decode.
//!
//! Several images go through the UNet as one batch. Each keeps its own
//! seed's noise, as diffusers does when given one generator per image, so an
//! image of a batch is the image its seed gives alone.
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::models::conditioning::Conditioning;
use crate::models::stable_diffusion::StableDiffusion;
use crate::models::text_stack::TextStyle;
use crate::schedulers::{Sampler, SchedulerKind};

/// Everything that decides one image.
#[derive(Clone, Debug)]
pub struct SampleRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub width: i64,
    pub height: i64,
    pub scheduler: SchedulerKind,
    /// Text-encoder layers to skip from the end (0: last layer, as diffusers' default).
    pub clip_skip: usize,
    /// SDXL's size conditioning; `None`: the image's own size, no crop.
    pub size_conditioning: Option<SizeConditioning>,
}

/// The six numbers SDXL's UNet is conditioned on besides the text
/// (diffusers' `original_size`, `crops_coords_top_left`, `target_size`),
/// each pair (height, width) or (top, left) in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SizeConditioning {
    pub original: [i64; 2],
    pub crop_top_left: [i64; 2],
    pub target: [i64; 2],
}

impl SizeConditioning {
    /// What `StableDiffusionXLPipeline` uses unless told otherwise.
    pub fn plain(width: i64, height: i64) -> Self {
        SizeConditioning { original: [height, width], crop_top_left: [0, 0], target: [height, width] }
    }

    /// `[orig_h, orig_w, top, left, target_h, target_w]`, in that order.
    pub fn time_ids(&self) -> [f32; 6] {
        let [oh, ow] = self.original;
        let [top, left] = self.crop_top_left;
        let [th, tw] = self.target;
        [oh, ow, top, left, th, tw].map(|v| v as f32)
    }
}

impl SampleRequest {
    /// Whether `other` can share a UNet batch with this one: everything but
    /// prompt, negative prompt and seed is the same.
    pub fn batches_with(&self, other: &SampleRequest) -> bool {
        self.steps == other.steps
            && self.guidance == other.guidance
            && self.width == other.width
            && self.height == other.height
            && self.scheduler == other.scheduler
            && self.clip_skip == other.clip_skip
    }
}

/// Messages for the user that do not stop sampling (e.g. a truncated prompt).
pub type Warn<'a> = &'a mut dyn FnMut(String);

/// Renders one image; returns the VAE output [1, 3, H, W] in about [-1, 1].
pub fn text_to_image(
    model: &StableDiffusion,
    req: &SampleRequest,
    warn: Warn,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    text_to_images(model, std::slice::from_ref(req), warn, on_step)
}

/// Renders `reqs` as one batch; returns the VAE output [B, 3, H, W] in
/// about [-1, 1], in the order of `reqs`. They must share everything but
/// prompt, negative prompt and seed ([`SampleRequest::batches_with`]).
pub fn text_to_images(
    model: &StableDiffusion,
    reqs: &[SampleRequest],
    warn: Warn,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    text_to_images_until(model, reqs, warn, on_step, None)
}

/// A render stopped between denoising steps because its stop flag was set.
#[derive(Debug)]
pub struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the render was stopped")
    }
}

impl std::error::Error for Stopped {}

/// [`text_to_images`], checking `stop` before each denoising step (another
/// thread sets it, e.g. `sdtune serve` cancelling a job): once set, the
/// render ends with [`Stopped`].
pub fn text_to_images_until(
    model: &StableDiffusion,
    reqs: &[SampleRequest],
    warn: Warn,
    on_step: &mut dyn FnMut(usize, usize),
    stop: Option<&AtomicBool>,
) -> Result<Tensor> {
    let Some(first) = reqs.first() else { bail!("nothing to render: no prompt was given") };
    if !reqs.iter().all(|r| first.batches_with(r)) {
        bail!("images of one batch must share steps, guidance, size, scheduler and clip skip");
    }
    check_size(model, first)?;
    tch::no_grad(|| {
        let context = encode_batch(model, reqs, warn)?;
        let mut sampler = first.scheduler.build(&model.scheduler, first.steps)?;
        let mut noise = SeedNoise::new(model, reqs);
        let latents = noise.initial() * sampler.init_noise_sigma();
        let latents = denoise(model, sampler.as_mut(), latents, &context, first.guidance, &mut noise, on_step, stop)?;
        Ok(decode(model, &latents))
    })
}

/// Renders `reqs` (which must all batch together) `batch_size` at a time;
/// returns one VAE output [1, 3, H, W] per request, in order. `on_step`
/// counts steps over all batches.
pub fn text_to_images_batched(
    model: &StableDiffusion,
    reqs: &[SampleRequest],
    batch_size: usize,
    warn: Warn,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Tensor>> {
    let batch_size = batch_size.max(1);
    let batches = reqs.len().div_ceil(batch_size);
    let steps = reqs.first().map_or(0, |r| r.steps);
    let mut out = Vec::with_capacity(reqs.len());
    for (b, chunk) in reqs.chunks(batch_size).enumerate() {
        let decoded = text_to_images(model, chunk, warn, &mut |i, _| on_step(b * steps + i, batches * steps))?;
        out.extend((0..chunk.len() as i64).map(|i| decoded.narrow(0, i, 1)));
    }
    Ok(out)
}

fn check_size(model: &StableDiffusion, req: &SampleRequest) -> Result<()> {
    let f = model.vae_config.scale_factor();
    if req.width <= 0 || req.height <= 0 || req.width % f != 0 || req.height % f != 0 {
        bail!(
            "--width and --height must be positive multiples of {f} for this model, got {}x{}",
            req.width,
            req.height
        );
    }
    if req.steps == 0 {
        bail!("--steps must be at least 1");
    }
    Ok(())
}

/// Prompt -> its conditioning (a batch of one) through the model's text stack.
pub fn encode_prompt(
    model: &StableDiffusion,
    prompt: &str,
    clip_skip: usize,
    what: &str,
    warn: Warn,
) -> Result<Conditioning> {
    let encoded = model.text.encode(&[prompt], clip_skip)?;
    if !encoded.truncated.is_empty() {
        warn(format!("the {what} is longer than 77 CLIP tokens; the rest was cut off, as diffusers does"));
    }
    Ok(encoded.conditioning)
}

/// The UNet's context for a batch: [uncond.., cond..] with guidance (as
/// diffusers concatenates them), else [cond..]. Each prompt is encoded on
/// its own so its embedding does not depend on its batch-mates. SDXL
/// models also get each image's time ids, and with no negative prompt
/// zeros as the unconditional side (`force_zeros_for_empty_prompt`).
fn encode_batch(model: &StableDiffusion, reqs: &[SampleRequest], warn: Warn) -> Result<Conditioning> {
    let context = encode_texts(model, reqs, warn)?;
    if !model.unet_config.takes_text_time() {
        return Ok(context);
    }
    // With guidance the batch is [uncond.., cond..]: both halves get the same ids.
    let halves = (context.batch_size() / reqs.len() as i64) as usize;
    let ids: Vec<Tensor> = (0..halves).flat_map(|_| reqs.iter().map(time_ids)).collect();
    let time_ids = Tensor::stack(&ids, 0).to_device(context.text.device());
    Ok(Conditioning { time_ids: Some(time_ids), ..context })
}

/// SDXL's six size numbers for one image: as the request says, else as
/// `StableDiffusionXLPipeline` makes them by default (the image's own size, no crop).
fn time_ids(req: &SampleRequest) -> Tensor {
    let sizes = req.size_conditioning.unwrap_or_else(|| SizeConditioning::plain(req.width, req.height));
    Tensor::from_slice(&sizes.time_ids())
}

fn encode_texts(model: &StableDiffusion, reqs: &[SampleRequest], warn: Warn) -> Result<Conditioning> {
    let mut cache: Vec<(String, usize, Conditioning)> = Vec::new();
    let mut encode = |text: &str, clip_skip: usize, what: &str, warn: Warn| -> Result<Conditioning> {
        if let Some((_, _, t)) = cache.iter().find(|(p, s, _)| p == text && *s == clip_skip) {
            return Ok(t.shallow_clone());
        }
        let t = encode_prompt(model, text, clip_skip, what, warn)?;
        cache.push((text.to_string(), clip_skip, t.shallow_clone()));
        Ok(t)
    };
    let clip_skip = reqs[0].clip_skip;
    // StableDiffusionXLPipeline reads the negative prompt at the penultimate
    // layer whatever clip_skip says; the same images need the same quirk.
    let negative_skip = if model.text.style == TextStyle::Sdxl { 0 } else { clip_skip };
    let mut cond = Vec::with_capacity(reqs.len());
    for r in reqs {
        cond.push(encode(&r.prompt, clip_skip, "prompt", warn)?);
    }
    if reqs[0].guidance <= 1.0 {
        return Conditioning::cat(&cond);
    }
    let mut all = Vec::with_capacity(2 * reqs.len());
    for (r, c) in reqs.iter().zip(&cond) {
        let uncond = match r.negative_prompt.as_deref() {
            None if model.text.zeros_for_no_negative => zeros_like(c),
            negative => encode(negative.unwrap_or(""), negative_skip, "negative prompt", warn)?,
        };
        all.push(uncond);
    }
    all.extend(cond);
    Conditioning::cat(&all)
}

/// Zero states and pooled embedding shaped as `c`.
fn zeros_like(c: &Conditioning) -> Conditioning {
    Conditioning {
        text: c.text.zeros_like(),
        pooled: c.pooled.as_ref().map(Tensor::zeros_like),
        time_ids: c.time_ids.as_ref().map(Tensor::shallow_clone),
    }
}

/// Per-image noise from per-image seeds, drawn on the CPU so a seed means
/// the same image on any device. tch has only the global CPU generator, so
/// each image's draws are made in one go after seeding it: the initial
/// latents, then (only if the sampler asks) one tensor per model call, in
/// the order diffusers' `randn_tensor` draws them from that image's generator.
struct SeedNoise {
    seeds: Vec<u64>,
    /// [1, C, h, w]: one image's latents.
    shape: [i64; 4],
    device: Device,
    draws_per_image: usize,
    /// Per image, the noise of each step (filled on the first request).
    steps: Option<Vec<Vec<Tensor>>>,
    next_step: usize,
}

impl SeedNoise {
    fn new(model: &StableDiffusion, reqs: &[SampleRequest]) -> Self {
        let f = model.vae_config.scale_factor();
        let channels = model.unet_config.in_channels;
        let (h, w) = (reqs[0].height / f, reqs[0].width / f);
        SeedNoise {
            seeds: reqs.iter().map(|r| r.seed).collect(),
            shape: [1, channels, h, w],
            device: model.device(),
            draws_per_image: 0,
            steps: None,
            next_step: 0,
        }
    }

    fn randn(&self) -> Tensor {
        Tensor::randn(self.shape, (Kind::Float, Device::Cpu))
    }

    /// N(0, 1) latents [B, C, h, w], each as `torch.Generator("cpu").manual_seed(seed)` draws them.
    fn initial(&self) -> Tensor {
        let per_image: Vec<Tensor> = self
            .seeds
            .iter()
            .map(|&seed| {
                tch::manual_seed(seed as i64);
                self.randn()
            })
            .collect();
        Tensor::cat(&per_image, 0).to_device(self.device)
    }

    /// The noise of the next ancestral step [B, C, h, w]. On the first call
    /// every image's generator is replayed past its initial latents and
    /// `draws_per_image` step noises are drawn.
    fn next(&mut self) -> Tensor {
        if self.steps.is_none() {
            let draws = self.draws_per_image;
            let per_image = self
                .seeds
                .iter()
                .map(|&seed| {
                    tch::manual_seed(seed as i64);
                    let _initial = self.randn();
                    (0..draws).map(|_| self.randn()).collect()
                })
                .collect();
            self.steps = Some(per_image);
        }
        let per_image = self.steps.as_ref().expect("filled above");
        let step = self.next_step;
        self.next_step += 1;
        let parts: Vec<Tensor> = per_image
            .iter()
            .map(|draws: &Vec<Tensor>| draws.get(step).map_or_else(|| self.randn(), Tensor::shallow_clone))
            .collect();
        Tensor::cat(&parts, 0).to_device(self.device)
    }
}

fn denoise(
    model: &StableDiffusion,
    sampler: &mut dyn Sampler,
    mut latents: Tensor,
    context: &Conditioning,
    guidance: f64,
    noise: &mut SeedNoise,
    on_step: &mut dyn FnMut(usize, usize),
    stop: Option<&AtomicBool>,
) -> Result<Tensor> {
    let guided = guidance > 1.0;
    let timesteps = sampler.timesteps().to_vec();
    // Ancestral samplers draw once per model call at most.
    noise.draws_per_image = timesteps.len();
    let mut fresh_noise = || noise.next();
    for (i, &t) in timesteps.iter().enumerate() {
        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            return Err(Stopped.into());
        }
        // Guidance 1 (or less) needs no unconditional pass: half the UNet work.
        let input = if guided { Tensor::cat(&[&latents, &latents], 0) } else { latents.shallow_clone() };
        let input = sampler.scale_model_input(&input, i);
        let t_batch = Tensor::full([input.size()[0]], t, (Kind::Float, model.device()));
        let out = model.unet.model.forward(&input, &t_batch, context).to_kind(Kind::Float);
        let out = if guided {
            let parts = out.chunk(2, 0);
            &parts[0] + guidance * (&parts[1] - &parts[0])
        } else {
            out
        };
        latents = sampler.step(&out, i, &latents, &mut fresh_noise);
        on_step(i + 1, timesteps.len());
    }
    Ok(latents)
}

/// Latents -> VAE output, undoing the VAE's `scaling_factor`.
pub fn decode(model: &StableDiffusion, latents: &Tensor) -> Tensor {
    let vae_kind = model.vae.vs.kind();
    let z = (latents / model.vae_config.scaling_factor).to_kind(vae_kind);
    model.vae.model.decode(&z).to_kind(Kind::Float)
}
