//! What diffusers' sigma-based ("k-diffusion") schedulers share: the sigma
//! table, the inference timesteps and sigmas, the Karras schedule, and the
//! model-input scaling. diffusers builds these with numpy at a mix of float64
//! and float32; the functions here keep the same dtype at each point, so
//! the timesteps and sigmas we hand the UNet are the ones diffusers does.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::NoiseSchedule;
use crate::models::config::{Prediction, SchedulerConfig};

/// sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) for every training step,
/// ascending in t. diffusers: `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`
/// on the float32 tensor, then `np.array(...)` (still float32).
pub fn train_sigmas(schedule: &NoiseSchedule) -> Vec<f32> {
    let ac = &schedule.alphas_cumprod;
    let sigmas = ((1f64 - ac) / ac).sqrt();
    Vec::<f32>::try_from(&sigmas.to_kind(Kind::Float)).expect("alphas_cumprod is a float32 vector")
}

/// `np.linspace(start, stop, num)` in float64: `i * step + start`, the last
/// element set to `stop` exactly.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` for a float step: `start + i * (-step)` while positive.
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = (start / step).ceil() as usize;
    (0..len).map(|i| start + i as f64 * -step).collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` in float64 (numpy returns `fp[j]`
/// itself when `x` hits a knot, which is every case for integer timesteps).
pub fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// The inference timesteps of Euler, Euler ancestral, Heun and LMS, first to last,
/// as their `set_timesteps` computes them (float32, possibly fractional).
pub fn discrete_timesteps(cfg: &SchedulerConfig, steps: usize) -> Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    check_steps(n, steps)?;
    let k = steps as i64;
    Ok(match cfg.timestep_spacing.as_str() {
        // np.linspace(0, n - 1, k, dtype=np.float32)[::-1]: computed in f64, cast once.
        "linspace" => np_linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(|t| t as f32).collect(),
        // (np.arange(0, k) * (n // k)).round()[::-1].astype(np.float32) + steps_offset
        "leading" => (0..k).rev().map(|i| (i * (n / k)) as f32 + cfg.steps_offset as f32).collect(),
        // np.arange(n, 0, -n / k).round().astype(np.float32) - 1 (numpy rounds half to even)
        "trailing" => np_arange_down(n as f64, n as f64 / k as f64)
            .into_iter()
            .map(|t| t.round_ties_even() as f32 - 1.0)
            .collect(),
        other => bail!("timestep_spacing {other:?} is not one of leading, trailing, linspace"),
    })
}

pub fn check_steps(num_train_timesteps: i64, steps: usize) -> Result<()> {
    if steps < 1 || steps as i64 > num_train_timesteps {
        bail!("--steps must be between 1 and {num_train_timesteps}, got {steps}");
    }
    Ok(())
}

/// Karras et al. (2022) sigmas, rho = 7, as diffusers' `_convert_to_karras`
/// (float64 arithmetic between the given end points).
pub fn karras(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose sigma is
/// `sigma`, interpolating linearly in log sigma. `log_sigmas` is `np.log` of
/// the float32 table (float32); the arithmetic is float64.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // cumsum(dists >= 0).argmax(): the last index whose log sigma is <= ours
    // (0 when none is), clipped so that high_idx stays in range.
    let below = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0);
    let low_idx = below.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[high_idx] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `np.log` of the float32 sigma table, kept in float32.
pub fn log_sigmas(train: &[f32]) -> Vec<f32> {
    train.iter().map(|s| s.ln()).collect()
}

/// Timesteps and sigmas (with the final sigma appended) of the Euler family's
/// `set_timesteps`: interpolate the table at the timesteps, or with Karras
/// sigmas map each sigma back to a fractional timestep; then
/// `np.concatenate([sigmas, [0.0]]).astype(np.float32)`.
pub struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    /// One per step plus the final 0, float32 as diffusers stores them.
    pub sigmas: Vec<f32>,
}

impl SigmaSchedule {
    pub fn new(schedule: &NoiseSchedule, cfg: &SchedulerConfig, steps: usize, use_karras: bool) -> Result<Self> {
        let train = train_sigmas(schedule);
        let timesteps = discrete_timesteps(cfg, steps)?;
        let interpolated: Vec<f64> = timesteps.iter().map(|&t| np_interp(t as f64, &train)).collect();
        let (timesteps, sigmas): (Vec<f64>, Vec<f64>) = if use_karras {
            // _convert_to_karras(in_sigmas=sigmas): the ends of the float64 interpolation.
            let karras = karras(interpolated[steps - 1], interpolated[0], steps);
            let logs = log_sigmas(&train);
            (karras.iter().map(|&s| sigma_to_t(s, &logs)).collect(), karras)
        } else {
            (timesteps.iter().map(|&t| t as f64).collect(), interpolated)
        };
        let sigmas = sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect();
        // self.timesteps = torch.from_numpy(timesteps.astype(np.float32))
        let timesteps = timesteps.into_iter().map(|t| t as f32 as f64).collect();
        Ok(SigmaSchedule { timesteps, sigmas })
    }

    /// `init_noise_sigma`: the largest sigma, or sqrt(max^2 + 1) for "leading"
    /// spacing, in float32 tensor arithmetic.
    pub fn init_noise_sigma(&self, cfg: &SchedulerConfig) -> f64 {
        let max = self.sigmas.iter().copied().fold(f32::MIN, f32::max);
        match cfg.timestep_spacing.as_str() {
            "linspace" | "trailing" => max as f64,
            _ => (max * max + 1.0).sqrt() as f64,
        }
    }
}

/// `sample / ((sigma**2 + 1) ** 0.5)`, the scale factor in float32 as the 0-d tensor math gives it.
pub fn scale_input(sample: &Tensor, sigma: f32) -> Tensor {
    sample / (sigma * sigma + 1.0).sqrt() as f64
}

/// The denoised sample x0 from the model output at noise level `sigma`
/// (Euler, Euler ancestral, Heun, LMS), each float32 coefficient computed as diffusers does.
pub fn denoised(prediction: Prediction, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Tensor {
    match prediction {
        // sample - sigma * model_output
        Prediction::Epsilon => sample - model_output * sigma as f64,
        // model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        Prediction::V => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            model_output * c_out as f64 + sample / (sigma * sigma + 1.0) as f64
        }
        Prediction::Sample => model_output.shallow_clone(),
    }
}

/// diffusers' numbers for the scheduler tests: `tables.json` written by
/// scripts/fixtures/make_scheduler_cases.py.
#[cfg(test)]
pub(crate) mod reference {
    use std::path::{Path, PathBuf};

    use serde::Deserialize;

    use crate::models::config::SchedulerConfig;

    #[derive(Deserialize)]
    pub struct Table {
        pub timesteps: Vec<f64>,
        pub sigmas: Vec<f64>,
        pub init_noise_sigma: f64,
        /// LMS only: `get_lms_coefficient(order, i, k)` for each step i (present when scipy was).
        #[serde(default)]
        pub lms_coefficients: Option<Vec<Vec<f64>>>,
    }

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    /// (timestep_spacing, steps, diffusers' table) for one scheduler's CLI name.
    pub fn tables(scheduler: &str) -> Vec<(String, usize, Table)> {
        let path = fixtures().join("reference/schedulers/tables.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e}; run scripts/fixtures/make_scheduler_cases.py", path.display())
        });
        let mut all: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
        let by_spacing = all.remove(scheduler).unwrap_or_else(|| panic!("no tables for {scheduler}"));
        let by_spacing: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Table>> =
            serde_json::from_value(by_spacing).unwrap();
        let mut out = Vec::new();
        for (spacing, by_steps) in by_spacing {
            for (steps, table) in by_steps {
                out.push((spacing.clone(), steps.parse().unwrap(), table));
            }
        }
        assert!(!out.is_empty());
        out
    }

    /// The tiny SD1 fixture's scheduler config with another timestep spacing.
    pub fn config(spacing: &str) -> SchedulerConfig {
        let path = fixtures().join("tiny-sd1/scheduler/scheduler_config.json");
        let mut cfg = SchedulerConfig::from_file(&path).unwrap();
        cfg.timestep_spacing = spacing.to_string();
        cfg
    }

    /// The tolerance for sigmas: two float32 ulps. torch picks its float32
    /// kernels per CPU (AVX2, AVX512), so the table's last bit depends on the
    /// machine that wrote it; diffusers run here gives our sigmas exactly.
    pub const SIGMA_TOL: f64 = 2.0 * f32::EPSILON as f64;

    /// Asserts |ours - theirs| <= tol * max(1, |theirs|) elementwise.
    pub fn assert_close(what: &str, ours: &[f64], theirs: &[f64], tol: f64) {
        assert_eq!(ours.len(), theirs.len(), "{what}: {ours:?} vs diffusers {theirs:?}");
        for (a, b) in ours.iter().zip(theirs) {
            assert!((a - b).abs() <= tol * b.abs().max(1.0), "{what}: {ours:?} vs diffusers {theirs:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_and_interp_follow_numpy() {
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(0.0, 1.0, 1), vec![0.0]);
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(np_interp(1.0, &fp), 3.0);
        assert_eq!(np_interp(1.25, &fp), 4.0);
        assert_eq!(np_interp(5.0, &fp), 7.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let train = [0.1f32, 0.2, 0.4, 0.8];
        let logs = log_sigmas(&train);
        assert!((sigma_to_t(0.4, &logs) - 2.0).abs() < 1e-6);
        assert!((sigma_to_t((0.2f64 * 0.4).sqrt(), &logs) - 1.5).abs() < 1e-6);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
        assert_eq!(sigma_to_t(5.0, &logs), 3.0);
    }
}
