//! Link flags the torch-sys build script cannot give us.
//!
//! * rpath to libtorch's lib folder, so `sdtune` runs with no LD_LIBRARY_PATH.
//! * `libtorch_cuda` linked with `--no-as-needed`: nothing in our code names a
//!   CUDA symbol, so the default `--as-needed` drops it and CUDA silently
//!   disappears at run time.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        println!("cargo:warning=torch-sys did not report the libtorch lib folder; no rpath set");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // The wheel's torch/version.py names the exact build (e.g. 2.11.0+cu130).
    let version_py = lib.parent().map(|torch| torch.join("version.py"));
    let version = version_py
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string()))
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SDTUNE_LIBTORCH_VERSION={version}");
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
