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

/// Reads `path` (named as `flag` in errors) as plain LoRA / LoCon modules.
/// LoHa and LoKr are refused: their conv deltas are stored flattened, and
/// their kernel size is known only from the model.
pub fn read_plain(path: &Path, flag: &str) -> Result<PlainLora> {
    if !path.is_file() {
        bail!("{flag} {} {}; give the path of a .safetensors LoRA file", path.display(), crate::fsutil::why_not_a_file(path));
    }
    let file = TensorFile::open(path)?;
    let stored = format::read_stored(&file)?;
    if let Some(m) = stored.lycoris.first() {
        bail!(
            "{} holds {} modules (e.g. {}), which sdtune lora cannot resize or merge; it works on plain LoRA and LoCon files",
            path.display(),
            m.factors.kind_name(),
            m.base
        );
    }
    if let Some(m) = stored.modules.iter().find(|m| m.dora_scale.is_some()) {
        bail!(
            "{} holds DoRA modules (e.g. {}), whose magnitudes belong to their exact weights, so sdtune lora cannot resize or merge them; it works on plain LoRA and LoCon files",
            path.display(),
            m.base
        );
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

/// The shape a module's down tensor has after its rank: `[in]` or `[in, k, k]`.
pub fn down_tail(m: &StoredModule) -> Vec<i64> {
    m.down.size()[1..].to_vec()
}
