//! AdamW over all LoRA tensors at once, with state that can be saved.
//!
//! Gradients are gathered into one flat fp32 vector, so the whole update is
//! a handful of vector ops whatever the number of LoRA modules, and the
//! state (first/second moments, step) is three tensors to checkpoint.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<Tensor>,
    /// First and second moments, flat fp32 over all params in order.
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Optimizer steps taken (skipped steps not counted).
    pub step: i64,
}

impl AdamW {
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> Self {
        let numel: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let device = params.first().map(|p| p.device()).unwrap_or(tch::Device::Cpu);
        let zeros = || Tensor::zeros([numel], (Kind::Float, device));
        AdamW { config, exp_avg: zeros(), exp_avg_sq: zeros(), step: 0, params }
    }

    /// All gradients as one flat fp32 vector (zeros where a param has none).
    pub fn flat_grad(&self) -> Tensor {
        let parts: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| {
                let g = p.grad();
                if g.defined() {
                    g.to_kind(Kind::Float).reshape([-1])
                } else {
                    Tensor::zeros([p.numel() as i64], (Kind::Float, p.device()))
                }
            })
            .collect();
        Tensor::cat(&parts, 0)
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// One AdamW step with learning rate `lr` on the (already unscaled and
    /// clipped) flat gradient `grad`.
    pub fn step(&mut self, grad: &Tensor, lr: f64) {
        let c = self.config;
        self.step += 1;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            let _ = self.exp_avg.g_mul_scalar_(c.beta1).g_add_(&(grad * (1.0 - c.beta1)));
            let _ = self.exp_avg_sq.g_mul_scalar_(c.beta2).g_add_(&(grad * grad * (1.0 - c.beta2)));
            let denom = (&self.exp_avg_sq / bias2).sqrt() + c.eps;
            let update = (&self.exp_avg / bias1) / denom * lr;
            let mut offset = 0i64;
            for p in &mut self.params {
                let n = p.numel() as i64;
                let u = update.narrow(0, offset, n).view_(p.size()).to_kind(p.kind());
                // Decoupled weight decay, then the Adam update.
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                let _ = p.g_sub_(&u);
                offset += n;
            }
        });
    }

    /// Restores moments and step from a checkpoint.
    pub fn load_state(&mut self, exp_avg: Tensor, exp_avg_sq: Tensor, step: i64) -> Result<()> {
        if exp_avg.size() != self.exp_avg.size() || exp_avg_sq.size() != self.exp_avg_sq.size() {
            bail!(
                "the saved optimizer state holds {:?} values but this LoRA has {:?}; resume with the same --rank and --targets",
                exp_avg.size(),
                self.exp_avg.size()
            );
        }
        let device = self.exp_avg.device();
        self.exp_avg = exp_avg.to_kind(Kind::Float).to_device(device);
        self.exp_avg_sq = exp_avg_sq.to_kind(Kind::Float).to_device(device);
        self.step = step;
        Ok(())
    }
}

/// Scales `grad` in place so its L2 norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip_grad_norm(grad: &mut Tensor, max_norm: f64) -> f64 {
    let norm = grad.norm().double_value(&[]);
    if max_norm > 0.0 && norm > max_norm {
        let _ = grad.g_mul_scalar_(max_norm / (norm + 1e-6));
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps of our AdamW against torch.optim.AdamW's update rule
    /// written out by hand on scalars.
    #[test]
    fn matches_the_adamw_update_rule() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![p.shallow_clone()], AdamWConfig::default());
        let (b1, b2, eps, wd, lr) = (0.9f64, 0.999f64, 1e-8f64, 1e-2f64, 0.1f64);
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for step in 1..=2 {
            let grads = [0.5 * step as f64, -0.25];
            opt.step(&Tensor::from_slice(&grads).to_kind(Kind::Float), lr);
            for i in 0..2 {
                want[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * grads[i];
                v[i] = b2 * v[i] + (1.0 - b2) * grads[i] * grads[i];
                let mh = m[i] / (1.0 - b1.powi(step));
                let vh = v[i] / (1.0 - b2.powi(step));
                want[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        for i in 0..2 {
            let got = p.double_value(&[i as i64]);
            assert!((got - want[i]).abs() < 1e-6, "param {i}: {got} vs {}", want[i]);
        }
        assert_eq!(opt.step, 2);
    }

    #[test]
    fn clipping_caps_the_norm() {
        let mut g = Tensor::from_slice(&[3.0f32, 4.0]);
        let norm = clip_grad_norm(&mut g, 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((g.norm().double_value(&[]) - 1.0).abs() < 1e-5);
    }
}
