//! DDIM (eta = 0), as diffusers' `DDIMScheduler.from_config(...)`.
use anyhow::{bail, Result};
use tch::Tensor;

use super::{ModelCalls, NoiseSchedule, Sampler};
use crate::models::config::{Prediction, SchedulerConfig};

pub struct Ddim {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    step_ratio: i64,
    /// alpha_bar used past the last step: 1 with `set_alpha_to_one`, else alpha_bar(0).
    final_alpha_cumprod: f64,
    clip_sample: Option<f64>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(cfg)?;
        let (timesteps, step_ratio) = spaced_timesteps(cfg, steps)?;
        let final_alpha_cumprod =
            if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { schedule.alpha_cumprod(0) };
        // DDIMScheduler's own default is clip_sample=True with range 1.
        let clip_sample = cfg.clip_sample.unwrap_or(true).then_some(1.0);
        Ok(Ddim { schedule, timesteps, step_ratio, final_alpha_cumprod, clip_sample })
    }
}

/// Integer timesteps for `steps` steps with the config's `timestep_spacing`,
/// and the stride DDIM steps back by.
pub fn spaced_timesteps(cfg: &SchedulerConfig, steps: usize) -> Result<(Vec<f64>, i64)> {
    let n = cfg.num_train_timesteps;
    let k = steps as i64;
    if k < 1 || k > n {
        bail!("--steps must be between 1 and {n}, got {steps}");
    }
    let step_ratio = n / k;
    let ts: Vec<i64> = match cfg.timestep_spacing.as_str() {
        "leading" => (0..k).rev().map(|i| i * step_ratio + cfg.steps_offset).collect(),
        "trailing" => {
            let ratio = n as f64 / k as f64;
            (0..k).map(|i| (n as f64 - i as f64 * ratio).round() as i64 - 1).collect()
        }
        "linspace" => (0..k)
            .rev()
            .map(|i| {
                if k == 1 { 0 } else { (i as f64 * (n - 1) as f64 / (k - 1) as f64).round() as i64 }
            })
            .collect(),
        other => bail!("timestep_spacing {other:?} is not one of leading, trailing, linspace"),
    };
    Ok((ts.into_iter().map(|t| t as f64).collect(), step_ratio))
}

impl Sampler for Ddim {
    fn calls(&self) -> ModelCalls<'_> {
        ModelCalls::Unscaled { timesteps: &self.timesteps }
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _noise: &mut dyn FnMut() -> Tensor) -> Tensor {
        let t = self.timesteps[index] as i64;
        let prev_t = t - self.step_ratio;
        let alpha_t = self.schedule.alpha_cumprod(t);
        let alpha_prev = if prev_t >= 0 { self.schedule.alpha_cumprod(prev_t) } else { self.final_alpha_cumprod };
        let beta_t = 1.0 - alpha_t;
        let (mut x0, eps) = match self.schedule.prediction {
            Prediction::Epsilon => {
                ((sample - beta_t.sqrt() * model_output) / alpha_t.sqrt(), model_output.shallow_clone())
            }
            Prediction::V => (
                alpha_t.sqrt() * sample - beta_t.sqrt() * model_output,
                alpha_t.sqrt() * model_output + beta_t.sqrt() * sample,
            ),
            Prediction::Sample => {
                let x0 = model_output.shallow_clone();
                let eps = (sample - alpha_t.sqrt() * &x0) / beta_t.sqrt();
                (x0, eps)
            }
        };
        if let Some(range) = self.clip_sample {
            x0 = x0.clamp(-range, range);
        }
        alpha_prev.sqrt() * x0 + (1.0 - alpha_prev).sqrt() * eps
    }
}
