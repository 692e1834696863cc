//! The `train:` section of `sdtune.yaml`; every key has a `sdtune train` flag.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::lr::LrSchedule;
use crate::lora::targets::Targets;
use crate::runtime::Precision;
use crate::ranges::number;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The run's name: files go to `<output>/<name>/`.
    pub name: String,
    /// Folder holding one sub-folder per run.
    pub output: String,
    /// Optimizer steps.
    pub steps: u64,
    /// LoRA rank (dimension) and alpha; the update is scaled by alpha / rank.
    pub rank: i64,
    pub alpha: f64,
    /// cross-attn, attn, transformer, conv or all (LoCon).
    pub targets: String,
    pub lr: f64,
    /// constant, constant_with_warmup or cosine.
    pub lr_schedule: String,
    pub warmup_steps: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
    /// auto (bf16 on CUDA and on CPUs with native bf16 where a probe finds it faster, else fp32), fp32, bf16 or fp16.
    pub precision: String,
    /// auto, cpu, cuda or cuda:N.
    pub device: String,
    /// Save the LoRA and resumable state every this many steps (0: only at the end).
    pub save_every: u64,
    /// Render the sample grid every this many steps (0: never).
    pub sample_every: u64,
    /// Resumable states kept on disk.
    pub keep_last: usize,
    /// kohya (A1111, ComfyUI) or diffusers.
    pub format: String,
    /// Extra per-channel noise (e.g. 0.05) for darker darks and brighter brights.
    pub noise_offset: f64,
    /// Min-SNR-gamma loss weighting (5 is usual); null turns it off.
    pub min_snr_gamma: Option<f64>,
    /// Fraction of steps that train on the empty caption.
    pub caption_dropout: f64,
    /// Gradient clipping by global norm (0 turns it off).
    pub clip_norm: f64,
    /// Recompute the UNet's activations in backward instead of keeping
    /// them: much less memory, steps about 20-30% slower.
    pub gradient_checkpointing: bool,
    /// Also train a LoRA on the text encoder(s): their attention
    /// projections (and MLP with `targets: transformer`).
    pub train_text_encoder: bool,
    /// The text encoders' learning rate; null: the same as `lr`.
    pub text_encoder_lr: Option<f64>,
    /// Rank and alpha of the LoCon pairs on 3x3 convs (`targets: conv` or
    /// `all`; kohya's conv_dim / conv_alpha); null: `rank` / `alpha`.
    pub conv_rank: Option<i64>,
    pub conv_alpha: Option<f64>,
    /// DoRA (weight-decomposed LoRA): a trained magnitude per output row beside each pair.
    pub dora: bool,
    /// Sampler steps and guidance of the grids rendered while training.
    pub sample_steps: usize,
    pub sample_guidance: f64,
    /// Keep an exponential moving average of the adapter weights; saves
    /// and grids then use it.
    pub ema: bool,
    /// The EMA's decay (diffusers' warm-up applies below it).
    pub ema_decay: f64,
    /// Images held out of training for the validation loss: a fraction
    /// below 1, else a count (0: none; a `validation/` folder in the
    /// data folder is held out instead when there is one).
    pub validation_split: f64,
    /// Shuffle the comma-separated tags of each caption per sample (kohya's shuffle_caption).
    pub shuffle_captions: bool,
    /// Tags at the start of a caption that shuffling leaves in place.
    pub keep_tokens: usize,
    /// DreamBooth's prior preservation: the class images' loss (data.class_prompt,
    /// or a reg/ folder) is added times this; 0 turns it off.
    pub prior_loss_weight: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            name: "brand-lora".into(),
            output: "output".into(),
            steps: 1000,
            rank: 16,
            alpha: 16.0,
            targets: "cross-attn".into(),
            lr: 1e-4,
            lr_schedule: "constant".into(),
            warmup_steps: 0,
            batch_size: 1,
            grad_accum: 1,
            seed: 42,
            precision: "auto".into(),
            device: "auto".into(),
            save_every: 250,
            sample_every: 250,
            keep_last: 3,
            format: "kohya".into(),
            noise_offset: 0.0,
            min_snr_gamma: Some(5.0),
            caption_dropout: 0.05,
            clip_norm: 1.0,
            gradient_checkpointing: false,
            train_text_encoder: false,
            text_encoder_lr: None,
            dora: false,
            conv_rank: None,
            conv_alpha: None,
            sample_steps: 20,
            sample_guidance: 7.5,
            ema: false,
            ema_decay: super::ema::DEFAULT_DECAY,
            validation_split: 0.0,
            shuffle_captions: false,
            keep_tokens: 0,
            prior_loss_weight: 1.0,
        }
    }
}

impl TrainConfig {
    /// Rejects values no run can use, in words.
    pub fn validate(&self) -> Result<()> {
        Targets::parse(&self.targets)?;
        LrSchedule::parse(&self.lr_schedule, self.warmup_steps)?;
        if self.precision != "auto" {
            Precision::parse(&self.precision)?;
        }
        if !["kohya", "diffusers"].contains(&self.format.as_str()) {
            bail!("format {:?} is not one of kohya, diffusers", self.format);
        }
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            bail!("name {:?} must be a plain file name (no slashes, not starting with a dot)", self.name);
        }
        for (key, value) in [("steps", self.steps), ("batch_size", self.batch_size as u64), ("grad_accum", self.grad_accum as u64)] {
            if value == 0 {
                bail!("{} is 0; it must be a whole number of 1 or more", setting(key));
            }
        }
        if self.rank < 1 {
            bail!("{} is {}; a LoRA rank is a whole number of 1 or more (4 to 128 is usual)", setting("rank"), self.rank);
        }
        positive_finite("lr", self.lr, "1e-4 is usual for a LoRA")?;
        positive_finite("alpha", self.alpha, "the rank, or half of it, is usual")?;
        if let Some(rank) = self.conv_rank.filter(|&r| r < 1) {
            bail!("{} is {rank}; a LoCon rank is a whole number of 1 or more (4 to 32 is usual)", setting("conv_rank"));
        }
        if let Some(alpha) = self.conv_alpha {
            positive_finite("conv_alpha", alpha, "the conv rank, or half of it, is usual")?;
        }
        if let Some(lr) = self.text_encoder_lr {
            positive_finite("text_encoder_lr", lr, "5e-5, half the UNet's, is usual")?;
        }
        in_range("noise_offset", self.noise_offset, 0.0, 1.0, "0 turns it off, 0.05 to 0.1 is usual")?;
        if let Some(gamma) = self.min_snr_gamma {
            in_range("min_snr_gamma", gamma, 0.0, 1000.0, "0 turns it off, 5 is usual")?;
        }
        in_range("clip_norm", self.clip_norm, 0.0, f64::MAX, "0 turns clipping off, 1 is usual")?;
        in_range("prior_loss_weight", self.prior_loss_weight, 0.0, f64::MAX, "1 is usual, 0 turns prior preservation off")?;
        if self.sample_steps == 0 {
            bail!("{} is 0; grids need 1 or more sampler steps (20 is usual)", setting("sample_steps"));
        }
        crate::ranges::check_guidance(self.sample_guidance, "train.sample_guidance in sdtune.yaml")?;
        if !(0.0..1.0).contains(&self.caption_dropout) {
            bail!("{} is {}; it is a fraction of steps from 0 up to (not including) 1", setting("caption_dropout"), self.caption_dropout);
        }
        if !(self.ema_decay.is_finite() && self.ema_decay > 0.0 && self.ema_decay < 1.0) {
            bail!("{} is {}; it must be a number between 0 and 1 (0.999 is usual)", setting("ema_decay"), number(self.ema_decay));
        }
        if !(self.validation_split.is_finite() && self.validation_split >= 0.0)
            || (self.validation_split >= 1.0 && self.validation_split.fract() != 0.0)
        {
            bail!(
                "{} is {}; it is a fraction below 1 or a whole count of images (0 turns it off)",
                setting("validation_split"),
                number(self.validation_split)
            );
        }
        if self.keep_last == 0 {
            bail!("{} is 0; at least 1 resumable state must be kept", setting("keep_last"));
        }
        Ok(())
    }

    /// Legal but suspicious settings, one line each, for the run to print.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.warmup_steps > self.steps {
            let effect = if self.lr_schedule == "constant" {
                "the constant schedule ignores it".to_string()
            } else {
                format!("the learning rate never reaches {}", self.lr)
            };
            out.push(format!(
                "warning: the warm-up ({} steps) is longer than the run ({} steps), so {effect}; lower --warmup-steps",
                self.warmup_steps, self.steps
            ));
        }
        if self.lr > 1e-2 {
            out.push(format!("warning: lr {} is far above the usual 1e-4 for a LoRA; training may diverge", self.lr));
        }
        if self.text_encoder_lr.is_some() && !self.train_text_encoder {
            out.push("warning: text_encoder_lr is set but the text encoder does not train; add --train-text-encoder (train_text_encoder: true) to train it".into());
        }
        if self.noise_offset > 0.2 {
            out.push(format!("warning: noise_offset {} is far above the usual 0.05 to 0.1; images may come out washed out or too dark", self.noise_offset));
        }
        out
    }
}

/// A key as both places name it: `train.lr in sdtune.yaml (--lr)`.
fn setting(key: &str) -> String {
    format!("train.{key} (--{})", key.replace('_', "-"))
}

fn positive_finite(key: &str, value: f64, usual: &str) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{} is {}; it must be a finite number above 0 ({usual})", setting(key), number(value));
    }
    Ok(())
}

fn in_range(key: &str, value: f64, low: f64, high: f64, usual: &str) -> Result<()> {
    if !(value.is_finite() && (low..=high).contains(&value)) {
        let range = if high == f64::MAX { format!("a finite number of {low} or more") } else { format!("a number from {low} to {high}") };
        bail!("{} is {}; it must be {range} ({usual})", setting(key), number(value));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_key_and_flag() {
        let cases: Vec<(&str, Box<dyn Fn(&mut TrainConfig)>)> = vec![
            ("train.noise_offset (--noise-offset)", Box::new(|t| t.noise_offset = f64::NAN)),
            ("train.noise_offset (--noise-offset)", Box::new(|t| t.noise_offset = -0.1)),
            ("train.min_snr_gamma (--min-snr-gamma)", Box::new(|t| t.min_snr_gamma = Some(-1.0))),
            ("train.lr (--lr)", Box::new(|t| t.lr = f64::INFINITY)),
            ("train.batch_size (--batch-size)", Box::new(|t| t.batch_size = 0)),
            ("train.grad_accum (--grad-accum)", Box::new(|t| t.grad_accum = 0)),
            ("train.sample_guidance", Box::new(|t| t.sample_guidance = 1e30)),
        ];
        for (key, change) in cases {
            let mut t = TrainConfig::default();
            change(&mut t);
            let err = t.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        assert!(TrainConfig::default().validate().is_ok());
    }

    #[test]
    fn a_warm_up_longer_than_the_run_is_warned() {
        let t = TrainConfig { steps: 10, warmup_steps: 50, lr_schedule: "cosine".into(), ..TrainConfig::default() };
        let warnings = t.warnings();
        assert!(warnings.iter().any(|w| w.contains("warm-up") && w.contains("50 steps")), "{warnings:?}");
        assert!(TrainConfig::default().warnings().is_empty());
    }
}
