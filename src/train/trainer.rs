//! One optimizer step of LoRA training: draw the micro-batches, noise them,
//! predict, weight the loss, backpropagate into the LoRA only, update.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::data::{batches_per_epoch, derive_seed, epoch_batches, TrainingData};
use super::lr::LrSchedule;
use super::optimizer::AdamW;
use super::precision::LossScaler;
use crate::models::config::Prediction;
use crate::models::unet::UNet2DConditionModel;
use crate::schedulers::NoiseSchedule;

/// The settings that shape each step.
#[derive(Clone, Debug)]
pub struct StepSettings {
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub lr_schedule: LrSchedule,
    pub total_steps: u64,
    pub seed: u64,
    pub noise_offset: f64,
    pub min_snr_gamma: Option<f64>,
    pub caption_dropout: f64,
    pub clip_norm: f64,
    /// VAE scaling factor applied to cached (unscaled) latents.
    pub latent_scale: f64,
}

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepOutcome {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub loss_scale: f64,
    /// fp16 overflow: the update was skipped and the loss scale backed off.
    pub skipped: bool,
}

pub struct Trainer<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub schedule: &'a NoiseSchedule,
    pub data: &'a dyn TrainingData,
    pub optimizer: AdamW,
    pub scaler: LossScaler,
    pub settings: StepSettings,
    pub device: Device,
    buckets: Vec<Vec<usize>>,
    empty_caption: Tensor,
}

impl<'a> Trainer<'a> {
    pub fn new(
        unet: &'a UNet2DConditionModel,
        schedule: &'a NoiseSchedule,
        data: &'a dyn TrainingData,
        optimizer: AdamW,
        scaler: LossScaler,
        settings: StepSettings,
        device: Device,
    ) -> Result<Self> {
        let buckets: Vec<Vec<usize>> = data.buckets().into_iter().filter(|b| !b.is_empty()).collect();
        if buckets.is_empty() {
            bail!("the training cache holds no images; run `sdtune prepare DIR` first");
        }
        let empty_caption = data.empty_caption()?.to_device(device);
        if device.is_cuda() {
            // Each convolution shape (few: one per bucket) picks its fastest algorithm once.
            tch::Cuda::cudnn_set_benchmark(true);
        } else {
            // The step's big activation buffers recur every step: keep them.
            crate::runtime::keep_freed_big_blocks();
        }
        Ok(Trainer { unet, schedule, data, optimizer, scaler, settings, device, buckets, empty_caption })
    }

    /// Which batch the `micro`-th micro-batch overall is: epochs are
    /// recomputed from the seed, so this needs no saved state.
    fn batch_for(&self, micro: u64) -> Vec<usize> {
        let per_epoch = batches_per_epoch(&self.buckets, self.settings.batch_size) as u64;
        let epoch = micro / per_epoch;
        let batches = epoch_batches(&self.buckets, self.settings.batch_size, self.settings.seed, epoch);
        batches[(micro % per_epoch) as usize].clone()
    }

    /// Optimizer step `step` (0-based).
    ///
    /// Nothing here waits for the device until the step's work is all
    /// queued: gradients come straight from autograd (no `.grad` to zero),
    /// finiteness, clipping and the skip of a non-finite step are decided on
    /// the device, and loss, gradient norm and finiteness come back together
    /// in one read at the end.
    pub fn step(&mut self, step: u64) -> Result<StepOutcome> {
        let s = self.settings.clone();
        let scale = self.scaler.factor();
        let mut loss_sum: Option<Tensor> = None;
        let mut grad: Option<Tensor> = None;
        for micro in 0..s.grad_accum as u64 {
            let index = step * s.grad_accum as u64 + micro;
            let loss = self.micro_batch_loss(index)?;
            let scaled = &loss * (scale / s.grad_accum as f64);
            let grads = Tensor::f_run_backward(&[&scaled], self.optimizer.params(), false, false)?;
            let flat = self.optimizer.flatten(&grads);
            grad = Some(match grad {
                Some(sum) => sum + flat,
                None => flat,
            });
            let loss = loss.detach();
            loss_sum = Some(match loss_sum {
                Some(sum) => sum + loss,
                None => loss,
            });
        }
        let (Some(mut grad), Some(loss_sum)) = (grad, loss_sum) else {
            bail!("grad_accum must be at least 1");
        };
        if scale != 1.0 {
            grad /= scale;
        }
        let finite = grad.isfinite().all();
        let lr = s.lr_schedule.lr(s.lr, step, s.total_steps);
        let norm = crate::train::optimizer::clip_grad_norm_on_device(&mut grad, s.clip_norm);
        self.optimizer.step_if(&grad, lr, Some(&finite));

        // The one read of the step.
        let loss = loss_sum / s.grad_accum as f64;
        let facts = Tensor::stack(&[loss.to_kind(Kind::Float), norm.to_kind(Kind::Float), finite.to_kind(Kind::Float)], 0);
        let facts = Vec::<f64>::try_from(&facts.to_kind(Kind::Double).to_device(Device::Cpu))?;
        let (loss, grad_norm, finite) = (facts[0], facts[1], facts[2] == 1.0);
        let loss_scale = self.scaler.factor();
        let do_step = self.scaler.update(finite);
        if !finite {
            self.optimizer.unstep();
        }
        let grad_norm = if do_step { grad_norm } else { f64::NAN };
        Ok(StepOutcome { loss, grad_norm, lr, loss_scale, skipped: !do_step })
    }

    /// The mean (min-SNR weighted) loss of micro-batch `index`, in fp32.
    fn micro_batch_loss(&self, index: u64) -> Result<Tensor> {
        let s = &self.settings;
        let batch = self.batch_for(index);
        // Every random draw of this micro-batch comes from its own seed.
        tch::manual_seed(derive_seed(s.seed, 2, index) as i64);
        let mut rng = super::data::SplitMix64::new(derive_seed(s.seed, 3, index));
        let n = batch.len() as i64;

        let mut latents = Vec::with_capacity(batch.len());
        let mut texts = Vec::with_capacity(batch.len());
        for &i in &batch {
            let flip = self.data.has_flips() && rng.below(2) == 1;
            let sample = self.data.sample(i, flip)?;
            // A fresh draw from the cached distribution each time the image is seen.
            let eps = Tensor::randn(sample.latent_mean.size(), (Kind::Float, Device::Cpu));
            latents.push(sample.latent_mean.to_kind(Kind::Float) + sample.latent_std.to_kind(Kind::Float) * eps);
            let drop = s.caption_dropout > 0.0 && (rng.next_u64() as f64 / u64::MAX as f64) < s.caption_dropout;
            texts.push(if drop { self.empty_caption.shallow_clone() } else { sample.text.to_device(self.device) });
        }
        let latents = (Tensor::stack(&latents, 0) * s.latent_scale).to_device(self.device);
        let context = Tensor::stack(&texts, 0);

        let shape = latents.size();
        let mut noise = Tensor::randn(&shape[..], (Kind::Float, Device::Cpu));
        if s.noise_offset > 0.0 {
            noise += Tensor::randn([shape[0], shape[1], 1, 1], (Kind::Float, Device::Cpu)) * s.noise_offset;
        }
        let noise = noise.to_device(self.device);
        let timesteps = Tensor::randint(self.schedule.num_train_timesteps, [n], (Kind::Int64, Device::Cpu));

        let noisy = self.schedule.add_noise(&latents, &noise, &timesteps);
        let target = match self.schedule.prediction {
            Prediction::Epsilon => noise.shallow_clone(),
            Prediction::V => self.schedule.velocity(&latents, &noise, &timesteps),
            Prediction::Sample => latents.shallow_clone(),
        };
        // Everything the host computes is on the device before the UNet runs,
        // so no copy waits for the forward to finish.
        let weights = s.min_snr_gamma.map(|gamma| self.min_snr_weights(&timesteps, gamma).to_device(self.device));
        let pred = self.unet.forward(&noisy, &timesteps.to_device(self.device), &context).to_kind(Kind::Float);
        let per_sample = (pred - target).square().mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
        let weighted = match weights {
            Some(weights) => per_sample * weights,
            None => per_sample,
        };
        Ok(weighted.mean(Kind::Float))
    }

    /// Min-SNR-gamma weights (Hang et al. 2023), as diffusers' training
    /// scripts compute them: min(snr, gamma) / snr for epsilon,
    /// min(snr, gamma) / (snr + 1) for v-prediction.
    fn min_snr_weights(&self, timesteps: &Tensor, gamma: f64) -> Tensor {
        let snr = self.schedule.snr(timesteps);
        let clipped = snr.clamp_max(gamma);
        match self.schedule.prediction {
            Prediction::V => clipped / (snr + 1.0),
            _ => clipped / snr,
        }
    }
}
