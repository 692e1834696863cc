//! `sdtune lora resize|merge --model`: LoHa, LoKr and DoRA modules, whose
//! weight change is known only against the base model (LoHa/LoKr conv
//! factors are stored flattened, without their kernel size; a DoRA
//! magnitude renormalises the exact base weight), become plain LoRA /
//! LoCon pairs. Each module's exact change against its layer (as `attach`
//! and `fuse` apply it), summed over the inputs with their strengths, is
//! factored by SVD (`svd.rs`). Plain pairs are treated as `merge.rs` and
//! `resize.rs` treat them.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::edit;
use super::format::{self, LoraFormat, StoredModule};
use super::lycoris::{Factors, Part};
use super::merge::{check_same_base_metadata, Input, Merged};
use super::resize::Resized;
use super::svd::{self, Truncated};
use super::{Component, LoraModule, LoraWeights, ModelLayers};
use crate::loaders::tensor_file::TensorFile;
use crate::models::layers::LayerShape;

/// One input file read against the model.
struct Read {
    /// The layout the result is written in: kohya's, else diffusers' (PEFT).
    format: LoraFormat,
    weights: LoraWeights,
}

fn read(path: &Path, layers: &ModelLayers) -> Result<Read> {
    edit::check_is_file(path, "the LoRA")?;
    let file = TensorFile::open(path)?;
    let stored = format::read_stored(&file)?;
    let format = if stored.format == LoraFormat::Kohya { LoraFormat::Kohya } else { LoraFormat::Peft };
    let weights = format::resolve(stored, file.string_metadata(), layers, &path.display().to_string())?;
    Ok(Read { format, weights })
}

/// The layout `sdtune lora resize|merge --model` writes for `path` as first
/// input (kohya for kohya files, else diffusers'), if it can be told.
pub fn output_format(path: &Path) -> Option<LoraFormat> {
    let file = TensorFile::open(path).ok()?;
    let format = format::detect(&file.names())?;
    Some(if format == LoraFormat::Kohya { LoraFormat::Kohya } else { LoraFormat::Peft })
}

/// One file's change to one layer.
enum Change<'a> {
    /// A plain LoRA / LoCon pair.
    Pair(&'a LoraModule),
    /// A LoHa, LoKr or DoRA module's exact change, `[out, in * k * k]` in
    /// fp64, its scale applied; `bound` is a rank at which it is exact.
    Dense { delta: Tensor, bound: i64 },
}

impl Change<'_> {
    /// The change as `[out, in * k * k]` in fp64, scale applied.
    fn delta(&self) -> Tensor {
        match self {
            Change::Pair(m) => svd::pair_delta(&m.down, &m.up) * m.scale(),
            Change::Dense { delta, .. } => delta.shallow_clone(),
        }
    }

    /// A rank at which the change is exact.
    fn bound(&self) -> i64 {
        match self {
            Change::Pair(m) => m.rank(),
            Change::Dense { bound, .. } => *bound,
        }
    }
}

/// The shape a layer's LoRA pair takes: down's tail (`[in]` or `[in, k, k]`),
/// whether up is a 1x1 conv, and the flattened delta's size.
struct PairShape {
    tail: Vec<i64>,
    conv: bool,
    out: i64,
    inner: i64,
}

fn pair_shape(layers: &ModelLayers, component: Component, layer: &str) -> PairShape {
    let shape = layers.index(component).and_then(|i| i.with(layer, |e| e.shape)).expect("checked by format::resolve");
    match shape {
        LayerShape::Linear { in_features, out_features } => PairShape { tail: vec![in_features], conv: false, out: out_features, inner: in_features },
        LayerShape::Conv2d { in_channels, out_channels, kernel } => {
            PairShape { tail: vec![in_channels, kernel, kernel], conv: true, out: out_channels, inner: in_channels * kernel * kernel }
        }
    }
}

/// A rank at which a LoHa / LoKr product is exact: rank(A ∘ B) <= rank A *
/// rank B (Hadamard), rank(A ⊗ B) = rank A * rank B (Kronecker), each side
/// at most its inner size.
fn factors_bound(factors: &Factors) -> i64 {
    let side = |p: &Part| match p {
        Part::Full(w) => w.size()[0].min(w.numel() as i64 / w.size()[0].max(1)),
        // a [out, r] @ b [r, in]; with a Tucker core a is [r, out].
        Part::Product { b, t: None, .. } => b.size()[0],
        Part::Product { a, t: Some(_), .. } => a.size()[0],
    };
    match factors {
        Factors::Hadamard { w1, w2 } | Factors::Kronecker { w1, w2 } => side(w1) * side(w2),
    }
}

/// Every module of a file as (component, layer, change).
fn changes<'a>(weights: &'a LoraWeights, layers: &ModelLayers, source: &str) -> Result<Vec<(Component, String, Change<'a>)>> {
    let mut out = Vec::new();
    for m in &weights.modules {
        let change = match &m.dora_scale {
            None => Change::Pair(m),
            Some(_) => {
                let shape = pair_shape(layers, m.component, &m.layer);
                let index = layers.index(m.component).expect("checked by format::resolve");
                let weight = index.with(&m.layer, |e| e.weight.shallow_clone()).expect("checked by format::resolve");
                let delta = super::dora_delta(m, &weight, source).expect("a DoRA module");
                // m / ||V|| rescales W itself, so the change is full rank.
                Change::Dense { delta: delta.to_kind(Kind::Double).reshape([shape.out, -1]), bound: shape.out.min(shape.inner) }
            }
        };
        out.push((m.component, m.layer.clone(), change));
    }
    for m in &weights.lycoris {
        let shape = pair_shape(layers, m.component, &m.layer);
        let (delta, _) = super::lycoris_delta(m, layers, source)?;
        let bound = factors_bound(&m.factors).min(shape.out).min(shape.inner);
        out.push((m.component, m.layer.clone(), Change::Dense { delta: delta.to_kind(Kind::Double).reshape([shape.out, -1]), bound }));
    }
    Ok(out)
}

/// The highest rank among a file's modules as `sdtune info` shows it (a
/// LoHa/LoKr's inner size, a DoRA's pair rank); 0 when none has one.
fn largest_rank(weights: &LoraWeights) -> i64 {
    let pairs = weights.modules.iter().map(LoraModule::rank);
    let products = weights.lycoris.iter().filter_map(|m| m.factors.rank());
    pairs.chain(products).max().unwrap_or(0)
}

/// Each module's changes by its name in the output (sorted), at their strengths.
type Grouped<'a> = BTreeMap<String, (Component, String, Vec<(Change<'a>, f64)>)>;

fn group<'a>(files: &'a [Read], strengths: &[f64], paths: &[&Path], layers: &ModelLayers, format: LoraFormat) -> Result<Grouped<'a>> {
    let mut grouped: Grouped = BTreeMap::new();
    for ((file, &strength), path) in files.iter().zip(strengths).zip(paths) {
        for (component, layer, change) in changes(&file.weights, layers, &path.display().to_string())? {
            let name = format::module_name(format, component, &layer, &layers.kohya)?;
            grouped.entry(name).or_insert_with(|| (component, layer, Vec::new())).2.push((change, strength));
        }
    }
    Ok(grouped)
}

/// The sum of `parts` factored at `rank` (at most the rank where it is
/// exact, and the matrix's size), alpha = rank (scale 1).
fn factor(name: &str, parts: &[(Change, f64)], rank: impl FnOnce(i64) -> i64, shape: &PairShape) -> Result<(StoredModule, f64)> {
    let sum = parts.iter().map(|(c, s)| c.delta() * *s).reduce(|a, b| a + b).expect("a module has a change");
    let exact = parts.iter().map(|(c, _)| c.bound()).sum::<i64>().min(shape.out).min(shape.inner);
    let Truncated { down, up, kept_energy } = svd::truncate(&sum, rank(exact).min(exact), &shape.tail, shape.conv)?;
    let new_rank = down.size()[0];
    Ok((StoredModule { base: name.to_string(), down, up, alpha: new_rank as f64, dora_scale: None }, kept_energy))
}

fn dense_count(parts: &[(Change, f64)]) -> usize {
    parts.iter().filter(|(c, _)| matches!(c, Change::Dense { .. })).count()
}

/// The header of a file of plain pairs: kohya's LoRA module, and no
/// LyCORIS network arguments (`algo`, `dora_wd`) that would describe the
/// old network to tools that read them.
fn as_plain_lora(metadata: &mut std::collections::HashMap<String, String>) {
    metadata.remove("ss_network_args");
    if metadata.contains_key("ss_network_module") {
        metadata.insert("ss_network_module".into(), "networks.lora".into());
    }
}

/// `sdtune lora resize IN --rank R --model M`: plain pairs as `resize.rs`
/// treats them (kept at or below R, else cut keeping their scale); every
/// LoHa, LoKr and DoRA module factored at R, at most the rank where it is exact.
pub fn resize(input: &Path, rank: i64, out: &Path, layers: &ModelLayers) -> Result<Resized> {
    if rank < 1 {
        bail!("--rank {rank} is not a LoRA rank; give a whole number of at least 1");
    }
    let files = [read(input, layers)?];
    let format = files[0].format;
    edit::check_out(out, &[input], format)?;
    let old_rank = largest_rank(&files[0].weights);
    let (mut modules, mut kept, mut truncated, mut converted) = (Vec::new(), Vec::new(), 0, 0);
    for (name, (component, layer, parts)) in group(&files, &[1.0], &[input], layers, format)? {
        let shape = pair_shape(layers, component, &layer);
        if let [(Change::Pair(m), _)] = parts.as_slice() {
            // As resize.rs: a pair keeps its scale (alpha = scale * new rank).
            if m.rank() <= rank {
                modules.push(StoredModule { base: name, down: m.down.copy(), up: m.up.copy(), alpha: m.alpha, dora_scale: None });
                kept.push(1.0);
                continue;
            }
            let t = svd::truncate(&svd::pair_delta(&m.down, &m.up), rank, &shape.tail, shape.conv)?;
            let new_rank = t.down.size()[0];
            modules.push(StoredModule { base: name, down: t.down, up: t.up, alpha: m.scale() * new_rank as f64, dora_scale: None });
            kept.push(t.kept_energy);
            truncated += 1;
            continue;
        }
        converted += dense_count(&parts);
        let exact = parts.iter().map(|(c, _)| c.bound()).sum::<i64>().min(shape.out).min(shape.inner);
        truncated += usize::from(rank < exact);
        let (module, energy) = factor(&name, &parts, |_| rank, &shape)?;
        modules.push(module);
        kept.push(energy);
    }
    let mut metadata = files[0].weights.metadata.clone();
    as_plain_lora(&mut metadata);
    let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    edit::one_alpha(&mut modules);
    edit::record(
        &mut metadata,
        &modules,
        &format!("dimension is resized from {old_rank} to {rank}, LoHa/LoKr/DoRA made LoRA by SVD"),
        "sdtune_resized_from",
        format!("{name} (rank {old_rank})"),
    );
    format::write_stored(out, &modules, format, metadata).with_context(|| format!("--out {} cannot be written", out.display()))?;
    let (min_energy, mean_energy) = edit::energy_summary(&kept);
    let new_rank = edit::highest_rank(&modules);
    Ok(Resized { modules: modules.len(), truncated, old_rank, new_rank, min_energy, mean_energy, converted })
}

/// `sdtune lora merge A:s B:t --model M`: as `merge.rs`, except that a
/// module with a LoHa, LoKr or DoRA change gets `rank`, by default the
/// highest rank among the inputs (at most the rank where its sum is exact).
/// The inputs may be of different layouts (every name is resolved against
/// the model); the result is in the first one's, kohya or diffusers.
pub fn merge(inputs: &[Input], rank: Option<i64>, out: &Path, layers: &ModelLayers) -> Result<Merged> {
    if let Some(r) = rank.filter(|&r| r < 1) {
        bail!("--rank {r} is not a LoRA rank; give a whole number of at least 1");
    }
    if inputs.is_empty() {
        bail!("sdtune lora merge needs at least one LoRA file (FILE:STRENGTH)");
    }
    let files: Vec<Read> = inputs.iter().map(|i| read(&i.path, layers)).collect::<Result<_>>()?;
    for (i, a) in files.iter().enumerate() {
        for (j, b) in files.iter().enumerate().skip(i + 1) {
            check_same_base_metadata(&a.weights.metadata, &inputs[i].path, &b.weights.metadata, &inputs[j].path)?;
        }
    }
    let format = files[0].format;
    let paths: Vec<&Path> = inputs.iter().map(|i| i.path.as_path()).collect();
    edit::check_out(out, &paths, format)?;
    let largest = files.iter().map(|f| largest_rank(&f.weights)).max().unwrap_or(0);
    let strengths: Vec<f64> = inputs.iter().map(|i| i.strength).collect();
    let (mut modules, mut kept, mut shared, mut converted) = (Vec::new(), Vec::new(), 0, 0);
    for (name, (component, layer, parts)) in group(&files, &strengths, &paths, layers, format)? {
        let shape = pair_shape(layers, component, &layer);
        if let [(Change::Pair(m), strength)] = parts.as_slice() {
            // As merge.rs: a module only one file has is copied, times its strength.
            if rank.is_none_or(|r| m.rank() <= r) {
                modules.push(StoredModule { base: name, down: m.down.copy(), up: &m.up * *strength, alpha: m.alpha, dora_scale: None });
                kept.push(1.0);
                continue;
            }
        }
        shared += usize::from(parts.len() > 1);
        let dense = dense_count(&parts);
        converted += dense;
        // Pairs alone: as merge.rs, the sum of their ranks (exact) by default.
        let default = |exact: i64| if dense > 0 && largest > 0 { largest } else { exact };
        let (module, energy) = factor(&name, &parts, |exact| rank.unwrap_or_else(|| default(exact)), &shape)?;
        modules.push(module);
        kept.push(energy);
    }
    let mut metadata = files[0].weights.metadata.clone();
    as_plain_lora(&mut metadata);
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
    Ok(Merged { modules: modules.len(), shared, max_rank, min_energy, mean_energy, converted })
}
