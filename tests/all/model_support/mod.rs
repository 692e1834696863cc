//! Shared by the model-loading tests: fixture models, single-file export,
//! configs beside a file, fake Hugging Face caches, and running `sdtune`
//! offline.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sdtune::loaders::single_file::{to_ldm, Family};
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use sdtune::loaders::tensor_file::write_tensors;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn family(name: &str) -> Family {
    if name.contains("sdxl") {
        Family::Sdxl
    } else if name.contains("sd2") {
        Family::Sd2
    } else {
        Family::Sd1
    }
}

pub fn load_folder(name: &str) -> StableDiffusion {
    StableDiffusion::from_diffusers_folder(&fixture(name), Placement::cpu_f32(), None)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The tiny fixture `name` as an LDM single-file state dict (fp32).
pub fn export(name: &str) -> Vec<(String, Tensor)> {
    to_ldm(&load_folder(name), family(name)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Writes `tensors` to `dir/file`, floating ones converted to `kind` if given.
pub fn write_file(dir: &Path, file: &str, tensors: &[(String, Tensor)], kind: Option<Kind>) -> PathBuf {
    let converted: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let t = match kind {
                Some(k) if t.is_floating_point() => t.to_kind(k),
                _ => t.shallow_clone(),
            };
            (n.clone(), t)
        })
        .collect();
    let path = dir.join(file);
    write_tensors(&path, &converted, None).unwrap_or_else(|e| panic!("{e:#}"));
    path
}

/// Writes the tiny fixture `name` as `dir/<stem>.safetensors` in `kind`.
pub fn write_single_file(dir: &Path, name: &str, stem: &str, kind: Option<Kind>) -> PathBuf {
    write_file(dir, &format!("{stem}.safetensors"), &export(name), kind)
}

/// A diffusers config folder `dir/<stem>/` beside `<stem>.safetensors`,
/// with `parts` of the fixture folder `name` (`unet`, `vae`,
/// `text_encoder`, `scheduler`: config files only; `tokenizer`, `tokenizer_2`: all files).
pub fn write_beside(dir: &Path, stem: &str, name: &str, parts: &[&str]) -> PathBuf {
    let target = dir.join(stem);
    for part in parts {
        let from = fixture(name).join(part);
        let to = target.join(part);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&from).unwrap().flatten() {
            let file_name = entry.file_name().to_string_lossy().to_string();
            if part.starts_with("tokenizer") || file_name.ends_with(".json") && !file_name.ends_with(".index.json") {
                std::fs::copy(entry.path(), to.join(&file_name)).unwrap();
            }
        }
    }
    target
}

/// Every variable of a var store, by name, on the CPU.
pub fn vars(vs: &VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().map(|(n, t)| (n, t.to_device(tch::Device::Cpu))).collect()
}

/// Asserts two models' weights are identical, `b` first rounded through `round`.
pub fn assert_same_weights(what: &str, a: &VarStore, b: &VarStore, round: Option<Kind>) {
    let (a, b) = (vars(a), vars(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: different weight names");
    for (name, ta) in &a {
        let tb = &b[name];
        let tb = match round {
            Some(k) => tb.to_kind(k).to_kind(tb.kind()),
            None => tb.shallow_clone(),
        };
        assert_eq!(ta.size(), tb.size(), "{what} {name}: shapes differ");
        assert!(ta.to_kind(Kind::Float).equal(&tb.to_kind(Kind::Float)), "{what} {name}: values differ");
    }
}

/// `sdtune` with a clean, offline Hugging Face environment: the cache is
/// `hub_cache` (an empty folder unless the test built one), never the
/// machine's, and nothing is ever downloaded.
pub fn sdtune(hub_cache: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdtune"));
    for key in ["HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"] {
        cmd.env_remove(key);
    }
    cmd.env("HF_HUB_CACHE", hub_cache).env("HF_HUB_OFFLINE", "1");
    // One thread: the tiny models gain nothing from more, and OpenMP's
    // spinning threads crawl when the test runner keeps the cores busy.
    cmd.env("OMP_NUM_THREADS", "1");
    cmd
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("sdtune runs")
}

/// The single `error: ...` line a failed command printed.
pub fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure, got success: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "{stderr}");
    lines[0].to_string()
}

pub fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "sdtune failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A fake Hugging Face cache: `cache/models--org--name/` with `refs/main`,
/// `snapshots/<hash>/` (files linked into `blobs/`, as huggingface_hub lays
/// them out) holding a copy of `folder`, with `edit` applied to the
/// snapshot's file list (relative path -> source file; `None` drops it).
pub fn fake_hub_repo(cache: &Path, id: &str, folder: &Path, edit: &dyn Fn(&mut BTreeMap<String, PathBuf>)) -> PathBuf {
    let mut files = BTreeMap::new();
    collect(folder, folder, &mut files);
    edit(&mut files);
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let hash = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    for (i, (rel, src)) in files.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("blob{i:04}"));
        std::fs::copy(src, &blob).unwrap();
        let link = snapshot.join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = rel.matches('/').count() + 2;
        let target: PathBuf =
            std::iter::repeat_n("..", depth).collect::<PathBuf>().join("blobs").join(blob.file_name().unwrap());
        std::os::unix::fs::symlink(&target, &link).unwrap();
    }
    snapshot
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, out);
        } else {
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().to_string();
            out.insert(rel, path);
        }
    }
}

/// The decoded pixels of a PNG (text chunks such as the model's path left out).
pub fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8().into_raw()
}
