//! The model loaded once, and what every image rendered with it records
//! about it (model path and hash, VAE, precision, device, LoRAs). Shared by
//! `sdtune sample` and `sdtune serve`, so an image served and one sampled
//! with the same recipe carry the same settings, byte for byte.
use std::path::Path;

use anyhow::Result;
use tch::Device;

use super::render::LoadedLora;
use super::settings::{self, Settings};
use crate::loaders::source::LoadOptions;
use crate::models::stable_diffusion::{Placement, StableDiffusion};
use crate::runtime::Precision;

/// The settings of a render before anything is chosen: `sdtune sample`'s
/// defaults (30 DDIM steps, guidance 7.5); width and height 0 mean the
/// model's native size.
pub fn default_settings() -> Settings {
    Settings {
        steps: 30,
        guidance: 7.5,
        width: 0,
        height: 0,
        scheduler: "ddim".into(),
        clip_skip: 0,
        model: String::new(),
        model_hash: String::new(),
        variant: None,
        vae: None,
        prediction_type: None,
        loras: Vec::new(),
        fuse: false,
        vae_tiling: false,
        precision: "fp32".into(),
        device: "cpu".into(),
        size_conditioning: None,
    }
}

/// Loads the model `model` names and hashes its weights file(s) (for the
/// PNGs' settings); a local model is hashed on another thread while it loads.
pub fn load_and_hash(model: &str, options: &LoadOptions, placement: Placement) -> Result<(StableDiffusion, String)> {
    let variant = options.variant.as_deref();
    let local = Path::new(model);
    let (loaded, early) = std::thread::scope(|s| {
        let hasher = local.exists().then(|| s.spawn(|| settings::model_hash(local, variant)));
        let loaded = StableDiffusion::load(model, placement, options);
        (loaded, hasher.and_then(|h| h.join().ok()).and_then(Result::ok))
    });
    let loaded = loaded?;
    let hash = match (early, &loaded.source) {
        (Some(hash), _) => hash,
        // A Hub id or cache folder: hash what it resolved to.
        (None, Some(source)) => settings::model_hash(source, variant)?,
        (None, None) => String::new(),
    };
    let hash = match &options.vae {
        Some(vae) => settings::with_vae(&hash, vae)?,
        None => hash,
    };
    Ok((loaded, hash))
}

/// How the loaded weights are used: `--precision`, `--fuse`, `--vae-tiling`.
#[derive(Clone, Copy, Debug)]
pub struct Handling {
    pub precision: Precision,
    pub fuse: bool,
    pub vae_tiling: bool,
}

/// What every image records about the model (`model` as the user named
/// it), its LoRAs and the device.
pub fn shared_settings(
    model: &str,
    options: &LoadOptions,
    handling: Handling,
    model_hash: String,
    loras: &[LoadedLora],
    device: Device,
) -> Settings {
    let mut s = default_settings();
    s.model = settings::recorded_model(model);
    s.model_hash = model_hash;
    s.variant = options.variant.clone();
    s.vae = options.vae.as_ref().map(|v| settings::recorded_model(&v.to_string_lossy()));
    s.prediction_type = options.prediction_type.map(|p| p.as_config_str().to_string());
    s.loras = loras.iter().map(|l| l.usage(l.scale)).collect();
    s.fuse = handling.fuse;
    s.vae_tiling = handling.vae_tiling;
    s.precision = handling.precision.name().into();
    s.device = match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    };
    s
}

/// The model's, LoRAs' and device's settings with the render's own (steps,
/// guidance, size, scheduler, clip skip).
pub fn with_render_settings(shared: Settings, own: &Settings) -> Settings {
    Settings {
        steps: own.steps,
        guidance: own.guidance,
        width: own.width,
        height: own.height,
        scheduler: own.scheduler.clone(),
        clip_skip: own.clip_skip,
        size_conditioning: own.size_conditioning,
        ..shared
    }
}

/// The side, in pixels, the model was made for.
pub fn native_side(model: &StableDiffusion) -> i64 {
    model.unet_config.sample_size.unwrap_or(64) * model.vae_config.scale_factor()
}

/// Sizes left at 0 become the model's native size, and SDXL size
/// conditioning left at 0x0 the image's own.
pub fn fill_sizes(settings: &mut Settings, model: &StableDiffusion) {
    let native = native_side(model);
    for side in [&mut settings.width, &mut settings.height] {
        if *side == 0 {
            *side = native;
        }
    }
    let own = [settings.height, settings.width];
    if let Some(sizes) = &mut settings.size_conditioning {
        for pair in [&mut sizes.original, &mut sizes.target] {
            if *pair == [0, 0] {
                *pair = own;
            }
        }
    }
}
