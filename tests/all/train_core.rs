//! The training step on the tiny SD1 fixture with in-memory data: it
//! learns, touches only LoRA tensors, resumes bit for bit, and bf16 lands
//! near fp32.
use crate::common;

use anyhow::Result;
use sdtune::lora::network::{DownInit, LoraNetwork};
use sdtune::lora::targets::Targets;
use sdtune::models::conditioning::Conditioning;
use sdtune::models::config::{SchedulerConfig, UNetConfig};
use sdtune::loaders::weights::build_and_load;
use sdtune::models::built::Built;
use sdtune::models::unet::UNet2DConditionModel;
use sdtune::schedulers::NoiseSchedule;
use sdtune::train::checkpoint::{self, Identity};
use sdtune::train::data::{TrainSample, TrainingData};
use sdtune::train::lr::LrSchedule;
use sdtune::train::optimizer::{AdamW, AdamWConfig};
use sdtune::train::precision::LossScaler;
use sdtune::train::trainer::{StepSettings, Trainer};
use tch::{Device, Kind, Tensor};

/// The trainer draws from torch's global generator; tests that train must
/// not run beside any other test that draws, or they would steal each
/// other's draws.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    crate::common::torch_rng()
}

/// Four "images" in two buckets, each with its own caption embedding.
struct Toy {
    means: Vec<Tensor>,
    texts: Vec<Tensor>,
}

impl Toy {
    fn new() -> Self {
        tch::manual_seed(1234);
        let means = (0..4).map(|i| {
            let (h, w) = if i < 2 { (8, 8) } else { (8, 16) };
            Tensor::randn([4, h, w], (Kind::Float, Device::Cpu)) * 3.0
        }).collect();
        let texts = (0..4).map(|_| Tensor::randn([77, 32], (Kind::Float, Device::Cpu))).collect();
        Toy { means, texts }
    }
}

impl TrainingData for Toy {
    fn buckets(&self) -> Vec<Vec<usize>> {
        vec![vec![0, 1], vec![2, 3]]
    }
    fn sample(&self, i: usize, _flip: bool) -> Result<TrainSample> {
        Ok(TrainSample {
            latent_mean: self.means[i].shallow_clone(),
            latent_std: self.means[i].ones_like() * 0.01,
            text: Conditioning::text_only(self.texts[i].unsqueeze(0)),
        })
    }
    fn has_flips(&self) -> bool {
        false
    }
    fn empty_caption(&self) -> Result<Conditioning> {
        Ok(Conditioning::text_only(Tensor::zeros([1, 77, 32], (Kind::Float, Device::Cpu))))
    }
}

fn unet(kind: Kind) -> Built<UNet2DConditionModel> {
    let dir = common::fixtures().join("tiny-sd1/unet");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    build_and_load(&[dir.join("diffusion_pytorch_model.safetensors")], Device::Cpu, kind, |vb| {
        UNet2DConditionModel::new(vb, &cfg)
    })
    .unwrap()
}

fn schedule() -> NoiseSchedule {
    let cfg = SchedulerConfig::from_file(&common::fixtures().join("tiny-sd1/scheduler/scheduler_config.json")).unwrap();
    NoiseSchedule::from_config(&cfg).unwrap()
}

fn settings(total: u64) -> StepSettings {
    StepSettings {
        batch_size: 2,
        grad_accum: 1,
        lr: 1e-2,
        lr_schedule: LrSchedule::Constant,
        total_steps: total,
        seed: 7,
        noise_offset: 0.0,
        min_snr_gamma: Some(5.0),
        caption_dropout: 0.1,
        clip_norm: 1.0,
        latent_scale: 0.18215,
        gradient_checkpointing: false,
    }
}

fn lora_for(model: &Built<UNet2DConditionModel>) -> LoraNetwork {
    tch::manual_seed(99);
    LoraNetwork::inject(&model.layers, Targets::CrossAttn, 4, 4.0, DownInit::KaimingUniform, Device::Cpu).unwrap()
}

/// Runs steps `from..to`; returns the losses.
fn run(trainer: &mut Trainer, from: u64, to: u64) -> Vec<f64> {
    (from..to).map(|s| trainer.step(s).unwrap().loss).collect()
}

fn lora_tensors(lora: &LoraNetwork) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = lora.vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn it_learns_and_only_lora_changes() {
    let _serial = serial();
    let model = unet(Kind::Float);
    let frozen_before: Vec<(String, Tensor)> =
        model.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let lora = lora_for(&model);
    let sched = schedule();
    let data = Toy::new();
    let total = 150;
    let mut trainer = Trainer::new(&model.model, &sched, &data, AdamW::new(lora.parameters(), AdamWConfig::default()), LossScaler::disabled(), settings(total), Device::Cpu).unwrap();
    let losses = run(&mut trainer, 0, total);
    let fifth = losses.len() / 5;
    let first: f64 = losses[..fifth].iter().sum::<f64>() / fifth as f64;
    let last: f64 = losses[losses.len() - fifth..].iter().sum::<f64>() / fifth as f64;
    eprintln!("mean loss first 20%: {first:.4}, last 20%: {last:.4}");
    assert!(last < 0.8 * first, "loss did not fall clearly: {first} -> {last}");

    let after = model.vs.variables();
    for (name, before) in &frozen_before {
        assert!(before.equal(&after[name]), "frozen weight {name} changed");
    }
    let up_norm: f64 = lora.modules.iter().map(|m| m.up.norm().double_value(&[])).sum();
    assert!(up_norm > 0.0, "LoRA up-projections never moved");
}

#[test]
fn resume_is_bit_identical() {
    let _serial = serial();
    let sched = schedule();
    let data = Toy::new();
    let n = 6;
    let identity = Identity(vec![("rank".into(), "4".into())]);

    let straight = {
        let model = unet(Kind::Float);
        let lora = lora_for(&model);
        let mut t = Trainer::new(&model.model, &sched, &data, AdamW::new(lora.parameters(), AdamWConfig::default()), LossScaler::disabled(), settings(2 * n), Device::Cpu).unwrap();
        run(&mut t, 0, 2 * n);
        lora_tensors(&lora).into_iter().map(|(k, v)| (k, v.copy())).collect::<Vec<_>>()
    };

    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    {
        let model = unet(Kind::Float);
        let lora = lora_for(&model);
        let mut t = Trainer::new(&model.model, &sched, &data, AdamW::new(lora.parameters(), AdamWConfig::default()), LossScaler::disabled(), settings(2 * n), Device::Cpu).unwrap();
        run(&mut t, 0, n);
        checkpoint::save(dir.path(), n, &lora, &t.optimizer, &t.scaler, &identity, 2).unwrap();
    }
    let model = unet(Kind::Float);
    // A different init seed: everything must come from the saved state.
    tch::manual_seed(4321);
    let lora = LoraNetwork::inject(&model.layers, Targets::CrossAttn, 4, 4.0, DownInit::KaimingUniform, Device::Cpu).unwrap();
    let mut opt = AdamW::new(lora.parameters(), AdamWConfig::default());
    let path = checkpoint::latest(dir.path()).unwrap().unwrap();
    let saved = checkpoint::load(&path, &lora, &mut opt, &identity).unwrap();
    assert_eq!(saved.step, n);
    let mut t = Trainer::new(&model.model, &sched, &data, opt, saved.scaler, settings(2 * n), Device::Cpu).unwrap();
    run(&mut t, n, 2 * n);
    for ((name, want), (_, got)) in straight.iter().zip(lora_tensors(&lora)) {
        assert!(want.equal(&got), "LoRA tensor {name} differs after resume");
    }

    let other = Identity(vec![("rank".into(), "8".into())]);
    let err = checkpoint::load(&path, &lora, &mut AdamW::new(lora.parameters(), AdamWConfig::default()), &other).unwrap_err();
    assert!(format!("{err:#}").contains("rank"), "{err:#}");
}

#[test]
fn bf16_training_lands_near_fp32() {
    let _serial = serial();
    let sched = schedule();
    let data = Toy::new();
    let total = 80;
    let final_loss = |kind: Kind| {
        let model = unet(kind);
        let lora = lora_for(&model);
        let mut t = Trainer::new(&model.model, &sched, &data, AdamW::new(lora.parameters(), AdamWConfig::default()), LossScaler::disabled(), settings(total), Device::Cpu).unwrap();
        let losses = run(&mut t, 0, total);
        // The last 20% averaged: single-step losses are noisy by design.
        let tail = &losses[losses.len() - total as usize / 5..];
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    let fp32 = final_loss(Kind::Float);
    let bf16 = final_loss(Kind::BFloat16);
    eprintln!("final loss fp32 {fp32:.5}, bf16 {bf16:.5}");
    assert!((bf16 - fp32).abs() / fp32 < 0.05, "bf16 {bf16} vs fp32 {fp32}");
}


/// One side of a two-process job run one after the other: rank 1 hands its
/// gradient over, rank 0 averages it with its own, as an all-reduce would.
struct TwoProcesses {
    rank: usize,
    handed_over: std::rc::Rc<std::cell::RefCell<Option<(Tensor, Tensor)>>>,
}

impl sdtune::train::sync::GradientSync for TwoProcesses {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        2
    }
    fn average(&mut self, grad: &mut Tensor, loss: &mut Tensor) -> Result<()> {
        let mut slot = self.handed_over.borrow_mut();
        match slot.take() {
            None => *slot = Some((grad.copy(), loss.copy())),
            Some((other_grad, other_loss)) => {
                *grad = (&*grad + other_grad) / 2.0;
                *loss = (&*loss + other_loss) / 2.0;
            }
        }
        Ok(())
    }
}

#[test]
fn a_step_split_over_two_processes_equals_one_process_accumulating_it() {
    let _serial = serial();
    let sched = schedule();
    let data = Toy::new();
    let accumulated = StepSettings { batch_size: 1, grad_accum: 2, ..settings(1) };
    let split = StepSettings { batch_size: 1, grad_accum: 1, ..settings(1) };

    let alone_model = unet(Kind::Float);
    let alone = lora_for(&alone_model);
    let opt = AdamW::new(alone.parameters(), AdamWConfig::default());
    let mut t = Trainer::new(&alone_model.model, &sched, &data, opt, LossScaler::disabled(), accumulated, Device::Cpu).unwrap();
    let alone_loss = t.step(0).unwrap().loss;

    let handed_over = std::rc::Rc::new(std::cell::RefCell::new(None));
    let mut outcome = None;
    for rank in [1, 0] {
        let model = unet(Kind::Float);
        let lora = lora_for(&model);
        let opt = AdamW::new(lora.parameters(), AdamWConfig::default());
        let sync = Box::new(TwoProcesses { rank, handed_over: handed_over.clone() });
        let mut t = Trainer::new(&model.model, &sched, &data, opt, LossScaler::disabled(), split.clone(), Device::Cpu)
            .unwrap()
            .with_sync(sync);
        let o = t.step(0).unwrap();
        if rank == 0 {
            outcome = Some((o.loss, lora_tensors(&lora)));
        }
    }
    let (split_loss, split_weights) = outcome.unwrap();
    assert_eq!(split_loss, alone_loss, "the mean loss of the step");
    for ((name, a), (_, b)) in lora_tensors(&alone).iter().zip(&split_weights) {
        assert!(a.equal(b), "{name}: rank 0 after the averaged step differs from one process accumulating both micro-batches");
    }
}
