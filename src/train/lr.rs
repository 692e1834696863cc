//! Learning-rate schedules: constant, constant-with-warmup, cosine (with warmup).
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup { warmup: u64 },
    Cosine { warmup: u64 },
}

impl LrSchedule {
    pub const NAMES: &'static [&'static str] = &["constant", "constant_with_warmup", "cosine"];

    pub fn parse(name: &str, warmup: u64) -> Result<Self> {
        Ok(match name {
            "constant" => LrSchedule::Constant,
            "constant_with_warmup" => LrSchedule::ConstantWithWarmup { warmup },
            "cosine" => LrSchedule::Cosine { warmup },
            other => bail!("lr schedule {other:?} is not one of {}", Self::NAMES.join(", ")),
        })
    }

    /// The learning rate for optimizer step `step` (0-based) of `total`,
    /// as diffusers' `get_scheduler` computes it.
    pub fn lr(&self, base: f64, step: u64, total: u64) -> f64 {
        let warm = |w: u64| if w > 0 && step < w { step as f64 / w as f64 } else { 1.0 };
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::ConstantWithWarmup { warmup } => base * warm(warmup),
            LrSchedule::Cosine { warmup } => {
                if warmup > 0 && step < warmup {
                    return base * warm(warmup);
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let progress = (step - warmup) as f64 / span;
                base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        let s = LrSchedule::Cosine { warmup: 10 };
        assert_eq!(s.lr(1.0, 0, 110), 0.0);
        assert!((s.lr(1.0, 5, 110) - 0.5).abs() < 1e-12);
        assert!((s.lr(1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 60, 110) - 0.5).abs() < 1e-12);
        assert!(s.lr(1.0, 110, 110).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant.lr(3e-4, 99, 100), 3e-4);
        assert!((LrSchedule::ConstantWithWarmup { warmup: 4 }.lr(1.0, 1, 100) - 0.25).abs() < 1e-12);
    }
}
