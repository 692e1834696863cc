//! Noise schedules and samplers, matching diffusers' schedulers built
//! `from_config` of a model's `scheduler_config.json`. They know nothing of
//! models: a sampler turns model outputs into the next sample.
pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod lms;
pub mod noise;
pub mod pndm;
pub mod sigmas;

use anyhow::{bail, Result};
use tch::Tensor;

use crate::models::config::SchedulerConfig;
pub use noise::NoiseSchedule;

/// The samplers `--scheduler` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
    Heun,
    Lms,
    Pndm,
}

impl SchedulerKind {
    pub const ALL: &'static [SchedulerKind] = &[
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::Heun,
        SchedulerKind::Lms,
        SchedulerKind::Pndm,
    ];
    pub const NAMES: &'static [&'static str] =
        &["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "heun", "lms", "pndm"];

    pub fn parse(name: &str) -> Result<Self> {
        match Self::ALL.iter().find(|k| k.name() == name) {
            Some(&kind) => Ok(kind),
            None => bail!("--scheduler {name:?} is not one of: {}", Self::NAMES.join(", ")),
        }
    }

    /// The `--scheduler` name; each is the diffusers scheduler of the same
    /// algorithm built `from_config` of the model's scheduler config.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",                     // DDIMScheduler
            SchedulerKind::Euler => "euler",                   // EulerDiscreteScheduler
            SchedulerKind::EulerAncestral => "euler_a",        // EulerAncestralDiscreteScheduler
            SchedulerKind::DpmPp2m => "dpmpp_2m",              // DPMSolverMultistepScheduler
            SchedulerKind::DpmPp2mKarras => "dpmpp_2m_karras", // ... with use_karras_sigmas=True
            SchedulerKind::Heun => "heun",                     // HeunDiscreteScheduler
            SchedulerKind::Lms => "lms",                       // LMSDiscreteScheduler
            SchedulerKind::Pndm => "pndm",                     // PNDMScheduler
        }
    }

    /// The sampler for `steps` steps, configured from the model's scheduler config.
    pub fn build(self, cfg: &SchedulerConfig, steps: usize) -> Result<Box<dyn Sampler>> {
        Ok(match self {
            SchedulerKind::Ddim => Box::new(ddim::Ddim::new(cfg, steps)?),
            SchedulerKind::Euler => Box::new(euler::Euler::new(cfg, steps)?),
            SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::new(cfg, steps)?),
            SchedulerKind::DpmPp2m => Box::new(dpm_solver::DpmSolverMultistep::new(cfg, steps, false)?),
            SchedulerKind::DpmPp2mKarras => Box::new(dpm_solver::DpmSolverMultistep::new(cfg, steps, true)?),
            SchedulerKind::Heun => Box::new(heun::Heun::new(cfg, steps)?),
            SchedulerKind::Lms => Box::new(lms::Lms::new(cfg, steps)?),
            SchedulerKind::Pndm => Box::new(pndm::Pndm::new(cfg, steps, cfg.skip_prk_steps)?),
        })
    }
}

/// What the sampling loop asks of a sampler besides its step: the model
/// timesteps and, for the k-diffusion samplers, each model call's sigma,
/// which scales the initial noise and the model input.
pub enum ModelCalls<'a> {
    /// DDIM, DPM-Solver++, PNDM: latents as drawn, inputs as they are.
    Unscaled { timesteps: &'a [f64] },
    /// Euler, Euler ancestral, Heun, LMS: `sigmas[i]` belongs to call `i`.
    Sigmas { timesteps: &'a [f64], sigmas: &'a [f32], init_noise_sigma: f64 },
}

/// A sampling loop's scheduler.
pub trait Sampler {
    /// The model calls of the loop (see [`ModelCalls`]).
    fn calls(&self) -> ModelCalls<'_>;

    /// The sample after step `index`, given the model's (guided) output.
    /// `noise` yields the fresh noise an ancestral sampler needs at this step.
    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, noise: &mut dyn FnMut() -> Tensor) -> Tensor;

    /// The model timesteps, one per model call, first to last (Heun and PNDM
    /// call the model more than once per step; diffusers' `scheduler.timesteps`
    /// lists those calls the same way).
    fn timesteps(&self) -> &[f64] {
        match self.calls() {
            ModelCalls::Unscaled { timesteps } | ModelCalls::Sigmas { timesteps, .. } => timesteps,
        }
    }

    /// Factor on the initial N(0, 1) latents.
    fn init_noise_sigma(&self) -> f64 {
        match self.calls() {
            ModelCalls::Unscaled { .. } => 1.0,
            ModelCalls::Sigmas { init_noise_sigma, .. } => init_noise_sigma,
        }
    }

    /// The model input for `sample` at call `index`.
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Tensor {
        match self.calls() {
            ModelCalls::Unscaled { .. } => sample.shallow_clone(),
            ModelCalls::Sigmas { sigmas, .. } => sigmas::scale_input(sample, sigmas[index]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_its_kind() {
        assert_eq!(SchedulerKind::ALL.len(), SchedulerKind::NAMES.len());
        for (kind, name) in SchedulerKind::ALL.iter().zip(SchedulerKind::NAMES) {
            assert_eq!(kind.name(), *name);
            assert_eq!(SchedulerKind::parse(name).unwrap(), *kind);
        }
        let err = SchedulerKind::parse("plms").unwrap_err().to_string();
        assert!(err.contains("euler_a"), "{err}");
    }
}
