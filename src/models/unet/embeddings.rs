//! The diffusion timestep as the UNet sees it: a sinusoidal code
//! (diffusers' `Timesteps` / `get_timestep_embedding`) fed through a small
//! MLP (`TimestepEmbedding`, weights `time_embedding.linear_1/linear_2`).
use tch::{Kind, Tensor};

use crate::models::layers::{Linear, Vb};

/// diffusers' `get_timestep_embedding` with `scale = 1`, `max_period = 10000`:
/// `timesteps` [B] of any numeric kind -> [B, dim] in fp32.
///
/// The operations and their order are diffusers' own, so that fp32 results
/// agree to the last bit: at t = 980 an error of one ulp in a frequency
/// already moves the sine by ~1e-4.
pub fn timestep_embedding(timesteps: &Tensor, dim: i64, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, timesteps.device())) * (-(10000f64).ln());
    let freqs = (exponent / (half as f64 - freq_shift)).exp();
    let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let (sin, cos) = (args.sin(), args.cos());
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], -1) } else { Tensor::cat(&[sin, cos], -1) };
    if dim % 2 == 1 {
        // diffusers pads an odd size with one zero column at the end.
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// diffusers' `Timesteps` (the UNet's `time_proj`, no weights): the
/// sinusoidal code of each timestep, `dim` wide, in fp32.
#[derive(Clone, Copy, Debug)]
pub struct Timesteps {
    pub dim: i64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl Timesteps {
    pub fn forward(&self, timesteps: &Tensor) -> Tensor {
        timestep_embedding(timesteps, self.dim, self.flip_sin_to_cos, self.freq_shift)
    }
}

/// `time_embedding`: linear_1 -> SiLU -> linear_2.
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: Vb, in_dim: i64, time_embed_dim: i64) -> Self {
        TimestepEmbedding {
            linear_1: vb.pp("linear_1").linear(in_dim, time_embed_dim, true),
            linear_2: vb.pp("linear_2").linear(time_embed_dim, time_embed_dim, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}
