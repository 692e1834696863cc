//! Link flags the torch-sys build script cannot give us.
//!
//! * rpath to libtorch's lib folder, so `sdtune` runs with no LD_LIBRARY_PATH.
//! * `libtorch_cuda` linked with `--no-as-needed`: nothing in our code names a
//!   CUDA symbol, so the default `--as-needed` drops it and CUDA silently
//!   disappears at run time.
//! * sdtune's own C++ (`src/native/`, see [`NATIVE_SOURCES`]) compiled
//!   against the same libtorch headers: what tch's C API does not offer.
//! * The data-parallel shim (`src/native/distributed.cpp`) only when gloo's
//!   headers are found (the wheel ships none; `scripts/bootstrap.sh`
//!   installs Debian's libgloo-dev), then `cfg(sdtune_gloo)`; its NCCL part
//!   only when CUDA's and NCCL's headers are there too, then
//!   `cfg(sdtune_nccl)`. Without them sdtune still builds and `--nproc`
//!   says what was missing (`SDTUNE_DISTRIBUTED_MISSING`).
use std::path::{Path, PathBuf};

/// The C++ shims, one concern per file.
const NATIVE_SOURCES: &[&str] = &["src/native/checkpoint.cpp", "src/native/onednn.cpp"];

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
    println!("cargo::rustc-check-cfg=cfg(sdtune_gloo)");
    println!("cargo::rustc-check-cfg=cfg(sdtune_nccl)");
    println!("cargo:rerun-if-env-changed=SDTUNE_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    // Included by both shims.
    println!("cargo:rerun-if-changed=src/native/error_message.h");
    compile_native(&lib);
    // SDTUNE_WITHOUT_GLOO=1 builds as a machine without gloo's headers would.
    println!("cargo:rerun-if-env-changed=SDTUNE_WITHOUT_GLOO");
    let gloo = if std::env::var_os("SDTUNE_WITHOUT_GLOO").is_some() { None } else { find_header(&gloo_dirs(), GLOO_HEADER) };
    match gloo {
        Some(gloo) => {
            println!("cargo:rerun-if-changed={}", gloo.join(GLOO_HEADER).display());
            let nccl = nccl_includes(&lib);
            compile_distributed(&lib, &gloo, nccl.as_deref());
            println!("cargo:rustc-cfg=sdtune_gloo");
            if nccl.is_some() {
                println!("cargo:rustc-cfg=sdtune_nccl");
                // The shim calls c10::cuda directly.
                println!("cargo:rustc-link-lib=c10_cuda");
            }
            println!("cargo:rustc-env=SDTUNE_DISTRIBUTED_MISSING=");
        }
        None => {
            let looked: Vec<String> = gloo_dirs().iter().map(|d| d.display().to_string()).collect();
            println!(
                "cargo:rustc-env=SDTUNE_DISTRIBUTED_MISSING=this sdtune was built without gloo's headers ({GLOO_HEADER} is in none of {}), so it cannot train on several processes; run scripts/bootstrap.sh (it installs libgloo-dev) or set SDTUNE_GLOO_INCLUDE, then build again",
                looked.join(", ")
            );
        }
    }
}

/// The gloo header c10d's ProcessGroupGloo.hpp needs first.
const GLOO_HEADER: &str = "gloo/rendezvous/store.h";

/// The compiler searches these itself.
const SYSTEM_INCLUDES: [&str; 2] = ["/usr/include", "/usr/local/include"];

/// Where gloo's headers may be: `SDTUNE_GLOO_INCLUDE`, then the system's.
fn gloo_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("SDTUNE_GLOO_INCLUDE").map(PathBuf::from).into_iter().collect();
    dirs.extend(SYSTEM_INCLUDES.map(PathBuf::from));
    dirs
}

fn find_header(dirs: &[PathBuf], header: &str) -> Option<PathBuf> {
    dirs.iter().find(|d| d.join(header).is_file()).cloned()
}

/// The include folders for ProcessGroupNCCL.hpp (CUDA runtime with its
/// `crt/` part, and NCCL), when all are there: the wheel's `nvidia/*`
/// packages or `CUDA_HOME`. None on a machine without them.
fn nccl_includes(lib: &Path) -> Option<Vec<PathBuf>> {
    if !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let site = lib.parent()?.parent()?;
    let mut dirs: Vec<PathBuf> = ["nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/nccl/include"]
        .iter()
        .map(|d| site.join(d))
        .collect();
    let cuda_home = std::env::var_os("CUDA_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/local/cuda"));
    dirs.push(cuda_home.join("include"));
    let needed = ["cuda_runtime.h", "crt/host_config.h", "nv/target", "nccl.h"];
    let found: Vec<PathBuf> = needed.iter().map(|h| find_header(&dirs, h)).collect::<Option<_>>()?;
    let mut unique: Vec<PathBuf> = Vec::new();
    for dir in found {
        if !unique.contains(&dir) {
            unique.push(dir);
        }
    }
    Some(unique)
}

/// Compiles the c10d shim against gloo's headers at `gloo` (and CUDA's and
/// NCCL's when given).
fn compile_distributed(lib: &Path, gloo: &Path, nccl: Option<&[PathBuf]>) {
    const SOURCE: &str = "src/native/distributed.cpp";
    println!("cargo:rerun-if-changed={SOURCE}");
    let mut build = torch_build(lib);
    // The compiler's own folders stay out: -isystem would reorder them and break libstdc++'s #include_next.
    if !SYSTEM_INCLUDES.iter().any(|d| gloo == Path::new(d)) {
        build.flag("-isystem").flag(gloo.display().to_string());
    }
    build.define("USE_C10D_GLOO", None);
    if let Some(dirs) = nccl {
        for dir in dirs {
            build.flag("-isystem").flag(dir.display().to_string());
        }
        build.define("USE_C10D_NCCL", None).define("USE_CUDA", None).define("SDTUNE_WITH_NCCL", None);
    }
    build.file(SOURCE).compile("sdtune_distributed");
}

/// Compiles [`NATIVE_SOURCES`] into one static library, with the flags
/// torch-sys uses for its own C++ (the wheel is built with the C++11 ABI).
fn compile_native(lib: &Path) {
    for source in NATIVE_SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    torch_build(lib).files(NATIVE_SOURCES).compile("sdtune_native");
}

/// A C++17 build against libtorch's headers with torch's own defines.
fn torch_build(lib: &Path) -> cc::Build {
    let Some(torch) = lib.parent() else {
        panic!("the libtorch lib folder {} has no parent holding include/", lib.display());
    };
    let include = torch.join("include");
    let mut build = cc::Build::new();
    build.cpp(true).pic(true).std("c++17");
    // -isystem: torch's own headers warn under -Wall -Wextra; ours must not.
    for dir in [include.clone(), include.join("torch/csrc/api/include")] {
        build.flag("-isystem").flag(dir.display().to_string());
    }
    build.define("_GLIBCXX_USE_CXX11_ABI", "1").define("GLOG_USE_GLOG_EXPORT", None).warnings(true);
    build
}
