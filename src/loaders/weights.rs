//! Filling a model built by its weight names from safetensors files, and
//! finding the weight files of a diffusers component folder.
//!
//! Every variable the model declares must be in the files with the same
//! shape, and every tensor in the files must belong to the model: a
//! mismatch means the file does not fit the config, and we say which tensor.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

use super::tensor_file::TensorFile;
use crate::models::built::{build, Built};
use crate::models::layers::{Vb, WeightInit};

/// Builds a model and fills it from `files` (one file or the shards of one).
pub fn build_and_load<M>(
    files: &[PathBuf],
    device: Device,
    kind: Kind,
    make: impl FnOnce(Vb) -> Result<M>,
) -> Result<Built<M>> {
    let built = build(device, kind, WeightInit::Zeros, make)?;
    let opened = files.iter().map(|f| TensorFile::open(f)).collect::<Result<Vec<_>>>()?;
    load_var_store(&built.vs, &opened, &|name| Some(name.to_string()))?;
    Ok(built)
}

/// Like [`build_and_load`], with `rename` mapping each file tensor name to
/// the model's (see [`load_var_store`]); for files whose naming differs
/// from the one the model is built with (legacy VAE attention names).
pub fn build_and_load_renamed<M>(
    files: &[PathBuf],
    device: Device,
    kind: Kind,
    rename: &dyn Fn(&str) -> Option<String>,
    make: impl FnOnce(Vb) -> Result<M>,
) -> Result<Built<M>> {
    let built = build(device, kind, WeightInit::Zeros, make)?;
    let opened = files.iter().map(|f| TensorFile::open(f)).collect::<Result<Vec<_>>>()?;
    load_var_store(&built.vs, &opened, rename)?;
    Ok(built)
}

/// Tensors that some exporters add and no model needs.
const IGNORED_SUFFIXES: &[&str] = &["embeddings.position_ids"];

/// Fills every variable of `vs` from `files`. `rename` maps a file's tensor
/// name to the model's name (identity for diffusers files), or `None` to
/// skip a tensor that belongs to another component of the same file.
pub fn load_var_store(
    vs: &VarStore,
    files: &[TensorFile],
    rename: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    // model name -> (file, name in file)
    let mut available: HashMap<String, (&TensorFile, String)> = HashMap::new();
    for file in files {
        for name in file.names() {
            if let Some(model_name) = rename(&name) {
                available.insert(model_name, (file, name));
            }
        }
    }
    let variables = vs.variables();
    let mut wanted: Vec<&String> = variables.keys().collect();
    wanted.sort();
    for name in wanted {
        let var = &variables[name];
        let Some((file, file_name)) = available.remove(name) else {
            bail!(
                "{} has no tensor {name}, which the model's config.json requires; the weights do not match the config",
                describe(files)
            );
        };
        file.with_view(&file_name, |src| {
            if src.size() != var.size() {
                bail!(
                    "{}: tensor {file_name} has shape {:?} but the model's config.json requires {:?}; the weights do not match the config",
                    file.path().display(),
                    src.size(),
                    var.size()
                );
            }
            copy_into(var, src).with_context(|| format!("{}: cannot load tensor {file_name}", file.path().display()))
        })?;
        file.release(&file_name);
    }
    let mut unexpected: Vec<String> = available
        .into_iter()
        .filter(|(name, _)| !IGNORED_SUFFIXES.iter().any(|s| name.ends_with(s)))
        .map(|(_, (_, file_name))| file_name)
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        let shown: Vec<&str> = unexpected.iter().take(3).map(String::as_str).collect();
        bail!(
            "{} holds {} tensor(s) the model's config.json has no place for (first: {}); the weights do not match the config",
            describe(files),
            unexpected.len(),
            shown.join(", ")
        );
    }
    Ok(())
}

/// Copies `src` (any dtype, any device; typically a view of a memory-mapped
/// file) into the weight `var`: `copy_` converts dtype and device in one
/// pass, so no full-size intermediate is made.
pub(crate) fn copy_into(var: &Tensor, src: &Tensor) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let mut var = var.shallow_clone();
        var.f_copy_(src)?;
        Ok(())
    })
}

fn describe(files: &[TensorFile]) -> String {
    match files {
        [one] => one.path().display().to_string(),
        many => format!(
            "the {} files {}",
            many.len(),
            many.iter().map(|f| f.path().display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The weight files of one component folder of a diffusers model:
/// `<stem>.safetensors`, its `--variant` (`<stem>.fp16.safetensors`), or the
/// shards listed in `<stem>.safetensors.index.json` (for a variant,
/// `<stem>.safetensors.index.fp16.json` as diffusers and transformers name
/// it). With no variant asked and no default weights, a folder holding a
/// single variant (what `from_pretrained(..., variant="fp16")` downloads)
/// loads that one.
pub fn component_weights(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    // (single file, index files) in order of preference.
    let mut candidates: Vec<(String, Vec<String>)> = Vec::new();
    if let Some(v) = variant {
        candidates.push((
            format!("{stem}.{v}.safetensors"),
            vec![format!("{stem}.safetensors.index.{v}.json"), format!("{stem}.{v}.safetensors.index.json")],
        ));
    }
    candidates.push((format!("{stem}.safetensors"), vec![format!("{stem}.safetensors.index.json")]));
    for (name, indexes) in &candidates {
        let single = dir.join(name);
        if single.is_file() {
            return Ok(vec![single]);
        }
        if let Some(index) = indexes.iter().map(|i| dir.join(i)).find(|i| i.is_file()) {
            return shards_of(&index);
        }
    }
    if variant.is_none() {
        let names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
            .unwrap_or_default();
        let mut singles: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(&format!("{stem}.")) && n.ends_with(".safetensors") && n.matches('.').count() == 2)
            .collect();
        singles.sort();
        if let [only] = singles.as_slice() {
            return Ok(vec![dir.join(only)]);
        }
        let indexes: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(&format!("{stem}.")) && n.contains(".index") && n.ends_with(".json"))
            .collect();
        if let [only] = indexes.as_slice() {
            return shards_of(&dir.join(only));
        }
    }
    let pickles = ["bin", "ckpt", "pt"].iter().map(|ext| dir.join(format!("{stem}.{ext}"))).find(|p| p.is_file());
    if let Some(p) = pickles {
        bail!(
            "{} is a pickle file, which sdtune never loads because it can run code; convert the model to safetensors (diffusers: save_pretrained(..., safe_serialization=True))",
            p.display()
        );
    }
    bail!("{} has no {stem}.safetensors; the model folder is incomplete", dir.display())
}

fn shards_of(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let parsed: Index = crate::models::config::read_json(index)?;
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}
