//! Resumable training state: one safetensors file per save, written
//! atomically, holding the trained tensors (LoRA masters, or the UNet's
//! weights in full training), the optimizer moments and (in its
//! header) the step, loss scaler and the settings a resume must share.
//! Random draws derive from (seed, step), so no RNG state is needed beyond them.
//!
//! `index.json` beside the states records each one's SHA-256; a resume
//! takes the newest state that is whole and falls back past damaged ones.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::optimizer::AdamW;
use super::precision::LossScaler;
use super::trainable::Trainable;
use crate::loaders::tensor_file::{serialize_tensors, TensorFile};

/// The states' checksums: `{"state-000250.safetensors": "<sha256>", ...}`.
const INDEX: &str = "index.json";

/// What to do about a damaged state, said after its name.
const DAMAGED: &str = "the state is damaged; sdtune resumes from an earlier one if there is one";

/// Settings that must not change between a run and its resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity(pub Vec<(String, String)>);

/// The identity key of the micro-batches per optimizer step over all
/// processes (`--grad-accum` x processes). States saved before it record
/// `grad_accum` instead, from one process: read as this key.
pub const MICRO_BATCHES: &str = "micro_batches_per_step";
const LEGACY_GRAD_ACCUM: &str = "identity.grad_accum";

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
    let bytes = serialize_tensors(&tensors, Some(meta)).with_context(|| format!("cannot write {}", path.display()))?;
    crate::fsutil::write_atomic(&path, &bytes)?;
    let mut index = read_index(dir);
    index.insert(file_name(&path), crate::fsutil::sha256_hex(&bytes));
    prune(dir, keep, &mut index)?;
    write_index(dir, &index)?;
    Ok(path)
}

/// The newest state that opens and matches its recorded checksum, with a
/// line for each newer one passed over as damaged.
pub fn latest_good(dir: &Path) -> Result<Option<(PathBuf, Vec<String>)>> {
    let index = read_index(dir);
    let mut passed = Vec::new();
    for (_, path) in states(dir)?.into_iter().rev() {
        match check(&path, index.get(&file_name(&path))) {
            Ok(()) => return Ok(Some((path, passed))),
            Err(why) => passed.push(format!("{} {why}", path.display())),
        }
    }
    if passed.is_empty() {
        return Ok(None);
    }
    bail!(
        "every saved state in {} is damaged ({}); delete that folder and train without --resume to start again",
        dir.display(),
        passed.join("; ")
    )
}

/// Why the state at `path` cannot be resumed from, if it cannot.
fn check(path: &Path, recorded: Option<&String>) -> std::result::Result<(), String> {
    let file = TensorFile::open_with_advice(path, DAMAGED).map_err(|_| "is truncated or not a state file".to_string())?;
    match recorded {
        Some(sum) if file.sha256() != *sum => Err("does not match its recorded checksum".into()),
        _ => Ok(()),
    }
}

fn read_index(dir: &Path) -> BTreeMap<String, String> {
    // A lost or damaged index only costs the checksums: states still parse-check.
    std::fs::read(dir.join(INDEX)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn write_index(dir: &Path, index: &BTreeMap<String, String>) -> Result<()> {
    crate::fsutil::write_atomic(&dir.join(INDEX), serde_json::to_string_pretty(index)?.as_bytes())
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
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

fn prune(dir: &Path, keep: usize, index: &mut BTreeMap<String, String>) -> Result<()> {
    let all = states(dir)?;
    let excess = all.len().saturating_sub(keep.max(1));
    for (_, path) in &all[..excess] {
        std::fs::remove_file(path).with_context(|| format!("cannot remove old state {}", path.display()))?;
    }
    let kept: Vec<String> = all[excess..].iter().map(|(_, p)| file_name(p)).collect();
    index.retain(|name, _| kept.contains(name));
    Ok(())
}

/// Loads `path` into the trained tensors and optimizer; returns step and scaler.
pub fn load(path: &Path, trained: &dyn Trainable, opt: &mut AdamW, identity: &Identity) -> Result<Saved> {
    let file = TensorFile::open_with_advice(path, DAMAGED)?;
    let mut meta = file.string_metadata();
    let micro_batches = format!("identity.{MICRO_BATCHES}");
    if !meta.contains_key(&micro_batches) {
        if let Some(accum) = meta.remove(LEGACY_GRAD_ACCUM) {
            meta.insert(micro_batches, accum);
        }
    }
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
        if got != want && key == MICRO_BATCHES {
            bail!(
                "{} was saved with {got} micro-batches per step (--grad-accum x processes), but this run has {want}; resume with --grad-accum and --nproc whose product is {got} (the same samples per step), or start a new --output",
                path.display()
            );
        }
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
