//! The UNet's spatial transformer: diffusers' `Transformer2DModel` of
//! `BasicTransformerBlock`s, each self-attention, cross-attention on the text
//! and a GEGLU feed-forward.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::resnet::group_norm;
use crate::models::channels_last;
use crate::models::layers::{Conv2d, ConvConfig, GroupNorm, LayerNorm, Linear, Vb};

/// diffusers fixes these eps values inside `Transformer2DModel`; the
/// config's `norm_eps` is the resnets' only.
const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;
const LAYER_NORM_EPS: f64 = 1e-5;

/// The sizes of one `Transformer2DModel`.
#[derive(Clone, Copy, Debug)]
pub struct TransformerSpec {
    pub channels: i64,
    pub heads: i64,
    /// Text embedding width, the keys' and values' input.
    pub cross_attention_dim: i64,
    pub layers: i64,
    pub groups: i64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

/// Multi-head attention (`attn1`, `attn2`) through torch's fused SDPA.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    head_dim: i64,
    /// Compute in fp32 when the weights are half precision: SD2's attention
    /// logits overflow fp16 otherwise.
    upcast: bool,
}

impl Attention {
    pub fn new(vb: Vb, query_dim: i64, context_dim: i64, heads: i64, head_dim: i64, upcast: bool) -> Self {
        let inner = heads * head_dim;
        Attention {
            to_q: vb.pp("to_q").linear(query_dim, inner, false),
            to_k: vb.pp("to_k").linear(context_dim, inner, false),
            to_v: vb.pp("to_v").linear(context_dim, inner, false),
            to_out: vb.pp("to_out").pp(0).linear(inner, query_dim, true),
            heads,
            head_dim,
            upcast,
        }
    }

    fn trains(&self) -> bool {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out].iter().any(|l| l.trains())
    }

    /// `x` [B, L, query_dim] attends to `context` [B, S, context_dim], or to
    /// itself when `context` is `None`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x));
        let k = self.split_heads(&self.to_k.forward(context));
        let v = self.split_heads(&self.to_v.forward(context));
        let out = self.attend(&q, &k, &v);
        self.to_out.forward(&self.merge_heads(&out))
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let kind = q.kind();
        if self.upcast && kind != Kind::Float {
            let f = |t: &Tensor| t.to_kind(Kind::Float);
            sdpa(&f(q), &f(k), &f(v)).to_kind(kind)
        } else {
            sdpa(q, k, v)
        }
    }

    /// [B, L, heads * head_dim] -> [B, heads, L, head_dim].
    fn split_heads(&self, t: &Tensor) -> Tensor {
        let batch = t.size()[0];
        t.view([batch, -1, self.heads, self.head_dim]).transpose(1, 2)
    }

    /// [B, heads, L, head_dim] -> [B, L, heads * head_dim].
    fn merge_heads(&self, t: &Tensor) -> Tensor {
        let batch = t.size()[0];
        t.transpose(1, 2).reshape([batch, -1, self.heads * self.head_dim])
    }
}

/// softmax(q k^T / sqrt(head_dim)) v, no mask, no dropout.
fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    crate::models::flop_count::attention(q, k, v);
    Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None, false)
}

/// `ff`: GEGLU (`net.0.proj`, to twice the inner width, half of it gating
/// the other through GELU) then `net.2` back to `dim`. Inner width 4 * dim.
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(vb: Vb, dim: i64) -> Self {
        let inner = 4 * dim;
        FeedForward {
            proj: vb.pp("net").pp(0).pp("proj").linear(dim, 2 * inner, true),
            out: vb.pp("net").pp(2).linear(inner, dim, true),
        }
    }

    fn trains(&self) -> bool {
        self.proj.trains() || self.out.trains()
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let halves = self.proj.forward(x).chunk(2, -1);
        let (hidden, gate) = (&halves[0], &halves[1]);
        self.out.forward(&(hidden * gate.gelu("none")))
    }
}

/// One pre-norm transformer layer: self-attention, cross-attention, FF,
/// each added back to the residual stream.
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(vb: Vb, dim: i64, s: &TransformerSpec, head_dim: i64) -> Self {
        let attention = |name: &str, context_dim: i64| {
            Attention::new(vb.pp(name), dim, context_dim, s.heads, head_dim, s.upcast_attention)
        };
        BasicTransformerBlock {
            norm1: vb.pp("norm1").layer_norm(dim, LAYER_NORM_EPS),
            attn1: attention("attn1", dim),
            norm2: vb.pp("norm2").layer_norm(dim, LAYER_NORM_EPS),
            attn2: attention("attn2", s.cross_attention_dim),
            norm3: vb.pp("norm3").layer_norm(dim, LAYER_NORM_EPS),
            ff: FeedForward::new(vb.pp("ff"), dim),
        }
    }

    fn trains(&self) -> bool {
        self.norm1.trains()
            || self.attn1.trains()
            || self.norm2.trains()
            || self.attn2.trains()
            || self.norm3.trains()
            || self.ff.trains()
    }

    /// `x` [B, HW, dim], `context` [B, S, cross_attention_dim].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + x;
        self.ff.forward(&self.norm3.forward(&x)) + x
    }
}

/// `proj_in` / `proj_out`: SD1 uses 1x1 convolutions on [B, C, h, w], SD2
/// (`use_linear_projection`) linears on the flattened [B, hw, C].
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn trains(&self) -> bool {
        match self {
            Projection::Conv(conv) => conv.trains(),
            Projection::Linear(linear) => linear.trains(),
        }
    }

    fn new(vb: Vb, linear: bool, in_dim: i64, out_dim: i64) -> Self {
        if linear {
            Projection::Linear(vb.linear(in_dim, out_dim, true))
        } else {
            Projection::Conv(vb.conv2d(in_dim, out_dim, 1, ConvConfig::same(1)))
        }
    }
}

/// The spatial transformer: GroupNorm, `proj_in`, transformer blocks over the
/// h*w positions, `proj_out`, plus the input as a residual.
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: Vb, s: &TransformerSpec) -> Result<Self> {
        if s.heads <= 0 || s.channels / s.heads == 0 {
            bail!(
                "{}: {} channels cannot be split into {} attention heads (attention_head_dim / num_attention_heads in config.json)",
                vb.prefix(),
                s.channels,
                s.heads
            );
        }
        // diffusers' head size is the integer quotient, so `inner` may be
        // narrower than `channels`; proj_in/proj_out bridge the two.
        let head_dim = s.channels / s.heads;
        let inner = s.heads * head_dim;
        let norm = group_norm(&vb.pp("norm"), s.groups, s.channels, TRANSFORMER_GROUP_NORM_EPS)?;
        let proj_in = Projection::new(vb.pp("proj_in"), s.use_linear_projection, s.channels, inner);
        let blocks = vb.pp("transformer_blocks");
        let transformer_blocks =
            (0..s.layers).map(|i| BasicTransformerBlock::new(blocks.pp(i), inner, s, head_dim)).collect();
        let proj_out = Projection::new(vb.pp("proj_out"), s.use_linear_projection, inner, s.channels);
        Ok(Transformer2DModel { norm, proj_in, transformer_blocks, proj_out })
    }

    /// Whether any of its tensors is trained or carries an adapter.
    pub fn trains(&self) -> bool {
        self.norm.trains()
            || self.proj_in.trains()
            || self.transformer_blocks.iter().any(BasicTransformerBlock::trains)
            || self.proj_out.trains()
    }

    /// `x` [B, C, h, w], `context` [B, S, cross_attention_dim] -> [B, C, h, w].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let size = x.size();
        let (batch, height, width) = (size[0], size[2], size[3]);
        let mut h = self.project_in(&self.norm.forward(x));
        for block in &self.transformer_blocks {
            h = block.forward(&h, context);
        }
        self.project_out(&h, batch, height, width, channels_last::is_channels_last(x)) + x
    }

    /// [B, C, h, w] -> [B, hw, inner].
    fn project_in(&self, x: &Tensor) -> Tensor {
        match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(x)),
            Projection::Linear(linear) => linear.forward(&to_tokens(x)),
        }
    }

    /// [B, hw, inner] -> [B, C, h, w], channels-last (then a free view of
    /// the tokens) when the block's input is.
    fn project_out(&self, h: &Tensor, batch: i64, height: i64, width: i64, channels_last: bool) -> Tensor {
        let to_image = |t: &Tensor| {
            let image = t.reshape([batch, height, width, -1]).permute([0, 3, 1, 2]);
            if channels_last { image } else { image.contiguous() }
        };
        match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(h)),
            Projection::Linear(linear) => to_image(&linear.forward(h)),
        }
    }
}

/// [B, C, h, w] -> [B, hw, C], each position a token.
fn to_tokens(x: &Tensor) -> Tensor {
    let size = x.size();
    x.permute([0, 2, 3, 1]).reshape([size[0], size[2] * size[3], size[1]])
}
