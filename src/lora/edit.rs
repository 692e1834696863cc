//! What `sdtune lora resize` and `merge` share: reading a plain LoRA file
//! without its model, checking where the result goes, recording the edit in
//! the header, and the kept-energy summary.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};

use super::format::{self, LoraFormat, StoredFile, StoredModule};
use crate::loaders::tensor_file::TensorFile;

/// A LoRA file as stored, with its header metadata.
pub struct PlainLora {
    pub stored: StoredFile,
    pub metadata: HashMap<String, String>,
}

/// `path` (named as `flag` in errors) must be a file.
pub fn check_is_file(path: &Path, flag: &str) -> Result<()> {
    if !path.is_file() {
        bail!("{flag} {} {}; give the path of a .safetensors LoRA file", path.display(), crate::fsutil::why_not_a_file(path));
    }
    Ok(())
}

/// The kind of module in the file at `path` whose weight change only the
/// base model can give (LoHa, LoKr, DoRA), by its tensor names alone; None
/// for plain LoRA / LoCon files and for files that cannot be opened (the
/// readers name what is wrong with those).
pub fn model_kind(path: &Path) -> Option<&'static str> {
    let file = TensorFile::open(path).ok()?;
    let names = file.names();
    let suffix = |n: &String| n.rsplit_once('.').map(|(_, s)| s.to_string()).unwrap_or_default();
    names.iter().find_map(|n| match suffix(n).as_str() {
        s if s.starts_with("hada_") => Some("LoHa"),
        s if s.starts_with("lokr_") => Some("LoKr"),
        "dora_scale" | "lora_magnitude_vector" => Some("DoRA"),
        _ => None,
    })
}

/// The one sentence for a LoHa, LoKr or DoRA input given without `--model`.
pub fn needs_model_sentence(path: &Path, kind: &str) -> String {
    let why = match kind {
        "DoRA" => "whose magnitudes renormalise the base model's exact weights",
        _ => "whose conv changes are stored flattened, so their kernel size comes from the base model",
    };
    format!("{} holds {kind} modules, {why}; add --model with the model it was trained for (a diffusers folder, a single .safetensors checkpoint or a Hub id) to turn them into LoRA", path.display())
}

/// Reads `path` (named as `flag` in errors) as plain LoRA / LoCon modules.
/// LoHa, LoKr and DoRA are refused here: they need the model (`model_edit`).
pub fn read_plain(path: &Path, flag: &str) -> Result<PlainLora> {
    check_is_file(path, flag)?;
    let file = TensorFile::open(path)?;
    let stored = format::read_stored(&file)?;
    let kind = stored.lycoris.first().map(|m| m.factors.kind_name()).or_else(|| stored.modules.iter().any(|m| m.dora_scale.is_some()).then_some("DoRA"));
    if let Some(kind) = kind {
        bail!("{}", needs_model_sentence(path, kind));
    }
    Ok(PlainLora { stored, metadata: file.string_metadata() })
}

/// `--out` may not be an input (it would be replaced while being read
/// from), and a PEFT file may not land beside an `adapter_config.json`,
/// whose `lora_alpha` readers would apply on top of the folded scales.
pub fn check_out(out: &Path, inputs: &[&Path], format: LoraFormat) -> Result<()> {
    if out.is_dir() {
        bail!("--out {} is a folder; give the path of the .safetensors file to write", out.display());
    }
    for input in inputs {
        if same_file(out, input) {
            bail!("--out {} is the input file itself; write the result to another file", out.display());
        }
    }
    let beside = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join("adapter_config.json");
    if format != LoraFormat::Kohya && beside.is_file() {
        bail!(
            "--out {} would sit beside {}, whose lora_alpha sdtune and peft would apply to it again; write the result to another folder",
            out.display(),
            beside.display()
        );
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Updates `metadata` for the written `modules`: kohya's `ss_network_dim` /
/// `ss_network_alpha` ("Dynamic" when modules differ, as kohya writes),
/// `ss_training_comment` prefixed with `comment`, `key` = `value`; hashes of
/// the old weights are dropped, and so are diffusers' per-model alphas,
/// already folded into the up weights of a diffusers layout.
pub fn record(metadata: &mut HashMap<String, String>, modules: &[StoredModule], comment: &str, key: &str, value: String) {
    let uniform = |values: Vec<String>| {
        let first = values.first().cloned().unwrap_or_default();
        if values.iter().all(|v| *v == first) {
            first
        } else {
            "Dynamic".to_string()
        }
    };
    metadata.insert("ss_network_dim".into(), uniform(modules.iter().map(|m| m.down.size()[0].to_string()).collect()));
    metadata.insert("ss_network_alpha".into(), uniform(modules.iter().map(|m| format!("{:?}", m.alpha)).collect()));
    let earlier = metadata.get("ss_training_comment").cloned().unwrap_or_default();
    metadata.insert("ss_training_comment".into(), if earlier.is_empty() { comment.to_string() } else { format!("{comment}; {earlier}") });
    metadata.insert(key.into(), value);
    for stale in ["sshs_model_hash", "sshs_legacy_hash", "lora_adapter_metadata"] {
        metadata.remove(stale);
    }
}

/// Gives every module the same alpha (the highest rank) when they differ,
/// folding the change of scale into `up`: diffusers' kohya loader applies
/// the most common alpha to every module of a file (its per-module
/// `alpha_pattern` keys match no module), so mixed alphas would load wrong.
pub fn one_alpha(modules: &mut [StoredModule]) {
    let Some(first) = modules.first().map(|m| m.alpha) else { return };
    if modules.iter().all(|m| m.alpha == first) {
        return;
    }
    let alpha = modules.iter().map(|m| m.down.size()[0]).max().unwrap_or(1) as f64;
    for m in modules {
        m.up = &m.up * (m.alpha / alpha);
        m.alpha = alpha;
    }
}

/// Min and mean of the kept energies, one per module.
pub fn energy_summary(kept: &[f64]) -> (f64, f64) {
    let min = kept.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = kept.iter().sum::<f64>() / kept.len().max(1) as f64;
    (if kept.is_empty() { 1.0 } else { min }, if kept.is_empty() { 1.0 } else { mean })
}

/// The highest rank among `modules` (0 for none).
pub fn highest_rank(modules: &[StoredModule]) -> i64 {
    modules.iter().map(|m| m.down.size()[0]).max().unwrap_or(0)
}

/// The shape a module's down tensor has after its rank: `[in]` or `[in, k, k]`.
pub fn down_tail(m: &StoredModule) -> Vec<i64> {
    m.down.size()[1..].to_vec()
}
