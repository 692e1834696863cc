//! PNDM, as diffusers' `PNDMScheduler.from_config(...)`: pseudo Runge-Kutta
//! warm-up steps (unless `skip_prk_steps`), then pseudo linear multistep.
//! `timesteps()` lists every model call, as diffusers' `scheduler.timesteps`:
//! with PRK, 10 steps are 12 warm-up calls plus 7 PLMS calls.
use anyhow::{bail, Result};
use tch::Tensor;

use super::sigmas::{self, check_steps};
use super::{ModelCalls, NoiseSchedule, Sampler};
use crate::models::config::{Prediction, SchedulerConfig};

pub struct Pndm {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    /// How many of `timesteps` are PRK warm-up calls.
    prk_len: usize,
    /// num_train_timesteps // steps.
    step_ratio: i64,
    final_alpha_cumprod: f32,
    /// Past model outputs (epsilon) the multistep formulas combine.
    ets: Vec<Tensor>,
    counter: usize,
    /// PRK: the weighted sum of this step's model outputs so far.
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    /// `skip_prk_steps` is PNDMScheduler's option (default false); SD1.x's
    /// own PNDM config sets it, DDIM configs (SD2.x, our fixtures) lack it.
    pub fn new(cfg: &SchedulerConfig, steps: usize, skip_prk_steps: bool) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(cfg)?;
        if schedule.prediction == Prediction::Sample {
            bail!("the pndm scheduler supports epsilon and v_prediction models only");
        }
        if !skip_prk_steps && steps < 4 {
            bail!("--scheduler pndm needs at least 4 --steps (its Runge-Kutta warm-up takes 3)");
        }
        let base = ascending_timesteps(cfg, steps)?;
        let n = cfg.num_train_timesteps;
        let step_ratio = n / steps as i64;
        let (prk, plms) = if skip_prk_steps {
            // concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]: the second-last repeated.
            let mut plms = base.clone();
            if base.len() >= 2 {
                plms.insert(base.len() - 1, base[base.len() - 2]);
            }
            plms.reverse();
            (Vec::new(), plms)
        } else {
            (prk_timesteps(&base, step_ratio / 2), base[..base.len() - 3].iter().rev().copied().collect())
        };
        let prk_len = prk.len();
        let timesteps = prk.into_iter().chain(plms).map(|t| t as f64).collect();
        // set_alpha_to_one: PNDMScheduler's default is False.
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) { 1.0 } else { schedule.alpha_cumprod(0) as f32 };
        Ok(Pndm {
            schedule,
            timesteps,
            prk_len,
            step_ratio,
            final_alpha_cumprod,
            ets: Vec::new(),
            counter: 0,
            cur_model_output: None,
            cur_sample: None,
        })
    }
}

/// `_timesteps` of `set_timesteps`, ascending, int64.
fn ascending_timesteps(cfg: &SchedulerConfig, steps: usize) -> Result<Vec<i64>> {
    let n = cfg.num_train_timesteps;
    check_steps(n, steps)?;
    let k = steps as i64;
    Ok(match cfg.timestep_spacing.as_str() {
        // np.linspace(0, n - 1, k).round().astype(np.int64)
        "linspace" => sigmas::np_linspace(0.0, (n - 1) as f64, steps)
            .into_iter()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        // (np.arange(0, k) * (n // k)).round() + steps_offset
        "leading" => (0..k).map(|i| i * (n / k) + cfg.steps_offset).collect(),
        // np.round(np.arange(n, 0, -n / k))[::-1] - 1
        "trailing" => {
            let ratio = n as f64 / k as f64;
            let len = (n as f64 / ratio).ceil() as i64;
            (0..len).rev().map(|i| (n as f64 + i as f64 * -ratio).round_ties_even() as i64 - 1).collect()
        }
        other => bail!("timestep_spacing {other:?} is not one of leading, trailing, linspace"),
    })
}

/// PRK timesteps: the last 4 timesteps, each with its half-step, as
/// `(ts[-4:].repeat(2) + tile([0, half], 4))[:-1].repeat(2)[1:-1][::-1]`.
fn prk_timesteps(base: &[i64], half: i64) -> Vec<i64> {
    let last4 = &base[base.len() - 4..];
    let with_halves: Vec<i64> = last4.iter().flat_map(|&t| [t, t + half]).collect();
    let doubled: Vec<i64> = with_halves[..with_halves.len() - 1].iter().flat_map(|&t| [t, t]).collect();
    doubled[1..doubled.len() - 1].iter().rev().copied().collect()
}

impl Pndm {
    /// `step_prk`: four model calls per step, combined with RK4 weights 1/6, 1/3, 1/3, 1/6.
    fn step_prk(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Tensor {
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { self.step_ratio / 2 };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.timesteps[self.counter / 4 * 4] as i64;
        let weighted = |w: f64| model_output * w;
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(add(self.cur_model_output.take(), weighted(1.0 / 6.0)));
                self.ets.push(model_output.shallow_clone());
                self.cur_sample = Some(sample.shallow_clone());
                model_output.shallow_clone()
            }
            1 | 2 => {
                self.cur_model_output = Some(add(self.cur_model_output.take(), weighted(1.0 / 3.0)));
                model_output.shallow_clone()
            }
            _ => add(self.cur_model_output.take(), weighted(1.0 / 6.0)),
        };
        let cur_sample = self.cur_sample.as_ref().unwrap_or(sample).shallow_clone();
        self.prev_sample(&cur_sample, timestep, prev_timestep, &model_output)
    }

    /// `step_plms`: Adams-Bashforth over the stored model outputs.
    fn step_plms(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Tensor {
        let mut timestep = timestep;
        let mut prev_timestep = timestep - self.step_ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.shallow_clone());
        } else {
            prev_timestep = timestep;
            timestep += self.step_ratio;
        }
        let e = |i: usize| &self.ets[self.ets.len() - i];
        let mut sample = sample.shallow_clone();
        let model_output = match (self.ets.len(), self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.shallow_clone());
                model_output.shallow_clone()
            }
            (1, 1) => {
                sample = self.cur_sample.take().expect("set by the first PLMS step");
                (model_output + e(1)) / 2.0
            }
            (2, _) => (e(1) * 3.0 - e(2)) / 2.0,
            (3, _) => (e(1) * 23.0 - e(2) * 16.0 + e(3) * 5.0) / 12.0,
            _ => (e(1) * 55.0 - e(2) * 59.0 + e(3) * 37.0 - e(4) * 9.0) * (1.0 / 24.0),
        };
        self.prev_sample(&sample, timestep, prev_timestep, &model_output)
    }

    /// `_get_prev_sample`: formula (9) of the PNDM paper, float32 scalars.
    fn prev_sample(&self, sample: &Tensor, timestep: i64, prev_timestep: i64, model_output: &Tensor) -> Tensor {
        let alpha_t = self.schedule.alpha_cumprod(timestep) as f32;
        let alpha_prev =
            if prev_timestep >= 0 { self.schedule.alpha_cumprod(prev_timestep) as f32 } else { self.final_alpha_cumprod };
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
        let eps = match self.schedule.prediction {
            Prediction::V => model_output * alpha_t.sqrt() as f64 + sample * beta_t.sqrt() as f64,
            _ => model_output.shallow_clone(),
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        sample * sample_coeff as f64 - eps * (alpha_prev - alpha_t) as f64 / denom as f64
    }
}

/// `acc += x` where diffusers starts the accumulator at the integer 0.
fn add(acc: Option<Tensor>, x: Tensor) -> Tensor {
    match acc {
        Some(acc) => acc + x,
        None => x,
    }
}

impl Sampler for Pndm {
    fn calls(&self) -> ModelCalls<'_> {
        ModelCalls::Unscaled { timesteps: &self.timesteps }
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _noise: &mut dyn FnMut() -> Tensor) -> Tensor {
        let timestep = self.timesteps[index] as i64;
        let prev = if self.counter < self.prk_len {
            self.step_prk(model_output, timestep, sample)
        } else {
            self.step_plms(model_output, timestep, sample)
        };
        self.counter += 1;
        prev
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::sigmas::reference;

    #[test]
    fn prk_and_plms_timesteps_match_diffusers() {
        for (spacing, steps, table) in reference::tables("pndm") {
            let s = Pndm::new(&reference::config(&spacing), steps, false).unwrap();
            reference::assert_close(&format!("pndm {spacing} {steps} timesteps"), s.timesteps(), &table.timesteps, 0.0);
            assert_eq!(s.init_noise_sigma(), table.init_noise_sigma);
        }
    }

    #[test]
    fn skip_prk_steps_repeats_the_second_timestep() {
        let s = Pndm::new(&reference::config("leading"), 4, true).unwrap();
        assert_eq!(s.timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
    }
}
