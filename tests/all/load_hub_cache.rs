//! `--model org/name` resolves in the local Hugging Face cache (built here
//! as huggingface_hub lays it out: `refs/main`, `snapshots/<hash>/` linking
//! into `blobs/`), offline; a missing id fails in one sentence naming the
//! cache folder and how to fetch it. Also diffusers folders with `fp16`
//! variants and sharded weights, and a single file's tokenizer from the cache.
use crate::model_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use model_support::*;
use sdtune::loaders::hub::{cache_dir_from, cached_snapshot, HubId};
use sdtune::loaders::source::LoadOptions;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use sdtune::loaders::tensor_file::{write_tensors, TensorFile};
use tch::Kind;

fn sample(cmd: &mut std::process::Command, model: &str, out: &Path, extra: &[&str]) -> Vec<u8> {
    let res = run(cmd
        .args(["sample", "--device", "cpu", "--prompt", "a blue mug", "--seed", "3", "--steps", "3"])
        .args(extra)
        .args(["--width", "64", "--height", "64", "--model", model])
        .arg("--out")
        .arg(out));
    stdout_ok(&res);
    pixels(out)
}

#[test]
fn hub_id_resolves_in_the_cache_offline_and_samples_like_the_folder() {
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let out = sdtune::scratch::ScratchDir::new().unwrap();
    fake_hub_repo(cache.path(), "acme/tiny-sd1", &fixture("tiny-sd1"), &|_| {});
    let from_id = sample(&mut sdtune(cache.path()), "acme/tiny-sd1", &out.path().join("id.png"), &[]);
    let empty = sdtune::scratch::ScratchDir::new().unwrap();
    let from_folder =
        sample(&mut sdtune(empty.path()), fixture("tiny-sd1").to_str().unwrap(), &out.path().join("folder.png"), &[]);
    assert!(from_id == from_folder, "the hub id's image differs from the folder's");

    // The repository folder itself also works as --model.
    let repo = cache.path().join("models--acme--tiny-sd1");
    let info = stdout_ok(&run(sdtune(empty.path()).arg("info").arg(&repo)));
    assert!(info.contains("diffusers folder"), "{info}");
}

#[test]
fn cache_location_follows_hf_home_and_home() {
    let home = sdtune::scratch::ScratchDir::new().unwrap();
    // HF_HOME/hub
    fake_hub_repo(&home.path().join("hf/hub"), "acme/tiny-sd2", &fixture("tiny-sd2"), &|_| {});
    let mut cmd = sdtune(Path::new("/unused"));
    cmd.env_remove("HF_HUB_CACHE").env("HF_HOME", home.path().join("hf"));
    let info = stdout_ok(&run(cmd.args(["info", "acme/tiny-sd2"])));
    assert!(info.contains("hub id       acme/tiny-sd2") && info.contains("v_prediction"), "{info}");
    // ~/.cache/huggingface/hub
    fake_hub_repo(&home.path().join(".cache/huggingface/hub"), "acme/tiny-sd1", &fixture("tiny-sd1"), &|_| {});
    let mut cmd = sdtune(Path::new("/unused"));
    cmd.env_remove("HF_HUB_CACHE").env("HOME", home.path());
    let info = stdout_ok(&run(cmd.args(["info", "acme/tiny-sd1"])));
    assert!(info.contains("Stable Diffusion 1.x"), "{info}");

    let env = |k: &str| (k == "HF_HUB_CACHE").then(|| "/x".to_string());
    assert_eq!(cache_dir_from(&env), PathBuf::from("/x"));
}

#[test]
fn missing_id_offline_says_where_it_looked_and_how_to_fetch_it() {
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    for args in [vec!["info", "acme/not-there"], vec!["sample", "--prompt", "x", "--model", "acme/not-there"]] {
        let line = one_line_error(&run(sdtune(cache.path()).args(&args)));
        let folder = cache.path().join("models--acme--not-there");
        assert!(line.contains(&folder.display().to_string()), "{line}");
        assert!(line.contains("huggingface-cli download acme/not-there"), "{line}");
        let why = if args[0] == "info" { "reads only the local cache" } else { "HF_HUB_OFFLINE is set" };
        assert!(line.contains(why), "{line}");
    }
    // A revision that is not cached is missing too.
    fake_hub_repo(cache.path(), "acme/tiny-sd1", &fixture("tiny-sd1"), &|_| {});
    assert!(cached_snapshot(cache.path(), &HubId::parse("acme/tiny-sd1").unwrap()).is_some());
    let line = one_line_error(&run(sdtune(cache.path()).args(["info", "acme/tiny-sd1@v2"])));
    assert!(line.contains("--revision v2"), "{line}");
}

/// A snapshot laid out like `from_pretrained(..., variant="fp16")` saves it:
/// only `*.fp16.safetensors` weights, the text encoder in two shards.
fn fp16_sharded(files: &mut BTreeMap<String, PathBuf>, scratch: &Path) {
    let half = |rel: &str, new_rel: &str, files: &mut BTreeMap<String, PathBuf>| {
        let src = files.remove(rel).unwrap();
        let file = TensorFile::open(&src).unwrap();
        let tensors: Vec<(String, tch::Tensor)> =
            file.names().into_iter().map(|n| (n.clone(), file.tensor(&n).unwrap().to_kind(Kind::Half))).collect();
        let dst = scratch.join(new_rel.replace('/', "_"));
        write_tensors(&dst, &tensors, None).unwrap();
        files.insert(new_rel.to_string(), dst);
    };
    half("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors", files);
    half("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors", files);
    // Text encoder: two fp16 shards and diffusers'/transformers' variant index name.
    let src = files.remove("text_encoder/model.safetensors").unwrap();
    let file = TensorFile::open(&src).unwrap();
    let names = file.names();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let shard = format!("model.fp16-0000{}-of-00002.safetensors", i + 1);
        let tensors: Vec<(String, tch::Tensor)> =
            part.iter().map(|n| (n.clone(), file.tensor(n).unwrap().to_kind(Kind::Half))).collect();
        let dst = scratch.join(&shard);
        write_tensors(&dst, &tensors, None).unwrap();
        files.insert(format!("text_encoder/{shard}"), dst);
        for n in part.iter() {
            weight_map.insert(n.clone(), serde_json::Value::String(shard.clone()));
        }
    }
    let index = scratch.join("index.json");
    std::fs::write(&index, serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string()).unwrap();
    files.insert("text_encoder/model.safetensors.index.fp16.json".into(), index);
}

#[test]
fn fp16_variant_and_sharded_weights_load() {
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let scratch = sdtune::scratch::ScratchDir::new().unwrap();
    let scratch_path = scratch.path().to_path_buf();
    let snapshot = fake_hub_repo(cache.path(), "acme/tiny-fp16", &fixture("tiny-sd1"), &|files| {
        fp16_sharded(files, &scratch_path)
    });
    let folder = load_folder("tiny-sd1");
    // --variant fp16, and without it (the folder holds only that variant).
    for variant in [Some("fp16".to_string()), None] {
        let opts = LoadOptions { variant: variant.clone(), prediction_type: None, vae: None };
        let ours = StableDiffusion::load(snapshot.to_str().unwrap(), Placement::cpu_f32(), &opts)
            .unwrap_or_else(|e| panic!("{variant:?}: {e:#}"));
        assert_same_weights("UNet", &ours.unet.vs, &folder.unet.vs, Some(Kind::Half));
        assert_same_weights("VAE", &ours.vae.vs, &folder.vae.vs, Some(Kind::Half));
        assert_same_weights("text encoder", &ours.text.first().model.vs, &folder.text.first().model.vs, Some(Kind::Half));
    }
    let out = sdtune::scratch::ScratchDir::new().unwrap();
    let image = sample(&mut sdtune(cache.path()), "acme/tiny-fp16", &out.path().join("a.png"), &["--variant", "fp16"]);
    assert!(!image.is_empty());
    let info = stdout_ok(&run(sdtune(cache.path()).args(["info", "acme/tiny-fp16"])));
    assert!(info.contains("2 shards") && info.contains("f16"), "{info}");
}

#[test]
fn single_file_tokenizer_comes_from_the_cache() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let path = write_single_file(dir.path(), "tiny-sd1", "brand", None);
    // Configs beside the file, but no tokenizer/.
    write_beside(dir.path(), "brand", "tiny-sd1", &["unet", "vae", "text_encoder", "scheduler"]);
    let run_sample = |cache: &Path| {
        run(sdtune(cache)
            .args([
                "sample", "--device", "cpu", "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64",
                "--model",
            ])
            .arg(&path)
            .arg("--out")
            .arg(dir.path().join("x.png")))
    };
    // None in the cache either: the bundled CLIP files, said in one line.
    let res = run_sample(cache.path());
    stdout_ok(&res);
    let stderr = String::from_utf8_lossy(&res.stderr).to_string();
    let shown = cache.path().display().to_string();
    assert!(stderr.contains("bundled CLIP tokenizer") && stderr.contains(&shown), "{stderr}");
    let bundled = pixels(&dir.path().join("x.png"));
    // diffusers' SD1 repository in the cache, tokenizer only: used, silently, for the same image.
    fake_hub_repo(cache.path(), "stable-diffusion-v1-5/stable-diffusion-v1-5", &fixture("tiny-sd1"), &|files| {
        files.retain(|rel, _| rel.starts_with("tokenizer/"))
    });
    let res = run_sample(cache.path());
    stdout_ok(&res);
    assert!(!String::from_utf8_lossy(&res.stderr).contains("bundled"), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(pixels(&dir.path().join("x.png")) == bundled, "the cached tokenizer's image differs from the bundled one's");
}

#[test]
fn sdxl_hub_id_with_fp16_variant_loads_both_text_encoders() {
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let scratch = sdtune::scratch::ScratchDir::new().unwrap();
    let scratch_path = scratch.path().to_path_buf();
    // Every part only as its fp16 variant, as `from_pretrained(..., variant="fp16")` downloads SDXL.
    let snapshot = fake_hub_repo(cache.path(), "acme/tiny-sdxl", &fixture("tiny-sdxl"), &|files| {
        for (part, stem) in [
            ("unet", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"),
            ("text_encoder", "model"),
            ("text_encoder_2", "model"),
        ] {
            let src = files.remove(&format!("{part}/{stem}.safetensors")).unwrap();
            let file = TensorFile::open(&src).unwrap();
            let tensors: Vec<(String, tch::Tensor)> =
                file.names().into_iter().map(|n| (n.clone(), file.tensor(&n).unwrap().to_kind(Kind::Half))).collect();
            let dst = scratch_path.join(format!("{part}.fp16.safetensors"));
            write_tensors(&dst, &tensors, None).unwrap();
            files.insert(format!("{part}/{stem}.fp16.safetensors"), dst);
        }
    });
    let folder = load_folder("tiny-sdxl");
    let opts = LoadOptions { variant: Some("fp16".into()), prediction_type: None, vae: None };
    let ours = StableDiffusion::load(snapshot.to_str().unwrap(), Placement::cpu_f32(), &opts)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_same_weights("UNet", &ours.unet.vs, &folder.unet.vs, Some(Kind::Half));
    assert_same_weights("VAE", &ours.vae.vs, &folder.vae.vs, Some(Kind::Half));
    assert_eq!(ours.text.encoders.len(), 2, "SDXL has two text encoders");
    for (i, (a, b)) in ours.text.encoders.iter().zip(&folder.text.encoders).enumerate() {
        assert_same_weights(&format!("text encoder {}", i + 1), &a.model.vs, &b.model.vs, Some(Kind::Half));
        assert_eq!(a.tokenizer().unwrap().pad_id(), b.tokenizer().unwrap().pad_id(), "tokenizer {}", i + 1);
    }
    // The id resolves to that snapshot: the same image as the snapshot folder itself.
    let out = sdtune::scratch::ScratchDir::new().unwrap();
    let fp16 = ["--variant", "fp16"];
    let by_id = sample(&mut sdtune(cache.path()), "acme/tiny-sdxl", &out.path().join("id.png"), &fp16);
    let by_dir = sample(&mut sdtune(cache.path()), snapshot.to_str().unwrap(), &out.path().join("dir.png"), &fp16);
    assert!(by_id == by_dir, "the hub id's image differs from its snapshot folder's");
    let info = stdout_ok(&run(sdtune(cache.path()).args(["info", "acme/tiny-sdxl"])));
    assert!(info.contains("Stable Diffusion XL") && info.contains("text encoder 2"), "{info}");
}
