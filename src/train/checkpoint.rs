//! Resumable training state: one safetensors file per save, written
//! atomically, holding the trained tensors (LoRA masters, or the UNet's
//! weights in full training), the optimizer moments and (in its
//! header) the step, loss scaler and the settings a resume must share.
//! Random draws derive from (seed, step), so no RNG state is needed beyond them.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::optimizer::AdamW;
use super::precision::LossScaler;
use super::trainable::Trainable;
use crate::loaders::tensor_file::{write_tensors, TensorFile};

/// Settings that must not change between a run and its resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity(pub Vec<(String, String)>);

/// What a saved state holds besides tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Saved {
    /// Completed optimizer steps.
    pub step: u64,
    pub scaler: LossScaler,
}

pub fn state_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("state-{step:06}.safetensors"))
}

/// Writes the state after `step` completed steps; keeps the newest `keep`.
pub fn save(dir: &Path, step: u64, trained: &dyn Trainable, opt: &AdamW, scaler: &LossScaler, identity: &Identity, keep: usize) -> Result<PathBuf> {
    let mut tensors: Vec<(String, Tensor)> = trained.state_tensors().into_iter().map(|(name, t)| (name, t.detach())).collect();
    tensors.push(("optimizer.exp_avg".into(), opt.exp_avg.shallow_clone()));
    tensors.push(("optimizer.exp_avg_sq".into(), opt.exp_avg_sq.shallow_clone()));
    let mut meta: HashMap<String, String> = identity.0.iter().cloned().map(|(k, v)| (format!("identity.{k}"), v)).collect();
    meta.insert("step".into(), step.to_string());
    meta.insert("optimizer.step".into(), opt.step.to_string());
    meta.insert("scaler.scale".into(), format!("{:e}", scaler.scale));
    meta.insert("scaler.good_steps".into(), scaler.good_steps.to_string());
    meta.insert("scaler.enabled".into(), scaler.enabled.to_string());
    let path = state_path(dir, step);
    write_tensors(&path, &tensors, Some(meta))?;
    prune(dir, keep)?;
    Ok(path)
}

/// The newest state file in `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(states(dir)?.pop().map(|(_, p)| p))
}

fn states(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(step) = name.strip_prefix("state-").and_then(|r| r.strip_suffix(".safetensors")).and_then(|s| s.parse().ok()) {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let all = states(dir)?;
    let excess = all.len().saturating_sub(keep.max(1));
    for (_, path) in &all[..excess] {
        std::fs::remove_file(path).with_context(|| format!("cannot remove old state {}", path.display()))?;
    }
    Ok(())
}

/// Loads `path` into the trained tensors and optimizer; returns step and scaler.
pub fn load(path: &Path, trained: &dyn Trainable, opt: &mut AdamW, identity: &Identity) -> Result<Saved> {
    let file = TensorFile::open(path)?;
    let meta = file.string_metadata();
    // A setting the saved run had and this one lacks (a full run's mode) also differs.
    let mut extra: Vec<(&String, &String)> =
        meta.iter().filter(|(k, _)| k.strip_prefix("identity.").is_some_and(|k| !identity.0.iter().any(|(n, _)| n == k))).collect();
    extra.sort();
    if let Some((key, got)) = extra.first() {
        let key = key.trim_start_matches("identity.");
        bail!(
            "{} was saved with {key} = {got}, but this run has no {key}; resume with the same settings (e.g. --full) or start a new --output",
            path.display()
        );
    }
    for (key, want) in &identity.0 {
        let got = meta.get(&format!("identity.{key}")).map(String::as_str).unwrap_or("(unset)");
        if got != want {
            bail!(
                "{} was saved with {key} = {got}, but this run has {key} = {want}; resume with the same settings or start a new --output",
                path.display()
            );
        }
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in trained.state_tensors() {
            let saved = file.tensor(&name)?;
            if saved.size() != var.size() {
                bail!("{}: tensor {name} has shape {:?}, expected {:?}", path.display(), saved.size(), var.size());
            }
            let mut var = var;
            var.copy_(&saved.to_device(var.device()));
        }
        Ok(())
    })?;
    let field = |k: &str| meta.get(k).with_context(|| format!("{} lacks {k}; the state file is damaged", path.display()));
    let opt_step: i64 = field("optimizer.step")?.parse()?;
    opt.load_state(file.tensor("optimizer.exp_avg")?, file.tensor("optimizer.exp_avg_sq")?, opt_step)
        .with_context(|| format!("in {}", path.display()))?;
    let mut scaler = if field("scaler.enabled")? == "true" { LossScaler::fp16() } else { LossScaler::disabled() };
    scaler.scale = field("scaler.scale")?.parse()?;
    scaler.good_steps = field("scaler.good_steps")?.parse()?;
    Ok(Saved { step: field("step")?.parse()?, scaler })
}
