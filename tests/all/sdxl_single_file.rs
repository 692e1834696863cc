//! SDXL single files in the SGM layout (A1111, ComfyUI, civitai) load into
//! the weights of the diffusers folder they came from and sample its pixels.
//!
//! The file is rebuilt from tests/fixtures/tiny-sdxl with sdtune's exporter;
//! every tensor is first checked against `tests/fixtures/single-file/tiny-sdxl.json`,
//! written by `scripts/fixtures/make_sdxl_single_file.py` after diffusers'
//! `StableDiffusionXLPipeline.from_single_file` loaded its own conversion back to
//! the folder's exact weights. So the file loaded below is the one diffusers accepted.
use crate::model_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use model_support::*;
use sdtune::loaders::source::LoadOptions;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

const NAME: &str = "tiny-sdxl";
/// The tiny model's sizes (8 norm groups, 4-head encoders) show in no tensor.
const PARTS: [&str; 7] = ["unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2"];

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

fn sha256(t: &Tensor) -> String {
    let t = t.contiguous();
    let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut bytes, t.numel());
    format!("{:x}", Sha256::digest(&bytes))
}

/// The tiny SDXL model as `dir/<stem>.safetensors`, its configs beside it.
fn single_file(dir: &Path, stem: &str) -> PathBuf {
    let path = write_single_file(dir, NAME, stem, None);
    write_beside(dir, stem, NAME, &PARTS);
    path
}

#[test]
fn exported_file_is_the_one_diffusers_accepted() {
    let text = std::fs::read_to_string(fixture("single-file/tiny-sdxl.json")).unwrap();
    let manifest: Manifest = serde_json::from_str(&text).unwrap();
    let exported: BTreeMap<String, Tensor> = export(NAME).into_iter().collect();
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        manifest.tensors.keys().collect::<Vec<_>>(),
        "tensor names differ from the diffusers-checked file"
    );
    for (name, entry) in &manifest.tensors {
        let t = &exported[name];
        assert_eq!(t.kind(), Kind::Float, "{name}: dtype");
        assert_eq!(entry.dtype, "float32", "{name}: dtype");
        assert_eq!(t.size(), entry.shape, "{name}: shape");
        assert_eq!(sha256(t), entry.sha256, "{name}: data");
    }
    // SGM names, not diffusers': the added embedding and bigG's fused attention.
    assert!(exported.contains_key("model.diffusion_model.label_emb.0.2.weight"));
    assert!(exported.contains_key("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"));
}

#[test]
fn single_file_loads_the_folder_weights_exactly() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let path = single_file(dir.path(), NAME);
    let ours = StableDiffusion::load(path.to_str().unwrap(), Placement::cpu_f32(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let folder = load_folder(NAME);
    assert_same_weights("UNet", &ours.unet.vs, &folder.unet.vs, None);
    assert_same_weights("VAE", &ours.vae.vs, &folder.vae.vs, None);
    assert_eq!(ours.text.encoders.len(), 2);
    for (i, (a, b)) in ours.text.encoders.iter().zip(&folder.text.encoders).enumerate() {
        assert_same_weights(&format!("text encoder {}", i + 1), &a.model.vs, &b.model.vs, None);
        assert_eq!(a.tokenizer().unwrap().pad_id(), b.tokenizer().unwrap().pad_id(), "tokenizer {}", i + 1);
    }
    assert!(ours.text.zeros_for_no_negative, "SDXL single files use zeros with no negative prompt");
    assert_eq!(ours.text.pooled_size(), folder.text.pooled_size());
}

#[test]
fn sample_from_single_file_equals_the_folder_image() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let path = single_file(dir.path(), NAME);
    for scheduler in ["euler", "dpmpp_2m"] {
        for negative in [None, Some("blurry, low quality")] {
            let mut images = Vec::new();
            for (label, model) in [("file", path.clone()), ("folder", fixture(NAME))] {
                let out = dir.path().join(format!("{scheduler}-{}-{label}.png", negative.is_some()));
                let mut cmd = sdtune(cache.path());
                cmd.args(["sample", "--device", "cpu", "--prompt", "a red car by the sea", "--seed", "7"])
                    .args(["--steps", "4", "--width", "64", "--height", "48", "--scheduler", scheduler, "--model"])
                    .arg(&model)
                    .arg("--out")
                    .arg(&out);
                if let Some(n) = negative {
                    cmd.args(["--negative-prompt", n]);
                }
                let res = run(&mut cmd);
                stdout_ok(&res);
                assert!(!String::from_utf8_lossy(&res.stderr).contains("warning"), "{label}: unexpected warning");
                images.push(pixels(&out));
            }
            assert!(images[0] == images[1], "{scheduler} negative={negative:?}: the single file's image differs");
        }
    }
}

#[test]
fn v_prediction_files_sample_with_the_flag() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    // No scheduler config beside the file: epsilon unless the flag says v. (Euler: the
    // tiny folder's Euler config leaves DDIM's clip_sample / set_alpha_to_one unset,
    // SDXL base's, which the file gets, sets them false.)
    let path = write_single_file(dir.path(), NAME, NAME, None);
    write_beside(dir.path(), NAME, NAME, &["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]);
    let mut images = Vec::new();
    for (label, model, v) in [("file-v", &path, true), ("folder-v", &fixture(NAME), true), ("file", &path, false)] {
        let out = dir.path().join(format!("{label}.png"));
        let mut cmd = sdtune(cache.path());
        cmd.args(["sample", "--device", "cpu", "--prompt", "a red car by the sea", "--seed", "3", "--steps", "3"])
            .args(["--width", "64", "--height", "64", "--scheduler", "euler", "--model"])
            .arg(model)
            .arg("--out")
            .arg(&out);
        if v {
            cmd.args(["--prediction-type", "v"]);
        }
        let res = run(&mut cmd);
        stdout_ok(&res);
        assert!(!String::from_utf8_lossy(&res.stderr).contains("warning"), "{label}: no guess to warn about");
        images.push(pixels(&out));
    }
    assert!(images[0] == images[1], "--prediction-type v: the single file's image differs from the folder's");
    assert!(images[0] != images[2], "--prediction-type v must change the image");
}

#[test]
fn info_names_the_file_sdxl() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let path = single_file(dir.path(), NAME);
    let out = stdout_ok(&run(sdtune(cache.path()).arg("info").arg(&path)));
    assert!(out.contains("Stable Diffusion XL"), "{out}");
    assert!(out.contains("SGM layout"), "{out}");
    assert!(out.contains("text encoder 2"), "{out}");
}

#[test]
fn a_refiner_and_a_truncated_file_are_refused_in_one_sentence() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    // Refiner-like: bigG alone in the first slot, no CLIP-L.
    let refiner: Vec<(String, Tensor)> = export(NAME)
        .into_iter()
        .filter(|(n, _)| !n.starts_with("conditioner.embedders.0."))
        .map(|(n, t)| (n.replace("conditioner.embedders.1.", "conditioner.embedders.0."), t))
        .collect();
    let refiner = write_file(dir.path(), "refiner.safetensors", &refiner, None);
    let truncated = single_file(dir.path(), "truncated");
    let len = std::fs::metadata(&truncated).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&truncated).unwrap().set_len(len / 2).unwrap();
    for (path, says) in [(&refiner, "refiner"), (&truncated, "truncated")] {
        for command in ["sample", "info"] {
            let mut cmd = sdtune(cache.path());
            if command == "sample" {
                cmd.args(["sample", "--device", "cpu", "--prompt", "a car", "--steps", "1", "--model"]).arg(path);
            } else {
                cmd.arg("info").arg(path);
            }
            let err = one_line_error(&run(&mut cmd));
            assert!(err.contains(says), "{command} {}: {err}", path.display());
            assert!(err.contains(&path.display().to_string()), "{command}: {err}");
        }
    }
}

#[test]
fn tokenizers_come_from_beside_the_cache_or_the_bundled_files() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    // Configs beside the file, but no tokenizer/ or tokenizer_2/.
    let path = write_single_file(dir.path(), NAME, NAME, None);
    write_beside(dir.path(), NAME, NAME, &PARTS[..5]);
    let sample = |cache: &Path, out: &str| {
        let out = dir.path().join(out);
        let res = run(sdtune(cache)
            .args(["sample", "--device", "cpu", "--prompt", "a red car by the sea", "--seed", "7", "--steps", "3"])
            .args(["--width", "64", "--height", "64", "--model"])
            .arg(&path)
            .arg("--out")
            .arg(&out));
        stdout_ok(&res);
        (pixels(&out), String::from_utf8_lossy(&res.stderr).to_string())
    };
    let empty = sdtune::scratch::ScratchDir::new().unwrap();
    let (folder_image, _) = {
        let out = dir.path().join("folder.png");
        let res = run(sdtune(empty.path())
            .args(["sample", "--device", "cpu", "--prompt", "a red car by the sea", "--seed", "7", "--steps", "3"])
            .args(["--width", "64", "--height", "64", "--model"])
            .arg(fixture(NAME))
            .arg("--out")
            .arg(&out));
        stdout_ok(&res);
        (pixels(&out), ())
    };
    // SDXL base's two tokenizers in the Hugging Face cache.
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    fake_hub_repo(cache.path(), "stabilityai/stable-diffusion-xl-base-1.0", &fixture(NAME), &|files| {
        files.retain(|rel, _| rel.starts_with("tokenizer"));
    });
    let (image, stderr) = sample(cache.path(), "cached.png");
    assert!(!stderr.contains("bundled"), "{stderr}");
    assert!(image == folder_image, "with the cached tokenizers the image differs from the folder's");
    // Nothing cached: the bundled CLIP files, padded with EOS and with "!".
    let (image, stderr) = sample(empty.path(), "bundled.png");
    assert_eq!(stderr.matches("bundled CLIP tokenizer").count(), 2, "{stderr}");
    assert!(stderr.contains("\"<|endoftext|>\"") && stderr.contains("\"!\""), "{stderr}");
    assert!(image == folder_image, "with the bundled tokenizers the image differs from the folder's");
}
