//! `sdtune lora merge`: one LoRA from several on the same base model: per
//! module the sum of strength_i * scale_i * up_i @ down_i, back to a
//! low-rank pair by SVD. A module only one file has is kept exactly (its
//! up times the strength) unless `--rank` is below its rank.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::edit::{self, down_tail, PlainLora};
use super::format::{self, StoredModule};
use super::svd;

/// One input: a file and the strength its deltas are added with.
pub struct Input {
    pub path: PathBuf,
    pub strength: f64,
}

/// `FILE[:STRENGTH]`: the strength after the last colon, 1 when there is
/// none; a path that exists as given is taken whole.
pub fn parse_input(spec: &str) -> Result<Input> {
    if Path::new(spec).is_file() {
        return Ok(Input { path: spec.into(), strength: 1.0 });
    }
    let Some((file, strength)) = spec.rsplit_once(':') else {
        return Ok(Input { path: spec.into(), strength: 1.0 });
    };
    let Ok(value) = strength.trim().parse::<f64>() else {
        bail!("{spec}: `{strength}` after the colon is not a number; give FILE:STRENGTH such as a.safetensors:0.7");
    };
    if let Some(warning) = crate::ranges::check_lora_scale(value, spec)? {
        eprintln!("{warning}");
    }
    Ok(Input { path: file.into(), strength: value })
}

/// What a merge did, for the summary line.
pub struct Merged {
    pub modules: usize,
    /// Modules found in more than one input (summed and decomposed).
    pub shared: usize,
    pub max_rank: i64,
    pub min_energy: f64,
    pub mean_energy: f64,
    /// LoHa, LoKr and DoRA modules made plain LoRA (`model_edit`).
    pub converted: usize,
}

/// Merges `inputs` into `out` (atomically, in the inputs' layout). Each
/// summed module gets rank `rank`, at most (and by default) the sum of its
/// inputs' ranks, at which the sum is exact (rank(A + B) <= rank A + rank B),
/// and at most the matrix's size. Summed modules get alpha = rank (scale 1),
/// then the file one alpha (`edit::one_alpha`).
pub fn merge(inputs: &[Input], rank: Option<i64>, out: &Path) -> Result<Merged> {
    if let Some(r) = rank.filter(|&r| r < 1) {
        bail!("--rank {r} is not a LoRA rank; give a whole number of at least 1");
    }
    if inputs.is_empty() {
        bail!("sdtune lora merge needs at least one LoRA file (FILE:STRENGTH)");
    }
    let files: Vec<PlainLora> = inputs.iter().map(|i| edit::read_plain(&i.path, "the LoRA")).collect::<Result<_>>()?;
    for (i, a) in files.iter().enumerate() {
        for (j, b) in files.iter().enumerate().skip(i + 1) {
            check_same_base(a, &inputs[i].path, b, &inputs[j].path)?;
        }
    }
    let format = files[0].stored.format;
    let paths: Vec<&Path> = inputs.iter().map(|i| i.path.as_path()).collect();
    edit::check_out(out, &paths, format)?;

    // Every module's contributions, by its name in the files.
    let mut by_base: BTreeMap<&str, Vec<(&StoredModule, f64)>> = BTreeMap::new();
    for (file, input) in files.iter().zip(inputs) {
        for m in &file.stored.modules {
            by_base.entry(m.base.as_str()).or_default().push((m, input.strength));
        }
    }
    let (mut modules, mut kept, mut shared) = (Vec::new(), Vec::new(), 0);
    for (base, parts) in &by_base {
        let (first, strength) = parts[0];
        let first_rank = first.down.size()[0];
        if parts.len() == 1 && rank.is_none_or(|r| first_rank <= r) {
            kept.push(1.0);
            modules.push(StoredModule { base: base.to_string(), down: first.down.copy(), up: &first.up * strength, alpha: first.alpha, dora_scale: None });
            continue;
        }
        shared += usize::from(parts.len() > 1);
        let sum = parts
            .iter()
            .map(|(m, s)| svd::pair_delta(&m.down, &m.up) * (s * m.alpha / m.down.size()[0] as f64))
            .reduce(|a, b| a + b)
            .unwrap_or_else(|| Tensor::zeros([1], (tch::Kind::Double, tch::Device::Cpu)));
        // Above the sum of the inputs' ranks the extra rows would be zeros.
        let exact: i64 = parts.iter().map(|(m, _)| m.down.size()[0]).sum();
        let target = rank.map_or(exact, |r| r.min(exact));
        let t = svd::truncate(&sum, target, &down_tail(first), first.up.dim() == 4)?;
        kept.push(t.kept_energy);
        let new_rank = t.down.size()[0];
        modules.push(StoredModule { base: base.to_string(), down: t.down, up: t.up, alpha: new_rank as f64, dora_scale: None });
    }
    let mut metadata = files[0].metadata.clone();
    let recipe = inputs
        .iter()
        .map(|i| format!("{}:{}", i.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), i.strength))
        .collect::<Vec<_>>()
        .join(", ");
    edit::one_alpha(&mut modules);
    edit::record(&mut metadata, &modules, &format!("merged from {recipe}"), "sdtune_merged_from", recipe);
    format::write_stored(out, &modules, format, metadata).with_context(|| format!("--out {} cannot be written", out.display()))?;
    let (min_energy, mean_energy) = edit::energy_summary(&kept);
    let max_rank = edit::highest_rank(&modules);
    Ok(Merged { modules: modules.len(), shared, max_rank, min_energy, mean_energy, converted: 0 })
}

/// Two inputs must be of one layout and one base model: by the base named in
/// their metadata, by SDXL-only module names, and by the shapes of the
/// modules they share.
fn check_same_base(a: &PlainLora, a_path: &Path, b: &PlainLora, b_path: &Path) -> Result<()> {
    let (an, bn) = (a_path.display(), b_path.display());
    if a.stored.format != b.stored.format {
        bail!(
            "{an} is a {} LoRA and {bn} a {} one; merge files of one layout (convert one with the tool that wrote it)",
            a.stored.format.name(),
            b.stored.format.name()
        );
    }
    let different = |why: String| -> Result<()> {
        bail!("{an} and {bn} are LoRAs for different base models ({why}); merge only LoRAs trained on the same base model")
    };
    check_same_base_metadata(&a.metadata, a_path, &b.metadata, b_path)?;
    let (ax, bx) = (is_sdxl(a), is_sdxl(b));
    if ax != bx {
        let name = |sdxl: bool| if sdxl { "SDXL" } else { "SD1/SD2" };
        return different(format!("{} and {} module names", name(ax), name(bx)));
    }
    for m in &a.stored.modules {
        if let Some(o) = b.stored.modules.iter().find(|o| o.base == m.base) {
            let shape = |m: &StoredModule| (m.up.size()[0], down_tail(m));
            if shape(m) != shape(o) {
                let ((ao, ai), (bo, bi)) = (shape(m), shape(o));
                return different(format!("module {} maps {ai:?} -> {ao} in one and {bi:?} -> {bo} in the other", m.base));
            }
        }
    }
    Ok(())
}

/// The base models two files' headers name (kohya's and modelspec's keys) must agree.
pub fn check_same_base_metadata(a: &HashMap<String, String>, a_path: &Path, b: &HashMap<String, String>, b_path: &Path) -> Result<()> {
    for key in ["ss_base_model_version", "modelspec.architecture"] {
        if let (Some(x), Some(y)) = (a.get(key), b.get(key)) {
            if x != y {
                bail!(
                    "{} and {} are LoRAs for different base models ({key} {x} and {y}); merge only LoRAs trained on the same base model",
                    a_path.display(),
                    b_path.display()
                );
            }
        }
    }
    Ok(())
}

/// Names only SDXL LoRAs have: SGM block paths and the second text encoder.
fn is_sdxl(file: &PlainLora) -> bool {
    file.stored.modules.iter().any(|m| {
        let b = m.base.as_str();
        ["lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te1_", "lora_te2_", "text_encoder_2."]
            .iter()
            .any(|p| b.starts_with(p))
    })
}
