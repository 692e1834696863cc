//! The training noise schedule: betas, cumulative alphas, forward noising,
//! velocity and SNR, computed as diffusers' DDPM/DDIM schedulers do (float32).
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::models::config::{Prediction, SchedulerConfig};

pub struct NoiseSchedule {
    pub num_train_timesteps: i64,
    pub prediction: Prediction,
    /// Cumulative product of (1 - beta), float32 on the CPU, [T].
    pub alphas_cumprod: Tensor,
}

impl NoiseSchedule {
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let betas = betas(cfg)?;
        let alphas: Tensor = 1f64 - &betas;
        let mut alphas_cumprod = alphas.cumprod(0, Kind::Float);
        if cfg.rescale_betas_zero_snr {
            alphas_cumprod = rescale_zero_terminal_snr(&alphas_cumprod);
        }
        Ok(NoiseSchedule {
            num_train_timesteps: cfg.num_train_timesteps,
            prediction: cfg.prediction()?,
            alphas_cumprod,
        })
    }

    /// alpha_bar(t) as f64 for scalar sampler arithmetic.
    pub fn alpha_cumprod(&self, t: i64) -> f64 {
        self.alphas_cumprod.double_value(&[t])
    }

    /// sqrt(alpha_bar(t)) and sqrt(1 - alpha_bar(t)) per sample, shaped to broadcast over `like`.
    fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> (Tensor, Tensor) {
        let ac = self.alphas_cumprod.to_device(like.device()).to_kind(like.kind());
        let a = ac.index_select(0, &timesteps.to_device(like.device()).to_kind(Kind::Int64));
        let mut shape = vec![-1i64];
        shape.extend(std::iter::repeat_n(1, like.dim() - 1));
        let sqrt_a = a.sqrt().reshape(&shape[..]);
        let sqrt_one_minus = (1f64 - &a).sqrt().reshape(&shape[..]);
        (sqrt_a, sqrt_one_minus)
    }

    /// x_t = sqrt(a) x_0 + sqrt(1 - a) eps, one timestep per sample.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sa, s1a) = self.coefficients(timesteps, original);
        sa * original + s1a * noise
    }

    /// v = sqrt(a) eps - sqrt(1 - a) x_0, the v-prediction target.
    pub fn velocity(&self, original: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sa, s1a) = self.coefficients(timesteps, original);
        sa * noise - s1a * original
    }

    /// Signal-to-noise ratio a / (1 - a) per timestep, float32 [B].
    pub fn snr(&self, timesteps: &Tensor) -> Tensor {
        let a = self.alphas_cumprod.index_select(0, &timesteps.to_device(Device::Cpu).to_kind(Kind::Int64));
        &a / (1f64 - &a)
    }
}

fn betas(cfg: &SchedulerConfig) -> Result<Tensor> {
    let n = cfg.num_train_timesteps;
    let opts = (Kind::Float, Device::Cpu);
    if let Some(trained) = &cfg.trained_betas {
        return Ok(Tensor::from_slice(trained).to_kind(Kind::Float));
    }
    Ok(match cfg.beta_schedule.as_str() {
        "linear" => Tensor::linspace(cfg.beta_start, cfg.beta_end, n, opts),
        "scaled_linear" => Tensor::linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n, opts).pow_tensor_scalar(2),
        "squaredcos_cap_v2" => {
            // diffusers' betas_for_alpha_bar with the cosine alpha_bar, in f64.
            let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
            let betas: Vec<f64> = (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                })
                .collect();
            Tensor::from_slice(&betas).to_kind(Kind::Float)
        }
        other => bail!("beta_schedule {other:?} is not one of linear, scaled_linear, squaredcos_cap_v2"),
    })
}

/// diffusers' `rescale_zero_terminal_snr`, expressed on alphas_cumprod.
fn rescale_zero_terminal_snr(alphas_cumprod: &Tensor) -> Tensor {
    let sqrt = alphas_cumprod.sqrt();
    let first = sqrt.double_value(&[0]);
    let last = sqrt.double_value(&[-1]);
    let shifted = (sqrt - last) * (first / (first - last));
    shifted.pow_tensor_scalar(2)
}
