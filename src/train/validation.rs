//! Validation: images held out of training (a `validation/` folder in the
//! data folder, or `validation_split` of the images), and their loss on
//! fixed draws: per image, a few timesteps spread over the schedule, each
//! with its own noise from (seed, image, timestep), the latent's mean and
//! the full caption. The same weights give the same value every time, so
//! the figure moves only when the LoRA does.
use std::collections::HashSet;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::data::{derive_seed, SplitMix64, TrainingData};
use super::data_view::DataView;
use crate::models::config::Prediction;
use crate::models::unet::UNet2DConditionModel;
use crate::schedulers::NoiseSchedule;

/// The folder (first path part, relative to the data folder) whose images
/// are held out of training.
pub const VALIDATION_FOLDER: &str = "validation";

/// Timesteps per held-out image, evenly spread over the schedule.
const TIMESTEPS_PER_IMAGE: i64 = 4;

/// The random stream of the validation draws (training uses 1..=3).
const STREAM: u64 = 11;

/// Which items are held out: every item under `validation/` when there is
/// any, else `split` of them (a fraction below 1, else a count) chosen
/// from the seed. `paths` are the items' paths relative to the data
/// folder; `candidates` the items training would otherwise use.
pub fn held_out(paths: &[String], candidates: &[usize], split: f64, seed: u64) -> Result<Vec<usize>> {
    let in_folder: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&i| paths[i].split(['/', '\\']).next() == Some(VALIDATION_FOLDER) && paths[i].contains(['/', '\\']))
        .collect();
    let held = if !in_folder.is_empty() {
        in_folder
    } else if split > 0.0 {
        let n = candidates.len();
        let count = if split < 1.0 { ((split * n as f64).round() as usize).max(1) } else { split as usize };
        if count >= n {
            bail!(
                "validation_split {split} holds out {count} of the {n} training images, leaving none to train on; lower it (0.1 or a count such as 2 is usual)"
            );
        }
        let mut order = candidates.to_vec();
        SplitMix64::new(derive_seed(seed, STREAM, u64::MAX)).shuffle(&mut order);
        let mut chosen = order[..count].to_vec();
        chosen.sort_unstable();
        chosen
    } else {
        Vec::new()
    };
    if !held.is_empty() && held.len() == candidates.len() {
        bail!("every training image is under {VALIDATION_FOLDER}/, which is held out for validation; keep some images outside it");
    }
    Ok(held)
}

/// Training's view of the data: the held-out items are left out of the buckets.
pub struct Training<'a> {
    pub data: &'a dyn TrainingData,
    pub held_out: HashSet<usize>,
}

impl DataView for Training<'_> {
    fn inner(&self) -> &dyn TrainingData {
        self.data
    }
    fn view_buckets(&self) -> Vec<Vec<usize>> {
        self.data.buckets().into_iter().map(|b| b.into_iter().filter(|i| !self.held_out.contains(i)).collect()).collect()
    }
}

/// The mean plain MSE (no min-SNR weighting) of the model as it is now
/// over the held-out `items` and fixed timesteps, on the given draws.
pub fn loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    data: &dyn TrainingData,
    items: &[usize],
    seed: u64,
    latent_scale: f64,
    device: Device,
) -> Result<f64> {
    if items.is_empty() {
        bail!("no images are held out for validation");
    }
    let span = schedule.num_train_timesteps;
    let mut total = 0.0;
    let mut count = 0usize;
    tch::no_grad(|| -> Result<()> {
        for (k, &item) in items.iter().enumerate() {
            let sample = data.sample(item, false)?;
            let latents = (sample.latent_mean.to_kind(Kind::Float).unsqueeze(0) * latent_scale).to_device(device);
            let mut text = sample.text.to_device(device);
            if unet.pooled_dim().is_some() {
                let Some(ids) = data.time_ids(item, false)? else {
                    bail!("the training data gives no image sizes, which this SDXL UNet needs as time ids; run `sdtune prepare` again");
                };
                text.time_ids = Some(Tensor::from_slice(&ids).unsqueeze(0).to_device(device));
            }
            for j in 0..TIMESTEPS_PER_IMAGE {
                // Centred in each of the equal parts of the schedule.
                let t = (2 * j + 1) * span / (2 * TIMESTEPS_PER_IMAGE);
                tch::manual_seed(derive_seed(seed, STREAM, (k as u64) * TIMESTEPS_PER_IMAGE as u64 + j as u64) as i64);
                let noise = Tensor::randn(latents.size(), (Kind::Float, Device::Cpu)).to_device(device);
                let timesteps = Tensor::from_slice(&[t]);
                let noisy = schedule.add_noise(&latents, &noise, &timesteps);
                let target = match schedule.prediction {
                    Prediction::Epsilon => noise.shallow_clone(),
                    Prediction::V => schedule.velocity(&latents, &noise, &timesteps),
                    Prediction::Sample => latents.shallow_clone(),
                };
                let pred = unet.forward(&noisy, &timesteps.to_device(device), &text).to_kind(Kind::Float);
                total += (pred - target).square().mean(Kind::Float).double_value(&[]);
                count += 1;
            }
        }
        Ok(())
    })?;
    Ok(total / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// A frozen tiny UNet, two cached-like images and a LoRA whose up
    /// weights are set: the same weights give the same loss, others another.
    #[test]
    fn the_same_weights_give_the_same_loss() {
        use super::super::data::TrainSample;
        use crate::models::conditioning::Conditioning;
        use crate::lora::network::{DownInit, LoraNetwork};
        use crate::lora::targets::Targets;
        use crate::models::config::{SchedulerConfig, UNetConfig};
        struct Two(Vec<Tensor>);
        impl TrainingData for Two {
            fn buckets(&self) -> Vec<Vec<usize>> {
                vec![vec![0, 1]]
            }
            fn sample(&self, i: usize, _flip: bool) -> Result<TrainSample> {
                let text = Conditioning::text_only(Tensor::ones([1, 77, 32], (Kind::Float, Device::Cpu)) * i as f64);
                Ok(TrainSample { latent_mean: self.0[i].shallow_clone(), latent_std: self.0[i].ones_like(), text })
            }
            fn has_flips(&self) -> bool {
                false
            }
            fn empty_caption(&self) -> Result<Conditioning> {
                self.sample(0, false).map(|s| s.text)
            }
        }
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
        let cfg = UNetConfig::from_file(&fixture.join("unet/config.json")).unwrap();
        let unet = crate::loaders::weights::build_and_load(&[fixture.join("unet/diffusion_pytorch_model.safetensors")], Device::Cpu, Kind::Float, |vb| {
            UNet2DConditionModel::new(vb, &cfg)
        })
        .unwrap();
        let schedule =
            NoiseSchedule::from_config(&SchedulerConfig::from_file(&fixture.join("scheduler/scheduler_config.json")).unwrap()).unwrap();
        tch::manual_seed(3);
        let data = Two((0..2).map(|_| Tensor::randn([4, 8, 8], (Kind::Float, Device::Cpu))).collect());
        let lora = LoraNetwork::inject(&unet.layers, Targets::CrossAttn, 2, 2.0, DownInit::KaimingUniform, Device::Cpu).unwrap();
        let run = || loss(&unet.model, &schedule, &data, &[0, 1], 5, 0.18215, Device::Cpu).unwrap();
        let before = run();
        assert_eq!(before, run(), "two evaluations of the same weights differ");
        tch::manual_seed(1234); // the evaluation must not depend on the generator's state
        assert_eq!(before, run());
        tch::no_grad(|| {
            for m in &lora.modules {
                let _ = m.up.shallow_clone().fill_(0.5);
            }
        });
        assert_ne!(before, run(), "changing the LoRA did not change the loss");
    }

    #[test]
    fn the_folder_wins_and_the_split_is_reproducible() {
        let p = paths(&["a.png", "validation/b.png", "c.png", "validationish.png"]);
        assert_eq!(held_out(&p, &[0, 1, 2, 3], 0.5, 1).unwrap(), [1]);
        let q = paths(&["a.png", "b.png", "c.png", "d.png", "e.png"]);
        let two = held_out(&q, &[0, 1, 2, 3, 4], 2.0, 9).unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(two, held_out(&q, &[0, 1, 2, 3, 4], 0.4, 9).unwrap(), "0.4 of 5 is 2, chosen alike");
        assert!(held_out(&q, &[0, 1, 2, 3, 4], 0.0, 9).unwrap().is_empty());
        let err = held_out(&q, &[0, 1, 2, 3, 4], 5.0, 9).unwrap_err().to_string();
        assert!(err.contains("leaving none to train on"), "{err}");
    }
}
