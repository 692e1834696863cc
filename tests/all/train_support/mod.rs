//! Shared by the `train_*`, `sdxl_train` and run-safety tests: a working
//! folder with a tiny fixture prepared, and the binary run in it.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sdtune::loaders::tensor_file::TensorFile;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A working folder with 6 prepared images (two buckets) of the tiny model.
pub fn prepared() -> sdtune::scratch::ScratchDir {
    prepared_with(&fixtures().join("tiny-sd1"))
}

/// The same 6 images prepared for `model` (a diffusers folder).
pub fn prepared_with(model: &Path) -> sdtune::scratch::ScratchDir {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let brand = dir.path().join("brand");
    std::fs::create_dir_all(&brand).unwrap();
    for i in 0..6u32 {
        let (w, h) = if i % 2 == 0 { (96, 96) } else { (128, 64) };
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let inside = (x as i64 - 40).pow(2) + (y as i64 - 30).pow(2) < 400 + 40 * i as i64;
            if inside { image::Rgb([20, 40, 200]) } else { image::Rgb([250, 120, (30 + 10 * i) as u8]) }
        });
        img.save(brand.join(format!("poster{i}.png"))).unwrap();
        std::fs::write(brand.join(format!("poster{i}.txt")), format!("an orange acme poster with a blue circle {i}")).unwrap();
    }
    let out = sdtune(dir.path(), &[
        "prepare", "brand", "--device", "cpu", "--resolution", "64", "--min-bucket", "32", "--max-bucket", "128",
        "--bucket-step", "32", "--min-side", "64", "--model",
    ], Some(model));
    assert!(out.status.success(), "prepare failed: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

pub fn sdtune(dir: &Path, args: &[&str], last: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
    cmd.current_dir(dir).args(args);
    if let Some(p) = last {
        cmd.arg(p);
    }
    cmd.output().unwrap()
}

/// `--precision fp32`: `auto` would pick bf16 on a CPU with AVX512-BF16, and
/// the tests compare runs at fp32 tolerances.
pub const FAST: &[&str] = &["train", "--device", "cpu", "--precision", "fp32", "--sample-every", "0", "--lr", "1e-3", "--rank", "4", "--alpha", "4"];

pub fn train(dir: &Path, extra: &[&str]) -> Output {
    let args: Vec<&str> = FAST.iter().chain(extra).copied().collect();
    sdtune(dir, &args, None)
}

pub fn lora_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let file = TensorFile::open(path).unwrap();
    file.names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n).unwrap().contiguous();
            let mut bytes = vec![0u8; t.numel() * 4];
            t.copy_data_u8(&mut bytes, t.numel());
            (n, bytes)
        })
        .collect()
}

pub fn run_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join("output").join(name)
}

