//! Bad model files get one plain sentence and a non-zero exit, never a panic.
use crate::common;

use std::path::Path;
use std::process::Command;

use sdtune::loaders::tensor_file::{write_tensors, TensorFile};

/// Runs `sdtune sample` on `model`; returns stderr after asserting failure.
fn sample_fails(model: &Path) -> String {
    let run = Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .args(["sample", "--device", "cpu", "--steps", "2", "--prompt", "a mug", "--model"])
        .arg(model)
        .arg("--out")
        .arg(model.join("never.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    assert_eq!(run.status.code(), Some(1), "expected exit 1, got {:?}: {stderr}", run.status);
    assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(!model.join("never.png").exists(), "no image may be written on error");
    stderr
}

fn tiny_copy() -> sdtune::scratch::ScratchDir {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    common::copy_dir(&common::fixtures().join("tiny-sd1"), dir.path());
    dir
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = tiny_copy();
    let file = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len / 2).unwrap();
    let err = sample_fails(dir.path());
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn mis_shaped_tensor_names_the_tensor_and_file() {
    let dir = tiny_copy();
    let file = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let src = TensorFile::open(&file).unwrap();
    let tensors: Vec<(String, tch::Tensor)> = src
        .names()
        .into_iter()
        .map(|n| {
            let t = src.tensor(&n).unwrap();
            let t = if n == "conv_in.bias" { t.narrow(0, 0, t.size()[0] - 1) } else { t };
            (n, t)
        })
        .collect();
    drop(src);
    write_tensors(&file, &tensors, None).unwrap();
    let err = sample_fails(dir.path());
    assert!(err.contains("conv_in.bias"), "{err}");
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(err.contains("shape"), "{err}");
}

#[test]
fn missing_tensor_names_the_tensor() {
    let dir = tiny_copy();
    let file = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let src = TensorFile::open(&file).unwrap();
    let tensors: Vec<(String, tch::Tensor)> = src
        .names()
        .into_iter()
        .filter(|n| n != "decoder.conv_out.weight")
        .map(|n| {
            let t = src.tensor(&n).unwrap();
            (n, t)
        })
        .collect();
    drop(src);
    write_tensors(&file, &tensors, None).unwrap();
    let err = sample_fails(dir.path());
    assert!(err.contains("decoder.conv_out.weight"), "{err}");
}

#[test]
fn a_folder_that_is_not_a_model_is_refused() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "holiday photos").unwrap();
    let err = sample_fails(dir.path());
    assert!(err.contains("not a diffusers model folder"), "{err}");
}

#[test]
fn a_missing_path_is_refused() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let err = sample_fails(&dir.path().join("nope"));
    assert!(err.contains("does not exist"), "{err}");
}
