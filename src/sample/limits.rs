//! What only the loaded model decides about a render: clip skip against its
//! text encoder, the image size against its VAE and this machine's memory,
//! checked before anything that large is allocated.
use anyhow::{bail, Result};

use crate::models::stable_diffusion::StableDiffusion;

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
    if let Some(free) = available_memory(model) {
        if need > free {
            bail!(
                "rendering {batch} image(s) of {width}x{height} needs about {} GiB for the VAE decode but {} GiB are free; lower --width/--height or --batch-size",
                gib(need),
                gib(free)
            );
        }
    }
    Ok(())
}

/// The VAE decoder's peak at full resolution: a few live activations of the
/// channels its last upsampler writes there.
fn decode_bytes(model: &StableDiffusion, width: i64, height: i64, batch: usize) -> u64 {
    let channels = model.vae_config.block_out_channels.iter().take(2).copied().max().unwrap_or(128).max(1);
    let elt = model.vae.vs.kind().elt_size_in_bytes() as u64;
    // Measured: a 1024x1024 decode of the built-in model peaks near 8 such tensors.
    const LIVE_ACTIVATIONS: u64 = 8;
    (batch as u64) * (channels as u64) * (width.max(0) as u64) * (height.max(0) as u64) * elt * LIVE_ACTIVATIONS
}

/// Free memory where the model runs: the CPU's available memory (Linux);
/// unknown on CUDA and elsewhere, where only the side bound applies.
fn available_memory(model: &StableDiffusion) -> Option<u64> {
    if model.device().is_cuda() {
        return None;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}
