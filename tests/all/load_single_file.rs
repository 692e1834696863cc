//! Single-file checkpoints in the original LDM layout (SD1: OpenAI CLIP,
//! SD2: OpenCLIP with fused q/k/v and an unused last layer) load into the
//! same weights as the diffusers folders they came from, and sample the
//! same image.
//!
//! The files are rebuilt here from the tiny folders with sdtune's exporter;
//! every tensor is first checked against `tests/fixtures/single-file/*.json`,
//! written by `scripts/fixtures/make_single_file.py` after diffusers'
//! `from_single_file` loaded its own conversion back to the folder's exact
//! weights. So the file loaded below is the one diffusers accepted.
//!
//! `sdtune prepare` on a single file caches the latents and caption
//! embeddings the diffusers folder gives, and `sdtune train` runs on them.
use crate::model_support;

use std::collections::BTreeMap;

use model_support::*;
use sdtune::data::cache::CacheReader;
use sdtune::models::config::{ClipTextConfig, Prediction, UNetConfig, VaeConfig};
use sdtune::loaders::single_file::{
    detect, infer_text_config, infer_unet_config, infer_vae_config, HeadHints, Plan, PredictionSource, Shapes,
};
use sdtune::loaders::source::LoadOptions;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use sdtune::loaders::tensor_file::TensorFile;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

const MODELS: [&str; 2] = ["tiny-sd1", "tiny-sd2"];

#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<i64>,
    sha256: String,
}

#[derive(Deserialize)]
struct Manifest {
    tensors: BTreeMap<String, Entry>,
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Int64 => "int64",
        other => panic!("unexpected kind {other:?}"),
    }
}

fn sha256(t: &Tensor) -> String {
    let t = t.contiguous();
    let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut bytes, t.numel());
    format!("{:x}", Sha256::digest(&bytes))
}

#[test]
fn exported_files_are_the_ones_diffusers_accepted() {
    for name in MODELS {
        let text = std::fs::read_to_string(fixture(&format!("single-file/{name}.json"))).unwrap();
        let manifest: Manifest = serde_json::from_str(&text).unwrap();
        let exported: BTreeMap<String, Tensor> = export(name).into_iter().collect();
        let ours: Vec<&String> = exported.keys().collect();
        let theirs: Vec<&String> = manifest.tensors.keys().collect();
        assert_eq!(ours, theirs, "{name}: tensor names differ from the diffusers-checked file");
        for (tensor_name, entry) in &manifest.tensors {
            let t = &exported[tensor_name];
            assert_eq!(dtype_name(t.kind()), entry.dtype, "{name} {tensor_name}: dtype");
            assert_eq!(t.size(), entry.shape, "{name} {tensor_name}: shape");
            assert_eq!(sha256(t), entry.sha256, "{name} {tensor_name}: data");
        }
    }
}

#[test]
fn single_files_load_the_folder_weights_exactly() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    for name in MODELS {
        let path = write_single_file(dir.path(), name, name, None);
        // The tiny models have 8 norm groups and 4 text heads, which no
        // tensor shows: their configs sit beside the file.
        write_beside(dir.path(), name, name, &["unet", "vae", "text_encoder", "scheduler", "tokenizer"]);
        let ours = StableDiffusion::load(path.to_str().unwrap(), Placement::cpu_f32(), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e:#}"));
        let folder = load_folder(name);
        assert_same_weights("UNet", &ours.unet.vs, &folder.unet.vs, None);
        assert_same_weights("VAE", &ours.vae.vs, &folder.vae.vs, None);
        assert_same_weights("text encoder", &ours.text.first().model.vs, &folder.text.first().model.vs, None);
        assert_eq!(ours.scheduler.prediction_type, folder.scheduler.prediction_type);
        assert_eq!(ours.source.as_deref(), Some(path.as_path()));
    }
}

#[test]
fn sample_from_single_file_equals_the_folder_image() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    for name in MODELS {
        let path = write_single_file(dir.path(), name, name, None);
        write_beside(dir.path(), name, name, &["unet", "vae", "text_encoder", "scheduler", "tokenizer"]);
        let mut images = Vec::new();
        for (label, model) in [("file", path.clone()), ("folder", fixture(name))] {
            let out = dir.path().join(format!("{name}-{label}.png"));
            let res = run(sdtune(cache.path())
                .args(["sample", "--device", "cpu", "--prompt", "a red car by the sea", "--seed", "7"])
                .args(["--steps", "4", "--width", "64", "--height", "64", "--model"])
                .arg(&model)
                .arg("--out")
                .arg(&out));
            stdout_ok(&res);
            assert!(!String::from_utf8_lossy(&res.stderr).contains("warning"), "{name} {label}: unexpected warning");
            images.push(pixels(&out));
        }
        assert!(images[0] == images[1], "{name}: the single file's image differs from the folder's");
    }
}

#[test]
fn fp16_and_bf16_files_load_as_the_rounded_weights() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    for (name, kind) in [("tiny-sd1", Kind::Half), ("tiny-sd2", Kind::BFloat16)] {
        let stem = format!("{name}-{kind:?}");
        let path = write_single_file(dir.path(), name, &stem, Some(kind));
        write_beside(dir.path(), &stem, name, &["unet", "vae", "text_encoder", "scheduler", "tokenizer"]);
        let file = TensorFile::open(&path).unwrap();
        assert_eq!(file.kind("model.diffusion_model.input_blocks.0.0.weight").unwrap(), kind);
        let folder = load_folder(name);
        // Into fp32: every weight is the folder's, rounded to the file's dtype.
        let ours =
            StableDiffusion::load(path.to_str().unwrap(), Placement::cpu_f32(), &LoadOptions::default()).unwrap();
        assert_same_weights("UNet", &ours.unet.vs, &folder.unet.vs, Some(kind));
        assert_same_weights("VAE", &ours.vae.vs, &folder.vae.vs, Some(kind));
        assert_same_weights("text encoder", &ours.text.first().model.vs, &folder.text.first().model.vs, Some(kind));
        // Into the file's own dtype: the weights are stored in it.
        let placement = Placement { device: Device::Cpu, kind, vae_kind: Kind::Float };
        let half = StableDiffusion::load(path.to_str().unwrap(), placement, &LoadOptions::default()).unwrap();
        let w = &vars(&half.unet.vs)["conv_in.weight"];
        assert_eq!(w.kind(), kind);
        assert_eq!(vars(&half.vae.vs)["encoder.conv_in.weight"].kind(), Kind::Float);
    }
}

#[test]
fn full_files_with_an_ema_copy_load_the_main_weights() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let mut tensors = export("tiny-sd1");
    // kohya/CompVis full files: the EMA UNet under flattened names, plus counters.
    let ema: Vec<(String, Tensor)> = tensors
        .iter()
        .filter_map(|(n, t)| n.strip_prefix("model.diffusion_model.").map(|rest| (n, rest, t)))
        .map(|(_, rest, t)| (format!("model_ema.diffusion_model{}", rest.replace('.', "")), t.zeros_like()))
        .collect();
    assert!(ema.len() > 100);
    tensors.extend(ema);
    tensors.push(("model_ema.decay".into(), Tensor::from(0.9999f32)));
    tensors.push(("model_ema.num_updates".into(), Tensor::from(1000i32)));
    let path = write_file(dir.path(), "full.safetensors", &tensors, None);
    write_beside(dir.path(), "full", "tiny-sd1", &["unet", "vae", "text_encoder", "scheduler", "tokenizer"]);
    let ours = StableDiffusion::load(path.to_str().unwrap(), Placement::cpu_f32(), &LoadOptions::default()).unwrap();
    assert_same_weights("UNet", &ours.unet.vs, &load_folder("tiny-sd1").unet.vs, None);
}

#[test]
fn configs_read_from_the_tensors_match_the_folders() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    for name in MODELS {
        let path = write_single_file(dir.path(), name, name, None);
        let file = TensorFile::open(&path).unwrap();
        let shapes = Shapes::of(&file);
        let layout = detect(&path, &shapes).unwrap();
        assert_eq!(layout.family, family(name));
        let want_unet = UNetConfig::from_file(&fixture(name).join("unet/config.json")).unwrap();
        // What no tensor shows: SD1's 8 heads is SD's rule; the tiny SD2's
        // 8-wide heads would come from NAME.yaml (num_head_channels).
        let hints = match family(name) {
            sdtune::loaders::single_file::Family::Sd1 => HeadHints::default(),
            sdtune::loaders::single_file::Family::Sd2 => HeadHints { num_heads: None, num_head_channels: Some(8) },
            sdtune::loaders::single_file::Family::Sdxl => unreachable!("SDXL files are tested in sdxl_single_file.rs"),
        };
        let unet = infer_unet_config(&shapes, layout.family, hints).unwrap();
        assert_eq!(unet.block_out_channels, want_unet.block_out_channels);
        assert_eq!(unet.down_block_types, want_unet.down_block_types);
        assert_eq!(unet.up_block_types, want_unet.up_block_types);
        assert_eq!(unet.layers_per_block(), want_unet.layers_per_block());
        assert_eq!(unet.cross_attention_dims(), want_unet.cross_attention_dims());
        assert_eq!(unet.heads_per_block(), want_unet.heads_per_block());
        assert_eq!(unet.transformer_layers(), want_unet.transformer_layers());
        assert_eq!(unet.use_linear_projection, want_unet.use_linear_projection);
        assert_eq!(unet.upcast_attention, want_unet.upcast_attention);
        assert_eq!((unet.in_channels, unet.out_channels), (want_unet.in_channels, want_unet.out_channels));

        let want_vae = VaeConfig::from_file(&fixture(name).join("vae/config.json")).unwrap();
        let vae = infer_vae_config(&shapes, None, 64).unwrap();
        assert_eq!(vae.block_out_channels, want_vae.block_out_channels);
        assert_eq!(vae.layers_per_block, want_vae.layers_per_block);
        assert_eq!(vae.latent_channels, want_vae.latent_channels);

        let want_text = ClipTextConfig::from_file(&fixture(name).join("text_encoder/config.json")).unwrap();
        let text = infer_text_config(&shapes, &layout, Some(4)).unwrap();
        assert_eq!(
            (
                text.vocab_size,
                text.hidden_size,
                text.intermediate_size,
                text.num_hidden_layers,
                text.max_position_embeddings
            ),
            (
                want_text.vocab_size,
                want_text.hidden_size,
                want_text.intermediate_size,
                want_text.num_hidden_layers,
                want_text.max_position_embeddings
            ),
            "{name}: text encoder sizes (SD2 files hold one layer more than is used)"
        );
        assert_eq!(text.hidden_act, want_text.hidden_act);

        // Without a config beside it, the tiny model's heads (SD2) and 8 norm
        // groups cannot be read from the tensors: one sentence says where to put one.
        let err = format!("{:#}", Plan::new(&path, &file, None).expect_err("needs a config"));
        let what = if name == "tiny-sd1" { "norm groups" } else { "attention heads" };
        assert!(err.contains(what) && err.contains("beside"), "{err}");
    }
}

#[test]
fn prediction_type_comes_from_flag_config_yaml_or_a_warned_guess() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let path = write_single_file(dir.path(), "tiny-sd2", "sd2", None);
    write_beside(dir.path(), "sd2", "tiny-sd2", &["unet", "vae", "text_encoder"]);
    let file = TensorFile::open(&path).unwrap();

    // No scheduler config, no yaml, no metadata: SD2 is taken as v, with a warning.
    let plan = Plan::new(&path, &file, None).unwrap();
    assert_eq!(plan.scheduler.prediction().unwrap(), Prediction::V);
    assert_eq!(plan.prediction_source, PredictionSource::Guess);
    assert_eq!(plan.warnings.len(), 1);
    assert!(plan.warnings[0].contains("--prediction-type epsilon"), "{}", plan.warnings[0]);

    // The flag wins, silently.
    let plan = Plan::new(&path, &file, Some(Prediction::Epsilon)).unwrap();
    assert_eq!(plan.scheduler.prediction().unwrap(), Prediction::Epsilon);
    assert!(plan.warnings.is_empty());

    // A1111's convention: the LDM config named like the file.
    std::fs::write(
        dir.path().join("sd2.yaml"),
        "model:\n  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n    linear_end: 0.0120\n    unet_config:\n      params:\n        num_head_channels: 64\n",
    )
    .unwrap();
    let plan = Plan::new(&path, &file, None).unwrap();
    assert_eq!(plan.scheduler.prediction().unwrap(), Prediction::V);
    assert!(matches!(plan.prediction_source, PredictionSource::Config(ref p) if p.ends_with("sd2.yaml")));
    assert!(plan.warnings.is_empty());
    std::fs::write(dir.path().join("sd2.yaml"), "model:\n  params:\n    scale_factor: 0.18215\n").unwrap();
    assert_eq!(Plan::new(&path, &file, None).unwrap().scheduler.prediction().unwrap(), Prediction::Epsilon);
    std::fs::remove_file(dir.path().join("sd2.yaml")).unwrap();

    // A diffusers scheduler config beside it is used as is.
    write_beside(dir.path(), "sd2", "tiny-sd2", &["scheduler"]);
    let plan = Plan::new(&path, &file, None).unwrap();
    assert!(matches!(plan.prediction_source, PredictionSource::Config(_)));
    assert!(plan.warnings.is_empty());

    // SD1 files are epsilon without a word.
    let path = write_single_file(dir.path(), "tiny-sd1", "sd1", None);
    write_beside(dir.path(), "sd1", "tiny-sd1", &["unet", "vae", "text_encoder"]);
    let plan = Plan::new(&path, &TensorFile::open(&path).unwrap(), None).unwrap();
    assert_eq!(plan.scheduler.prediction().unwrap(), Prediction::Epsilon);
    assert!(plan.warnings.is_empty());
}

#[test]
fn guessed_prediction_warns_once_on_the_command_line() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let path = write_single_file(dir.path(), "tiny-sd2", "sd2", None);
    write_beside(dir.path(), "sd2", "tiny-sd2", &["unet", "vae", "text_encoder", "tokenizer"]);
    let out = dir.path().join("x.png");
    let res = run(sdtune(cache.path())
        .args([
            "sample", "--device", "cpu", "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64", "--model",
        ])
        .arg(&path)
        .arg("--out")
        .arg(&out));
    stdout_ok(&res);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(stderr.matches("warning:").count(), 1, "{stderr}");
    assert!(stderr.contains("v-prediction") && stderr.contains("--prediction-type epsilon"), "{stderr}");
    let res = run(sdtune(cache.path())
        .args(["sample", "--device", "cpu", "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64"])
        .args(["--prediction-type", "v", "--model"])
        .arg(&path)
        .arg("--out")
        .arg(&out));
    stdout_ok(&res);
    assert!(!String::from_utf8_lossy(&res.stderr).contains("warning"));
}

#[test]
fn broken_checkpoints_fail_in_one_sentence_naming_the_file() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let all = export("tiny-sd1");
    type Case<'a> = (&'a str, Vec<(String, Tensor)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no-vae",
            all.iter()
                .filter(|(n, _)| !n.starts_with("first_stage_model."))
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            "no VAE",
        ),
        (
            "no-text",
            all.iter()
                .filter(|(n, _)| !n.starts_with("cond_stage_model."))
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            "no text encoder",
        ),
        (
            "missing-tensor",
            all.iter()
                .filter(|(n, _)| n != "model.diffusion_model.input_blocks.1.1.proj_out.weight")
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            "has no tensor model.diffusion_model.input_blocks.1.1.proj_out.weight",
        ),
        (
            // SDXL base files load (tests/sdxl_single_file.rs); the refiner's one OpenCLIP encoder does not.
            "xl-refiner",
            vec![
                (
                    "model.diffusion_model.input_blocks.0.0.weight".into(),
                    Tensor::zeros([4, 4, 3, 3], (Kind::Float, Device::Cpu)),
                ),
                (
                    "conditioner.embedders.0.model.ln_final.weight".into(),
                    Tensor::zeros([4], (Kind::Float, Device::Cpu)),
                ),
            ],
            "Stable Diffusion XL refiner",
        ),
    ];
    for (stem, tensors, expected) in cases {
        let path = write_file(dir.path(), &format!("{stem}.safetensors"), &tensors, None);
        write_beside(dir.path(), stem, "tiny-sd1", &["unet", "vae", "text_encoder", "scheduler", "tokenizer"]);
        let res = run(sdtune(cache.path()).args(["sample", "--device", "cpu", "--prompt", "x", "--model"]).arg(&path));
        let line = one_line_error(&res);
        assert!(line.contains(&path.display().to_string()), "{stem}: {line}");
        assert!(line.contains(expected), "{stem}: {line}");
    }
}

/// Largest absolute difference of two tensors.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

#[test]
fn prepare_and_train_take_a_single_file() {
    const TOL: f64 = 1e-5;
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let hub = sdtune::scratch::ScratchDir::new().unwrap();
    let path = write_single_file(dir.path(), "tiny-sd1", "tiny-sd1", None);
    write_beside(dir.path(), "tiny-sd1", "tiny-sd1", &["unet", "vae", "text_encoder", "scheduler", "tokenizer"]);
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for (i, (w, h)) in [(64u32, 64u32), (80, 48)].into_iter().enumerate() {
        let i = i as u32;
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, (60 * i + x + y) as u8]));
        img.save(images.join(format!("mug{i}.png"))).unwrap();
        std::fs::write(images.join(format!("mug{i}.txt")), format!("a red acme mug on a desk, view {i}")).unwrap();
    }
    let mut caches = Vec::new();
    for (label, model) in [("file", path.clone()), ("folder", fixture("tiny-sd1"))] {
        let work = dir.path().join(label);
        std::fs::create_dir_all(&work).unwrap();
        let res = run(sdtune(hub.path())
            .current_dir(&work)
            .env("SDTUNE_CACHE_DIR", dir.path().join("sdtune-cache"))
            .arg("prepare")
            .arg(&images)
            .args(["--device", "cpu", "--resolution", "64", "--min-bucket", "32", "--max-bucket", "128"])
            .args(["--bucket-step", "16", "--min-side", "32", "--model"])
            .arg(&model));
        stdout_ok(&res);
        caches.push(CacheReader::open(&work).unwrap_or_else(|e| panic!("{label}: {e:#}")));
    }
    let (file, folder) = (&caches[0], &caches[1]);
    assert_eq!(file.dataset().model, path.display().to_string());
    assert_eq!(file.dataset().items.len(), 2);
    assert_eq!(file.dataset().scaling_factor, folder.dataset().scaling_factor);
    for item in &file.dataset().items {
        let twin = folder.dataset().items.iter().find(|i| i.path == item.path).expect("both cached the image");
        assert_eq!((item.bucket, item.crop), (twin.bucket, twin.crop), "{}", item.path);
        let (mean, std) = file.latent(&item.latent).unwrap();
        let (want_mean, want_std) = folder.latent(&twin.latent).unwrap();
        for (what, ours, theirs) in [("mean", &mean, &want_mean), ("std", &std, &want_std)] {
            let diff = max_diff(ours, theirs);
            eprintln!("{}: latent {what} max abs diff {diff:e}", item.path);
            assert!(diff <= TOL, "{}: latent {what} differs by {diff:e}", item.path);
        }
        let diff = max_diff(&file.text(&item.text).unwrap(), &folder.text(&twin.text).unwrap());
        eprintln!("{}: caption embedding max abs diff {diff:e}", item.path);
        assert!(diff <= TOL, "{}: caption embedding differs by {diff:e}", item.path);
    }

    // sdtune.yaml names the file; train loads it and uses the cache prepare wrote.
    let work = dir.path().join("file");
    let res = run(sdtune(hub.path())
        .current_dir(&work)
        .env("SDTUNE_CACHE_DIR", dir.path().join("sdtune-cache"))
        .args(["train", "--device", "cpu", "--steps", "2", "--sample-every", "0", "--rank", "4", "--alpha", "4"])
        .args(["--name", "mug"]));
    stdout_ok(&res);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!stderr.contains("warning"), "{stderr}");
    assert!(work.join("output/mug/mug.safetensors").is_file(), "train wrote no LoRA");

    // A file prepare cannot use: one sentence naming it.
    let no_vae: Vec<(String, Tensor)> =
        export("tiny-sd1").into_iter().filter(|(n, _)| !n.starts_with("first_stage_model.")).collect();
    let broken = write_file(dir.path(), "no-vae.safetensors", &no_vae, None);
    write_beside(dir.path(), "no-vae", "tiny-sd1", &["unet", "vae", "text_encoder", "scheduler", "tokenizer"]);
    let work = dir.path().join("broken");
    std::fs::create_dir_all(&work).unwrap();
    let res = run(sdtune(hub.path())
        .current_dir(&work)
        .arg("prepare")
        .arg(&images)
        .args(["--device", "cpu", "--model"])
        .arg(&broken));
    let line = one_line_error(&res);
    assert!(line.contains(&broken.display().to_string()) && line.contains("no VAE"), "{line}");
}
