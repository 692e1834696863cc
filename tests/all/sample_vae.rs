//! `sdtune sample --vae PATH` decodes with another VAE: a diffusers vae/
//! folder, its `diffusion_pytorch_model.safetensors` alone, or an LDM-named
//! VAE file (A1111's `*.vae.safetensors`). Each gives the pixels of the model
//! folder with that VAE put in its `vae/`, and the model hash the images
//! record changes with it.
use crate::common;
use crate::model_support;

use std::path::{Path, PathBuf};

use model_support::*;
use sdtune::loaders::ldm_names::vae_ldm_name;
use sdtune::loaders::tensor_file::{write_tensors, TensorFile};
use tch::Tensor;


/// tiny-sd1's VAE with its decoder output shifted, so images show which VAE decoded them.
fn other_vae() -> Vec<(String, Tensor)> {
    let file = TensorFile::open(&fixture("tiny-sd1/vae/diffusion_pytorch_model.safetensors")).unwrap();
    file.names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n).unwrap();
            let t = if n == "decoder.conv_out.bias" { t + 0.25 } else { t };
            (n, t)
        })
        .collect()
}

struct Setup {
    _dir: sdtune::scratch::ScratchDir,
    root: PathBuf,
    /// tiny-sd1 with the other VAE in its vae/.
    swapped_model: PathBuf,
    vae_folder: PathBuf,
    ldm_file: PathBuf,
}

fn setup() -> Setup {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let root = dir.path().to_path_buf();
    let tensors = other_vae();
    let config = fixture("tiny-sd1/vae/config.json");
    let vae_folder = root.join("other-vae");
    std::fs::create_dir_all(&vae_folder).unwrap();
    std::fs::copy(&config, vae_folder.join("config.json")).unwrap();
    write_tensors(&vae_folder.join("diffusion_pytorch_model.safetensors"), &tensors, None).unwrap();
    let swapped_model = root.join("swapped");
    common::copy_dir(&fixture("tiny-sd1"), &swapped_model);
    common::copy_dir(&vae_folder, &swapped_model.join("vae"));
    // The same VAE in LDM names (mid attention as 1x1 convs), its config beside it:
    // the tiny VAE's 8 norm groups show in no tensor.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let blocks = cfg["block_out_channels"].as_array().unwrap().len();
    let ldm: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let name = vae_ldm_name(n, blocks).unwrap_or_else(|| panic!("no LDM name for {n}"));
            let t = if name.contains(".mid.attn_1.") && name.ends_with(".weight") && t.dim() == 2 {
                t.unsqueeze(-1).unsqueeze(-1)
            } else {
                t.shallow_clone()
            };
            (name, t)
        })
        .collect();
    let ldm_dir = root.join("ldm");
    std::fs::create_dir_all(&ldm_dir).unwrap();
    std::fs::copy(&config, ldm_dir.join("config.json")).unwrap();
    let ldm_file = ldm_dir.join("other.vae.safetensors");
    write_tensors(&ldm_file, &ldm, None).unwrap();
    Setup { _dir: dir, root, swapped_model, vae_folder, ldm_file }
}

fn sample(root: &Path, model: &Path, vae: Option<&Path>, out: &str) -> (Vec<u8>, serde_json::Value) {
    let cache = root.join("hub");
    let out = root.join(out);
    let mut cmd = sdtune(&cache);
    cmd.args(["sample", "--device", "cpu", "--prompt", "a red car", "--seed", "5", "--steps", "3"])
        .args(["--width", "64", "--height", "64", "--model"])
        .arg(model)
        .arg("--out")
        .arg(&out);
    if let Some(v) = vae {
        cmd.arg("--vae").arg(v);
    }
    stdout_ok(&run(&mut cmd));
    (pixels(&out), common::png_settings(&out))
}

#[test]
fn vae_folder_file_and_ldm_file_decode_as_the_swapped_model() {
    let s = setup();
    assert_eq!(
        TensorFile::open(&s.vae_folder.join("diffusion_pytorch_model.safetensors")).unwrap().names().len(),
        TensorFile::open(&s.ldm_file).unwrap().names().len()
    );
    let tiny = fixture("tiny-sd1");
    let (own, own_settings) = sample(&s.root, &tiny, None, "own.png");
    let (want, _) = sample(&s.root, &s.swapped_model, None, "want.png");
    assert!(own != want, "the other VAE must change the image");
    let diffusers_file = s.vae_folder.join("diffusion_pytorch_model.safetensors");
    let mut hashes = Vec::new();
    for (label, vae) in [("folder", &s.vae_folder), ("file", &diffusers_file), ("ldm", &s.ldm_file)] {
        let (got, recorded) = sample(&s.root, &tiny, Some(vae), &format!("{label}.png"));
        assert!(got == want, "--vae {label}: the image differs from the model folder with that VAE");
        assert_ne!(recorded["model_hash"], own_settings["model_hash"], "--vae {label}: the model hash must change");
        let vae_recorded = recorded["vae"].as_str().unwrap_or_else(|| panic!("--vae {label}: not recorded"));
        assert_eq!(Path::new(vae_recorded), std::fs::canonicalize(vae).unwrap());
        hashes.push(recorded["model_hash"].as_str().unwrap().to_string());
    }
    assert_eq!(hashes[0], hashes[1], "a vae folder and its weights file are the same VAE");
    assert_ne!(hashes[0], hashes[2], "another file is another VAE");
    assert!(own_settings.get("vae").is_none());

    // --from replays the VAE the image was made with.
    let cache = s.root.join("hub");
    let res = run(sdtune(&cache)
        .args(["sample", "--device", "cpu", "--from"])
        .arg(s.root.join("ldm.png"))
        .arg("--out")
        .arg(s.root.join("again.png")));
    stdout_ok(&res);
    assert!(!String::from_utf8_lossy(&res.stderr).contains("hash"), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(pixels(&s.root.join("again.png")) == want, "--from did not decode with the recorded VAE");
}

#[test]
fn a_vae_that_does_not_fit_is_refused_in_one_sentence() {
    let s = setup();
    let cache = s.root.join("hub");
    // A UNet file, and a VAE file whose norm groups no tensor shows (no config beside it).
    let unet = fixture("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    let lone = s.root.join("lone.vae.safetensors");
    std::fs::copy(&s.ldm_file, &lone).unwrap();
    for (vae, says) in [(unet.as_path(), "holds no VAE encoder"), (lone.as_path(), "norm groups"), (s.root.join("none").as_path(), "does not exist")] {
        let res = run(sdtune(&cache)
            .args(["sample", "--device", "cpu", "--prompt", "x", "--steps", "1", "--model"])
            .arg(fixture("tiny-sd1"))
            .arg("--vae")
            .arg(vae));
        let err = one_line_error(&res);
        assert!(err.contains(says) && err.contains(&vae.display().to_string()), "{err}");
    }
}
