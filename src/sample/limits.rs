//! What only the loaded model decides about a render: clip skip against its
//! text encoder, the image size against its VAE and this machine's memory,
//! checked before anything that large is allocated.
use anyhow::{bail, Result};

use crate::models::stable_diffusion::StableDiffusion;
use crate::runtime::{available_memory, gib};

/// The smallest largest-side every model may render; models with a larger
/// native size may go to 8 times it.
const MIN_MAX_SIDE: i64 = 4096;

/// `--clip-skip` against the model's text encoders: at least one layer of
/// the shallowest must remain.
pub fn check_clip_skip(model: &StableDiffusion, clip_skip: usize) -> Result<()> {
    let layers = model.text.encoders.iter().map(|e| e.config.num_hidden_layers).min().unwrap_or(0);
    if clip_skip as i64 >= layers {
        bail!(
            "--clip-skip {clip_skip} skips every layer of this model's text encoder, which has {layers}; use 0 to {}",
            layers - 1
        );
    }
    Ok(())
}

/// Refuses sizes this model cannot render here before anything is
/// allocated: a side beyond 8 times the model's own (at least 4096), or a
/// VAE decode that would need more memory than the machine has free.
pub fn check_render_size(model: &StableDiffusion, width: i64, height: i64, batch: usize) -> Result<()> {
    let f = model.vae_config.scale_factor();
    let native = model.unet_config.sample_size.unwrap_or(64) * f;
    let max_side = MIN_MAX_SIDE.max(8 * native);
    if width > max_side || height > max_side {
        bail!("{width}x{height} is too large for this model (native {native}x{native}); use --width and --height up to {max_side}");
    }
    let need = decode_bytes(model, width, height, batch.max(1));
    // Not on CUDA: once the model is loaded, the caching allocator holds
    // blocks torch can reuse but the driver counts as used.
    let free = if model.device().is_cuda() { None } else { available_memory(model.device()) };
    if let Some(free) = free {
        if need > free {
            let tiling = if model.vae.model.tiling().is_none() { ", or add --vae-tiling" } else { "" };
            bail!(
                "rendering {batch} image(s) of {width}x{height} needs about {} GiB for the VAE decode but {} GiB are free; lower --width/--height or --batch-size{tiling}",
                gib(need),
                gib(free)
            );
        }
    }
    Ok(())
}

/// The VAE decoder's peak: at full resolution, or with tiling at one
/// tile's plus the pixel tiles kept until they are joined.
fn decode_bytes(model: &StableDiffusion, width: i64, height: i64, batch: usize) -> u64 {
    let kind = model.vae.vs.kind();
    let elt = kind.elt_size_in_bytes() as u64;
    let (w, h, b) = (width.max(0) as u64, height.max(0) as u64, batch as u64);
    match model.vae.model.tiling() {
        Some(t) => {
            let tile = t.sample_tile.max(1) as u64;
            crate::models::vae::decode_peak_bytes(&model.vae_config, elt, w.min(tile), h.min(tile), b)
                + crate::models::vae::tiling::joined_output_bytes(kind, w, h, b)
        }
        None => crate::models::vae::decode_peak_bytes(&model.vae_config, elt, w, h, b),
    }
}
