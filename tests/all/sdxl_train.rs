//! Training on the tiny SDXL fixture: prepare (1024 px in kohya's buckets
//! by default, kohya's time ids), train and sample with the LoRA end to
//! end; resume after SIGKILL bit for bit; kohya files on SGM
//! block names that read back to the same layers and change the UNet as
//! diffusers' `load_lora_weights` does; the step gives the UNet each
//! sample's time ids, and a dropped caption's pooled embedding; `--full`
//! trains the whole UNet, its added embedding included.
use crate::common;
use crate::train_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use sdtune::data::cache::CacheReader;
use sdtune::loaders::tensor_file::TensorFile;
use sdtune::loaders::weights::build_and_load;
use sdtune::lora::format::{self, LoraFormat};
use sdtune::lora::network::{DownInit, LoraNetwork};
use sdtune::lora::targets::Targets;
use sdtune::lora::{self, LoraWeights};
use sdtune::models::conditioning::Conditioning;
use sdtune::models::config::{SchedulerConfig, UNetConfig};
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use sdtune::models::unet::UNet2DConditionModel;
use sdtune::sample::render;
use sdtune::schedulers::NoiseSchedule;
use sdtune::train::data::{TrainSample, TrainingData};
use sdtune::train::lr::LrSchedule;
use sdtune::train::optimizer::{AdamW, AdamWConfig};
use sdtune::train::precision::LossScaler;
use sdtune::train::trainer::{StepSettings, Trainer};
use tch::{Device, Kind, Tensor};
use train_support::{lora_tensors, prepared_with, run_dir, train, FAST};

fn tiny_sdxl() -> std::path::PathBuf {
    common::fixtures().join("tiny-sdxl")
}

fn model() -> StableDiffusion {
    StableDiffusion::from_diffusers_folder(&tiny_sdxl(), Placement::cpu_f32(), None).unwrap()
}

/// The tiny SDXL UNet on the inputs of reference/sdxl/unet.safetensors.
fn unet_out(m: &StableDiffusion) -> Tensor {
    let r = common::read_tensors(&common::reference("sdxl/unet.safetensors"));
    let cond = Conditioning {
        text: r["encoder_hidden_states"].shallow_clone(),
        pooled: Some(r["text_embeds"].shallow_clone()),
        time_ids: Some(r["time_ids"].shallow_clone()),
    };
    tch::no_grad(|| m.unet.model.forward(&r["sample"], &r["timestep"], &cond))
}

fn read_lora(m: &StableDiffusion, path: &std::path::Path) -> LoraWeights {
    format::read(path, &render::layers(m).unwrap()).unwrap_or_else(|e| panic!("{e:#}"))
}

fn fixture_lora(name: &str) -> std::path::PathBuf {
    common::fixtures().join("lora").join(format!("{name}.safetensors"))
}

#[test]
fn prepare_train_and_sample_with_the_lora() {
    let dir = prepared_with(&tiny_sdxl());
    {
        // kohya's time ids: 96x96 fills its square bucket; 128x64 in it sits 16 rows down.
        let cache = CacheReader::open(dir.path()).unwrap();
        for (i, item) in cache.dataset().items.iter().enumerate() {
            assert_eq!((item.bucket.width, item.bucket.height), (64, 64), "{}", item.path);
            let want = if item.width == 96 { [96.0, 96.0, 0.0, 0.0, 64.0, 64.0] } else { [64.0, 128.0, 16.0, 0.0, 64.0, 64.0] };
            assert_eq!(cache.item_time_ids(i, false).unwrap(), want, "{}", item.path);
        }
    }
    let out = train(dir.path(), &["--steps", "4", "--lr", "1e-2", "--name", "xl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file_path = run_dir(dir.path(), "xl").join("xl.safetensors");
    let file = TensorFile::open(&file_path).unwrap();
    let meta = file.string_metadata();
    assert_eq!(meta["ss_base_model_version"], "sdxl_base_v1-0");
    assert_eq!(meta["modelspec.architecture"], "stable-diffusion-xl-v1-base/lora");
    assert_eq!(meta["ss_v2"], "false");
    let names = file.names();
    let sgm = ["lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_"];
    assert!(names.iter().all(|n| sgm.iter().any(|p| n.starts_with(p))), "not SGM block names: {names:?}");
    for module in ["input_blocks_4_1", "input_blocks_8_1", "middle_block_1", "output_blocks_0_1", "output_blocks_5_1"] {
        let name = format!("lora_unet_{module}_transformer_blocks_0_attn2_to_q.lora_down.weight");
        assert!(names.contains(&name), "{name} missing");
    }

    let sample = |lora: Option<&std::path::Path>, out: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
        cmd.current_dir(dir.path()).args(["sample", "--device", "cpu", "--model"]).arg(tiny_sdxl());
        cmd.args(["--prompt", "an orange acme poster", "--seed", "3", "--steps", "3", "--width", "64", "--height", "64"]);
        if let Some(lora) = lora {
            cmd.arg("--lora").arg(lora);
        }
        let run = cmd.arg("--out").arg(dir.path().join(out)).output().unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        image::open(dir.path().join(out)).unwrap().to_rgb8()
    };
    let with = sample(Some(&file_path), "with.png");
    let without = sample(None, "without.png");
    assert_eq!(with.dimensions(), (64, 64));
    assert_ne!(with.as_raw(), without.as_raw(), "the trained LoRA changed nothing in the image");
}

#[test]
fn an_sdxl_model_prepares_at_1024_px_in_kohyas_buckets_by_default() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    std::fs::create_dir_all(dir.path().join("imgs")).unwrap();
    image::RgbImage::from_pixel(384, 256, image::Rgb([200, 100, 50])).save(dir.path().join("imgs/a.png")).unwrap();
    let out = train_support::sdtune(dir.path(), &["prepare", "imgs", "--device", "cpu", "--model"], Some(&tiny_sdxl()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = std::fs::read_to_string(dir.path().join("sdtune.yaml")).unwrap();
    assert!(yaml.contains("resolution: 1024"), "{yaml}");
    let cache = CacheReader::open(dir.path()).unwrap();
    assert_eq!(cache.dataset().resolution, 1024);
    let item = &cache.dataset().items[0];
    // 3:2 goes to kohya's 1024x704 (ratio 1.45); fitted inside it, 1024x682.67 sits 10 rows down.
    assert_eq!((item.bucket.width, item.bucket.height), (1024, 704));
    assert_eq!(cache.item_time_ids(0, false).unwrap(), [256.0, 384.0, 10.0, 0.0, 704.0, 1024.0]);
}

#[test]
fn a_killed_run_resumes_bit_identically() {
    let total = "6";
    let args = ["--steps", total, "--save-every", "3", "--name", "r"];
    let straight = prepared_with(&tiny_sdxl());
    let out = train(straight.path(), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = lora_tensors(&run_dir(straight.path(), "r").join("r.safetensors"));

    let killed = prepared_with(&tiny_sdxl());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .current_dir(killed.path())
        .args(FAST.iter().chain(&args))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = run_dir(killed.path(), "r").join("state/state-000003.safetensors");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !state.exists() {
        assert!(Instant::now() < deadline, "no save at step 3 within 300 s");
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    let resumed = train(killed.path(), &[&args[..], &["--resume"][..]].concat());
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let got = lora_tensors(&run_dir(killed.path(), "r").join("r.safetensors"));
    assert_eq!(want.len(), got.len());
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "LoRA tensor {name} differs between the straight and the resumed run");
    }
}

/// The effective weight change of each module, by diffusers layer.
fn deltas(weights: &LoraWeights) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        weights.modules.iter().map(|m| (m.layer.clone(), m.up.matmul(&m.down) * m.scale())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn kohya_files_read_back_to_the_layers_of_the_diffusers_file() {
    // The two fixtures come from one run (same seed), saved in each format.
    let m = model();
    let kohya = read_lora(&m, &fixture_lora("sdtune_sdxl_kohya"));
    let peft = read_lora(&m, &fixture_lora("sdtune_sdxl_diffusers"));
    let (kohya, peft) = (deltas(&kohya), deltas(&peft));
    assert_eq!(kohya.iter().map(|d| &d.0).collect::<Vec<_>>(), peft.iter().map(|d| &d.0).collect::<Vec<_>>());
    for ((layer, a), (_, b)) in kohya.iter().zip(&peft) {
        common::assert_close(layer, a, b, 1e-6);
    }

    // Written again in kohya layout, the names stay SGM's and read back the same.
    let weights = read_lora(&m, &fixture_lora("sdtune_sdxl_kohya"));
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let path = dir.path().join("again.safetensors");
    let names = render::layers(&m).unwrap().kohya;
    format::write(&path, &weights, LoraFormat::Kohya, &names, Default::default()).unwrap();
    let original = TensorFile::open(&fixture_lora("sdtune_sdxl_kohya")).unwrap().names();
    let mut again = TensorFile::open(&path).unwrap().names();
    let mut original = original;
    again.sort();
    original.sort();
    assert_eq!(again, original);
    for ((layer, a), (_, b)) in deltas(&read_lora(&m, &path)).iter().zip(&kohya) {
        common::assert_close(layer, a, b, 1e-6);
    }
}

#[test]
fn sdtune_files_change_the_unet_as_diffusers_load_lora_weights_does() {
    let r = common::read_tensors(&common::reference("sdxl/lora_from_sdtune.safetensors"));
    for name in ["sdtune_sdxl_kohya", "sdtune_sdxl_diffusers"] {
        let m = model();
        common::assert_close("base", &unet_out(&m), &r["base"], 1e-4);
        let weights = read_lora(&m, &fixture_lora(name));
        lora::attach(&weights, &render::layers(&m).unwrap(), 1.0, name).unwrap();
        let ours = unet_out(&m);
        common::assert_close(name, &ours, &r[name], 1e-4);
        let effect = common::max_abs_diff(&ours, &r["base"]);
        assert!(effect > 1e-2, "{name} barely changes the UNet ({effect}); the test would not discriminate");
    }
}

/// Two in-memory samples of one bucket with SDXL conditioning; the time ids
/// and the empty caption are the test's.
struct Sdxl {
    means: Vec<Tensor>,
    captions: Vec<Conditioning>,
    empty: Conditioning,
    time_ids: [f32; 6],
}

fn conditioning(seed: i64) -> Conditioning {
    tch::manual_seed(seed);
    let cpu = (Kind::Float, Device::Cpu);
    Conditioning { text: Tensor::randn([1, 77, 64], cpu), pooled: Some(Tensor::randn([1, 32], cpu) * 3.0), time_ids: None }
}

impl Sdxl {
    fn new(time_ids: [f32; 6]) -> Self {
        tch::manual_seed(5);
        let means = (0..2).map(|_| Tensor::randn([4, 8, 8], (Kind::Float, Device::Cpu)) * 3.0).collect();
        Sdxl { means, captions: vec![conditioning(1), conditioning(2)], empty: conditioning(3), time_ids }
    }
}

impl TrainingData for Sdxl {
    fn buckets(&self) -> Vec<Vec<usize>> {
        vec![vec![0, 1]]
    }
    fn sample(&self, i: usize, _flip: bool) -> Result<TrainSample> {
        Ok(TrainSample {
            latent_mean: self.means[i].shallow_clone(),
            latent_std: self.means[i].ones_like() * 0.01,
            text: self.captions[i].shallow_clone(),
        })
    }
    fn has_flips(&self) -> bool {
        false
    }
    fn empty_caption(&self) -> Result<Conditioning> {
        Ok(self.empty.shallow_clone())
    }
    fn time_ids(&self, _index: usize, _flip: bool) -> Result<Option<[f32; 6]>> {
        Ok(Some(self.time_ids))
    }
}

/// The first step's loss of a fresh LoRA (the base UNet's loss) on `data`.
fn first_loss(data: &Sdxl, caption_dropout: f64) -> f64 {
    let dir = tiny_sdxl().join("unet");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let unet = build_and_load(&[dir.join("diffusion_pytorch_model.safetensors")], Device::Cpu, Kind::Float, |vb| {
        UNet2DConditionModel::new(vb, &cfg)
    })
    .unwrap();
    tch::manual_seed(99);
    let lora = LoraNetwork::inject(&unet.layers, Targets::CrossAttn, 2, 2.0, DownInit::KaimingUniform, Device::Cpu).unwrap();
    let sched = SchedulerConfig::from_file(&tiny_sdxl().join("scheduler/scheduler_config.json")).unwrap();
    let sched = NoiseSchedule::from_config(&sched).unwrap();
    let settings = StepSettings {
        batch_size: 2,
        grad_accum: 1,
        lr: 1e-3,
        lr_schedule: LrSchedule::Constant,
        total_steps: 1,
        seed: 7,
        noise_offset: 0.0,
        min_snr_gamma: None,
        caption_dropout,
        clip_norm: 1.0,
        latent_scale: 0.13025,
        gradient_checkpointing: false,
    };
    let optimizer = AdamW::new(lora.parameters(), AdamWConfig::default());
    let mut trainer = Trainer::new(&unet.model, &sched, data, optimizer, LossScaler::disabled(), settings, Device::Cpu).unwrap();
    trainer.step(0).unwrap().loss
}

#[test]
fn the_step_gives_the_unet_time_ids_and_drops_captions_with_their_pooled_embedding() {
    let _rng = crate::common::torch_rng();
    let square = [64.0, 64.0, 0.0, 0.0, 64.0, 64.0];
    let base = first_loss(&Sdxl::new(square), 0.0);
    assert_eq!(base, first_loss(&Sdxl::new(square), 0.0), "the step is not reproducible");
    let moved = first_loss(&Sdxl::new([256.0, 128.0, 40.0, 0.0, 64.0, 64.0]), 0.0);
    assert_ne!(base, moved, "other time ids gave the same loss: the UNet did not get them");

    // Every caption dropped equals every caption being the empty one...
    let dropped = first_loss(&Sdxl::new(square), 1.0);
    let mut all_empty = Sdxl::new(square);
    all_empty.captions = vec![all_empty.empty.shallow_clone(), all_empty.empty.shallow_clone()];
    assert_eq!(dropped, first_loss(&all_empty, 0.0));
    // ...and the empty caption's pooled embedding is part of what is dropped to.
    let mut other_pooled = Sdxl::new(square);
    other_pooled.empty.pooled = Some(other_pooled.empty.pooled.as_ref().unwrap() * -1.0);
    assert_ne!(dropped, first_loss(&other_pooled, 1.0), "the dropped caption kept its own pooled embedding");
}

#[test]
fn full_training_writes_an_sdxl_unet_folder_with_its_added_embedding_trained() {
    let dir = prepared_with(&tiny_sdxl());
    let out = train(dir.path(), &["--full", "--steps", "2", "--lr", "1e-3", "--name", "whole"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let unet = run_dir(dir.path(), "whole").join("unet");
    let cfg = UNetConfig::from_file(&unet.join("config.json")).unwrap();
    assert!(cfg.takes_text_time(), "the written config lost SDXL's added embedding");
    let trained = common::read_tensors(&unet.join("diffusion_pytorch_model.safetensors"));
    let base = common::read_tensors(&tiny_sdxl().join("unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(trained.len(), base.len());
    for name in ["add_embedding.linear_1.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"] {
        assert!(!trained[name].equal(&base[name]), "{name} did not change");
    }
}

/// A kohya SDXL file with modules on both text encoders (kohya trains them
/// by default): `lora_te1_` reaches the first encoder, `lora_te2_` the
/// second, each changing only its own half of the joined states.
#[test]
fn kohya_files_with_both_text_encoders_reach_each_encoder() {
    let _rng = crate::common::torch_rng();
    let m = model();
    let layers = render::layers(&m).unwrap();
    let modules: Vec<lora::LoraModule> = [
        (lora::Component::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj"),
        (lora::Component::TextEncoder2, "text_model.encoder.layers.0.self_attn.q_proj"),
        (lora::Component::TextEncoder2, "text_model.encoder.layers.1.mlp.fc1"),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (component, layer))| {
        let out = if layer.ends_with("fc1") { 37 } else { 32 };
        tch::manual_seed(10 + i as i64);
        lora::LoraModule {
            component,
            layer: layer.into(),
            down: Tensor::randn([4, 32], (Kind::Float, Device::Cpu)) * 0.5,
            up: Tensor::randn([out, 4], (Kind::Float, Device::Cpu)) * 0.5,
            alpha: 4.0,
            dora_scale: None,
        }
    })
    .collect();
    let weights = LoraWeights { modules, ..Default::default() };
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let path = tmp.path().join("te.safetensors");
    format::write(&path, &weights, LoraFormat::Kohya, &layers.kohya, Default::default()).unwrap();
    let names = TensorFile::open(&path).unwrap().names();
    assert!(names.iter().any(|n| n.starts_with("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("lora_te2_text_model_encoder_layers_1_mlp_fc1")), "{names:?}");

    let before = m.text.encode(&["a red car"], 0).unwrap().conditioning;
    let read = read_lora(&m, &path);
    assert_eq!(read.modules.iter().filter(|m| m.component == lora::Component::TextEncoder2).count(), 2);
    lora::attach(&read, &layers, 1.0, "te.safetensors").unwrap();
    let after = m.text.encode(&["a red car"], 0).unwrap().conditioning;
    let half = |t: &Tensor, i: i64| t.narrow(-1, 32 * i, 32);
    for i in 0..2 {
        let moved = common::max_abs_diff(&half(&before.text, i), &half(&after.text, i));
        assert!(moved > 1e-3, "encoder {} states unchanged by its LoRA modules", i + 1);
    }
    let pooled = common::max_abs_diff(before.pooled.as_ref().unwrap(), after.pooled.as_ref().unwrap());
    assert!(pooled > 1e-3, "the second encoder's pooled embedding unchanged");

    // The same modules in diffusers' layout read back to the same layers.
    let peft = tmp.path().join("te-peft.safetensors");
    format::write(&peft, &weights, LoraFormat::Peft, &layers.kohya, Default::default()).unwrap();
    let names = TensorFile::open(&peft).unwrap().names();
    assert!(names.iter().any(|n| n.starts_with("text_encoder_2.text_model.encoder.layers.1.mlp.fc1")), "{names:?}");
    let back = read_lora(&m, &peft);
    let mut got: Vec<(lora::Component, String)> = back.modules.iter().map(|m| (m.component, m.layer.clone())).collect();
    got.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    assert_eq!(got.len(), 3, "{got:?}");
}
