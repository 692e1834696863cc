//! Heun (2nd order), as diffusers' `HeunDiscreteScheduler.from_config(...)`.
//! Like diffusers' `scheduler.timesteps`, `timesteps()` lists every model call:
//! the first timestep once, each later one twice (an Euler predictor, then the
//! trapezoid corrector at the same point), so 10 steps are 19 UNet calls.
use anyhow::Result;
use tch::Tensor;

use super::sigmas::{self, SigmaSchedule};
use super::{ModelCalls, NoiseSchedule, Sampler};
use crate::models::config::{Prediction, SchedulerConfig};

pub struct Heun {
    prediction: Prediction,
    /// The repeated timesteps, one per model call.
    timesteps: Vec<f64>,
    /// Sigmas per model call plus the final 0: s0, s1, s1, s2, s2, ..., 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    clip_sample: bool,
    /// Between the predictor and the corrector: (derivative, dt, sample).
    pending: Option<(Tensor, f32, Tensor)>,
}

impl Heun {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let noise = NoiseSchedule::from_config(cfg)?;
        let schedule = SigmaSchedule::new(&noise, cfg, steps, false)?;
        let init_noise_sigma = schedule.init_noise_sigma(cfg);
        // torch.cat([t[:1], t[1:].repeat_interleave(2)]); sigmas likewise, keeping the final 0 once.
        let timesteps = repeat_tail(&schedule.timesteps);
        let (last, body) = schedule.sigmas.split_last().expect("at least one step");
        let mut sigmas = repeat_tail(body);
        sigmas.push(*last);
        Ok(Heun {
            prediction: noise.prediction,
            timesteps,
            sigmas,
            init_noise_sigma,
            // HeunDiscreteScheduler's clip_sample defaults to False (range 1).
            clip_sample: cfg.clip_sample.unwrap_or(false),
            pending: None,
        })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// [a, b, c] -> [a, b, b, c, c].
fn repeat_tail<T: Copy>(v: &[T]) -> Vec<T> {
    v.iter().take(1).copied().chain(v.iter().skip(1).flat_map(|&x| [x, x])).collect()
}

impl Sampler for Heun {
    fn calls(&self) -> ModelCalls<'_> {
        ModelCalls::Sigmas { timesteps: &self.timesteps, sigmas: &self.sigmas, init_noise_sigma: self.init_noise_sigma }
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _noise: &mut dyn FnMut() -> Tensor) -> Tensor {
        match self.pending.take() {
            None => {
                // First order: sigma_hat = sigma (gamma = 0), Euler to the next sigma.
                let (sigma, sigma_next) = (self.sigmas[index], self.sigmas[index + 1]);
                let x0 = self.denoised(model_output, sample, sigma);
                let derivative = (sample - x0) / sigma as f64;
                let dt = sigma_next - sigma;
                let prev = sample + &derivative * dt as f64;
                self.pending = Some((derivative, dt, sample.shallow_clone()));
                prev
            }
            Some((first_derivative, dt, first_sample)) => {
                // Second order: the model was evaluated at sigma_next = sigmas[index].
                let sigma_next = self.sigmas[index];
                let x0 = self.denoised(model_output, sample, sigma_next);
                let derivative = (sample - x0) / sigma_next as f64;
                let derivative = (first_derivative + derivative) / 2.0;
                first_sample + derivative * dt as f64
            }
        }
    }
}

impl Heun {
    fn denoised(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Tensor {
        let x0 = sigmas::denoised(self.prediction, model_output, sample, sigma);
        if self.clip_sample {
            x0.clamp(-1.0, 1.0)
        } else {
            x0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::sigmas::reference;

    #[test]
    fn repeated_timesteps_and_sigmas_match_diffusers() {
        for (spacing, steps, table) in reference::tables("heun") {
            let what = format!("heun {spacing} {steps}");
            let s = Heun::new(&reference::config(&spacing), steps).unwrap();
            reference::assert_close(&format!("{what} timesteps"), s.timesteps(), &table.timesteps, 1e-12);
            let sigmas: Vec<f64> = s.sigmas().iter().map(|&x| x as f64).collect();
            reference::assert_close(&format!("{what} sigmas"), &sigmas, &table.sigmas, reference::SIGMA_TOL);
            reference::assert_close(&format!("{what} init"), &[s.init_noise_sigma()], &[table.init_noise_sigma], reference::SIGMA_TOL);
        }
    }
}
