//! `--vae PATH` on prepare and train: prepare encodes with that VAE and the
//! cache records it; a prepare with another VAE encodes every latent again
//! (its keys hold the VAE's identity), never mixing two VAEs' latents; the
//! VAE goes into a fresh sdtune.yaml, and train's grids (and `sdtune sample`
//! of the run) decode with it.
use crate::common;
use crate::train_support;

use std::path::{Path, PathBuf};

use sdtune::data::cache::CacheReader;
use sdtune::loaders::tensor_file::{write_tensors, TensorFile};
use train_support::{fixtures, run_dir, sdtune, train};

/// tiny-sd1's VAE with its encoder's and decoder's output shifted, written
/// as a diffusers vae/ folder in `dir`: latents and pixels show which VAE made them.
fn other_vae(dir: &Path) -> PathBuf {
    let vae = dir.join("other-vae");
    std::fs::create_dir_all(&vae).unwrap();
    std::fs::copy(fixtures().join("tiny-sd1/vae/config.json"), vae.join("config.json")).unwrap();
    let file = TensorFile::open(&fixtures().join("tiny-sd1/vae/diffusion_pytorch_model.safetensors")).unwrap();
    let tensors: Vec<_> = file
        .names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n).unwrap();
            let shifted = matches!(n.as_str(), "encoder.conv_out.bias" | "decoder.conv_out.bias");
            (n, if shifted { t + 0.25 } else { t })
        })
        .collect();
    write_tensors(&vae.join("diffusion_pytorch_model.safetensors"), &tensors, None).unwrap();
    vae
}

/// Each item's latent key and mean, in item order.
fn latents(dir: &Path) -> Vec<(String, tch::Tensor)> {
    let cache = CacheReader::open(dir).unwrap();
    let keys: Vec<String> = cache.dataset().items.iter().map(|i| i.latent.clone()).collect();
    keys.into_iter().map(|k| (k.clone(), cache.latent(&k).unwrap().0)).collect()
}

/// (encoded, reused) latents of the last prepare.
fn counts(dir: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(dir.join(".sdtune/prepare-report.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    (report["counts"]["encoded"].as_u64().unwrap(), report["counts"]["reused"].as_u64().unwrap())
}

fn prepare(dir: &Path, extra: &[&str]) {
    let args: Vec<&str> = ["prepare", "--device", "cpu"].iter().chain(extra).copied().collect();
    let out = sdtune(dir, &args, None);
    assert!(out.status.success(), "prepare {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn another_vae_encodes_every_latent_again_and_the_cache_records_it() {
    let dir = train_support::prepared();
    let own = latents(dir.path());
    assert_eq!(CacheReader::open(dir.path()).unwrap().dataset().vae, None);
    other_vae(dir.path());

    prepare(dir.path(), &["--vae", "other-vae"]);
    assert_eq!(counts(dir.path()), (own.len() as u64, 0), "not every latent was encoded again with the other VAE");
    assert_eq!(CacheReader::open(dir.path()).unwrap().dataset().vae.as_deref(), Some("other-vae"));
    let other = latents(dir.path());
    assert_eq!(other.len(), own.len());
    for ((own_key, own_mean), (other_key, other_mean)) in own.iter().zip(&other) {
        assert_ne!(own_key, other_key, "one latent key for two VAEs");
        let moved = (own_mean - other_mean).abs().max().double_value(&[]);
        assert!(moved > 1e-3, "the other VAE's latent equals the model VAE's ({moved})");
    }

    // The same VAE again reuses its latents; back to the model's own, its latents come back.
    prepare(dir.path(), &["--vae", "other-vae"]);
    assert_eq!(counts(dir.path()), (0, own.len() as u64));
    prepare(dir.path(), &[]);
    assert_eq!(CacheReader::open(dir.path()).unwrap().dataset().vae, None);
    for ((own_key, own_mean), (key, mean)) in own.iter().zip(&latents(dir.path())) {
        assert_eq!(own_key, key);
        assert!(own_mean.equal(mean), "the model VAE's latent {key} changed");
    }
}

#[test]
fn a_missing_vae_is_refused_in_one_sentence_naming_it() {
    let dir = train_support::prepared();
    let out = sdtune(dir.path(), &["prepare", "--device", "cpu", "--vae", "no-such-vae"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-vae") && stderr.trim().lines().count() == 1, "{stderr}");
}

fn first_grid(dir: &Path, name: &str) -> PathBuf {
    let samples = run_dir(dir, name).join("samples");
    let mut grids: Vec<PathBuf> = std::fs::read_dir(&samples).unwrap().flatten().map(|e| e.path()).collect();
    grids.retain(|p| p.extension().is_some_and(|e| e == "png"));
    grids.sort();
    grids.into_iter().next().unwrap_or_else(|| panic!("no grid in {}", samples.display()))
}

#[test]
fn the_prepared_vae_goes_into_sdtune_yaml_and_decodes_trains_grids() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    other_vae(dir.path());
    std::fs::create_dir_all(dir.path().join("imgs")).unwrap();
    for i in 0..2u8 {
        image::RgbImage::from_pixel(64, 64, image::Rgb([200, 40 * i, 50])).save(dir.path().join(format!("imgs/{i}.png"))).unwrap();
        std::fs::write(dir.path().join(format!("imgs/{i}.txt")), format!("an acme poster {i}")).unwrap();
    }
    let model = fixtures().join("tiny-sd1");
    let args = ["prepare", "imgs", "--device", "cpu", "--resolution", "64", "--min-side", "64", "--vae", "other-vae", "--model"];
    let out = sdtune(dir.path(), &args, Some(&model));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = std::fs::read_to_string(dir.path().join("sdtune.yaml")).unwrap();
    assert!(yaml.lines().any(|l| l == "vae: other-vae"), "{yaml}");

    let grid_args = ["--steps", "1", "--sample-every", "1", "--save-every", "0"];
    let out = train(dir.path(), &[&grid_args[..], &["--name", "prepared-vae"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning: the images were encoded"));
    let with_prepared = first_grid(dir.path(), "prepared-vae");
    let recorded = common::png_settings(&with_prepared);
    assert!(recorded["vae"].as_str().is_some_and(|v| v.ends_with("other-vae")), "{recorded}");

    // The model's own VAE, named with --vae: another image, and a warning saying so.
    let own_vae = model.join("vae");
    let own_args = [&grid_args[..], &["--name", "own-vae", "--vae", own_vae.to_str().unwrap()]].concat();
    let out = train(dir.path(), &own_args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning: the images were encoded with other-vae"), "{stderr}");
    let with_own = first_grid(dir.path(), "own-vae");
    assert_ne!(
        image::open(&with_prepared).unwrap().to_rgb8().as_raw(),
        image::open(&with_own).unwrap().to_rgb8().as_raw(),
        "the grid decoded alike with both VAEs"
    );
    assert_ne!(recorded["model_hash"], common::png_settings(&with_own)["model_hash"]);

    // `sdtune sample` of the run (its prompts, no --model) renders with the prepared VAE too.
    let lora = run_dir(dir.path(), "prepared-vae").join("prepared-vae.safetensors");
    let args = ["sample", "--device", "cpu", "--steps", "2", "--out", "run.png", "--lora", lora.to_str().unwrap()];
    let out = sdtune(dir.path(), &args, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let recorded = common::png_settings(&dir.path().join("run.png"));
    assert!(recorded["vae"].as_str().is_some_and(|v| v.ends_with("other-vae")), "{recorded}");
}
