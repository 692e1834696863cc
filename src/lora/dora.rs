//! DoRA (weight-decomposed LoRA): the layer's weight becomes
//! `W' = m * V / ||V||` with `V = W + scale * up @ down`, the norm taken
//! per output row (`m` of shape `[out, 1]`: PEFT's `lora_magnitude_vector`,
//! LyCORIS 3.2+'s `dora_scale`) or per input column (`[1, in]`: older
//! LyCORIS and most 2024 files, A1111). The two are told apart by shape.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::layer::weight_delta;
use crate::models::layers::{Adapter, ConvConfig};

/// Which way a magnitude normalises the weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// One magnitude per output row, `[out, 1]` (or PEFT's `[out]`).
    Output,
    /// One magnitude per input column, `[1, in]`.
    Input,
}

/// The axis of a stored magnitude for a layer of weight shape `weight_size`
/// (`[out, in]` or `[out, in, k, k]`); an error names the module and file.
pub fn axis_of(magnitude: &Tensor, weight_size: &[i64], module: &str, source: &str) -> Result<Axis> {
    let (out, inp) = (weight_size[0], weight_size[1]);
    let size = magnitude.size();
    let numel = magnitude.numel() as i64;
    if size.first() == Some(&out) && numel == out {
        return Ok(Axis::Output);
    }
    if size.first() == Some(&1) && size.get(1) == Some(&inp) && numel == inp {
        return Ok(Axis::Input);
    }
    bail!(
        "{source}: DoRA magnitude of {module} has shape {size:?}, but the layer's weight is {weight_size:?}; it must be [{out}, 1] or [1, {inp}] (the file was made for another model)"
    )
}

/// `W' - W` for the DoRA module (fp32, the layer weight's shape).
pub fn weight_delta_of(weight: &Tensor, down: &Tensor, up: &Tensor, scale: f64, magnitude: &Tensor, axis: Axis) -> Tensor {
    let size = weight.size();
    let w = weight.to_kind(Kind::Float);
    let v = &w + weight_delta(down, up, scale, &size).to_device(w.device());
    let (out, inp) = (size[0], size[1]);
    let m = magnitude.to_kind(Kind::Float).to_device(w.device());
    let normed = match axis {
        Axis::Output => {
            let rows = v.reshape([out, -1]);
            let norm = rows.norm_scalaropt_dim(2, [1i64].as_slice(), true);
            (rows * m.reshape([out, 1]) / norm).reshape(&size[..])
        }
        Axis::Input => {
            let cols = v.reshape([out, inp, -1]);
            let norm = cols.square().sum_dim_intlist([0i64, 2].as_slice(), true, Kind::Float).sqrt();
            (cols * m.reshape([1, inp, 1]) / norm).reshape(&size[..])
        }
    };
    normed - w
}

/// A trainable DoRA module on a linear or 1x1-conv layer, as PEFT's
/// `DoraLinearLayer` computes it: `(m / ||V|| - 1) * base(x) + m / ||V|| *
/// scale * up(down(x))`, the norm detached (the DoRA paper's section 4.3,
/// PEFT's too), per output row.
pub struct DoraAdapter {
    pub down: Tensor,
    pub up: Tensor,
    /// `[out, 1]`, fp32.
    pub magnitude: Tensor,
    pub scale: f64,
    /// The frozen base weight (the layer's own tensor).
    pub weight: Tensor,
    pub conv: Option<ConvConfig>,
}

impl Adapter for DoraAdapter {
    fn delta(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let out = self.weight.size()[0];
        let norm = tch::no_grad(|| {
            let v = self.weight.to_kind(Kind::Float) + weight_delta(&self.down, &self.up, self.scale, &self.weight.size());
            v.reshape([out, -1]).norm_scalaropt_dim(2, [1i64].as_slice(), true)
        });
        let mag_scale = (&self.magnitude / norm).reshape([-1]).to_kind(kind);
        let (down, up, w) = (self.down.to_kind(kind), self.up.to_kind(kind), self.weight.to_kind(kind));
        let (base, lora, mag_scale) = match self.conv {
            Some(c) => {
                let (s, p) = (c.stride, c.padding);
                let base = x.conv2d(&w, None::<&Tensor>, [s, s], [p, p], [1, 1], 1);
                let lora = x.conv2d(&down, None::<&Tensor>, [s, s], [p, p], [1, 1], 1).conv2d(&up, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1);
                (base, lora, mag_scale.reshape([1, out, 1, 1]))
            }
            None => (x.linear(&w, None::<&Tensor>), x.linear(&down, None::<&Tensor>).linear(&up, None::<&Tensor>), mag_scale),
        };
        (&mag_scale - 1.0) * base + mag_scale * lora * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both conventions against the formula written out element by element.
    #[test]
    fn both_axes_normalise_v_as_the_formula_says() {
        tch::manual_seed(3);
        let w = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu));
        let down = Tensor::randn([2, 4], (Kind::Float, tch::Device::Cpu));
        let up = Tensor::randn([3, 2], (Kind::Float, tch::Device::Cpu));
        let v = &w + up.matmul(&down) * 0.5;
        let rows = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([3, 1]);
        let cols = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([1, 4]);
        for (m, axis) in [(&rows, Axis::Output), (&cols, Axis::Input)] {
            assert_eq!(axis_of(m, &[3, 4], "x", "f").unwrap(), axis);
            let got = &w + weight_delta_of(&w, &down, &up, 0.5, m, axis);
            for o in 0..3 {
                for i in 0..4 {
                    let norm = match axis {
                        Axis::Output => (0..4).map(|j| v.double_value(&[o, j]).powi(2)).sum::<f64>().sqrt(),
                        Axis::Input => (0..3).map(|j| v.double_value(&[j, i]).powi(2)).sum::<f64>().sqrt(),
                    };
                    let mag = match axis {
                        Axis::Output => m.double_value(&[o, 0]),
                        Axis::Input => m.double_value(&[0, i]),
                    };
                    let want = mag * v.double_value(&[o, i]) / norm;
                    assert!((got.double_value(&[o, i]) - want).abs() < 1e-5, "{axis:?} [{o},{i}]");
                }
            }
        }
        assert!(axis_of(&Tensor::zeros([2, 1], (Kind::Float, tch::Device::Cpu)), &[3, 4], "x", "f").is_err());
    }

    /// The trainable adapter's output equals the layer with `W'` in place.
    #[test]
    fn the_adapter_gives_the_decomposed_weights_output() {
        tch::manual_seed(5);
        let opts = (Kind::Float, tch::Device::Cpu);
        let w = Tensor::randn([3, 4], opts);
        let (down, up) = (Tensor::randn([2, 4], opts), Tensor::randn([3, 2], opts));
        let magnitude = Tensor::rand([3, 1], opts) + 0.5;
        let x = Tensor::randn([5, 4], opts);
        let adapter = DoraAdapter { down: down.shallow_clone(), up: up.shallow_clone(), magnitude: magnitude.shallow_clone(), scale: 0.5, weight: w.shallow_clone(), conv: None };
        let got = x.linear(&w, None::<&Tensor>) + adapter.delta(&x);
        let want = x.linear(&(&w + weight_delta_of(&w, &down, &up, 0.5, &magnitude, Axis::Output)), None::<&Tensor>);
        assert!((got - want).abs().max().double_value(&[]) < 1e-5);
    }
}
