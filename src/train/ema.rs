//! An exponential moving average of the trained weights, kept in fp32
//! beside them (same device), saved in the resumable state, and swapped
//! into the model for the LoRA files and sample grids a run writes.
//!
//! The decay follows diffusers' `EMAModel` without `use_ema_warmup`: after
//! optimizer step n (1-based), with s = n - 1, decay = 0 when s = 0 (the
//! average starts at the weights), else min(decay, (1 + s) / (10 + s)).
//! It depends on the step number alone, so a resume needs no counter.
use anyhow::Result;
use tch::{Kind, Tensor};

use super::trainable::Trainable;

/// The usual decay of an adapter's EMA.
pub const DEFAULT_DECAY: f64 = 0.999;

pub struct Ema {
    pub decay: f64,
    /// One fp32 copy per trained tensor, in `Trainable::state_tensors` order.
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// Starts the average at the weights as they are now.
    pub fn new(trained: &dyn Trainable, decay: f64) -> Self {
        let shadow = trained
            .state_tensors()
            .into_iter()
            .map(|(name, t)| (format!("ema.{name}"), t.detach().to_kind(Kind::Float).copy()))
            .collect();
        Ema { decay, shadow }
    }

    /// The decay used by the update after optimizer step `step` (1-based).
    pub fn decay_after(&self, step: u64) -> f64 {
        let s = step.saturating_sub(1) as f64;
        if s == 0.0 {
            return 0.0;
        }
        self.decay.min((1.0 + s) / (10.0 + s))
    }

    /// Moves the average towards the weights after optimizer step `step`
    /// (1-based), as diffusers does: shadow -= (1 - decay) * (shadow - weight).
    pub fn update(&mut self, trained: &dyn Trainable, step: u64) {
        let keep = self.decay_after(step);
        tch::no_grad(|| {
            for ((_, shadow), (_, weight)) in self.shadow.iter_mut().zip(trained.state_tensors()) {
                let delta = (&*shadow - weight.to_kind(Kind::Float)) * (1.0 - keep);
                let _ = shadow.f_sub_(&delta);
            }
        });
    }

    /// The averaged tensors under their state names (`ema.<name>`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.shadow.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    /// Runs `f` with the averaged weights in the trained tensors (so the
    /// attached adapters render and save them), then puts the trained
    /// weights back exactly as they were.
    pub fn applied<T>(&self, trained: &dyn Trainable, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let live = trained.state_tensors();
        let kept: Vec<Tensor> = live.iter().map(|(_, t)| t.detach().copy()).collect();
        tch::no_grad(|| {
            for ((_, var), (_, shadow)) in live.iter().zip(&self.shadow) {
                let mut var = var.shallow_clone();
                var.copy_(shadow);
            }
        });
        let result = f();
        tch::no_grad(|| {
            for ((_, var), saved) in live.iter().zip(&kept) {
                let mut var = var.shallow_clone();
                var.copy_(saved);
            }
        });
        result
    }
}

/// The trained tensors and their average (when there is one) as one
/// `Trainable`, so a state file holds both and a resume restores both
/// through the same code.
pub struct WithEma<'a> {
    pub trained: &'a dyn Trainable,
    pub ema: Option<&'a Ema>,
}

impl Trainable for WithEma<'_> {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut all = self.trained.state_tensors();
        all.extend(self.ema.iter().flat_map(|e| e.state_tensors()));
        all
    }

    fn parameters(&self) -> Vec<Tensor> {
        self.trained.parameters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One(Tensor);

    impl Trainable for One {
        fn state_tensors(&self) -> Vec<(String, Tensor)> {
            vec![("w".into(), self.0.shallow_clone())]
        }
        fn parameters(&self) -> Vec<Tensor> {
            vec![self.0.shallow_clone()]
        }
    }

    #[test]
    fn decay_warms_up_as_diffusers_does() {
        let ema = Ema::new(&One(Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))), 0.999);
        assert_eq!(ema.decay_after(1), 0.0);
        assert_eq!(ema.decay_after(2), 2.0 / 11.0);
        assert_eq!(ema.decay_after(100_000), 0.999);
    }

    #[test]
    fn the_average_follows_and_swaps_back_exactly() {
        let w = One(Tensor::from_slice(&[1.0f32, 2.0]));
        let mut ema = Ema::new(&w, 0.5);
        tch::no_grad(|| w.0.shallow_clone().copy_(&Tensor::from_slice(&[3.0f32, 4.0])));
        ema.update(&w, 1); // decay 0: the average is the weights
        tch::no_grad(|| w.0.shallow_clone().copy_(&Tensor::from_slice(&[5.0f32, 8.0])));
        ema.update(&w, 2); // decay min(0.5, 2/11)
        let d = 2.0 / 11.0;
        let want = [3.0 * d + 5.0 * (1.0 - d), 4.0 * d + 8.0 * (1.0 - d)];
        let got = Vec::<f32>::try_from(&ema.state_tensors()[0].1).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        let inside = ema.applied(&w, || Ok(Vec::<f32>::try_from(&w.0).unwrap())).unwrap();
        assert_eq!(inside, got);
        assert_eq!(Vec::<f32>::try_from(&w.0).unwrap(), [5.0, 8.0]);
    }
}
