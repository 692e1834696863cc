//! diffusers' `ResnetBlock2D` (the "default" time-embedding norm: the time
//! embedding is added between the two convolutions).
use anyhow::{bail, Result};
use tch::Tensor;

use crate::models::layers::{Conv2d, ConvConfig, GroupNorm, Linear, Vb};

/// A GroupNorm whose channels must split evenly into `groups`; checked here
/// because torch would only fail at the first forward, far from the cause.
pub fn group_norm(vb: &Vb, groups: i64, channels: i64, eps: f64) -> Result<GroupNorm> {
    if groups <= 0 || channels % groups != 0 {
        bail!(
            "{}: {channels} channels cannot be split into {groups} groups (norm_num_groups in config.json)",
            vb.prefix()
        );
    }
    Ok(vb.group_norm(groups, channels, eps))
}

/// The sizes of one resnet; `groups` and `eps` are the config's
/// `norm_num_groups` and `norm_eps`.
#[derive(Clone, Copy, Debug)]
pub struct ResnetSpec {
    pub in_channels: i64,
    pub out_channels: i64,
    pub temb_channels: i64,
    pub groups: i64,
    pub eps: f64,
}

pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// A 1x1 conv when the block changes the channel count, so the residual fits.
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(vb: Vb, s: ResnetSpec) -> Result<Self> {
        // Fields are built in diffusers' order so the layer index lists them so.
        Ok(ResnetBlock2D {
            norm1: group_norm(&vb.pp("norm1"), s.groups, s.in_channels, s.eps)?,
            conv1: vb.pp("conv1").conv2d(s.in_channels, s.out_channels, 3, ConvConfig::same(3)),
            time_emb_proj: vb.pp("time_emb_proj").linear(s.temb_channels, s.out_channels, true),
            norm2: group_norm(&vb.pp("norm2"), s.groups, s.out_channels, s.eps)?,
            conv2: vb.pp("conv2").conv2d(s.out_channels, s.out_channels, 3, ConvConfig::same(3)),
            conv_shortcut: (s.in_channels != s.out_channels).then(|| {
                vb.pp("conv_shortcut").conv2d(s.in_channels, s.out_channels, 1, ConvConfig::same(1))
            }),
        })
    }

    /// Whether any of its tensors is trained or carries an adapter.
    pub fn trains(&self) -> bool {
        self.norm1.trains()
            || self.conv1.trains()
            || self.time_emb_proj.trains()
            || self.norm2.trains()
            || self.conv2.trains()
            || self.conv_shortcut.as_ref().is_some_and(Conv2d::trains)
    }

    /// `x` [B, in, h, w], `temb` [B, temb_channels] -> [B, out, h, w].
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let t = self.time_emb_proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1);
        let h = self.conv2.forward(&self.norm2.forward(&(h + t)).silu());
        let residual = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x.shallow_clone(),
        };
        residual + h
    }
}
