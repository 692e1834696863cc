//! Several concepts in one run on the tiny SD1 fixture: kohya's `N_name`
//! folders and `data.concepts` prepare with their own captions and
//! repeats, a concept of broken files is named while the others train,
//! the epoch draws each concept images x repeats times, a concept's loss
//! weight scales its loss, and each concept gets its own consistency figures.
use crate::common;
use crate::prepare_support;

use prepare_support as support;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use image::{ImageFormat, Rgb, RgbImage};
use sdtune::data::cache::CacheReader;
use sdtune::lora::network::{DownInit, LoraNetwork};
use sdtune::lora::targets::Targets;
use sdtune::loaders::weights::build_and_load;
use sdtune::models::conditioning::Conditioning;
use sdtune::models::config::{SchedulerConfig, UNetConfig};
use sdtune::models::unet::UNet2DConditionModel;
use sdtune::schedulers::NoiseSchedule;
use sdtune::train::data::{epoch_batches, with_repeats, TrainSample, TrainingData};
use sdtune::train::lr::LrSchedule;
use sdtune::train::optimizer::{AdamW, AdamWConfig};
use sdtune::train::precision::LossScaler;
use sdtune::train::trainer::{StepSettings, Trainer};
use tch::{Device, Kind, Tensor};

/// A flat-coloured shape picture: `ground` everywhere, `shape` in a disc.
fn shape(path: &Path, ground: [u8; 3], shape: [u8; 3], n: u32) {
    let img = RgbImage::from_fn(64, 64, |x, y| {
        let (dx, dy) = (x as i64 - 20 - 4 * n as i64, y as i64 - 30);
        if dx * dx + dy * dy < 200 { Rgb(shape) } else { Rgb(ground) }
    });
    support::write(path, &support::encode(&image::DynamicImage::ImageRgb8(img), ImageFormat::Png));
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `sdtune.yaml` settings that keep the grids small: 2 seeds, 4 DDIM steps.
fn small_grids(work: &Path) {
    let path = work.join("sdtune.yaml");
    let mut config = sdtune::config::Config::load(&path).unwrap();
    config.sample.seeds = vec![1, 2];
    config.train.sample_steps = 4;
    config.save(&path).unwrap();
}

fn train(work: &Path) {
    support::run_ok(
        work,
        &args(&[
            "train", "--device", "cpu", "--steps", "2", "--sample-every", "2", "--save-every", "0", "--rank", "4", "--alpha", "4",
            "--lr", "1e-3", "--batch-size", "2", "--name", "c",
        ]),
    );
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The per-concept figures of the last grid, by concept name.
fn concept_figures(work: &Path) -> BTreeMap<String, (u64, f64)> {
    let figures = json(&work.join("output/c/samples/step-000002.consistency.json"));
    figures["concepts"]
        .as_array()
        .expect("the grid has per-concept figures")
        .iter()
        .map(|c| {
            let mean = c["variants"][0]["mean"].as_f64().unwrap();
            (c["concept"].as_str().unwrap().to_string(), (c["brand_images"].as_u64().unwrap(), mean))
        })
        .collect()
}

#[test]
fn a_kohya_tree_prepares_names_a_broken_concept_and_trains() {
    let _rng = crate::common::torch_rng();
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    let img = work.join("img");
    for n in 0..3 {
        shape(&img.join(format!("10_tidewave circle/c{n}.png")), [240, 230, 200], [20, 140, 140], n);
        shape(&img.join(format!("2_tidewave star/s{n}.png")), [30, 30, 90], [250, 120, 90], n);
    }
    support::write(&img.join("2_tidewave star/s0.txt"), b"tidewave star, a coral star on navy");
    support::write(&img.join("3_tidewave broken/b0.png"), b"\x89PNG\r\n\x1a\n broken");
    support::write(&img.join("3_tidewave broken/b1.jpg"), b"not a jpeg at all");
    support::write(&img.join("stray.png"), b"x");

    let mut flags = support::small_flags(Path::new("img"));
    flags.extend(args(&["--trigger", "tw"]));
    let stdout = support::run_ok(work, &flags);
    let broken_lines: Vec<&str> = stdout.lines().filter(|l| l.contains("concept \"tidewave broken\"")).collect();
    assert_eq!(broken_lines.len(), 1, "the broken concept is named in one line:\n{stdout}");
    assert!(broken_lines[0].contains("no usable image (2 files skipped") && broken_lines[0].contains("the other concepts train"), "{stdout}");
    assert!(stdout.contains("concepts") && stdout.contains("83.3%") && stdout.contains("16.7%"), "the table shows each share:\n{stdout}");

    let report = support::report(work);
    let rows: Vec<(String, u64, u64, u64)> = report["concepts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().into(), c["images"].as_u64().unwrap(), c["repeats"].as_u64().unwrap(), c["skipped"].as_u64().unwrap()))
        .collect();
    let expected: Vec<(String, u64, u64, u64)> = vec![
        ("tidewave circle".into(), 3, 10, 0),
        ("tidewave star".into(), 3, 2, 0),
        ("tidewave broken".into(), 0, 3, 2),
    ];
    assert_eq!(rows, expected);
    let skipped: Vec<&str> = report["skipped"].as_array().unwrap().iter().map(|s| s["path"].as_str().unwrap()).collect();
    assert!(skipped.contains(&"stray.png"), "a file outside the concept folders is reported: {skipped:?}");

    // Captions: the folder name when there is no .txt, the trigger applied.
    let manifest = json(&work.join(".sdtune/cache/manifest.json"));
    let items = manifest["dataset"]["items"].as_array().unwrap();
    let captions: BTreeMap<&str, &str> = items.iter().map(|i| (i["path"].as_str().unwrap(), i["caption"].as_str().unwrap())).collect();
    assert_eq!(captions["10_tidewave circle/c1.png"], "tw, tidewave circle");
    assert_eq!(captions["2_tidewave star/s0.png"], "tw, tidewave star, a coral star on navy");
    assert_eq!(captions["2_tidewave star/s2.png"], "tw, tidewave star");

    // Two epochs in the order training uses: each concept drawn images x repeats times per epoch.
    let cache = CacheReader::open(work).unwrap();
    let epoch = with_repeats(&cache.buckets(), |i| cache.repeats(i));
    let mut draws: BTreeMap<String, usize> = BTreeMap::new();
    for e in 0..2 {
        for batch in epoch_batches(&epoch, 2, 42, e) {
            for i in batch {
                *draws.entry(cache.concept_of(i).unwrap().name.clone()).or_default() += 1;
            }
        }
    }
    assert_eq!(draws, BTreeMap::from([("tidewave circle".to_string(), 60), ("tidewave star".to_string(), 12)]));
    drop(cache);

    small_grids(work);
    train(work);
    let figures = concept_figures(work);
    assert_eq!(figures.keys().collect::<Vec<_>>(), ["tidewave circle", "tidewave star"]);
    assert!(figures.values().all(|&(images, mean)| images == 3 && mean.is_finite() && mean > 0.0), "{figures:?}");
    let page = std::fs::read_to_string(work.join("output/c/report.html")).unwrap();
    assert!(page.contains("Consistency per concept") && page.contains("<b>tidewave star</b>"), "the report shows each concept");
}

#[test]
fn configured_concepts_caption_with_their_own_trigger_and_share_latents() {
    let _rng = crate::common::torch_rng();
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path().join("project");
    for n in 0..2 {
        shape(&work.join(format!("photos/roadster/r{n}.png")), [200, 30, 30], [250, 250, 250], n);
        support::write(&work.join(format!("photos/roadster/r{n}.txt")), b"a red car");
        shape(&tmp.path().join(format!("shared/logo/l{n}.png")), [20, 40, 200], [255, 220, 0], n);
    }
    // The same picture in both concepts: one latent, two captions.
    std::fs::copy(work.join("photos/roadster/r0.png"), tmp.path().join("shared/logo/same.png")).unwrap();
    let config = format!(
        "model: {}\ndata:\n  resolution: 64\n  min_bucket: 32\n  max_bucket: 128\n  bucket_step: 16\n  min_side: 32\n  concepts:\n    - path: photos/roadster\n      trigger: rdx\n      repeats: 3\n    - path: ../shared/logo\n      trigger: lgx\n      caption_template: a logo of [trigger]\n      loss_weight: 0.5\n",
        support::tiny_model().display()
    );
    std::fs::write(work.join("sdtune.yaml"), config).unwrap();

    let refused = support::run(&work, &args(&["prepare", "photos", "--device", "cpu"]));
    let stderr = support::text(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("data.concepts"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");

    support::run_ok(&work, &args(&["prepare", "--device", "cpu"]));
    let manifest = json(&work.join(".sdtune/cache/manifest.json"));
    let items = manifest["dataset"]["items"].as_array().unwrap();
    let by_path: BTreeMap<&str, &serde_json::Value> = items.iter().map(|i| (i["path"].as_str().unwrap(), i)).collect();
    assert_eq!(by_path["photos/roadster/r1.png"]["caption"], "rdx, a red car");
    assert_eq!(by_path["../shared/logo/l1.png"]["caption"], "a logo of lgx");
    let (car, logo) = (by_path["photos/roadster/r0.png"], by_path["../shared/logo/same.png"]);
    assert_eq!(logo["caption"], "a logo of lgx");
    assert_eq!(car["latent"], logo["latent"], "an image in two concepts is encoded once");
    assert_ne!(car["text"], logo["text"], "each concept's caption has its own embedding");
    assert_eq!(manifest["latents"].as_object().unwrap().len(), 4, "five items, four distinct images");
    let texts: Vec<&str> = manifest["texts"].as_object().unwrap().values().map(|t| t["caption"].as_str().unwrap()).collect();
    assert!(texts.contains(&"rdx, a red car") && texts.contains(&"a logo of lgx"), "{texts:?}");
    let concepts = manifest["dataset"]["concepts"].as_array().unwrap();
    assert_eq!((concepts[0]["repeats"].as_u64(), concepts[1]["loss_weight"].as_f64()), (Some(3), Some(0.5)));

    small_grids(&work);
    train(&work);
    let figures = concept_figures(&work);
    assert_eq!(figures.keys().collect::<Vec<_>>(), ["logo", "roadster"]);
    assert_eq!((figures["roadster"].0, figures["logo"].0), (2, 3), "each concept is measured against its own images");
    let settings = std::fs::read_to_string(work.join("output/c/settings.json")).unwrap();
    assert!(settings.contains("roadster (2 images x 3 repeats)") && settings.contains("loss weight 0.5"), "{settings}");
}

/// Four in-memory latents in one bucket whose loss weight is set by the test.
struct Weighted {
    means: Vec<Tensor>,
    texts: Vec<Tensor>,
    weight: f64,
}

impl TrainingData for Weighted {
    fn buckets(&self) -> Vec<Vec<usize>> {
        vec![vec![0, 1, 2, 3]]
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
    fn loss_weight(&self, _index: usize) -> f64 {
        self.weight
    }
}

#[test]
fn a_concepts_loss_weight_scales_its_loss() {
    let _rng = crate::common::torch_rng();
    let dir = common::fixtures().join("tiny-sd1");
    let cfg = UNetConfig::from_file(&dir.join("unet/config.json")).unwrap();
    let model = build_and_load(&[dir.join("unet/diffusion_pytorch_model.safetensors")], Device::Cpu, Kind::Float, |vb| {
        UNet2DConditionModel::new(vb, &cfg)
    })
    .unwrap();
    let schedule = NoiseSchedule::from_config(&SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json")).unwrap()).unwrap();
    let settings = StepSettings {
        batch_size: 2,
        grad_accum: 1,
        lr: 1e-3,
        lr_schedule: LrSchedule::Constant,
        total_steps: 1,
        seed: 3,
        noise_offset: 0.0,
        min_snr_gamma: Some(5.0),
        caption_dropout: 0.0,
        clip_norm: 1.0,
        latent_scale: 0.18215,
        gradient_checkpointing: false,
    };
    let first_loss = |weight: f64| {
        tch::manual_seed(11);
        let means = (0..4).map(|_| Tensor::randn([4, 8, 8], (Kind::Float, Device::Cpu))).collect();
        let texts = (0..4).map(|_| Tensor::randn([77, 32], (Kind::Float, Device::Cpu))).collect();
        let data = Weighted { means, texts, weight };
        tch::manual_seed(99);
        let lora = LoraNetwork::inject(&model.layers, Targets::CrossAttn, 4, 4.0, DownInit::KaimingUniform, Device::Cpu).unwrap();
        let optimizer = AdamW::new(lora.parameters(), AdamWConfig::default());
        let mut trainer =
            Trainer::new(&model.model, &schedule, &data, optimizer, LossScaler::disabled(), settings.clone(), Device::Cpu).unwrap();
        let loss = trainer.step(0).unwrap().loss;
        model.layers.for_each(|e| e.adapters.clear());
        loss
    };
    let (one, two) = (first_loss(1.0), first_loss(2.0));
    assert!(one > 0.0 && one.is_finite());
    assert_eq!(two, 2.0 * one, "a weight of 2 doubles the loss exactly (same draws)");
}
