//! `sdtune info PATH|ID`: what a model or LoRA file is, from headers and
//! configs only (no weights are loaded, no pickle is ever opened).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::models::config::{ClipTextConfig, Prediction, SchedulerConfig, UNetConfig, VaeConfig};
use crate::loaders::folder::text_encoder_layout_of;
use crate::loaders::hub;
use crate::loaders::weights::component_weights;
use crate::loaders::single_file::{self, census, detect, Family, Plan, PredictionSource, Shapes};
use crate::loaders::file_kind::{classify, not_a_model_sentence, FileKind, TextEncoderLayout};
use crate::loaders::source::{parse, parse_prediction, ModelSource};
use crate::loaders::tensor_file::TensorFile;

use clap::Args;
pub const EXAMPLES: &str = "\
Examples:
  sdtune info ./v1-5-pruned-emaonly.safetensors     single-file checkpoint (A1111/civitai)
  sdtune info ./stable-diffusion-2-1                diffusers folder
  sdtune info stabilityai/stable-diffusion-2-1      Hub id, from the local Hugging Face cache
  sdtune info output/brand/brand.safetensors        LoRA: format, rank, alpha, layers, base, metadata

Reads only file headers and configs: nothing is loaded, pickles are never opened.";


#[derive(Args, Debug)]
pub struct InfoArgs {
    /// A model (diffusers folder, single-file .safetensors, Hub id org/name) or a LoRA file.
    #[arg(value_name = "PATH|ID")]
    pub target: String,
    /// What the UNet predicts, if you know better than the file (as for sample).
    #[arg(long, value_name = "epsilon|v")]
    pub prediction_type: Option<String>,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let prediction = args.prediction_type.as_deref().map(parse_prediction).transpose()?;
    match parse(&args.target)? {
        ModelSource::Folder(dir) => folder(&dir, None, prediction),
        ModelSource::Hub(id) => {
            let cache = hub::cache_dir();
            let dir = hub::cached_snapshot(&cache, &id)
                .filter(|d| d.join("model_index.json").is_file())
                .with_context(|| hub::not_cached_sentence(&id, &cache, "`sdtune info` reads only the local cache"))?;
            folder(&dir, Some(&id.to_string()), prediction)
        }
        ModelSource::SingleFile(path) => file(&path, prediction),
    }
}

fn row(key: &str, value: impl std::fmt::Display) {
    println!("{key:<13}{value}");
}

fn file(path: &Path, prediction: Option<Prediction>) -> Result<()> {
    let file = TensorFile::open(path)?;
    let names = file.names();
    match classify(&names) {
        FileKind::Checkpoint => checkpoint(path, &file, prediction),
        FileKind::Lora(format) => lora(path, &file, format.name()),
        kind => bail!("{}", not_a_model_sentence(path, kind, &names)),
    }
}

fn checkpoint(path: &Path, file: &TensorFile, prediction: Option<Prediction>) -> Result<()> {
    let shapes = Shapes::of(file);
    let layout = detect(path, &shapes)?;
    let c = census(file, &layout);
    row("path", path.display());
    row(
        "format",
        if layout.family == Family::Sdxl {
            "single-file checkpoint, SGM layout (safetensors)"
        } else {
            "single-file checkpoint, original LDM layout (safetensors)"
        },
    );
    let text = match layout.family {
        Family::Sd1 => "OpenAI CLIP text encoder",
        Family::Sd2 => "OpenCLIP text encoder (penultimate layer)",
        Family::Sdxl => "CLIP ViT-L and OpenCLIP bigG text encoders (SGM layout)",
    };
    row(
        "architecture",
        format!("{}: {text}, {}-wide cross-attention", layout.family.name(), layout.cross_attention_dim),
    );
    row("dtype", dtypes(&c.dtypes));
    row(
        "parameters",
        format!(
            "UNet {}, VAE {}, text encoder {} (total {})",
            count(c.unet),
            count(c.vae),
            count(c.text_encoder),
            count(c.unet + c.vae + c.text_encoder)
        ),
    );
    row(
        "ema",
        if layout.ema_tensors > 0 {
            format!(
                "also holds an EMA copy of the UNet ({} tensors, {}); the main weights are loaded",
                layout.ema_tensors,
                count(c.ema)
            )
        } else {
            "no separate EMA copy (pruned or EMA-only file)".into()
        },
    );
    match Plan::new(path, file, prediction) {
        Ok(plan) => {
            let source = match &plan.prediction_source {
                PredictionSource::Flag => "from --prediction-type".to_string(),
                PredictionSource::Config(p) => format!("from {}", p.display()),
                PredictionSource::Metadata(k) => format!("from the file's {k}"),
                PredictionSource::Guess if layout.family == Family::Sd2 => {
                    "guessed: SD2 768 models are v-prediction, SD2 base models epsilon; pass --prediction-type to be sure".into()
                }
                PredictionSource::Guess if layout.family == Family::Sdxl => {
                    "SDXL base models predict epsilon; pass --prediction-type v for a v-prediction finetune".into()
                }
                PredictionSource::Guess => "SD1 models predict epsilon".into(),
            };
            row("prediction", format!("{} ({source})", plan.scheduler.prediction_type));
            unet_rows(&plan.unet, &plan.vae);
            text_rows("text encoder", &plan.text, "");
            if let Some(second) = &plan.text_2 {
                text_rows("text encoder 2", second, "");
            }
            let beside = single_file::Beside::find(path)?;
            let mut configs = Vec::new();
            if let Some(f) = &beside.folder {
                configs.push(format!("{}/", f.display()));
            }
            if let Some(y) = &beside.yaml {
                configs.push(y.path.display().to_string());
            }
            row(
                "configs",
                if configs.is_empty() { "read from the tensors and SD's rules".into() } else { configs.join(", ") },
            );
        }
        Err(e) => row("configs", format!("{e:#}")),
    }
    Ok(())
}

fn unet_rows(unet: &UNetConfig, vae: &VaeConfig) {
    let size = unet.sample_size.map(|s| format!(", {} px native", s * vae.scale_factor())).unwrap_or_default();
    row(
        "unet",
        format!(
            "channels {:?}, heads {:?}, {} projection{}{size}",
            unet.block_out_channels,
            unet.heads_per_block(),
            if unet.use_linear_projection { "linear" } else { "conv" },
            if unet.upcast_attention { ", upcast attention" } else { "" }
        ),
    );
}

/// `naming` follows the sizes (a folder's tensor naming, or nothing).
fn text_rows(label: &str, text: &ClipTextConfig, naming: &str) {
    row(
        label,
        format!(
            "{} layers, {} wide, {} heads, {}{}{naming}",
            text.num_hidden_layers,
            text.hidden_size,
            text.num_attention_heads,
            text.hidden_act,
            text.projection_dim.filter(|_| text.with_projection()).map_or(String::new(), |d| format!(", projection {d}"))
        ),
    );
}

fn folder(dir: &Path, hub_id: Option<&str>, prediction: Option<Prediction>) -> Result<()> {
    let index = crate::loaders::folder::check_is_diffusers_folder(dir)?;
    let unet = UNetConfig::from_file(&dir.join("unet/config.json"))?;
    let vae = VaeConfig::from_file(&dir.join("vae/config.json"))?;
    let text = ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?;
    let scheduler_path = dir.join("scheduler/scheduler_config.json");
    let scheduler = SchedulerConfig::from_file(&scheduler_path)?;
    if let Some(id) = hub_id {
        row("hub id", id);
    }
    row("path", dir.display());
    let mut dtypes_all: BTreeMap<String, usize> = BTreeMap::new();
    let mut params = Vec::new();
    let mut files_used = Vec::new();
    let mut text_layouts = Vec::new();
    let mut components = vec![
        ("UNet", "unet", "diffusion_pytorch_model"),
        ("VAE", "vae", "diffusion_pytorch_model"),
        ("text encoder", "text_encoder", "model"),
    ];
    if index.is_sdxl() {
        components.push(("text encoder 2", "text_encoder_2", "model"));
    }
    for (label, component, stem) in components {
        let files = component_weights(&dir.join(component), stem, None)?;
        if component.starts_with("text_encoder") {
            // The same check loading makes, so info accepts only what sample would.
            text_layouts.push(text_encoder_layout_of(&files)?);
        }
        let mut n = 0i64;
        for f in &files {
            let tf = TensorFile::open(f)?;
            for name in tf.names() {
                if let Some(info) = tf.info(&name) {
                    n += info.shape.iter().map(|&d| d as i64).product::<i64>();
                    *dtypes_all.entry(format!("{:?}", info.dtype)).or_default() += 1;
                }
            }
        }
        params.push((label, n));
        files_used.push(describe_files(dir, &files));
    }
    row("format", "diffusers folder (safetensors)");
    row("weights", files_used.join(", "));
    let variants = variant_names(dir);
    if !variants.is_empty() {
        row("variants", format!("{} (choose with --variant)", variants.join(", ")));
    }
    let family = if index.is_sdxl() {
        "Stable Diffusion XL"
    } else if text.hidden_act == "gelu" {
        Family::Sd2.name()
    } else {
        Family::Sd1.name()
    };
    let cross = unet.cross_attention_dims()[0];
    row("architecture", format!("{family}: {cross}-wide cross-attention"));
    row("dtype", dtypes(&dtypes_all));
    let total: i64 = params.iter().map(|(_, n)| n).sum();
    row(
        "parameters",
        format!(
            "{} (total {})",
            params.iter().map(|(l, n)| format!("{l} {}", count(*n))).collect::<Vec<_>>().join(", "),
            count(total)
        ),
    );
    match prediction {
        Some(p) => row("prediction", format!("{} (from --prediction-type)", p.as_config_str())),
        None => row("prediction", format!("{} (from {})", scheduler.prediction_type, scheduler_path.display())),
    }
    unet_rows(&unet, &vae);
    let naming = |layout: Option<&TextEncoderLayout>| match layout {
        Some(TextEncoderLayout::Unprefixed) => ", transformers 5 tensor names (no text_model. prefix)",
        _ => "",
    };
    text_rows("text encoder", &text, naming(text_layouts.first()));
    if index.is_sdxl() {
        let second = ClipTextConfig::from_file(&dir.join("text_encoder_2/config.json"))?;
        text_rows("text enc. 2", &second, naming(text_layouts.get(1)));
    }
    Ok(())
}

fn describe_files(dir: &Path, files: &[PathBuf]) -> String {
    let rel = |p: &PathBuf| p.strip_prefix(dir).unwrap_or(p).display().to_string();
    match files {
        [one] => rel(one),
        many => format!("{} ({} shards)", rel(&many[0]), many.len()),
    }
}

/// `fp16`, ... : variants some component folder has files for.
fn variant_names(dir: &Path) -> Vec<String> {
    let mut found = std::collections::BTreeSet::new();
    for component in ["unet", "vae", "text_encoder"] {
        let Ok(entries) = std::fs::read_dir(dir.join(component)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let parts: Vec<&str> = name.split('.').collect();
            if parts.len() == 3 && parts[2] == "safetensors" {
                found.insert(parts[1].to_string());
            }
        }
    }
    found.into_iter().collect()
}

fn dtypes(counts: &BTreeMap<String, usize>) -> String {
    let mut v: Vec<(&String, &usize)> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter().map(|(d, n)| format!("{} ({n} tensors)", d.to_lowercase())).collect::<Vec<_>>().join(", ")
}

fn count(n: i64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

// ------------------------------------------------------------------- LoRA

struct Module {
    unet: bool,
    /// The adapter: LoRA, LoCon (a kxk conv LoRA), DoRA, LoHa or LoKr.
    adapter: &'static str,
    kind: String,
    /// None: a LoKr module with no factorised part (full rank).
    rank: Option<i64>,
    alpha: Option<f64>,
    /// The module's scale when it is a LoHa/LoKr (its file's own rule).
    scale: Option<f64>,
    in_features: i64,
    layer: String,
}

fn lora(path: &Path, file: &TensorFile, format: &str) -> Result<()> {
    // The same checks as loading it for sampling, so info accepts only what sample would.
    let stored = crate::lora::format::read_stored(file)?;
    let kohya = stored.format == crate::loaders::file_kind::LoraFormat::Kohya;
    let is_unet = |base: &str| if kohya { base.starts_with("lora_unet_") } else { !base.starts_with("text_encoder") };
    let mut modules = Vec::new();
    for name in &file.names() {
        let base = if let Some(b) = name.strip_suffix(".lora_down.weight") {
            b
        } else if let Some(b) = name.strip_suffix(".lora_A.weight").or_else(|| name.strip_suffix(".lora.down.weight")) {
            b
        } else {
            continue;
        };
        let shape = file.info(name).map(|i| i.shape.clone()).unwrap_or_default();
        let alpha_name = format!("{base}.alpha");
        let alpha = match file.info(&alpha_name) {
            Some(_) => Some(file.tensor(&alpha_name)?.to_kind(tch::Kind::Double).double_value(&[])),
            None => None,
        };
        let locon = shape.len() == 4 && shape[2..].iter().any(|&k| k > 1);
        // kohya/LyCORIS store DoRA's magnitude as `dora_scale`, PEFT as `lora_magnitude_vector`.
        let dora = ["dora_scale", "lora_magnitude_vector"].iter().any(|m| file.info(&format!("{base}.{m}")).is_some());
        modules.push(Module {
            unet: is_unet(base),
            adapter: if dora { "DoRA" } else if locon { "LoCon" } else { "LoRA" },
            kind: module_kind(base, kohya),
            rank: Some(shape.first().copied().unwrap_or(0) as i64),
            alpha,
            scale: None,
            in_features: shape.get(1).copied().unwrap_or(0) as i64,
            layer: base.to_string(),
        });
    }
    for m in &stored.lycoris {
        modules.push(Module {
            unet: is_unet(&m.base),
            adapter: m.factors.kind_name(),
            kind: module_kind(&m.base, kohya),
            rank: m.factors.rank(),
            alpha: m.alpha,
            scale: Some(m.scale),
            in_features: 0,
            layer: m.base.clone(),
        });
    }
    let meta = file.string_metadata();
    row("path", path.display());
    let adapters: std::collections::BTreeSet<&str> = modules.iter().map(|m| m.adapter).collect();
    row("format", format!("{}, {format}", adapters.into_iter().collect::<Vec<_>>().join(" + ")));
    let unet = modules.iter().filter(|m| m.unet).count();
    row("modules", format!("{} (UNet {unet}, text encoder {})", modules.len(), modules.len() - unet));
    let ranks: std::collections::BTreeSet<i64> = modules.iter().filter_map(|m| m.rank).collect();
    let full = modules.iter().filter(|m| m.rank.is_none()).count();
    let full_text = if full > 0 { format!(" ({full} LoKr modules unfactorised, full rank)") } else { String::new() };
    row("rank", format!("{}{full_text}", join_set(&ranks)));
    let alphas: Vec<f64> = modules.iter().filter_map(|m| m.alpha).collect();
    let alpha_text = if alphas.is_empty() {
        match meta.get("ss_network_alpha") {
            Some(a) => format!("{a} (from ss_network_alpha)"),
            None if modules.iter().any(|m| m.scale.is_some()) => "not in the file (see scale)".into(),
            None => "not stored (alpha = rank, scale 1)".into(),
        }
    } else {
        let mut uniq: Vec<String> = alphas.iter().map(|a| format!("{a}")).collect();
        uniq.sort();
        uniq.dedup();
        let scale = ranks.iter().next().map(|&r| alphas[0] / r as f64).unwrap_or(1.0);
        format!("{} (scale alpha/rank {scale})", uniq.join(", "))
    };
    row("alpha", alpha_text);
    let mut scales: Vec<String> = modules.iter().filter_map(|m| m.scale).map(|s| format!("{s}")).collect();
    scales.sort();
    scales.dedup();
    if !scales.is_empty() {
        row("scale", format!("{} (LoHa/LoKr, as the file's tool applies it)", scales.join(", ")));
    }
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &modules {
        *kinds.entry(m.kind.as_str()).or_default() += 1;
    }
    row("targets", kinds.iter().map(|(k, n)| format!("{k} x{n}")).collect::<Vec<_>>().join(", "));
    row("base", base_version(&meta, &modules));
    if let Some(m) = modules.first() {
        row("first layer", &m.layer);
    }
    if meta.is_empty() {
        row("metadata", "none");
    } else {
        println!("metadata");
        let mut keys: Vec<&String> = meta.keys().collect();
        keys.sort();
        for k in keys {
            let v = meta[k].replace('\n', " ");
            let v = if v.chars().count() > 100 { format!("{}...", v.chars().take(100).collect::<String>()) } else { v };
            println!("  {k} = {v}");
        }
    }
    Ok(())
}

/// The layer kind a module adapts: `attn2.to_q`, `proj_in`, `self_attn.q_proj`, ...
fn module_kind(base: &str, kohya: bool) -> String {
    let sep = if kohya { "_" } else { "." };
    for whole in ["conv_in", "conv_out", "proj_in", "proj_out"] {
        if base.ends_with(&format!("{sep}{whole}")) || base == whole {
            return whole.into();
        }
    }
    for marker in ["transformer_blocks", "layers", "resnets", "downsamplers", "upsamplers"] {
        let needle = format!("{sep}{marker}{sep}");
        if let Some(pos) = base.rfind(&needle) {
            let rest = &base[pos + needle.len()..];
            if let Some((_, tail)) = rest.split_once(sep) {
                return tail.to_string();
            }
        }
    }
    base.rsplit(sep).next().unwrap_or(base).to_string()
}

fn base_version(meta: &std::collections::HashMap<String, String>, modules: &[Module]) -> String {
    if let Some(v) = meta.get("ss_base_model_version") {
        return format!("{v} (from ss_base_model_version)");
    }
    if let Some(v) = meta.get("modelspec.architecture") {
        return format!("{v} (from modelspec.architecture)");
    }
    let width = modules
        .iter()
        .find(|m| m.unet && (m.kind.contains("attn2") && (m.kind.contains("to_k") || m.kind.contains("to_v"))))
        .map(|m| m.in_features);
    match width {
        Some(768) => "Stable Diffusion 1.x (768-wide text features, read from attn2.to_k)".into(),
        Some(1024) => "Stable Diffusion 2.x (1024-wide text features, read from attn2.to_k)".into(),
        Some(w) => format!("unknown ({w}-wide text features)"),
        None => "unknown (no metadata, no cross-attention key/value module)".into(),
    }
}

fn join_set(values: &std::collections::BTreeSet<i64>) -> String {
    values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}
