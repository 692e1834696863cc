//! Linear multistep (order 4), as diffusers' `LMSDiscreteScheduler.from_config(...)`.
//! diffusers integrates each Lagrange basis polynomial over a sigma interval
//! with `scipy.integrate.quad`; the integrand is a polynomial of degree <= 3,
//! which 3-point Gauss-Legendre integrates exactly, so we do that instead.
use anyhow::Result;
use tch::Tensor;

use super::sigmas::{self, SigmaSchedule};
use super::{ModelCalls, NoiseSchedule, Sampler};
use crate::models::config::{Prediction, SchedulerConfig};

/// `step(order=4)`, the default the pipeline uses.
const ORDER: usize = 4;

pub struct Lms {
    prediction: Prediction,
    schedule: SigmaSchedule,
    init_noise_sigma: f64,
    /// The last `ORDER` derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let noise = NoiseSchedule::from_config(cfg)?;
        let schedule = SigmaSchedule::new(&noise, cfg, steps, false)?;
        let init_noise_sigma = schedule.init_noise_sigma(cfg);
        Ok(Lms { prediction: noise.prediction, schedule, init_noise_sigma, derivatives: Vec::new() })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

/// `get_lms_coefficient(order, t, current_order)`: the integral from sigma[t] to
/// sigma[t + 1] of the Lagrange basis polynomial of node t - current_order over
/// the nodes sigma[t], ..., sigma[t - order + 1].
pub fn lms_coefficient(sigmas: &[f32], order: usize, t: usize, current_order: usize) -> f64 {
    let s = |i: usize| sigmas[i] as f64;
    let basis = |tau: f64| {
        (0..order)
            .filter(|&k| k != current_order)
            .map(|k| (tau - s(t - k)) / (s(t - current_order) - s(t - k)))
            .product::<f64>()
    };
    gauss_legendre_3(basis, s(t), s(t + 1))
}

/// Integral of `f` over [a, b] by 3-point Gauss-Legendre (exact up to degree 5).
fn gauss_legendre_3(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    let x = (3.0f64 / 5.0).sqrt();
    half * (5.0 / 9.0 * f(mid - half * x) + 8.0 / 9.0 * f(mid) + 5.0 / 9.0 * f(mid + half * x))
}

impl Sampler for Lms {
    fn calls(&self) -> ModelCalls<'_> {
        ModelCalls::Sigmas { timesteps: &self.schedule.timesteps, sigmas: &self.schedule.sigmas, init_noise_sigma: self.init_noise_sigma }
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _noise: &mut dyn FnMut() -> Tensor) -> Tensor {
        let sigma = self.schedule.sigmas[index];
        let x0 = sigmas::denoised(self.prediction, model_output, sample, sigma);
        self.derivatives.push((sample - x0) / sigma as f64);
        if self.derivatives.len() > ORDER {
            drop(self.derivatives.remove(0));
        }
        let order = (index + 1).min(ORDER);
        // sample + sum(coeff * derivative for coeff, derivative in zip(coeffs, reversed(derivatives)))
        let mut sum: Option<Tensor> = None;
        for (current_order, derivative) in self.derivatives.iter().rev().take(order).enumerate() {
            let coeff = lms_coefficient(&self.schedule.sigmas, order, index, current_order);
            let term = derivative * coeff;
            sum = Some(match sum {
                None => term,
                Some(acc) => acc + term,
            });
        }
        sample + sum.expect("at least one derivative")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::sigmas::reference;

    #[test]
    fn timesteps_sigmas_and_coefficients_match_diffusers() {
        let mut coefficients_checked = 0;
        for (spacing, steps, table) in reference::tables("lms") {
            let what = format!("lms {spacing} {steps}");
            let s = Lms::new(&reference::config(&spacing), steps).unwrap();
            reference::assert_close(&format!("{what} timesteps"), s.timesteps(), &table.timesteps, 1e-12);
            let sigmas: Vec<f64> = s.sigmas().iter().map(|&x| x as f64).collect();
            reference::assert_close(&format!("{what} sigmas"), &sigmas, &table.sigmas, reference::SIGMA_TOL);
            reference::assert_close(&format!("{what} init"), &[s.init_noise_sigma()], &[table.init_noise_sigma], reference::SIGMA_TOL);
            for (i, theirs) in table.lms_coefficients.iter().flatten().enumerate() {
                let order = (i + 1).min(ORDER);
                let ours: Vec<f64> = (0..order).map(|k| lms_coefficient(s.sigmas(), order, i, k)).collect();
                // scipy's quad evaluates diffusers' integrand in float32 tensor arithmetic.
                reference::assert_close(&format!("{what} step {i} coefficients"), &ours, theirs, 1e-5);
                coefficients_checked += 1;
            }
        }
        assert!(coefficients_checked > 0, "tables.json has no lms_coefficients (scipy was missing)");
    }

    #[test]
    fn gauss_legendre_is_exact_for_cubics() {
        let f = |x: f64| 4.0 * x * x * x - 3.0 * x * x + 2.0;
        // over [2, -1], as the sigmas fall
        let exact = |x: f64| x.powi(4) - x.powi(3) + 2.0 * x;
        assert!((gauss_legendre_3(f, 2.0, -1.0) - (exact(-1.0) - exact(2.0))).abs() < 1e-12);
    }
}
