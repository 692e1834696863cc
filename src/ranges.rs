//! The ranges user values must lie in, checked where they are read (flags,
//! sdtune.yaml, a `--from` PNG) so a bad one is one sentence, not black
//! images or NaN deep in the UNet. What needs the loaded model (clip skip,
//! memory for a size) is in sample::limits.
use anyhow::{bail, Result};

/// Guidance above this only burns the image out (A1111's slider stops at 30).
pub const MAX_GUIDANCE: f64 = 100.0;
/// Guidance above this is legal but rarely what anyone wants.
const HIGH_GUIDANCE: f64 = 30.0;
/// A LoRA strength beyond this saturates every image.
pub const MAX_LORA_SCALE: f64 = 100.0;
/// Strengths above this are legal but usually overcooked.
const HIGH_LORA_SCALE: f64 = 4.0;
/// Seeds of one grid: more is a typo, and would be allocated before any check.
pub const MAX_COUNT: usize = 10_000;
/// SDXL's size conditioning numbers: sizes no photo has are a typo.
pub const MAX_CONDITIONED_SIDE: i64 = 65_536;

/// Classifier-free guidance: a finite number from 0 to [`MAX_GUIDANCE`];
/// `what` names the flag or key. Returns a warning for high values.
pub fn check_guidance(guidance: f64, what: &str) -> Result<Option<String>> {
    if !(guidance.is_finite() && (0.0..=MAX_GUIDANCE).contains(&guidance)) {
        bail!("{what} is {}; guidance must be a number from 0 to {MAX_GUIDANCE} (1 turns it off, 7.5 is usual)", number(guidance));
    }
    Ok((guidance > HIGH_GUIDANCE)
        .then(|| format!("warning: {what} {guidance} is far above the usual 5 to 12; images will look burnt out")))
}

/// A LoRA strength: finite, |scale| <= [`MAX_LORA_SCALE`]. Returns a
/// warning for strengths above the usual range.
pub fn check_lora_scale(scale: f64, what: &str) -> Result<Option<String>> {
    if !(scale.is_finite() && scale.abs() <= MAX_LORA_SCALE) {
        bail!(
            "{what}: strength {} is out of range; a LoRA strength is a number from -{MAX_LORA_SCALE} to {MAX_LORA_SCALE} (1 is the LoRA as trained)",
            number(scale)
        );
    }
    Ok((scale.abs() > HIGH_LORA_SCALE)
        .then(|| format!("warning: {what}: strength {scale} is far above the usual 0.5 to 1.5; images will be overcooked")))
}

/// A pixel side from a flag: `None` is the model's size; 0, negative and
/// sides that are not multiples of 8 are refused.
pub fn check_side(side: Option<i64>, flag: &str) -> Result<()> {
    match side {
        Some(px) if px <= 0 || px % 8 != 0 => {
            bail!("{flag} {px} is not a size sdtune can render; use a positive multiple of 8 (e.g. 512), or leave it out for the model's own size")
        }
        _ => Ok(()),
    }
}

/// A number as a person would write it: `1e30`, not thirty-one digits.
pub fn number(x: f64) -> String {
    if x.is_finite() && x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_and_strength_ranges() {
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e30, 100.5] {
            let err = check_guidance(bad, "--guidance").unwrap_err().to_string();
            assert!(err.contains("--guidance") && err.contains("0 to 100"), "{err}");
        }
        assert!(check_guidance(7.5, "--guidance").unwrap().is_none());
        assert!(check_guidance(50.0, "--guidance").unwrap().is_some_and(|w| w.starts_with("warning:")));
        assert!(check_lora_scale(1e9, "--lora a").unwrap_err().to_string().contains("1e9"));
        assert!(check_lora_scale(-0.5, "--lora a").unwrap().is_none());
        assert!(check_lora_scale(8.0, "--lora a").unwrap().is_some());
    }

    #[test]
    fn sides_must_be_positive_multiples_of_8() {
        for bad in [0, -8, 100] {
            assert!(check_side(Some(bad), "--width").unwrap_err().to_string().contains(&format!("--width {bad}")));
        }
        assert!(check_side(Some(512), "--width").is_ok() && check_side(None, "--width").is_ok());
    }
}
