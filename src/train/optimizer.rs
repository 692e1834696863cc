//! AdamW over all LoRA tensors at once, with state that can be saved.
//!
//! The parameters are packed into one flat fp32 buffer (each parameter
//! becomes a view of its stretch of it), and gradients are gathered into one
//! flat vector, so the whole update is a handful of whole-vector ops whatever
//! the number of LoRA modules (on CUDA: a handful of kernel launches, not
//! several per tensor), and the state (first/second moments, step) is three
//! tensors to checkpoint.
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
    /// All params back to back, when they could be packed (all fp32 on one
    /// device): each param is a view of its stretch, so updating this
    /// updates them all.
    packed: Option<Tensor>,
    /// First and second moments, flat fp32 over all params in order.
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Optimizer steps taken (skipped steps not counted).
    pub step: i64,
    /// Each element's learning rate as a multiple of the step's (param
    /// groups with their own lr, e.g. the text encoder's); `None`: all 1.
    lr_factors: Option<Tensor>,
}

impl AdamW {
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> Self {
        let numel: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let device = params.first().map(|p| p.device()).unwrap_or(tch::Device::Cpu);
        let zeros = || Tensor::zeros([numel], (Kind::Float, device));
        let packed = pack(&params, numel, device);
        AdamW { config, exp_avg: zeros(), exp_avg_sq: zeros(), step: 0, params, packed, lr_factors: None }
    }

    /// Gives each parameter (in order) its own learning rate as a multiple
    /// of the step's; weight decay follows each one's rate, as in torch's
    /// param groups.
    pub fn with_lr_factors(mut self, factors: &[f64]) -> Result<Self> {
        if factors.len() != self.params.len() {
            bail!("internal: {} learning-rate factors for {} parameters", factors.len(), self.params.len());
        }
        let device = self.exp_avg.device();
        let parts: Vec<Tensor> =
            self.params.iter().zip(factors).map(|(p, &f)| Tensor::full([p.numel() as i64], f, (Kind::Float, device))).collect();
        self.lr_factors = (!parts.is_empty()).then(|| Tensor::cat(&parts, 0));
        Ok(self)
    }

    /// The parameters, in order.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// All gradients as one flat fp32 vector (zeros where a param has none).
    pub fn flat_grad(&self) -> Tensor {
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
        self.flatten(&grads)
    }

    /// `grads` (one per param, in order; undefined where a param got none)
    /// as one flat fp32 vector, as [`Self::flat_grad`] gives it.
    pub fn flatten(&self, grads: &[Tensor]) -> Tensor {
        let parts: Vec<Tensor> = self
            .params
            .iter()
            .zip(grads)
            .map(|(p, g)| {
                if g.defined() {
                    g.to_kind(Kind::Float).reshape([-1])
                } else {
                    Tensor::zeros([p.numel() as i64], (Kind::Float, p.device()))
                }
            })
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// A flat fp32 gradient of zeros, as [`Self::flatten`] lays it out.
    pub fn flat_zeros(&self) -> Tensor {
        self.exp_avg.zeros_like()
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
        self.step_if(grad, lr, None);
    }

    /// Like [`Self::step`], but when `apply` (a 0-dim bool tensor on the
    /// params' device) is false nothing changes: moments and params keep
    /// their values. Decided on the device, so the caller need not wait for
    /// the gradient to know; `self.step` is counted either way, and
    /// [`Self::unstep`] takes the count back once the caller knows the step
    /// did not apply.
    pub fn step_if(&mut self, grad: &Tensor, lr: f64, apply: Option<&Tensor>) {
        let c = self.config;
        self.step += 1;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            let exp_avg = &self.exp_avg * c.beta1 + grad * (1.0 - c.beta1);
            let exp_avg_sq = &self.exp_avg_sq * c.beta2 + grad * grad * (1.0 - c.beta2);
            let denom = (&exp_avg_sq / bias2).sqrt() + c.eps;
            let mut update = (&exp_avg / bias1) / denom * lr;
            // Decoupled weight decay, then the Adam update.
            let mut decay = Tensor::from((1.0 - lr * c.weight_decay) as f32).to_device(update.device());
            if let Some(factors) = &self.lr_factors {
                update *= factors;
                decay = (factors * (-lr * c.weight_decay)) + 1.0;
            }
            match apply {
                Some(apply) => {
                    self.exp_avg.copy_(&exp_avg.where_self(apply, &self.exp_avg));
                    self.exp_avg_sq.copy_(&exp_avg_sq.where_self(apply, &self.exp_avg_sq));
                    update = update.where_self(apply, &update.zeros_like());
                    decay = decay.where_self(apply, &decay.ones_like());
                }
                None => {
                    self.exp_avg.copy_(&exp_avg);
                    self.exp_avg_sq.copy_(&exp_avg_sq);
                }
            }
            match &mut self.packed {
                Some(flat) => {
                    let _ = flat.g_mul_(&decay).g_sub_(&update);
                }
                None => {
                    let mut offset = 0i64;
                    for p in &mut self.params {
                        let n = p.numel() as i64;
                        let u = update.narrow(0, offset, n).view_(p.size()).to_kind(p.kind());
                        let d = if decay.dim() == 0 { decay.shallow_clone() } else { decay.narrow(0, offset, n).view_(p.size()) };
                        let _ = p.g_mul_(&d.to_kind(p.kind())).g_sub_(&u);
                        offset += n;
                    }
                }
            }
        });
    }

    /// Takes back the count of a [`Self::step_if`] whose `apply` was false.
    pub fn unstep(&mut self) {
        self.step -= 1;
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
    clip_grad_norm_on_device(grad, max_norm).double_value(&[])
}

/// [`clip_grad_norm`] without waiting for the device: scales `grad` by
/// min(1, max_norm / (norm + 1e-6)) as torch's `clip_grad_norm_` does and
/// returns the norm before clipping as a 0-dim tensor (NaN stays NaN).
pub fn clip_grad_norm_on_device(grad: &mut Tensor, max_norm: f64) -> Tensor {
    let norm = grad.norm();
    if max_norm > 0.0 {
        let coef = (max_norm / (&norm + 1e-6)).clamp_max(1.0);
        let _ = grad.g_mul_(&coef);
    }
    norm
}

/// Packs `params` (all fp32 on `device`, contiguous) into one flat buffer
/// and makes each a view of its stretch of it; `None` (nothing changed)
/// when they are not all alike.
fn pack(params: &[Tensor], numel: i64, device: tch::Device) -> Option<Tensor> {
    let alike = params.iter().all(|p| p.kind() == Kind::Float && p.device() == device && p.is_contiguous());
    if params.is_empty() || !alike {
        return None;
    }
    let flat = Tensor::zeros([numel], (Kind::Float, device));
    tch::no_grad(|| {
        let mut offset = 0i64;
        for p in params {
            let n = p.numel() as i64;
            let view = flat.narrow(0, offset, n).view_(p.size());
            view.shallow_clone().copy_(p);
            // Every handle of `p` (model adapters, the LoRA's store) now reads the buffer.
            let mut handle = p.shallow_clone();
            handle.set_data(&view);
            offset += n;
        }
    });
    Some(flat)
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

    /// Packed params: updating the flat buffer updates every handle of every
    /// param, and their gradients still arrive.
    #[test]
    fn packed_params_stay_views_of_the_buffer() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]).view([1, 2]).set_requires_grad(true);
        let b = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let held = a.shallow_clone();
        let mut opt = AdamW::new(vec![a.shallow_clone(), b.shallow_clone()], AdamWConfig { weight_decay: 0.0, ..Default::default() });
        assert!(opt.packed.is_some());
        let loss = (&held * 2.0).sum(Kind::Float) + (&b * 3.0).sum(Kind::Float);
        let grads = Tensor::run_backward(&[&loss], opt.params(), false, false);
        let flat = opt.flatten(&grads);
        assert_eq!(Vec::<f32>::try_from(&flat).unwrap(), vec![2.0, 2.0, 3.0]);
        opt.step(&flat, 0.5);
        // Adam's first step moves each weight by lr against its gradient's sign.
        assert!((held.double_value(&[0, 0]) - 0.5).abs() < 1e-5);
        assert!((b.double_value(&[0]) - 2.5).abs() < 1e-5);
        // A step that does not apply leaves everything as it was.
        let before = Vec::<f32>::try_from(&opt.exp_avg).unwrap();
        opt.step_if(&(flat.ones_like() * f64::NAN), 0.5, Some(&Tensor::from(false)));
        opt.unstep();
        assert_eq!(opt.step, 1);
        assert!((b.double_value(&[0]) - 2.5).abs() < 1e-5);
        assert_eq!(Vec::<f32>::try_from(&opt.exp_avg).unwrap(), before);
    }

    /// A parameter with factor f moves as it would alone at lr * f.
    #[test]
    fn lr_factors_give_each_parameter_its_own_rate() {
        let moved = |factors: Option<&[f64]>, lr: f64| {
            let a = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
            let b = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
            let mut opt = AdamW::new(vec![a.shallow_clone(), b.shallow_clone()], AdamWConfig::default());
            if let Some(f) = factors {
                opt = opt.with_lr_factors(f).unwrap();
            }
            for step in 1..=3 {
                opt.step(&Tensor::from_slice(&[0.3f32 * step as f32, -0.1, 0.2]), lr);
            }
            (Vec::<f32>::try_from(&a.detach()).unwrap(), Vec::<f32>::try_from(&b.detach()).unwrap())
        };
        let (a, b) = moved(Some(&[1.0, 0.25]), 0.1);
        let (a_full, _) = moved(None, 0.1);
        let (_, b_quarter) = moved(None, 0.025);
        for (x, y) in a.iter().zip(&a_full).chain(b.iter().zip(&b_quarter)) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
        assert!((b[0] - 0.5).abs() > 1e-3, "the slow parameter did not move");
    }

    #[test]
    fn clipping_caps_the_norm() {
        let mut g = Tensor::from_slice(&[3.0f32, 4.0]);
        let norm = clip_grad_norm(&mut g, 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((g.norm().double_value(&[]) - 1.0).abs() < 1e-5);
    }
}
