//! Text to image, step for step as diffusers' `StableDiffusionPipeline`:
//! tokenize, encode (with the negative prompt for guidance), draw the
//! initial latents on the CPU from the seed, denoise, decode.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::models::stable_diffusion::StableDiffusion;
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
    check_size(model, req)?;
    tch::no_grad(|| {
        let guided = req.guidance > 1.0;
        let text = encode_prompt(model, &req.prompt, req.clip_skip, "prompt", warn)?;
        let context = if guided {
            let negative = req.negative_prompt.as_deref().unwrap_or("");
            let uncond = encode_prompt(model, negative, req.clip_skip, "negative prompt", warn)?;
            Tensor::cat(&[uncond, text], 0)
        } else {
            text
        };

        let mut sampler = req.scheduler.build(&model.scheduler, req.steps)?;
        let latents = initial_latents(model, req) * sampler.init_noise_sigma();
        let latents = denoise(model, sampler.as_mut(), latents, &context, req.guidance, on_step);
        Ok(decode(model, &latents))
    })
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

/// Prompt -> text-encoder hidden states [1, 77, D] in the UNet's kind.
pub fn encode_prompt(model: &StableDiffusion, prompt: &str, clip_skip: usize, what: &str, warn: Warn) -> Result<Tensor> {
    let encoded = model.tokenizer()?.encode(prompt);
    if encoded.truncated {
        warn(format!("the {what} is longer than 77 CLIP tokens; the rest was cut off, as diffusers does"));
    }
    let ids = Tensor::from_slice(&encoded.ids).view([1, -1]).to_device(model.device());
    Ok(model.text_encoder.model.encode(&ids, clip_skip))
}

/// N(0, 1) latents drawn on the CPU from the seed, as diffusers does with
/// `torch.Generator("cpu").manual_seed(seed)`, so a seed means the same
/// image on any device.
fn initial_latents(model: &StableDiffusion, req: &SampleRequest) -> Tensor {
    let f = model.vae_config.scale_factor();
    let channels = model.unet_config.in_channels;
    tch::manual_seed(req.seed as i64);
    Tensor::randn([1, channels, req.height / f, req.width / f], (Kind::Float, Device::Cpu))
        .to_device(model.device())
}

fn denoise(
    model: &StableDiffusion,
    sampler: &mut dyn Sampler,
    mut latents: Tensor,
    context: &Tensor,
    guidance: f64,
    on_step: &mut dyn FnMut(usize, usize),
) -> Tensor {
    let guided = guidance > 1.0;
    let timesteps = sampler.timesteps().to_vec();
    let noise_shape = latents.size();
    // Ancestral samplers keep drawing from the generator the seed started.
    let mut fresh_noise = || Tensor::randn(&noise_shape[..], (Kind::Float, Device::Cpu)).to_device(model.device());
    for (i, &t) in timesteps.iter().enumerate() {
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
    latents
}

/// Latents -> VAE output, undoing the VAE's `scaling_factor`.
pub fn decode(model: &StableDiffusion, latents: &Tensor) -> Tensor {
    let vae_kind = model.vae.vs.kind();
    let z = (latents / model.vae_config.scaling_factor).to_kind(vae_kind);
    model.vae.model.decode(&z).to_kind(Kind::Float)
}
