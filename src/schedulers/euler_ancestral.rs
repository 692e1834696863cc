//! Euler ancestral, as diffusers' `EulerAncestralDiscreteScheduler.from_config(...)`:
//! an Euler step down to sigma_down, then fresh noise of size sigma_up. It draws
//! one noise tensor every step, the last included, as diffusers' `step` does.
use anyhow::Result;
use tch::Tensor;

use super::sigmas::{self, SigmaSchedule};
use super::{ModelCalls, NoiseSchedule, Sampler};
use crate::models::config::{Prediction, SchedulerConfig};

pub struct EulerAncestral {
    prediction: Prediction,
    schedule: SigmaSchedule,
    init_noise_sigma: f64,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let noise = NoiseSchedule::from_config(cfg)?;
        // EulerAncestralDiscreteScheduler has no Karras option.
        let schedule = SigmaSchedule::new(&noise, cfg, steps, false)?;
        let init_noise_sigma = schedule.init_noise_sigma(cfg);
        Ok(EulerAncestral { prediction: noise.prediction, schedule, init_noise_sigma })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

/// (sigma_up, sigma_down) for a step from `from` to `to`, float32 as diffusers'
/// 0-d tensor arithmetic: sigma_up = sqrt(to^2 (from^2 - to^2) / from^2),
/// sigma_down = sqrt(to^2 - sigma_up^2).
pub fn ancestral_sigmas(from: f32, to: f32) -> (f32, f32) {
    let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
    let down = (to * to - up * up).sqrt();
    (up, down)
}

impl Sampler for EulerAncestral {
    fn calls(&self) -> ModelCalls<'_> {
        ModelCalls::Sigmas { timesteps: &self.schedule.timesteps, sigmas: &self.schedule.sigmas, init_noise_sigma: self.init_noise_sigma }
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, noise: &mut dyn FnMut() -> Tensor) -> Tensor {
        let sigma = self.schedule.sigmas[index];
        let x0 = sigmas::denoised(self.prediction, model_output, sample, sigma);
        let (sigma_up, sigma_down) = ancestral_sigmas(sigma, self.schedule.sigmas[index + 1]);
        let derivative = (sample - x0) / sigma as f64;
        let dt = sigma_down - sigma;
        let prev = sample + derivative * dt as f64;
        // randn_tensor(model_output.shape, generator=generator): one draw per step.
        prev + noise() * sigma_up as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::sigmas::reference;

    #[test]
    fn timesteps_and_sigmas_match_diffusers() {
        for (spacing, steps, table) in reference::tables("euler_a") {
            let what = format!("euler_a {spacing} {steps}");
            let s = EulerAncestral::new(&reference::config(&spacing), steps).unwrap();
            reference::assert_close(&format!("{what} timesteps"), s.timesteps(), &table.timesteps, 1e-12);
            let sigmas: Vec<f64> = s.sigmas().iter().map(|&x| x as f64).collect();
            reference::assert_close(&format!("{what} sigmas"), &sigmas, &table.sigmas, reference::SIGMA_TOL);
            reference::assert_close(&format!("{what} init"), &[s.init_noise_sigma()], &[table.init_noise_sigma], reference::SIGMA_TOL);
        }
    }
}
