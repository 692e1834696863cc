//! Link flags the torch-sys build script cannot give us.
//!
//! * rpath to libtorch's lib folder, so `sdtune` runs with no LD_LIBRARY_PATH.
//! * `libtorch_cuda` linked with `--no-as-needed`: nothing in our code names a
//!   CUDA symbol, so the default `--as-needed` drops it and CUDA silently
//!   disappears at run time.
//! * sdtune's own C++ (`src/native/`, see [`NATIVE_SOURCES`]) compiled
//!   against the same libtorch headers: what tch's C API does not offer.
use std::path::{Path, PathBuf};

/// The C++ shims, one concern per file.
const NATIVE_SOURCES: &[&str] = &["src/native/checkpoint.cpp"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        panic!("torch-sys did not report the libtorch lib folder (DEP_TCH_LIBTORCH_LIB), which sdtune's C++ needs for torch's headers; set LIBTORCH or LIBTORCH_USE_PYTORCH=1 as for torch-sys");
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
    compile_native(&lib);
}

/// Compiles [`NATIVE_SOURCES`] into one static library, with the flags
/// torch-sys uses for its own C++ (the wheel is built with the C++11 ABI).
fn compile_native(lib: &Path) {
    let Some(torch) = lib.parent() else {
        panic!("the libtorch lib folder {} has no parent holding include/", lib.display());
    };
    let include = torch.join("include");
    for source in NATIVE_SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    let mut build = cc::Build::new();
    build.cpp(true).pic(true).std("c++17");
    // -isystem: torch's own headers warn under -Wall -Wextra; ours must not.
    for dir in [include.clone(), include.join("torch/csrc/api/include")] {
        build.flag("-isystem").flag(dir.display().to_string());
    }
    build
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .warnings(true)
        .files(NATIVE_SOURCES)
        .compile("sdtune_native");
}
