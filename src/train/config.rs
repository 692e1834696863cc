//! The `train:` section of `sdtune.yaml`; every key has a `sdtune train` flag.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::lr::LrSchedule;
use crate::lora::targets::Targets;
use crate::runtime::Precision;

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
    /// cross-attn, attn or transformer.
    pub targets: String,
    pub lr: f64,
    /// constant, constant_with_warmup or cosine.
    pub lr_schedule: String,
    pub warmup_steps: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
    /// auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16.
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
    /// Sampler steps and guidance of the grids rendered while training.
    pub sample_steps: usize,
    pub sample_guidance: f64,
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
            sample_steps: 20,
            sample_guidance: 7.5,
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
        let positive = [("steps", self.steps as f64), ("rank", self.rank as f64), ("batch_size", self.batch_size as f64), ("grad_accum", self.grad_accum as f64), ("lr", self.lr), ("alpha", self.alpha)];
        for (key, value) in positive {
            if !(value > 0.0) {
                bail!("{key} must be positive, got {value}");
            }
        }
        if !(0.0..1.0).contains(&self.caption_dropout) {
            bail!("caption_dropout must be in [0, 1), got {}", self.caption_dropout);
        }
        if self.keep_last == 0 {
            bail!("keep_last must be at least 1");
        }
        Ok(())
    }
}
