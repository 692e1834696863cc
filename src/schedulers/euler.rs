//! Euler, as diffusers' `EulerDiscreteScheduler.from_config(...)` with its
//! defaults: linear interpolation of the sigma table, no Karras sigmas, final
//! sigma 0, and no churn (`s_churn = 0`, so it never draws noise).
use anyhow::Result;
use tch::Tensor;

use super::sigmas::{self, SigmaSchedule};
use super::{ModelCalls, NoiseSchedule, Sampler};
use crate::models::config::{Prediction, SchedulerConfig};

pub struct Euler {
    prediction: Prediction,
    schedule: SigmaSchedule,
    init_noise_sigma: f64,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let noise = NoiseSchedule::from_config(cfg)?;
        let schedule = SigmaSchedule::new(&noise, cfg, steps, false)?;
        let init_noise_sigma = schedule.init_noise_sigma(cfg);
        Ok(Euler { prediction: noise.prediction, schedule, init_noise_sigma })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

impl Sampler for Euler {
    fn calls(&self) -> ModelCalls<'_> {
        ModelCalls::Sigmas { timesteps: &self.schedule.timesteps, sigmas: &self.schedule.sigmas, init_noise_sigma: self.init_noise_sigma }
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _noise: &mut dyn FnMut() -> Tensor) -> Tensor {
        // With s_churn = 0, gamma = 0 and sigma_hat = sigma * (0 + 1) = sigma.
        let sigma = self.schedule.sigmas[index];
        let x0 = sigmas::denoised(self.prediction, model_output, sample, sigma);
        let derivative = (sample - x0) / sigma as f64;
        let dt = self.schedule.sigmas[index + 1] - sigma;
        sample + derivative * dt as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::sigmas::reference;

    #[test]
    fn timesteps_and_sigmas_match_diffusers() {
        for (spacing, steps, table) in reference::tables("euler") {
            let what = format!("euler {spacing} {steps}");
            let s = Euler::new(&reference::config(&spacing), steps).unwrap();
            reference::assert_close(&format!("{what} timesteps"), s.timesteps(), &table.timesteps, 1e-12);
            let sigmas: Vec<f64> = s.sigmas().iter().map(|&x| x as f64).collect();
            reference::assert_close(&format!("{what} sigmas"), &sigmas, &table.sigmas, reference::SIGMA_TOL);
            reference::assert_close(&format!("{what} init"), &[s.init_noise_sigma()], &[table.init_noise_sigma], reference::SIGMA_TOL);
        }
    }
}
