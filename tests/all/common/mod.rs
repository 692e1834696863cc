//! Shared by the integration tests: fixture paths and tensor comparison.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sdtune::loaders::tensor_file::TensorFile;
use tch::{Kind, Tensor};

pub mod cli;
pub mod sd1;
pub mod sdxl;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn reference(name: &str) -> PathBuf {
    fixtures().join("reference").join(name)
}

/// Every tensor of a reference safetensors file, on the CPU.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    let file = TensorFile::open(path).unwrap_or_else(|e| panic!("{e:#}"));
    file.names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n).unwrap();
            (n, t)
        })
        .collect()
}

/// max |a - b| in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Asserts max |a - b| <= tol, naming what was compared.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
    eprintln!("{what}: max abs diff {d:e}");
}

/// Copies the folder `from` into `to` (created), recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The settings JSON sdtune writes into a PNG's `sdtune` text chunk.
pub fn png_settings(path: &Path) -> serde_json::Value {
    let texts = sdtune::sample::image_out::read_png_text(path).unwrap_or_else(|e| panic!("{e:#}"));
    let (_, json) = texts
        .iter()
        .find(|(keyword, _)| keyword == "sdtune")
        .unwrap_or_else(|| panic!("{} has no sdtune chunk", path.display()));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{}: sdtune chunk: {e}", path.display()))
}

pub fn read_rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
}

/// Mean |a - b| over every channel of every pixel, in 0..255 units.
pub fn mean_abs_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum();
    sum / a.as_raw().len() as f64
}

/// Held by every test that seeds or draws from torch's global generator in
/// this process (`manual_seed`, `randn`, random weight or LoRA init, in-process
/// sampling or training). The tests share one process and run on several
/// threads, so a draw in another test between a `manual_seed` and its `randn`
/// would change the numbers. A test that failed while holding it poisons
/// nothing: the guard is taken back.
pub fn torch_rng() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
