//! Tiled VAE encode and decode, step for step as diffusers'
//! `AutoencoderKL.enable_tiling()`: overlapping tiles of the config's
//! `sample_size` (a quarter overlap), each run through the whole encoder or
//! decoder, blended linearly into their upper and left neighbours, cropped
//! and joined. Memory then follows the tile, not the image, so a 2048 px
//! image decodes on a laptop. Tiles see only their own pixels (GroupNorm
//! statistics included), so the result differs slightly from the untiled
//! one, as diffusers' does.
use anyhow::Result;
use tch::{Kind, Tensor};

use crate::models::config::VaeConfig;

/// Tile sizes in pixels and in latents.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VaeTiling {
    pub sample_tile: i64,
    pub latent_tile: i64,
}

/// diffusers' `tile_overlap_factor`.
const OVERLAP: f64 = 0.25;

impl VaeTiling {
    /// diffusers' sizes: the config's `sample_size` (512 when absent) and that
    /// over 2^(blocks - 1).
    pub fn from_config(config: &VaeConfig) -> Self {
        let sample_tile = config.sample_size.filter(|&s| s > 0).unwrap_or(512);
        let downsamples = config.block_out_channels.len().saturating_sub(1) as u32;
        VaeTiling { sample_tile, latent_tile: (sample_tile / 2i64.pow(downsamples)).max(1) }
    }

    /// Whether an input of `height`x`width` (pixels or latents, as `tile`
    /// says) is split at all: only when a side exceeds one tile.
    pub fn splits(tile: i64, height: i64, width: i64) -> bool {
        height > tile || width > tile
    }
}

/// Runs `run` on overlapping tiles of `x` [B, C, H, W] of side `in_tile` and
/// joins the outputs, whose tiles have side `out_tile`: diffusers'
/// `tiled_decode` (in = latents, out = pixels) and `_tiled_encode` (the reverse).
pub fn tiled(x: &Tensor, in_tile: i64, out_tile: i64, run: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (h, w) = (x.size()[2], x.size()[3]);
    let stride = ((in_tile as f64) * (1.0 - OVERLAP)) as i64;
    let blend_extent = ((out_tile as f64) * OVERLAP) as i64;
    let row_limit = out_tile - blend_extent;
    let starts = |len: i64| (0..len).step_by(stride.max(1) as usize).collect::<Vec<i64>>();
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for &i in &starts(h) {
        let mut row = Vec::new();
        for &j in &starts(w) {
            let tile = x.narrow(2, i, in_tile.min(h - i)).narrow(3, j, in_tile.min(w - j));
            row.push(run(&tile)?);
        }
        rows.push(row);
    }
    // In place and in order, as diffusers: a tile blends into the already
    // blended tiles above and to its left.
    let mut joined_rows = Vec::new();
    for i in 0..rows.len() {
        let mut cropped = Vec::new();
        for j in 0..rows[i].len() {
            if i > 0 {
                blend(&rows[i - 1][j], &rows[i][j], blend_extent, 2);
            }
            if j > 0 {
                blend(&rows[i][j - 1], &rows[i][j], blend_extent, 3);
            }
            let tile = &rows[i][j];
            let (th, tw) = (tile.size()[2], tile.size()[3]);
            cropped.push(tile.narrow(2, 0, row_limit.min(th)).narrow(3, 0, row_limit.min(tw)));
        }
        joined_rows.push(Tensor::f_cat(&cropped, 3)?);
    }
    Ok(Tensor::f_cat(&joined_rows, 2)?)
}

/// diffusers' `blend_v` (dim 2) / `blend_h` (dim 3): the first `extent` rows
/// (columns) of `b` become `a`'s last ones weighted by 1 - y/extent plus
/// `b`'s own weighted by y/extent, written into `b`.
fn blend(a: &Tensor, b: &Tensor, extent: i64, dim: i64) {
    let extent = extent.min(a.size()[dim as usize]).min(b.size()[dim as usize]);
    if extent <= 0 {
        return;
    }
    // As diffusers' `tensor * python_float`: the weight in fp32 (computed in
    // double), each product rounded to the tile's kind, then their sum.
    let ramp: Vec<f32> = (0..extent).map(|y| (y as f64 / extent as f64) as f32).collect();
    let rest: Vec<f32> = (0..extent).map(|y| (1.0 - y as f64 / extent as f64) as f32).collect();
    let shape: Vec<i64> = if dim == 2 { vec![1, 1, extent, 1] } else { vec![1, 1, 1, extent] };
    let weights = |v: &[f32]| Tensor::from_slice(v).to_device(b.device()).reshape(shape.as_slice());
    let a_end = a.narrow(dim, a.size()[dim as usize] - extent, extent);
    let mut b_start = b.narrow(dim, 0, extent);
    let mixed = (&a_end * weights(&rest)).to_kind(b.kind()) + (&b_start * weights(&ramp)).to_kind(b.kind());
    b_start.copy_(&mixed);
}

/// Bytes of the pixel tiles a tiled decode keeps until it joins them (3
/// channels at about (1/(1-overlap))² of the image's area), in `Kind::Float`
/// or the VAE's kind.
pub fn joined_output_bytes(kind: Kind, width: u64, height: u64, batch: u64) -> u64 {
    let elt = kind.elt_size_in_bytes() as u64;
    // Tiles overlap by a quarter each way: 16/9 of the area, and the joined copy.
    let area = width.saturating_mul(height).saturating_mul(16) / 9 + width.saturating_mul(height);
    area.saturating_mul(3).saturating_mul(elt).saturating_mul(batch)
}
