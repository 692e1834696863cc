//! LoRA files: kohya (A1111, ComfyUI), diffusers/PEFT, and diffusers' older
//! `lora.down/up` layout. Reading resolves every key against the model; a
//! key that matches no layer is an error, never silently dropped.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::{Component, LoraModule, LoraWeights, ModelLayers};
pub use crate::loaders::file_kind::{detect_lora as detect, LoraFormat};
use crate::loaders::tensor_file::{write_tensors, TensorFile};

/// `lora_unet_down_blocks_0_..._to_q` for UNet layer `down_blocks.0....to_q`.
pub fn kohya_name(component: Component, layer: &str) -> String {
    let prefix = match component {
        Component::Unet => "lora_unet_",
        Component::TextEncoder => "lora_te_",
    };
    format!("{prefix}{}", layer.replace('.', "_"))
}

/// Reads a LoRA file of any supported layout, resolving names against `layers`.
pub fn read(path: &Path, layers: &ModelLayers) -> Result<LoraWeights> {
    let file = TensorFile::open(path)?;
    let names = file.names();
    let source = path.display().to_string();
    let format = detect(&names).with_context(|| {
        format!("{source} is not a LoRA file sdtune knows (no lora_down/lora_A/lora.down tensors); use a kohya or diffusers LoRA")
    })?;
    let metadata = file.string_metadata();
    let modules = match format {
        LoraFormat::Kohya => read_kohya(&file, &names, layers, &source)?,
        LoraFormat::Peft => read_paired(&file, &names, ".lora_A.weight", ".lora_B.weight", peft_alpha(&metadata), &source)?,
        LoraFormat::DiffusersLegacy => read_paired(&file, &names, ".lora.down.weight", ".lora.up.weight", None, &source)?,
    };
    if modules.is_empty() {
        bail!("{source} holds no LoRA modules");
    }
    let weights = LoraWeights { modules, metadata };
    super::check_fits(&weights, layers, &source)?;
    Ok(weights)
}

fn read_kohya(file: &TensorFile, names: &[String], layers: &ModelLayers, source: &str) -> Result<Vec<LoraModule>> {
    // kohya names lose the dots, so map them back through the model's own names.
    let mut by_kohya: HashMap<String, (Component, String)> = HashMap::new();
    for name in layers.unet.names() {
        by_kohya.insert(kohya_name(Component::Unet, &name), (Component::Unet, name));
    }
    if let Some(te) = layers.text_encoder {
        for name in te.names() {
            by_kohya.insert(kohya_name(Component::TextEncoder, &name), (Component::TextEncoder, name));
        }
    }
    let mut modules = Vec::new();
    for name in names {
        if let Some(base) = name.strip_suffix(".lora_down.weight") {
            let Some((component, layer)) = by_kohya.get(base) else {
                bail!("{source}: LoRA module {base} matches no layer of this model; the LoRA was made for a different architecture");
            };
            let down = file.tensor(name)?.to_kind(Kind::Float);
            let up = file
                .tensor(&format!("{base}.lora_up.weight"))
                .with_context(|| format!("{source}: module {base} has lora_down but no lora_up"))?
                .to_kind(Kind::Float);
            let rank = down.size()[0] as f64;
            let alpha = match file.info(&format!("{base}.alpha")) {
                Some(_) => file.tensor(&format!("{base}.alpha"))?.to_kind(Kind::Double).double_value(&[]),
                None => rank,
            };
            modules.push(LoraModule { component: *component, layer: layer.clone(), down, up, alpha });
        } else if !(name.ends_with(".lora_up.weight") || name.ends_with(".alpha")) {
            bail!("{source}: tensor {name} is not part of a kohya LoRA module (expected .lora_down.weight, .lora_up.weight or .alpha)");
        }
    }
    Ok(modules)
}

/// Reads `<prefix><layer><down_suffix>` / `<up_suffix>` pairs (PEFT and
/// diffusers' legacy layout).
fn read_paired(
    file: &TensorFile,
    names: &[String],
    down_suffix: &str,
    up_suffix: &str,
    alpha: Option<f64>,
    source: &str,
) -> Result<Vec<LoraModule>> {
    let mut modules = Vec::new();
    for name in names {
        if let Some(base) = name.strip_suffix(down_suffix) {
            let (component, layer) = split_component(&legacy_processor_path(base));
            let down = file.tensor(name)?.to_kind(Kind::Float);
            let up = file
                .tensor(&format!("{base}{up_suffix}"))
                .with_context(|| format!("{source}: module {base} has no {}", up_suffix.trim_start_matches('.')))?
                .to_kind(Kind::Float);
            let alpha = alpha.unwrap_or(down.size()[0] as f64);
            modules.push(LoraModule { component, layer, down, up, alpha });
        } else if !name.ends_with(up_suffix) {
            bail!("{source}: tensor {name} is not part of a LoRA module (expected {down_suffix} / {up_suffix} pairs)");
        }
    }
    Ok(modules)
}

/// `unet.x` / `text_encoder.x` / `base_model.model.x` / bare `x` (UNet).
fn split_component(base: &str) -> (Component, String) {
    if let Some(rest) = base.strip_prefix("text_encoder.") {
        return (Component::TextEncoder, rest.to_string());
    }
    let rest = base.strip_prefix("unet.").or_else(|| base.strip_prefix("base_model.model.")).unwrap_or(base);
    (Component::Unet, rest.to_string())
}

/// diffusers' attention-processor layout: `...attn1.processor.to_q_lora` -> `...attn1.to_q`.
fn legacy_processor_path(base: &str) -> String {
    let base = base.replace(".processor.to_out_lora", ".to_out.0");
    let base = base.replace(".processor.", ".");
    base.strip_suffix("_lora").map(str::to_string).unwrap_or(base)
}

/// `lora_alpha` from diffusers' `lora_adapter_metadata` header entry, if any.
fn peft_alpha(metadata: &HashMap<String, String>) -> Option<f64> {
    let json: serde_json::Value = serde_json::from_str(metadata.get("lora_adapter_metadata")?).ok()?;
    ["unet.lora_alpha", "lora_alpha"].iter().find_map(|k| json.get(*k).and_then(|v| v.as_f64()))
}

/// Writes `weights` in `format` atomically with `metadata` in the header.
pub fn write(path: &Path, weights: &LoraWeights, format: LoraFormat, metadata: HashMap<String, String>) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for m in &weights.modules {
        match format {
            LoraFormat::Kohya => {
                let base = kohya_name(m.component, &m.layer);
                tensors.push((format!("{base}.lora_down.weight"), m.down.shallow_clone()));
                tensors.push((format!("{base}.lora_up.weight"), m.up.shallow_clone()));
                tensors.push((format!("{base}.alpha"), Tensor::from(m.alpha as f32)));
            }
            LoraFormat::Peft | LoraFormat::DiffusersLegacy => {
                // No per-module alpha in this layout: fold alpha / rank into up.
                let prefix = match m.component {
                    Component::Unet => "unet",
                    Component::TextEncoder => "text_encoder",
                };
                let (down_suffix, up_suffix) = match format {
                    LoraFormat::Peft => ("lora_A.weight", "lora_B.weight"),
                    _ => ("lora.down.weight", "lora.up.weight"),
                };
                tensors.push((format!("{prefix}.{}.{down_suffix}", m.layer), m.down.shallow_clone()));
                tensors.push((format!("{prefix}.{}.{up_suffix}", m.layer), &m.up * m.scale()));
            }
        }
    }
    write_tensors(path, &tensors, Some(metadata))
}
