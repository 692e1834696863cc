//! One optimizer step of LoRA training: draw the micro-batches, noise them,
//! predict, weight the loss and backpropagate into the LoRA only
//! (accumulate); average the gradients over the processes (sync); unscale,
//! check, clip and update (apply).
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::data::{derive_seed, epoch_micro_batches, micro_batches_per_epoch, weight_samples, with_repeats, TrainingData};
use super::lr::LrSchedule;
use super::optimizer::AdamW;
use super::precision::LossScaler;
use super::prior::Prior;
use super::sync::{GradientSync, SingleProcess};
use super::text_encoder::{CaptionDraw, TextEncoderTraining};
use crate::models::conditioning::Conditioning;
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
    /// The UNet recomputes its activations in backward (less memory).
    pub gradient_checkpointing: bool,
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
    /// With prior preservation: the class samples' mean loss, which `loss`
    /// holds times the prior weight beside the brand samples' loss.
    pub prior_loss: Option<f64>,
}

/// A step's gradients before they are applied.
struct Accumulated {
    /// Flat fp32 gradient of every trained parameter, times the loss scale.
    grad: Tensor,
    /// Mean loss over the micro-batches (on the device).
    loss: Tensor,
    /// The loss scale the gradient carries.
    scale: f64,
    /// With prior preservation: the class samples' mean loss (unweighted).
    prior: Option<Tensor>,
}

/// What one training sample drew, on the CPU.
struct SampleDraws {
    /// A draw from the cached latent distribution, [1, C, h, w] (unscaled).
    latent: Tensor,
    text: Conditioning,
    /// SDXL's size numbers of this image, [1, 6]; they stay when the caption is dropped.
    time_ids: Option<Tensor>,
    drop_caption: bool,
    noise: Tensor,
    /// [1]
    timestep: Tensor,
    /// The run's sample index it was drawn for (a shuffled caption's order comes from it).
    global: u64,
}

impl SampleDraws {
    fn shallow_clone(&self) -> Self {
        SampleDraws {
            latent: self.latent.shallow_clone(),
            text: self.text.shallow_clone(),
            time_ids: self.time_ids.as_ref().map(Tensor::shallow_clone),
            drop_caption: self.drop_caption,
            noise: self.noise.shallow_clone(),
            timestep: self.timestep.shallow_clone(),
            global: self.global,
        }
    }
}

/// The random streams of a brand sample's draws (torch's, SplitMix64's).
const BRAND_STREAMS: (u64, u64) = (2, 3);

/// A micro-batch's loss (the one backpropagated) and, with prior
/// preservation, its class samples' loss (already in `loss`, weighted).
struct MicroLoss {
    loss: Tensor,
    prior: Option<Tensor>,
}

/// The index of the `position`-th sample of micro-batch `micro` among all
/// samples of the run (batches shorter than `batch_size` leave gaps).
pub fn global_sample_index(micro: u64, position: usize, batch_size: usize) -> u64 {
    micro * batch_size.max(1) as u64 + position as u64
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
    empty_caption: Conditioning,
    sync: Box<dyn GradientSync + 'a>,
    /// When the text encoders' LoRA trains: captions are encoded in the step.
    text_encoder: Option<TextEncoderTraining<'a>>,
    /// Prior preservation: a class sample beside each brand sample.
    prior: Option<Prior>,
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
        // Each concept's images as many times as its repeats say.
        let buckets: Vec<Vec<usize>> =
            with_repeats(&data.buckets(), |i| data.repeats(i)).into_iter().filter(|b| !b.is_empty()).collect();
        if buckets.is_empty() {
            bail!("the training cache holds no images; run `sdtune prepare DIR` first");
        }
        let empty_caption = data.empty_caption()?.to_device(device);
        // The trained tensors go to the checkpoints: their gradients pass through them.
        let trained = settings.gradient_checkpointing.then(|| optimizer.params().iter().map(Tensor::shallow_clone).collect());
        unet.set_gradient_checkpointing(trained);
        if device.is_cuda() {
            // Each convolution shape (few: one per bucket) picks its fastest algorithm once.
            tch::Cuda::cudnn_set_benchmark(true);
        } else {
            // The step's big activation buffers recur every step: keep them.
            crate::runtime::keep_freed_big_blocks();
        }
        let sync: Box<dyn GradientSync + 'a> = Box::new(SingleProcess);
        Ok(Trainer { unet, schedule, data, optimizer, scaler, settings, device, buckets, empty_caption, sync, text_encoder: None, prior: None })
    }

    /// Encodes each batch's captions through `text` in the step (its
    /// encoders carry a LoRA that trains) instead of reading cached embeddings.
    pub fn with_text_encoder(mut self, text: TextEncoderTraining<'a>) -> Self {
        self.text_encoder = Some(text);
        self
    }

    /// Adds DreamBooth's prior loss, times `weight`, over the data's class
    /// items (nothing changes when it has none, or at weight 0).
    pub fn with_prior(mut self, weight: f64) -> Self {
        self.prior = Prior::new(self.data.class_items(), weight);
        self
    }

    /// Whether the prior loss is on.
    pub fn prior(&self) -> Option<&Prior> {
        self.prior.as_ref()
    }

    /// Exchanges gradients through `sync` (data parallel) instead of
    /// training alone.
    pub fn with_sync(mut self, sync: Box<dyn GradientSync + 'a>) -> Self {
        self.sync = sync;
        self
    }

    /// The gradient exchange, for the run's other collective moments
    /// (barriers around the main process's writes, a stop decided together).
    pub fn sync(&mut self) -> &mut dyn GradientSync {
        &mut *self.sync
    }

    /// Micro-batches per optimizer step over all processes.
    fn parts(&self) -> usize {
        self.settings.grad_accum.max(1) * self.sync.world_size()
    }

    /// The `grad_accum x world` micro-batches of optimizer step `step`, in
    /// order, over all processes: epochs are recomputed from the seed, so
    /// this needs no saved state, and a step holds the same samples however
    /// many processes share it.
    fn step_batches(&self, step: u64) -> Vec<Vec<usize>> {
        let (batch, parts) = (self.settings.batch_size, self.parts());
        let per_epoch = micro_batches_per_epoch(&self.buckets, batch, parts) as u64;
        let first = step * parts as u64;
        let batches = epoch_micro_batches(&self.buckets, batch, parts, self.settings.seed, first / per_epoch);
        let at = (first % per_epoch) as usize;
        batches[at..at + parts].to_vec()
    }

    /// Which of the step's micro-batches this process computes: of its
    /// `grad_accum x world`, every `world`-th from its rank (all of them for
    /// a single process).
    fn own_parts(&self) -> Vec<usize> {
        let (rank, world) = (self.sync.rank(), self.sync.world_size());
        (0..self.settings.grad_accum).map(|k| k * world + rank).collect()
    }

    /// Optimizer step `step` (0-based): accumulate this process's
    /// gradients, average them over the processes, apply them.
    ///
    /// Nothing here waits for the device until the step's work is all
    /// queued: gradients come straight from autograd (no `.grad` to zero),
    /// finiteness, clipping and the skip of a non-finite step are decided on
    /// the device, and loss, gradient norm and finiteness come back together
    /// in one read at the end.
    pub fn step(&mut self, step: u64) -> Result<StepOutcome> {
        let mut acc = self.accumulate(step)?;
        match acc.prior.take() {
            // Both losses travel in one exchange.
            Some(prior) => {
                let mut losses = Tensor::stack(&[&acc.loss, &prior], 0);
                self.sync.average(&mut acc.grad, &mut losses)?;
                acc.loss = losses.get(0);
                acc.prior = Some(losses.get(1));
            }
            None => self.sync.average(&mut acc.grad, &mut acc.loss)?,
        }
        self.apply(step, acc)
    }

    /// The loss-scaled flat gradient and the loss of this process's
    /// micro-batches of `step`, each weighted by its share of the step's
    /// samples times the world size: summed over the processes and divided
    /// by the world size, they are the step's mean.
    fn accumulate(&mut self, step: u64) -> Result<Accumulated> {
        let own = self.own_parts();
        if own.is_empty() {
            bail!("grad_accum must be at least 1");
        }
        let batches = self.step_batches(step);
        let samples: usize = batches.iter().map(Vec::len).sum();
        let world = self.sync.world_size();
        let scale = self.scaler.factor();
        let mut loss_sum: Option<Tensor> = None;
        let mut prior_sum: Option<Tensor> = None;
        let mut grad: Option<Tensor> = None;
        for part in own {
            let batch = &batches[part];
            // A bucket's short last batch can leave a micro-batch empty.
            if batch.is_empty() {
                continue;
            }
            let weight = (batch.len() * world) as f64 / samples as f64;
            let index = step * batches.len() as u64 + part as u64;
            let MicroLoss { loss, prior } = self.micro_batch_loss(index, batch)?;
            if let Some(prior) = prior {
                let prior = prior.detach() * weight;
                prior_sum = Some(match prior_sum {
                    Some(sum) => sum + prior,
                    None => prior,
                });
            }
            let scaled = &loss * (scale * weight);
            let grads = Tensor::f_run_backward(&[&scaled], self.optimizer.params(), false, false)?;
            let flat = self.optimizer.flatten(&grads);
            grad = Some(match grad {
                Some(sum) => sum + flat,
                None => flat,
            });
            let loss = loss.detach() * weight;
            loss_sum = Some(match loss_sum {
                Some(sum) => sum + loss,
                None => loss,
            });
        }
        // A process with no samples this step still takes part in the exchange.
        let grad = grad.unwrap_or_else(|| self.optimizer.flat_zeros());
        let loss = loss_sum.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, self.device)));
        let prior = self.prior.as_ref().map(|_| prior_sum.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, self.device))));
        Ok(Accumulated { grad, loss, scale, prior })
    }

    /// Unscale, finite check, clip, optimizer step (skipped on the device
    /// when not finite), then the step's one read.
    fn apply(&mut self, step: u64, acc: Accumulated) -> Result<StepOutcome> {
        let s = &self.settings;
        let Accumulated { mut grad, loss, scale, prior } = acc;
        if scale != 1.0 {
            grad /= scale;
        }
        let finite = grad.isfinite().all();
        let lr = s.lr_schedule.lr(s.lr, step, s.total_steps);
        let norm = crate::train::optimizer::clip_grad_norm_on_device(&mut grad, s.clip_norm);
        self.optimizer.step_if(&grad, lr, Some(&finite));

        let mut facts = vec![loss.to_kind(Kind::Float), norm.to_kind(Kind::Float), finite.to_kind(Kind::Float)];
        facts.extend(prior.map(|p| p.to_kind(Kind::Float)));
        let facts = Vec::<f64>::try_from(&Tensor::stack(&facts, 0).to_kind(Kind::Double).to_device(Device::Cpu))?;
        let (loss, grad_norm, finite) = (facts[0], facts[1], facts[2] == 1.0);
        let prior_loss = facts.get(3).copied();
        let loss_scale = self.scaler.factor();
        let do_step = self.scaler.update(finite);
        if !finite {
            self.optimizer.unstep();
        }
        let grad_norm = if do_step { grad_norm } else { f64::NAN };
        Ok(StepOutcome { loss, grad_norm, lr, loss_scale, skipped: !do_step, prior_loss })
    }

    /// The mean (min-SNR weighted) loss of micro-batch `index`, in fp32,
    /// and with prior preservation the class samples' plain MSE, already
    /// added to the loss times the prior weight.
    fn micro_batch_loss(&self, index: u64, batch: &[usize]) -> Result<MicroLoss> {
        let s = &self.settings;
        let globals: Vec<u64> = (0..batch.len()).map(|position| global_sample_index(index, position, s.batch_size)).collect();
        let mut draws = Vec::with_capacity(batch.len() * 2);
        for (&global, &i) in globals.iter().zip(batch) {
            draws.push((i, self.sample_draws(global, i, BRAND_STREAMS)?));
        }
        // One class sample per brand sample, drawn from the same global index on streams of its own.
        if let Some(prior) = &self.prior {
            for &global in &globals {
                let c = prior.class_item(s.seed, global);
                draws.push((c, self.sample_draws(global, c, (super::prior::TORCH_STREAM, super::prior::RNG_STREAM))?));
            }
        }
        let (per_sample, timesteps) = self.per_sample_losses(draws)?;
        let brand = batch.len() as i64;
        let brand_loss = per_sample.narrow(0, 0, brand);
        let brand_timesteps = timesteps.narrow(0, 0, brand);
        // Everything the host computes is on the device before the UNet runs,
        // so no copy waits for the forward to finish.
        let weights = s.min_snr_gamma.map(|gamma| self.min_snr_weights(&brand_timesteps, gamma).to_device(self.device));
        let loss_weights: Vec<f64> = batch.iter().map(|&i| self.data.loss_weight(i)).collect();
        let brand_loss = weight_samples(brand_loss, &loss_weights);
        let weighted = match weights {
            Some(weights) => brand_loss * weights,
            None => brand_loss,
        };
        let loss = weighted.mean(Kind::Float);
        let Some(prior) = &self.prior else { return Ok(MicroLoss { loss, prior: None }) };
        // diffusers: the prior loss is the class samples' plain mean MSE (each reg set's loss weight kept).
        let class_weights: Vec<f64> = (0..batch.len()).map(|k| self.data.loss_weight(prior.class_item(s.seed, globals[k]))).collect();
        let class_loss = weight_samples(per_sample.narrow(0, brand, brand), &class_weights).mean(Kind::Float);
        Ok(MicroLoss { loss: loss + &class_loss * prior.weight, prior: Some(class_loss) })
    }

    /// Each drawn sample's unweighted MSE `[n]` and its timestep `[n]`, in
    /// the order given: samples of one latent shape go through the UNet
    /// together (all of them in one batch when they share it, as a batch
    /// without class samples always does).
    fn per_sample_losses(&self, draws: Vec<(usize, SampleDraws)>) -> Result<(Tensor, Tensor)> {
        let mut shapes: Vec<Vec<i64>> = Vec::new();
        for (_, d) in &draws {
            if !shapes.contains(&d.latent.size()) {
                shapes.push(d.latent.size());
            }
        }
        let timesteps = Tensor::cat(&draws.iter().map(|(_, d)| d.timestep.shallow_clone()).collect::<Vec<_>>(), 0);
        if shapes.len() == 1 {
            return Ok((self.forward_losses(&draws)?, timesteps));
        }
        let mut losses: Vec<Option<Tensor>> = draws.iter().map(|_| None).collect();
        for shape in &shapes {
            let members: Vec<usize> = (0..draws.len()).filter(|&k| &draws[k].1.latent.size() == shape).collect();
            let group: Vec<(usize, SampleDraws)> = members.iter().map(|&k| (draws[k].0, draws[k].1.shallow_clone())).collect();
            let group_losses = self.forward_losses(&group)?;
            for (j, &k) in members.iter().enumerate() {
                losses[k] = Some(group_losses.narrow(0, j as i64, 1));
            }
        }
        let losses: Vec<Tensor> = losses.into_iter().map(|l| l.expect("every sample has a shape group")).collect();
        Ok((Tensor::cat(&losses, 0), timesteps))
    }

    /// One UNet forward over `draws` (one latent shape): each sample's mean
    /// squared error against the prediction target, `[n]`, fp32.
    fn forward_losses(&self, draws: &[(usize, SampleDraws)]) -> Result<Tensor> {
        let s = &self.settings;
        let mut latents = Vec::with_capacity(draws.len());
        let mut texts = Vec::with_capacity(draws.len());
        let mut noises = Vec::with_capacity(draws.len());
        let mut timesteps = Vec::with_capacity(draws.len());
        let mut captions = Vec::with_capacity(draws.len());
        for (i, draws) in draws {
            captions.push((!draws.drop_caption).then_some(CaptionDraw { item: *i, global: draws.global }));
            latents.push(draws.latent.shallow_clone());
            let text = if draws.drop_caption { self.empty_caption.shallow_clone() } else { draws.text.to_device(self.device) };
            texts.push(Conditioning { time_ids: draws.time_ids.as_ref().map(|t| t.to_device(self.device)), ..text });
            noises.push(draws.noise.shallow_clone());
            timesteps.push(draws.timestep.shallow_clone());
        }
        let latents = (Tensor::cat(&latents, 0) * s.latent_scale).to_device(self.device);
        let context = Conditioning::cat(&texts)?;
        let context = match &self.text_encoder {
            Some(text) => Conditioning { time_ids: context.time_ids, ..text.encode(&captions)? },
            None => context,
        };
        let noise = Tensor::cat(&noises, 0).to_device(self.device);
        let timesteps = Tensor::cat(&timesteps, 0);

        let noisy = self.schedule.add_noise(&latents, &noise, &timesteps);
        let target = match self.schedule.prediction {
            Prediction::Epsilon => noise.shallow_clone(),
            Prediction::V => self.schedule.velocity(&latents, &noise, &timesteps),
            Prediction::Sample => latents.shallow_clone(),
        };
        let pred = self.unet.forward(&noisy, &timesteps.to_device(self.device), &context).to_kind(Kind::Float);
        Ok((pred - target).square().mean_dim(&[1i64, 2, 3][..], false, Kind::Float))
    }

    /// Every random draw of one training sample, from (seed, its global
    /// sample index) alone: which process draws it, or after how many
    /// restarts, does not change what it draws. On the CPU, in this order:
    /// flip, latent draw, caption dropout, noise, noise offset, timestep.
    /// `streams` are (torch's, SplitMix64's): [`BRAND_STREAMS`] for brand
    /// samples, prior preservation's own for class samples.
    fn sample_draws(&self, global: u64, item: usize, streams: (u64, u64)) -> Result<SampleDraws> {
        let s = &self.settings;
        tch::manual_seed(derive_seed(s.seed, streams.0, global) as i64);
        let mut rng = super::data::SplitMix64::new(derive_seed(s.seed, streams.1, global));
        let flip = self.data.has_flips() && rng.below(2) == 1;
        let sample = self.data.sample_for(item, flip, global)?;
        // A fresh draw from the cached distribution each time the image is seen.
        let mean = sample.latent_mean.to_kind(Kind::Float);
        let eps = Tensor::randn(mean.size(), (Kind::Float, Device::Cpu));
        let latent = (mean + sample.latent_std.to_kind(Kind::Float) * eps).unsqueeze(0);
        let drop_caption = s.caption_dropout > 0.0 && (rng.next_u64() as f64 / u64::MAX as f64) < s.caption_dropout;
        let shape = latent.size();
        let mut noise = Tensor::randn(&shape[..], (Kind::Float, Device::Cpu));
        if s.noise_offset > 0.0 {
            noise += Tensor::randn([1, shape[1], 1, 1], (Kind::Float, Device::Cpu)) * s.noise_offset;
        }
        let timestep = Tensor::randint(self.schedule.num_train_timesteps, [1], (Kind::Int64, Device::Cpu));
        let time_ids = self.time_ids(item, flip, &sample.text)?;
        Ok(SampleDraws { latent, text: sample.text, time_ids, drop_caption, noise, timestep, global })
    }

    /// The time ids of `item` as a [1, 6] tensor when the UNet takes them
    /// (SDXL), checking the cached caption brought the pooled embedding it
    /// also needs; `None` for UNets that take text states alone.
    fn time_ids(&self, item: usize, flip: bool, text: &Conditioning) -> Result<Option<Tensor>> {
        if self.unet.pooled_dim().is_none() {
            return Ok(None);
        }
        if text.pooled.is_none() || self.empty_caption.pooled.is_none() {
            bail!("the training cache holds no pooled text embeddings, which this SDXL UNet needs; run `sdtune prepare` again with this model");
        }
        let Some(ids) = self.data.time_ids(item, flip)? else {
            bail!("the training data gives no image sizes, which this SDXL UNet needs as time ids; run `sdtune prepare` again");
        };
        Ok(Some(Tensor::from_slice(&ids).unsqueeze(0)))
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
