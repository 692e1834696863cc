//! The built-in default model: `models/tiny-sd/` (a tiny SD1.x-architecture
//! model that sdtune trained itself, see scripts/make-tiny-sd.sh), compiled
//! into the binary. `prepare`, `train` and `sample` use it when neither
//! `--model` nor `sdtune.yaml` names a model, so the whole job runs on any
//! machine with no download.
//!
//! On first use its files are written once to a cache folder
//! (`$SDTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/sdtune`, else
//! `~/.cache/sdtune`), named by their content hash, and loaded from there
//! like any diffusers folder.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

macro_rules! embed {
    ($($rel:literal),* $(,)?) => {
        &[$(($rel, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-sd/", $rel)) as &[u8])),*]
    };
}

/// Every file of the model folder, by path inside it.
const FILES: &[(&str, &[u8])] = embed!(
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// The image side the model was trained at, in pixels.
pub const RESOLUTION: u32 = 64;

/// How the commands name it when they fall back to it.
/// How images and settings name the built-in model, so a PNG made with it
/// replays (`sample --from`) on any machine, wherever its cache is.
pub const SPEC: &str = "sdtune-tiny-sd";

pub const DESCRIPTION: &str = "sdtune's built-in tiny model (64 px, trained by sdtune on coloured shapes)";

/// The embedded file at `name` inside the model folder (`tokenizer/vocab.json`).
pub fn embedded(name: &str) -> Option<&'static [u8]> {
    FILES.iter().find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}

/// A short hash of the embedded files: names the cache folder, so a newer
/// binary never reads an older model.
fn content_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let mut h = Sha256::new();
        for (name, bytes) in FILES {
            h.update(name.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
    })
}

fn cache_root() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("SDTUNE_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("sdtune")))
        .or_else(|| env("HOME").map(|p| p.join(".cache").join("sdtune")))
        .unwrap_or_else(|| std::env::temp_dir().join("sdtune"))
}

/// The built-in model as a diffusers folder, written on first use; a
/// copy whose files were damaged since is repaired in place.
pub fn path() -> Result<PathBuf> {
    let root = cache_root();
    let dir = root.join(format!("tiny-sd-{}", content_hash()));
    if dir.is_dir() {
        repair(&dir).with_context(|| {
            format!("the built-in model's copy in {} is damaged and cannot be rewritten; delete that folder, or set SDTUNE_CACHE_DIR to a writable folder", dir.display())
        })?;
        return Ok(dir);
    }
    let tmp = root.join(format!(".tiny-sd-{}.tmp-{}", content_hash(), std::process::id()));
    let written = write_all(&tmp).and_then(|()| match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(()),
        // Another process finished first: its copy is the same.
        Err(_) if is_complete(&dir) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot move {} to {}", tmp.display(), dir.display())),
    });
    let _ = std::fs::remove_dir_all(&tmp);
    written.with_context(|| {
        format!("cannot write the built-in model to {}; set SDTUNE_CACHE_DIR to a writable folder, or pass --model", root.display())
    })?;
    Ok(dir)
}

/// The path for a command that has no model, with the one line saying so.
pub fn fallback() -> Result<PathBuf> {
    let dir = path()?;
    eprintln!("using {DESCRIPTION}, as no model was named ({}); pass --model or set model: in sdtune.yaml for your own", dir.display());
    Ok(dir)
}

/// Whether `spec` names a (possibly deleted) copy of the built-in model.
pub fn is_builtin(spec: &str) -> bool {
    Path::new(spec).file_name().and_then(|n| n.to_str()).is_some_and(|n| n == format!("tiny-sd-{}", content_hash()))
}

fn is_complete(dir: &Path) -> bool {
    FILES.iter().all(|(name, bytes)| is_intact(&dir.join(name), bytes))
}

/// Whether the file at `path` holds exactly `bytes` (the files are a few
/// MB in all: comparing them costs less than loading them).
fn is_intact(path: &Path, bytes: &[u8]) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() == bytes.len() as u64) && std::fs::read(path).is_ok_and(|b| b == bytes)
}

/// Rewrites every file of the copy in `dir` that differs from the binary's.
fn repair(dir: &Path) -> Result<()> {
    for (name, bytes) in FILES {
        let path = dir.join(name);
        if !is_intact(&path, bytes) {
            crate::fsutil::write_atomic(&path, bytes)?;
            eprintln!("repaired {} (it differed from the built-in model sdtune carries)", path.display());
        }
    }
    Ok(())
}

fn write_all(dir: &Path) -> Result<()> {
    for (name, bytes) in FILES {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("embedded files sit in the model folder"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_loadable_folder_once() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        std::env::set_var("SDTUNE_CACHE_DIR", tmp.path());
        let dir = path().unwrap();
        assert!(dir.starts_with(tmp.path()) && is_complete(&dir));
        assert!(is_builtin(&dir.display().to_string()));
        crate::loaders::folder::check_is_diffusers_folder(&dir).unwrap();
        let modified = std::fs::metadata(dir.join("model_index.json")).unwrap().modified().unwrap();
        assert_eq!(path().unwrap(), dir);
        assert_eq!(std::fs::metadata(dir.join("model_index.json")).unwrap().modified().unwrap(), modified, "written once");

        // One flipped byte (same size) and one missing file are repaired.
        let weights = dir.join("unet/diffusion_pytorch_model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&weights, &bytes).unwrap();
        std::fs::remove_file(dir.join("vae/config.json")).unwrap();
        assert!(!is_complete(&dir));
        assert_eq!(path().unwrap(), dir);
        assert!(is_complete(&dir), "the damaged copy was not repaired");
        std::env::remove_var("SDTUNE_CACHE_DIR");
    }
}
