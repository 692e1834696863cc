//! The blocks the VAE encoder and decoder share, as diffusers builds them
//! for `AutoencoderKL`: resnets without time embedding, a single-head
//! spatial self-attention, the mid block, and the 2x resamplers.
use tch::Tensor;

use crate::models::layers::{Conv2d, ConvConfig, GroupNorm, Linear, Vb};

/// Every VAE norm uses this epsilon (diffusers hard-codes `resnet_eps=1e-6`).
pub const EPS: f64 = 1e-6;

/// diffusers' `ResnetBlock2D` with `temb_channels=None`:
/// `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// A 1x1 conv when the channel count changes.
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(vb: Vb, in_channels: i64, out_channels: i64, groups: i64) -> Self {
        let conv_shortcut = (in_channels != out_channels)
            .then(|| vb.pp("conv_shortcut").conv2d(in_channels, out_channels, 1, ConvConfig::same(1)));
        ResnetBlock {
            norm1: vb.pp("norm1").group_norm(groups, in_channels, EPS),
            conv1: vb.pp("conv1").conv2d(in_channels, out_channels, 3, ConvConfig::same(3)),
            norm2: vb.pp("norm2").group_norm(groups, out_channels, EPS),
            conv2: vb.pp("conv2").conv2d(out_channels, out_channels, 3, ConvConfig::same(3)),
            conv_shortcut,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(conv) => conv.forward(x) + h,
            None => x + h,
        }
    }
}

/// diffusers' `Attention` as the VAE mid block builds it: one head spanning
/// all channels, a group norm first, a residual around it.
pub struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    pub fn new(vb: Vb, channels: i64, groups: i64) -> Self {
        SpatialAttention {
            group_norm: vb.pp("group_norm").group_norm(groups, channels, EPS),
            to_q: vb.pp("to_q").linear(channels, channels, true),
            to_k: vb.pp("to_k").linear(channels, channels, true),
            to_v: vb.pp("to_v").linear(channels, channels, true),
            to_out: vb.pp("to_out").pp(0).linear(channels, channels, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("VAE attention input is [B, C, H, W]");
        // [B, C, H, W] -> [B, 1 head, H*W, C]
        let tokens = self.group_norm.forward(x).view([b, c, h * w]).transpose(1, 2);
        let q = self.to_q.forward(&tokens).unsqueeze(1);
        let k = self.to_k.forward(&tokens).unsqueeze(1);
        let v = self.to_v.forward(&tokens).unsqueeze(1);
        crate::models::flop_count::attention(&q, &k, &v);
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        let y = self.to_out.forward(&y.squeeze_dim(1));
        x + y.transpose(1, 2).reshape([b, c, h, w])
    }
}

/// diffusers' `UNetMidBlock2D` without time embedding: resnet, optional
/// attention (`mid_block_add_attention`), resnet.
pub struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    pub fn new(vb: Vb, channels: i64, groups: i64, add_attention: bool) -> Self {
        let resnets = vb.pp("resnets");
        MidBlock {
            resnet0: ResnetBlock::new(resnets.pp(0), channels, channels, groups),
            attention: add_attention
                .then(|| SpatialAttention::new(vb.pp("attentions").pp(0), channels, groups)),
            resnet1: ResnetBlock::new(resnets.pp(1), channels, channels, groups),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.resnet0.forward(x);
        let x = match &self.attention {
            Some(attention) => attention.forward(&x),
            None => x,
        };
        self.resnet1.forward(&x)
    }
}

/// diffusers' `Downsample2D` with `padding=0`: pad right and bottom by one,
/// then a stride-2 3x3 conv (the original LDM's asymmetric padding).
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub fn new(vb: Vb, channels: i64) -> Self {
        Downsample { conv: vb.pp("conv").conv2d(channels, channels, 3, ConvConfig { stride: 2, padding: 0 }) }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
    }
}

/// diffusers' `Upsample2D`: nearest-neighbour 2x, then a 3x3 conv.
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn new(vb: Vb, channels: i64) -> Self {
        Upsample { conv: vb.pp("conv").conv2d(channels, channels, 3, ConvConfig::same(3)) }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (_, _, h, w) = x.size4().expect("VAE upsample input is [B, C, H, W]");
        self.conv.forward(&x.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0))
    }
}
