//! The UNet's levels: diffusers' `DownBlock2D` / `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn` and `UpBlock2D` / `CrossAttnUpBlock2D`, plus
//! the strided conv and nearest upsampling that move between levels.
//!
//! A block with cross-attention is the plain block with one transformer
//! after each resnet, so both kinds share one type here; whether
//! `attentions` is empty is the only difference.
use anyhow::Result;
use tch::Tensor;

use super::attention::{Transformer2DModel, TransformerSpec};
use super::checkpointing::{Segments, Shared};
use super::resnet::{ResnetBlock2D, ResnetSpec};
use crate::models::layers::{Conv2d, ConvConfig, Vb};

/// What every block of one UNet shares.
#[derive(Clone, Copy, Debug)]
pub struct Common {
    pub temb_channels: i64,
    pub groups: i64,
    pub resnet_eps: f64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub downsample_padding: i64,
}

/// The cross-attention of one block (blocks without it have none).
#[derive(Clone, Copy, Debug)]
pub struct AttentionSpec {
    pub heads: i64,
    pub cross_attention_dim: i64,
    pub transformer_layers: i64,
}

impl Common {
    fn resnet(&self, in_channels: i64, out_channels: i64) -> ResnetSpec {
        ResnetSpec {
            in_channels,
            out_channels,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.resnet_eps,
        }
    }

    fn transformer(&self, channels: i64, a: AttentionSpec) -> TransformerSpec {
        TransformerSpec {
            channels,
            heads: a.heads,
            cross_attention_dim: a.cross_attention_dim,
            layers: a.transformer_layers,
            groups: self.groups,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
        }
    }
}

/// The sizes of one down or up block.
#[derive(Clone, Copy, Debug)]
pub struct BlockSpec {
    /// Channels coming in: the previous level's for a down block; for an up
    /// block, the skip width of its last resnet (diffusers' `in_channels`).
    pub in_channels: i64,
    pub out_channels: i64,
    /// Up blocks only: the channels the previous up block hands over.
    pub prev_output_channels: i64,
    pub resnets: i64,
    pub attention: Option<AttentionSpec>,
    /// A downsampler (down block) or upsampler (up block) at the end.
    pub resample: bool,
}

/// `conv` with stride 2: halves h and w (rounding up).
pub struct Downsample2D {
    conv: Conv2d,
    /// diffusers pads right and bottom by one when `downsample_padding` is 0.
    pad_right_bottom: bool,
}

impl Downsample2D {
    fn new(vb: Vb, channels: i64, padding: i64) -> Self {
        let conv = vb.pp("conv").conv2d(channels, channels, 3, ConvConfig { stride: 2, padding });
        Downsample2D { conv, pad_right_bottom: padding == 0 }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour upsampling to a given size, then a 3x3 `conv`.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    fn new(vb: Vb, channels: i64) -> Self {
        Upsample2D { conv: vb.pp("conv").conv2d(channels, channels, 3, ConvConfig::same(3)) }
    }

    /// `size` is [h, w] of the skip connection the next level concatenates;
    /// without one, twice the input's.
    fn forward(&self, x: &Tensor, size: Option<[i64; 2]>) -> Tensor {
        let size = size.unwrap_or_else(|| {
            let s = x.size();
            [2 * s[2], 2 * s[3]]
        });
        self.conv.forward(&x.upsample_nearest2d(size, None, None))
    }
}

/// Builds the transformers of a block, one per resnet, if it has attention.
fn transformers(
    vb: &Vb,
    common: &Common,
    channels: i64,
    spec: &BlockSpec,
) -> Result<Vec<Shared<Transformer2DModel>>> {
    let Some(a) = spec.attention else { return Ok(Vec::new()) };
    let vb = vb.pp("attentions");
    (0..spec.resnets)
        .map(|j| Transformer2DModel::new(vb.pp(j), &common.transformer(channels, a)).map(Shared::new))
        .collect()
}

/// resnet, then its transformer if there is one.
fn resnet_then_attention(
    resnet: &Shared<ResnetBlock2D>,
    attention: Option<&Shared<Transformer2DModel>>,
    x: &Tensor,
    temb: &Tensor,
    context: &Tensor,
    segments: Segments,
) -> Tensor {
    let h = segments.resnet(resnet, x, temb);
    match attention {
        Some(attention) => segments.transformer(attention, &h, context),
        None => h,
    }
}

pub struct DownBlock {
    resnets: Vec<Shared<ResnetBlock2D>>,
    attentions: Vec<Shared<Transformer2DModel>>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(vb: Vb, common: &Common, spec: &BlockSpec) -> Result<Self> {
        let resnets = (0..spec.resnets)
            .map(|j| {
                let in_channels = if j == 0 { spec.in_channels } else { spec.out_channels };
                ResnetBlock2D::new(vb.pp("resnets").pp(j), common.resnet(in_channels, spec.out_channels)).map(Shared::new)
            })
            .collect::<Result<_>>()?;
        let attentions = transformers(&vb, common, spec.out_channels, spec)?;
        let downsampler = spec.resample.then(|| {
            Downsample2D::new(vb.pp("downsamplers").pp(0), spec.out_channels, common.downsample_padding)
        });
        Ok(DownBlock { resnets, attentions, downsampler })
    }

    /// Returns the block's output and the states it hands to the up path
    /// as skip connections: each resnet's (or transformer's) output, then
    /// the downsampled one.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor, segments: Segments) -> (Tensor, Vec<Tensor>) {
        let mut h = x.shallow_clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet_then_attention(resnet, self.attentions.get(j), &h, temb, context, segments);
            skips.push(h.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h);
            skips.push(h.shallow_clone());
        }
        (h, skips)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet at the lowest resolution.
pub struct MidBlock {
    resnets: [Shared<ResnetBlock2D>; 2],
    attention: Shared<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(vb: Vb, common: &Common, channels: i64, attention: AttentionSpec) -> Result<Self> {
        let resnet = |j: i64| {
            ResnetBlock2D::new(vb.pp("resnets").pp(j), common.resnet(channels, channels)).map(Shared::new)
        };
        let first = resnet(0)?;
        let attention =
            Shared::new(Transformer2DModel::new(vb.pp("attentions").pp(0), &common.transformer(channels, attention))?);
        Ok(MidBlock { resnets: [first, resnet(1)?], attention })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor, segments: Segments) -> Tensor {
        let h = segments.resnet(&self.resnets[0], x, temb);
        let h = segments.transformer(&self.attention, &h, context);
        segments.resnet(&self.resnets[1], &h, temb)
    }
}

pub struct UpBlock {
    resnets: Vec<Shared<ResnetBlock2D>>,
    attentions: Vec<Shared<Transformer2DModel>>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn new(vb: Vb, common: &Common, spec: &BlockSpec) -> Result<Self> {
        let last = spec.resnets - 1;
        let resnets = (0..spec.resnets)
            .map(|j| {
                // Each resnet takes the running state concatenated with one skip;
                // the last skip comes from one level deeper, hence `in_channels`.
                let running = if j == 0 { spec.prev_output_channels } else { spec.out_channels };
                let skip = if j == last { spec.in_channels } else { spec.out_channels };
                ResnetBlock2D::new(vb.pp("resnets").pp(j), common.resnet(running + skip, spec.out_channels))
                    .map(Shared::new)
            })
            .collect::<Result<_>>()?;
        let attentions = transformers(&vb, common, spec.out_channels, spec)?;
        let upsampler = spec.resample.then(|| Upsample2D::new(vb.pp("upsamplers").pp(0), spec.out_channels));
        Ok(UpBlock { resnets, attentions, upsampler })
    }

    /// How many skip connections the block consumes.
    pub fn skips_needed(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` in the order the down path produced them (consumed last
    /// first); `upsample_to` the [h, w] of the next level, when it has one.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_to: Option<[i64; 2]>,
        segments: Segments,
    ) -> Tensor {
        let mut h = x.shallow_clone();
        for (j, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            let joined = Tensor::cat(&[&h, skip], 1);
            h = resnet_then_attention(resnet, self.attentions.get(j), &joined, temb, context, segments);
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, upsample_to),
            None => h,
        }
    }
}
