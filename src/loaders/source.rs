//! What a `--model` value names (loading is `model_files`' business).
//!
//! A value is, in this order: a diffusers folder (`model_index.json`), a
//! Hugging Face cache repository folder (`models--org--name`), a file (a
//! single-file `.safetensors` checkpoint; pickles are refused by extension
//! and magic bytes without being read further), or a Hub id (`org/name`,
//! `org/name@revision`) resolved in the local Hugging Face cache.
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::file_kind::{classify, not_a_model_sentence, FileKind};
use super::hub::{self, HubId};
use super::tensor_file::TensorFile;
use crate::models::config::Prediction;

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A diffusers pipeline folder.
    Folder(PathBuf),
    /// A single-file checkpoint in the original LDM layout.
    SingleFile(PathBuf),
    /// A Hub id, looked up in the Hugging Face cache.
    Hub(HubId),
}

/// How to load, beyond where from.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Weight variant of a diffusers folder or Hub id (`fp16`: `*.fp16.safetensors`).
    pub variant: Option<String>,
    /// What the UNet predicts; overrides every config and guess.
    pub prediction_type: Option<Prediction>,
    /// Another VAE to use instead of the model's (`--vae`).
    pub vae: Option<PathBuf>,
}

/// `epsilon` / `eps` or `v` / `v_prediction`, as `--prediction-type` takes it.
pub fn parse_prediction(value: &str) -> Result<Prediction> {
    match value.to_ascii_lowercase().as_str() {
        "epsilon" | "eps" => Ok(Prediction::Epsilon),
        "v" | "v_prediction" | "v-prediction" => Ok(Prediction::V),
        other => bail!("--prediction-type {other:?} is not one of epsilon, v"),
    }
}

/// Extensions of pickle-based checkpoints, which sdtune never opens.
const PICKLE_EXTENSIONS: &[&str] = &["ckpt", "pt", "pth", "bin", "pkl", "pickle"];

/// Parses a `--model` value without loading anything (pickles are refused
/// here, from their name or first bytes).
pub fn parse(value: &str) -> Result<ModelSource> {
    let path = Path::new(value);
    if path.is_dir() {
        if path.join("model_index.json").is_file() {
            return Ok(ModelSource::Folder(path.to_path_buf()));
        }
        if hub::is_repo_dir(path) {
            let snap = hub::snapshot_of_repo_dir(path, "main").with_context(|| {
                format!("{} is a Hugging Face cache folder without a snapshot of main; pass --model its snapshots/<hash> folder", path.display())
            })?;
            return Ok(ModelSource::Folder(snap));
        }
        let checkpoints = files_with_extension(path, "safetensors");
        if let Some(first) = checkpoints.first() {
            bail!(
                "{} is not a diffusers model folder (it has no model_index.json); to load a single-file checkpoint, pass the file itself, e.g. --model {}",
                path.display(),
                first.display()
            );
        }
        bail!(
            "{} is not a diffusers model folder (it has no model_index.json); pass --model the folder that holds model_index.json, unet/, vae/, text_encoder/ and tokenizer/",
            path.display()
        );
    }
    if path.exists() {
        refuse_pickle(path)?;
        return Ok(ModelSource::SingleFile(path.to_path_buf()));
    }
    if let Some(id) = HubId::parse(value) {
        return Ok(ModelSource::Hub(id));
    }
    bail!(
        "{value} does not exist; pass --model a diffusers folder, a single-file .safetensors checkpoint or a Hugging Face id like org/name"
    )
}

fn files_with_extension(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|entries| entries.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.retain(|p| p.is_file() && p.extension().and_then(|e| e.to_str()) == Some(ext));
    files.sort();
    files
}

/// Refuses pickle checkpoints: by extension without opening the file, then
/// by the first 9 bytes (zip `PK\x03\x04` of `torch.save`, pickle protocol
/// `\x80`) unless they are a safetensors header. Errs on anything that is
/// not a regular file.
pub fn refuse_pickle(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    if let Some(ext) = ext.filter(|e| PICKLE_EXTENSIONS.contains(&e.as_str())) {
        bail!("{}", pickle_sentence(path, &format!("a .{ext} file")));
    }
    if !path.is_file() {
        bail!(
            "{} is not a regular file; pass --model a diffusers folder, a .safetensors file or a Hub id",
            path.display()
        );
    }
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let read = read_up_to(&mut file, &mut head).with_context(|| format!("cannot read {}", path.display()))?;
    let head = &head[..read];
    if looks_like_safetensors(head) {
        return Ok(());
    }
    if head.starts_with(b"PK\x03\x04") {
        bail!("{}", pickle_sentence(path, "a zip archive as torch.save writes"));
    }
    if head.len() >= 2 && head[0] == 0x80 && (1..=5).contains(&head[1]) {
        bail!("{}", pickle_sentence(path, "a Python pickle"));
    }
    bail!(
        "{} is not a safetensors file; pass --model a diffusers folder, a single-file .safetensors checkpoint or a Hugging Face id like org/name",
        path.display()
    )
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// A little-endian u64 header length followed by `{`.
fn looks_like_safetensors(head: &[u8]) -> bool {
    head.len() == 9 && head[8] == b'{'
}

fn pickle_sentence(path: &Path, what: &str) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    format!(
        "{} is a pickle checkpoint ({what}), which sdtune never opens because unpickling can run arbitrary code; convert it once to safetensors, e.g. `python -c \"import torch, safetensors.torch as st; sd = torch.load('{}', weights_only=True); st.save_file(sd.get('state_dict', sd), '{stem}.safetensors')\"`, and pass the .safetensors file",
        path.display(),
        path.display()
    )
}

/// Errs in one sentence unless the safetensors file at `path` is a
/// single-file Stable Diffusion checkpoint (a LoRA, a diffusers component).
pub fn check_checkpoint(path: &Path) -> Result<()> {
    let names = TensorFile::open(path)?.names();
    match classify(&names) {
        FileKind::Checkpoint => Ok(()),
        kind => bail!("{}", not_a_model_sentence(path, kind, &names)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_missing_paths() {
        assert_eq!(parse("org/name").unwrap(), ModelSource::Hub(HubId { id: "org/name".into(), revision: None }));
        let err = parse("./no/such/folder").unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn pickles_refused_by_name_without_opening() {
        // The file does not exist: refusal comes from the name alone.
        let err = refuse_pickle(Path::new("/nonexistent/model.ckpt")).unwrap_err().to_string();
        assert!(err.contains("pickle") && err.contains("safetensors"), "{err}");
    }

    #[test]
    fn prediction_flag_values() {
        assert_eq!(parse_prediction("v").unwrap(), Prediction::V);
        assert_eq!(parse_prediction("epsilon").unwrap(), Prediction::Epsilon);
        assert!(parse_prediction("x").is_err());
    }
}
