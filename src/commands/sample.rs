//! `sdtune sample`: one image from a prompt and a seed.
use anyhow::{Context, Result};

use crate::cli::SampleArgs;
use crate::models::stable_diffusion::{Placement, StableDiffusion};
use crate::runtime::{parse_device, Precision};
use crate::sample::image_out::{save_png, to_rgb8};
use crate::sample::pipeline::{text_to_image, SampleRequest};
use crate::schedulers::SchedulerKind;

pub fn run(args: SampleArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let precision = Precision::parse(&args.precision)?;
    let scheduler = SchedulerKind::parse(&args.scheduler)?;
    let placement = Placement { device, kind: precision.kind(), vae_kind: precision.kind() };
    let model = StableDiffusion::from_diffusers_folder(&args.model, placement, None)?;
    let layers = crate::lora::ModelLayers { unet: &model.unet.layers, text_encoder: Some(&model.text_encoder.layers) };
    crate::lora::apply_specs(&args.loras, &layers, args.fuse)?;
    let native = model.unet_config.sample_size.unwrap_or(64) * model.vae_config.scale_factor();
    let req = SampleRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        seed: args.seed,
        steps: args.steps,
        guidance: args.guidance,
        width: args.width.unwrap_or(native),
        height: args.height.unwrap_or(native),
        scheduler,
        clip_skip: args.clip_skip,
    };
    let bar = crate::progress::steps_bar(req.steps as u64, "sampling");
    let decoded = text_to_image(&model, &req, &mut |w| bar.suspend(|| eprintln!("warning: {w}")), &mut |i, _| {
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    let image = to_rgb8(&decoded)?.into_iter().next().context("the pipeline returned no image")?;
    save_png(&image, &args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
