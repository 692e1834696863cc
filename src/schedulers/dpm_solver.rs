//! DPM-Solver++(2M), as diffusers' `DPMSolverMultistepScheduler.from_config(...)`
//! with its defaults: algorithm "dpmsolver++", solver_order 2, "midpoint",
//! lower_order_final, final sigma 0 (so the last step is first order), and
//! optionally Karras sigmas (`dpmpp_2m_karras`). Deterministic: no noise.
use anyhow::{bail, Result};
use tch::Tensor;

use super::sigmas::{self, check_steps};
use super::{ModelCalls, NoiseSchedule, Sampler};
use crate::models::config::{Prediction, SchedulerConfig};

pub struct DpmSolverMultistep {
    prediction: Prediction,
    timesteps: Vec<f64>,
    /// One per step plus the final 0, float32.
    sigmas: Vec<f32>,
    /// The last two data predictions (x0), oldest first.
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

impl DpmSolverMultistep {
    pub fn new(cfg: &SchedulerConfig, steps: usize, use_karras: bool) -> Result<Self> {
        let noise = NoiseSchedule::from_config(cfg)?;
        let train = sigmas::train_sigmas(&noise);
        let int_timesteps = dpm_timesteps(cfg, steps)?;
        let (timesteps, sigmas): (Vec<f64>, Vec<f64>) = if use_karras {
            // sigmas = np.flip(sigmas): the ends are the float32 table's sigma(0) and sigma(T-1).
            let karras = sigmas::karras(train[0] as f64, train[train.len() - 1] as f64, steps);
            let logs = sigmas::log_sigmas(&train);
            // timesteps = _sigma_to_t(...).round() (beta_schedule is not squaredcos_cap_v2),
            // then stored as int64. np.round rounds half to even.
            let round = cfg.beta_schedule != "squaredcos_cap_v2";
            let ts = karras
                .iter()
                .map(|&s| {
                    let t = sigmas::sigma_to_t(s, &logs);
                    (if round { t.round_ties_even() } else { t }) as i64 as f64
                })
                .collect();
            (ts, karras)
        } else {
            let ts: Vec<f64> = int_timesteps.iter().map(|&t| t as f64).collect();
            let s = ts.iter().map(|&t| sigmas::np_interp(t, &train)).collect();
            (ts, s)
        };
        // final_sigmas_type "zero"; np.concatenate([...]).astype(np.float32)
        let sigmas = sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect();
        Ok(DpmSolverMultistep {
            prediction: noise.prediction,
            timesteps,
            sigmas,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
        })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// x0 from the model output at step `index` (`convert_model_output` for dpmsolver++).
    fn data_prediction(&self, model_output: &Tensor, sample: &Tensor, index: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index]);
        match self.prediction {
            Prediction::Epsilon => (sample - model_output * sigma_t as f64) / alpha_t as f64,
            Prediction::V => sample * alpha_t as f64 - model_output * sigma_t as f64,
            Prediction::Sample => model_output.shallow_clone(),
        }
    }

    /// `dpm_solver_first_order_update` (dpmsolver++).
    fn first_order(&self, x0: &Tensor, sample: &Tensor, index: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[index]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        sample * (sigma_t / sigma_s) as f64 - x0 * (alpha_t * ((-h).exp() - 1.0)) as f64
    }

    /// `multistep_dpm_solver_second_order_update` (dpmsolver++, midpoint).
    fn second_order(&self, sample: &Tensor, index: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let (m0, m1) = (&self.model_outputs[1], &self.model_outputs[0]);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = (m0 - m1) * (1.0 / r0) as f64;
        let c = alpha_t * ((-h).exp() - 1.0);
        sample * (sigma_t / sigma_s0) as f64 - m0 * c as f64 - d1 * (0.5 * c) as f64
    }
}

/// `_sigma_to_alpha_sigma_t`: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha, float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// lambda = log(alpha) - log(sigma); +inf at sigma 0, as torch gives.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// Integer timesteps of `DPMSolverMultistepScheduler.set_timesteps` (lambda_min_clipped
/// is -inf by default, so the last usable timestep is num_train_timesteps).
pub fn dpm_timesteps(cfg: &SchedulerConfig, steps: usize) -> Result<Vec<i64>> {
    let n = cfg.num_train_timesteps;
    check_steps(n, steps)?;
    let k = steps as i64;
    Ok(match cfg.timestep_spacing.as_str() {
        // np.linspace(0, n - 1, k + 1).round()[::-1][:-1]
        "linspace" => sigmas::np_linspace(0.0, (n - 1) as f64, steps + 1)
            .into_iter()
            .rev()
            .take(steps)
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        // step_ratio = n // (k + 1); (np.arange(0, k + 1) * step_ratio)[::-1][:-1] + steps_offset
        "leading" => {
            let ratio = n / (k + 1);
            (1..=k).rev().map(|i| i * ratio + cfg.steps_offset).collect()
        }
        // np.arange(n, 0, -n / k).round() - 1
        "trailing" => {
            let ratio = n as f64 / k as f64;
            let len = (n as f64 / ratio).ceil() as i64;
            (0..len).map(|i| (n as f64 + i as f64 * -ratio).round_ties_even() as i64 - 1).collect()
        }
        other => bail!("timestep_spacing {other:?} is not one of leading, trailing, linspace"),
    })
}

impl Sampler for DpmSolverMultistep {
    fn calls(&self) -> ModelCalls<'_> {
        ModelCalls::Unscaled { timesteps: &self.timesteps }
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _noise: &mut dyn FnMut() -> Tensor) -> Tensor {
        let n = self.timesteps.len();
        // final_sigmas_type "zero" makes the last step first order; with fewer than 15
        // steps lower_order_final would too (and keeps the second-last at order 2).
        let lower_order_final = index == n - 1;
        let x0 = self.data_prediction(model_output, sample, index);
        if self.model_outputs.len() == 2 {
            drop(self.model_outputs.remove(0));
        }
        self.model_outputs.push(x0);
        let prev = if self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&self.model_outputs[self.model_outputs.len() - 1], sample, index)
        } else {
            self.second_order(sample, index)
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        prev
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::sigmas::reference;

    #[test]
    fn timesteps_and_sigmas_match_diffusers() {
        for (name, karras) in [("dpmpp_2m", false), ("dpmpp_2m_karras", true)] {
            for (spacing, steps, table) in reference::tables(name) {
                let what = format!("{name} {spacing} {steps}");
                let s = DpmSolverMultistep::new(&reference::config(&spacing), steps, karras).unwrap();
                reference::assert_close(&format!("{what} timesteps"), s.timesteps(), &table.timesteps, 1e-12);
                let sigmas: Vec<f64> = s.sigmas().iter().map(|&x| x as f64).collect();
                reference::assert_close(&format!("{what} sigmas"), &sigmas, &table.sigmas, reference::SIGMA_TOL);
                assert_eq!(s.init_noise_sigma(), table.init_noise_sigma);
            }
        }
    }
}
