//! AutoencoderKL, numerically diffusers' `AutoencoderKL` (the SD VAE).
//!
//! `encode` gives the latent Gaussian after `quant_conv`, `decode` applies
//! `post_quant_conv` then the decoder. Neither applies `scaling_factor`:
//! callers multiply by it after encoding and divide before decoding.
mod blocks;
mod decoder;
mod encoder;
pub mod tiling;

use anyhow::{bail, ensure, Result};
use tch::{Kind, Tensor};

use self::decoder::Decoder;
use self::encoder::Encoder;
use self::tiling::VaeTiling;
use super::config::VaeConfig;
use super::layers::{Conv2d, ConvConfig, Vb};

/// The encoder's diagonal Gaussian over latents (unscaled).
pub struct LatentDist {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers' `DiagonalGaussianDistribution` does.
    pub logvar: Tensor,
}

impl LatentDist {
    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// `mean + std * noise`, `noise` a standard normal of the mean's shape.
    pub fn sample_with(&self, noise: &Tensor) -> Tensor {
        &self.mean + self.std() * noise
    }
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    /// Set by [`Self::enable_tiling`]: inputs over one tile go tile by tile.
    tiling: Option<VaeTiling>,
}

impl AutoencoderKL {
    pub fn new(vb: Vb, cfg: &VaeConfig) -> Result<Self> {
        check(cfg)?;
        let latent = cfg.latent_channels;
        Ok(AutoencoderKL {
            config: cfg.clone(),
            encoder: Encoder::new(vb.pp("encoder"), cfg),
            decoder: Decoder::new(vb.pp("decoder"), cfg),
            quant_conv: vb.pp("quant_conv").conv2d(2 * latent, 2 * latent, 1, ConvConfig::same(1)),
            post_quant_conv: vb.pp("post_quant_conv").conv2d(latent, latent, 1, ConvConfig::same(1)),
            tiling: None,
        })
    }

    /// Encode and decode images larger than one tile tile by tile, as
    /// diffusers' `enable_tiling()` (see [`tiling`]).
    pub fn enable_tiling(&mut self) {
        self.tiling = Some(VaeTiling::from_config(&self.config));
    }

    /// The tile sizes, when tiling is on.
    pub fn tiling(&self) -> Option<VaeTiling> {
        self.tiling
    }
    /// Images in [-1, 1], [B, 3, H, W] -> latent distribution [B, C, H/f, W/f],
    /// in the images' kind. Panics where [`Self::f_encode`] errs.
    pub fn encode(&self, images: &Tensor) -> LatentDist {
        self.f_encode(images).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn f_encode(&self, images: &Tensor) -> Result<LatentDist> {
        self.check_input("images", images, self.config.in_channels, self.config.scale_factor())?;
        let images_in = images.to_kind(self.kind());
        let moments_of = |x: &Tensor| Ok(self.quant_conv.forward(&self.encoder.forward(x)));
        let (h, w) = (images.size()[2], images.size()[3]);
        let moments = match self.tiling {
            Some(t) if VaeTiling::splits(t.sample_tile, h, w) => tiling::tiled(&images_in, t.sample_tile, t.latent_tile, &moments_of)?,
            _ => moments_of(&images_in)?,
        };
        let halves = moments.chunk(2, 1);
        Ok(LatentDist {
            mean: halves[0].to_kind(images.kind()),
            logvar: halves[1].clamp(-30.0, 20.0).to_kind(images.kind()),
        })
    }

    /// Unscaled latents -> images in about [-1, 1], in the latents' kind.
    /// Panics where [`Self::f_decode`] errs.
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        self.f_decode(latents).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn f_decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_input("latents", latents, self.config.latent_channels, 1)?;
        let z = latents.to_kind(self.kind());
        let pixels_of = |z: &Tensor| Ok(self.decoder.forward(&self.post_quant_conv.forward(z)));
        let (h, w) = (z.size()[2], z.size()[3]);
        let images = match self.tiling {
            Some(t) if VaeTiling::splits(t.latent_tile, h, w) => tiling::tiled(&z, t.latent_tile, t.sample_tile, &pixels_of)?,
            _ => pixels_of(&z)?,
        };
        Ok(images.to_kind(latents.kind()))
    }

    /// The kind the weights are stored in (inputs are cast to it).
    fn kind(&self) -> Kind {
        self.post_quant_conv.weight.kind()
    }

    fn check_input(&self, what: &str, x: &Tensor, channels: i64, multiple: i64) -> Result<()> {
        let size = x.size();
        ensure!(
            size.len() == 4 && size[1] == channels,
            "VAE {what} must be [batch, {channels}, height, width], got {size:?}"
        );
        ensure!(
            size[2] % multiple == 0 && size[3] % multiple == 0,
            "VAE {what} of {}x{} pixels: height and width must be multiples of {multiple}",
            size[3],
            size[2]
        );
        Ok(())
    }
}

/// The bytes a VAE decode of `batch` images of `width`×`height` pixels
/// peaks at: a few live activations of the channels its full-resolution
/// blocks hold. `elt`: bytes per element of its kind. Known before anything
/// is allocated, so callers can refuse a size in words.
pub fn decode_peak_bytes(config: &VaeConfig, elt: u64, width: u64, height: u64, batch: u64) -> u64 {
    let channels = config.block_out_channels.iter().take(2).copied().max().unwrap_or(128);
    // Measured: a 1024x1024 decode of the built-in model peaks near 8 such tensors.
    full_resolution_bytes(channels, 8, elt, width, height, batch)
}

/// The bytes a VAE encode peaks at, as [`decode_peak_bytes`]: only the first
/// block's channels run at full resolution.
pub fn encode_peak_bytes(config: &VaeConfig, elt: u64, width: u64, height: u64, batch: u64) -> u64 {
    let channels = config.block_out_channels.first().copied().unwrap_or(128);
    // Measured: a 2048x2048 encode of the built-in model peaks near 4.7 such tensors.
    full_resolution_bytes(channels, 6, elt, width, height, batch)
}

fn full_resolution_bytes(channels: i64, live: u64, elt: u64, width: u64, height: u64, batch: u64) -> u64 {
    let channels = channels.max(1) as u64;
    [channels, width, height, elt, live].iter().fold(batch, |n, &f| n.saturating_mul(f))
}

/// Rejects configs this VAE code does not build, in words.
fn check(cfg: &VaeConfig) -> Result<()> {
    let blocks = cfg.block_out_channels.len();
    ensure!(blocks > 0, "VAE block_out_channels is empty");
    if cfg.act_fn != "silu" {
        bail!("VAE act_fn {:?} is not supported; SD VAEs use \"silu\"", cfg.act_fn);
    }
    for &c in &cfg.block_out_channels {
        ensure!(
            cfg.norm_num_groups > 0 && c % cfg.norm_num_groups == 0,
            "VAE block channels {c} are not divisible by norm_num_groups {}",
            cfg.norm_num_groups
        );
    }
    check_block_types("down_block_types", &cfg.down_block_types, "DownEncoderBlock2D", blocks)?;
    check_block_types("up_block_types", &cfg.up_block_types, "UpDecoderBlock2D", blocks)
}

/// Block types may be absent (older configs); when given they must be the
/// plain ones, one per entry of `block_out_channels`.
fn check_block_types(field: &str, types: &[String], expected: &str, blocks: usize) -> Result<()> {
    if types.is_empty() {
        return Ok(());
    }
    ensure!(
        types.len() == blocks,
        "VAE {field} has {} entries but block_out_channels has {blocks}",
        types.len()
    );
    if let Some(other) = types.iter().find(|t| *t != expected) {
        bail!("VAE {field} entry {other:?} is not supported; only {expected} is");
    }
    Ok(())
}
