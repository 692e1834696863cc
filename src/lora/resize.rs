//! `sdtune lora resize`: every module's delta (scale * up @ down) truncated
//! to a lower rank by SVD, the file's layout, names and metadata kept.
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::edit::{self, down_tail};
use super::format::{self, StoredModule};
use super::svd;

/// What a resize did, for the summary line.
pub struct Resized {
    pub modules: usize,
    /// Modules above the new rank, truncated by SVD.
    pub truncated: usize,
    /// The highest rank in the input.
    pub old_rank: i64,
    /// The highest rank written (below the asked rank where a module's change has fewer directions).
    pub new_rank: i64,
    /// Min and mean over modules of the kept energy (1 for modules kept as they were).
    pub min_energy: f64,
    pub mean_energy: f64,
    /// LoHa, LoKr and DoRA modules made plain LoRA (`model_edit`).
    pub converted: usize,
}

/// Resizes `input` to `rank` and writes `out` atomically in the same layout.
/// As kohya's `resize_lora.py --new_rank`: up = U_r S_r, down = Vh_r and
/// alpha = scale * r, so each module keeps its scale; modules already at
/// rank <= `rank` are copied exactly.
pub fn resize(input: &Path, rank: i64, out: &Path) -> Result<Resized> {
    if rank < 1 {
        bail!("--rank {rank} is not a LoRA rank; give a whole number of at least 1");
    }
    let edit::PlainLora { stored, mut metadata } = edit::read_plain(input, "the LoRA")?;
    edit::check_out(out, &[input], stored.format)?;
    let old_rank = edit::highest_rank(&stored.modules);
    let mut kept = Vec::with_capacity(stored.modules.len());
    let mut modules = Vec::with_capacity(stored.modules.len());
    let mut truncated = 0;
    for m in stored.modules {
        let r = m.down.size()[0];
        if r <= rank {
            kept.push(1.0);
            modules.push(m);
            continue;
        }
        let scale = m.alpha / r as f64;
        let t = svd::truncate(&svd::pair_delta(&m.down, &m.up), rank, &down_tail(&m), m.up.dim() == 4)?;
        kept.push(t.kept_energy);
        truncated += 1;
        let new_rank = t.down.size()[0];
        modules.push(StoredModule { base: m.base, down: t.down, up: t.up, alpha: scale * new_rank as f64, dora_scale: None });
    }
    let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    edit::one_alpha(&mut modules);
    edit::record(
        &mut metadata,
        &modules,
        &format!("dimension is resized from {old_rank} to {rank}"),
        "sdtune_resized_from",
        format!("{name} (rank {old_rank})"),
    );
    format::write_stored(out, &modules, stored.format, metadata).with_context(|| format!("--out {} cannot be written", out.display()))?;
    let (min_energy, mean_energy) = edit::energy_summary(&kept);
    let new_rank = edit::highest_rank(&modules);
    Ok(Resized { modules: modules.len(), truncated, old_rank, new_rank, min_energy, mean_energy, converted: 0 })
}
