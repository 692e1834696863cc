//! One LoRA module: `delta(x) = up(down(x)) * scale`, attached to a model
//! layer's adapter slot. `scale` is alpha / rank times the user's strength.
use tch::{Kind, Tensor};

use crate::models::layers::{Adapter, ConvConfig, LayerShape};

/// The low-rank pair of one layer. `down` is [r, in] ([r, in, k, k] on a
/// kxk conv, LoCon) and `up` is [out, r] ([out, r, 1, 1]); both are usually fp32
/// masters, cast to the activation's kind for the product (as autocast does),
/// so gradients still land on the fp32 tensors.
pub struct LoraAdapter {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
    pub conv: bool,
    /// The layer's stride and padding, used by the down conv (the up conv is 1x1).
    pub stride: i64,
    pub padding: i64,
}

impl LoraAdapter {
    pub fn new(down: &Tensor, up: &Tensor, scale: f64, shape: LayerShape) -> Self {
        LoraAdapter {
            down: down.shallow_clone(),
            up: up.shallow_clone(),
            scale,
            conv: matches!(shape, LayerShape::Conv2d { .. }),
            stride: 1,
            padding: 0,
        }
    }

    /// On a conv layer whose stride and padding are `conv` (a kxk LoCon
    /// down conv must see the input as the layer does).
    pub fn with_conv(mut self, conv: Option<ConvConfig>) -> Self {
        if let Some(c) = conv {
            self.stride = c.stride;
            self.padding = c.padding;
        }
        self
    }
}

impl Adapter for LoraAdapter {
    fn delta(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let down = cast(&self.down, kind);
        let up = cast(&self.up, kind);
        let hidden = if self.conv {
            let (s, p) = (self.stride, self.padding);
            x.conv2d(&down, None::<&Tensor>, [s, s], [p, p], [1, 1], 1).conv2d(
                &up,
                None::<&Tensor>,
                [1, 1],
                [0, 0],
                [1, 1],
                1,
            )
        } else {
            x.linear(&down, None::<&Tensor>).linear(&up, None::<&Tensor>)
        };
        hidden * self.scale
    }
}

fn cast(t: &Tensor, kind: Kind) -> Tensor {
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}

/// The weight delta `scale * up @ down` in the layer weight's shape (for fusing).
pub fn weight_delta(down: &Tensor, up: &Tensor, scale: f64, weight_size: &[i64]) -> Tensor {
    let r = down.size()[0];
    let down2 = down.reshape([r, -1]).to_kind(Kind::Float);
    let up2 = up.reshape([up.size()[0], r]).to_kind(Kind::Float);
    (up2.matmul(&down2) * scale).reshape(weight_size)
}
