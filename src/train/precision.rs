//! The dtype policy and fp16's dynamic loss scaling.
//!
//! Frozen base weights in bf16 (fp16 where bf16 is unsupported) or fp32;
//! LoRA masters, gradients, optimizer state and the loss always fp32. tch's
//! autocast is fp16- and CUDA-only, so the policy is explicit: adapters cast
//! their fp32 masters to the activation kind for the product.

/// Dynamic loss scale for fp16: grow after `growth_interval` clean steps,
/// halve and skip the step when a gradient is inf/nan (torch's GradScaler).
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    /// Clean steps since the last change.
    pub good_steps: u64,
    pub enabled: bool,
}

impl LossScaler {
    /// torch.cuda.amp.GradScaler's defaults (scale 2^16, x2 every 2000 clean steps, /2 on overflow).
    pub fn fp16() -> Self {
        LossScaler { scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000, good_steps: 0, enabled: true }
    }

    /// A scaler that does nothing (fp32, bf16).
    pub fn disabled() -> Self {
        LossScaler { scale: 1.0, enabled: false, ..Self::fp16() }
    }

    /// The factor the loss is multiplied by before backward.
    pub fn factor(&self) -> f64 {
        if self.enabled {
            self.scale
        } else {
            1.0
        }
    }

    /// After unscaling: records whether the gradients were finite and
    /// returns whether the optimizer step should happen.
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if !self.enabled {
            return grads_finite;
        }
        if grads_finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.good_steps = 0;
            }
            true
        } else {
            self.scale = (self.scale * self.backoff_factor).max(1.0);
            self.good_steps = 0;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn injected_inf_gradient_skips_and_backs_off() {
        let mut s = LossScaler::fp16();
        let grad = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        let finite = crate::models::finite::all_finite(&grad);
        assert!(!finite);
        assert!(!s.update(finite), "a step with an inf gradient must be skipped");
        assert_eq!(s.scale, 32768.0);
        let nan = Tensor::from_slice(&[f32::NAN]);
        assert!(!s.update(crate::models::finite::all_finite(&nan)));
        assert_eq!(s.scale, 16384.0);
    }

    #[test]
    fn grows_after_the_interval_of_clean_steps() {
        let mut s = LossScaler { growth_interval: 3, ..LossScaler::fp16() };
        for _ in 0..2 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 65536.0);
        assert!(s.update(true));
        assert_eq!(s.scale, 131072.0);
        assert_eq!(s.good_steps, 0);
    }

    #[test]
    fn disabled_scaler_is_identity() {
        let mut s = LossScaler::disabled();
        assert_eq!(s.factor(), 1.0);
        assert!(s.update(true));
        assert!(!s.update(false));
        assert_eq!(s.scale, 1.0);
    }
}
