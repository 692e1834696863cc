//! Shared by the integration tests: fixture paths and tensor comparison.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sdtune::loaders::tensor_file::TensorFile;
use tch::{Kind, Tensor};

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
