//! LoRA files: kohya (A1111, ComfyUI), diffusers/PEFT, and diffusers' older
//! `lora.down/up` layout, each possibly holding LyCORIS LoHa/LoKr modules
//! (`lycoris.rs`) and LoCon (kxk conv) pairs. Reading resolves every key against the model; a
//! key that matches no layer is an error, never silently dropped.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::kohya_names::KohyaNames;
use super::lycoris::{self, LycorisModule, ScaleRule, StoredLycoris};
use super::{Component, LoraModule, LoraWeights, ModelLayers};
pub use crate::loaders::file_kind::{detect_lora as detect, LoraFormat};
use crate::loaders::file_kind::TEXT_MODEL_PREFIX;
use crate::loaders::tensor_file::{write_tensors, TensorFile};

/// Reads a LoRA file of any supported layout, resolving names against `layers`.
pub fn read(path: &Path, layers: &ModelLayers) -> Result<LoraWeights> {
    let file = TensorFile::open(path)?;
    let stored = read_stored(&file)?;
    resolve(stored, file.string_metadata(), layers, &path.display().to_string())
}

/// The modules of a file already read (`read_stored`) resolved to the
/// model's layers and checked to fit them; `source` names the file in errors.
pub fn resolve(stored: StoredFile, metadata: HashMap<String, String>, layers: &ModelLayers, source: &str) -> Result<LoraWeights> {
    let StoredFile { format, modules: stored, lycoris: stored_lycoris } = stored;
    let (modules, lycoris) = match format {
        LoraFormat::Kohya => {
            let by_kohya = kohya_map(layers);
            (resolve_kohya(stored, &by_kohya, source)?, resolve_kohya_lycoris(stored_lycoris, &by_kohya, source)?)
        }
        LoraFormat::Peft | LoraFormat::DiffusersLegacy => {
            let bases = stored.iter().map(|m| m.base.clone()).chain(stored_lycoris.iter().map(|m| m.base.clone()));
            check_text_encoder_named(bases, layers, &source)?;
            let modules = stored
                .into_iter()
                .map(|m| {
                    let (component, layer) = model_layer(&legacy_processor_path(&m.base));
                    LoraModule { component, layer, down: m.down, up: m.up, alpha: m.alpha, dora_scale: m.dora_scale }
                })
                .collect();
            let lycoris = stored_lycoris
                .into_iter()
                .map(|m| {
                    let (component, layer) = model_layer(&m.base);
                    LycorisModule { component, layer, factors: m.factors, scale: m.scale }
                })
                .collect();
            (modules, lycoris)
        }
    };
    let weights = LoraWeights { modules, lycoris, metadata };
    super::check_fits(&weights, layers, source)?;
    Ok(weights)
}

/// One module as the file stores it, checked on its own (no model needed):
/// `base` is its name in the file without the down/up suffix.
pub struct StoredModule {
    pub base: String,
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: f64,
    /// DoRA's magnitude (kohya `.dora_scale`, PEFT `.lora_magnitude_vector`
    /// as `[out, 1]`); `None` for a plain LoRA.
    pub dora_scale: Option<Tensor>,
}

/// What an open LoRA file holds, checked on its own.
pub struct StoredFile {
    pub format: LoraFormat,
    pub modules: Vec<StoredModule>,
    pub lycoris: Vec<StoredLycoris>,
}

/// Every module of an open LoRA file, each checked for what no model can
/// repair: ranks that agree, a finite scalar alpha, finite numbers. `sdtune
/// info` and every reader go through here, so they refuse the same files.
pub fn read_stored(file: &TensorFile) -> Result<StoredFile> {
    let names = file.names();
    let source = file.path().display().to_string();
    let format = detect(&names).with_context(|| {
        format!("{source} is not a LoRA file sdtune knows (no lora_down/lora_A/lora.down/hada_/lokr_ tensors); use a kohya, LyCORIS or diffusers LoRA")
    })?;
    let alpha = |name: &str| scalar_alpha(file, name, &source);
    let (modules, lycoris) = match format {
        LoraFormat::Kohya => (read_kohya(file, &names, &source)?, lycoris::read_stored(file, &names, &ScaleRule::Kohya, &alpha, &source)?),
        LoraFormat::Peft => {
            let config = peft_adapter_config(file.path(), &source)?;
            let alphas = PeftAlphas::read(&file.string_metadata(), &source)?;
            let config_alpha = config.as_ref().and_then(|c| c.lora_alpha);
            let scale = config.as_ref().and_then(|c| c.lycoris_scale);
            (
                read_paired(file, &names, ".lora_A.weight", ".lora_B.weight", |base| alphas.of(base).or(config_alpha), &source)?,
                lycoris::read_stored(file, &names, &ScaleRule::Peft { scale }, &alpha, &source)?,
            )
        }
        LoraFormat::DiffusersLegacy => (read_paired(file, &names, ".lora.down.weight", ".lora.up.weight", |_| None, &source)?, Vec::new()),
    };
    if modules.is_empty() && lycoris.is_empty() {
        bail!("{source} holds no LoRA modules");
    }
    Ok(StoredFile { format, modules, lycoris })
}

/// The model's layers by their kohya names: kohya names lose the dots (and
/// SDXL's are SGM paths), so they are mapped back through the model's own
/// names. An SDXL file may also name the UNet by diffusers paths (diffusers'
/// `convert_state_dict_to_kohya`), and a text encoder without `text_model_`
/// (transformers 5's module paths); none of these names can stand for two
/// layers, so all are read.
fn kohya_map(layers: &ModelLayers) -> HashMap<String, (Component, String)> {
    let mut by_kohya: HashMap<String, (Component, String)> = HashMap::new();
    let components = std::iter::once((Component::Unet, layers.unet))
        .chain(layers.text_encoder.map(|te| (Component::TextEncoder, te)))
        .chain(layers.text_encoder_2.map(|te| (Component::TextEncoder2, te)));
    let sdxl = matches!(layers.kohya, KohyaNames::Sgm(_));
    for (component, index) in components {
        for name in index.names() {
            let mut aliases = vec![name.clone()];
            if let Some(short) = name.strip_prefix(TEXT_MODEL_PREFIX) {
                aliases.push(short.to_string());
            }
            for alias in &aliases {
                if let Some(kohya) = layers.kohya.name(component, alias) {
                    by_kohya.insert(kohya, (component, name.clone()));
                }
                if sdxl && component == Component::Unet {
                    if let Some(kohya) = KohyaNames::Diffusers.name(component, alias) {
                        by_kohya.insert(kohya, (component, name.clone()));
                    }
                }
            }
        }
    }
    by_kohya
}

fn resolve_kohya(stored: Vec<StoredModule>, by_kohya: &HashMap<String, (Component, String)>, source: &str) -> Result<Vec<LoraModule>> {
    stored
        .into_iter()
        .map(|m| {
            let Some((component, layer)) = by_kohya.get(&m.base) else {
                bail!("{source}: LoRA module {} matches no layer of this model; the LoRA was made for a different architecture", m.base);
            };
            Ok(LoraModule { component: *component, layer: layer.clone(), down: m.down, up: m.up, alpha: m.alpha, dora_scale: m.dora_scale })
        })
        .collect()
}

fn resolve_kohya_lycoris(
    stored: Vec<StoredLycoris>,
    by_kohya: &HashMap<String, (Component, String)>,
    source: &str,
) -> Result<Vec<LycorisModule>> {
    stored
        .into_iter()
        .map(|m| {
            let Some((component, layer)) = by_kohya.get(&m.base) else {
                bail!(
                    "{source}: {} module {} matches no layer of this model; the adapter was made for a different architecture",
                    m.factors.kind_name(),
                    m.base
                );
            };
            Ok(LycorisModule { component: *component, layer: layer.clone(), factors: m.factors, scale: m.scale })
        })
        .collect()
}

fn read_kohya(file: &TensorFile, names: &[String], source: &str) -> Result<Vec<StoredModule>> {
    let mut modules = Vec::new();
    for name in names {
        if let Some(base) = name.strip_suffix(".lora_down.weight") {
            let up_name = format!("{base}.lora_up.weight");
            if file.info(&up_name).is_none() {
                bail!("{source}: module {base} has lora_down but no lora_up");
            }
            let alpha_name = format!("{base}.alpha");
            let alpha = match file.info(&alpha_name) {
                Some(_) => Some(scalar_alpha(file, &alpha_name, source)?),
                None => None,
            };
            modules.push(stored_module(file, base, name, &up_name, alpha, source)?.with_dora(file, &format!("{base}{KOHYA_DORA}"), source)?);
        } else if let Some(base) = name.strip_suffix(KOHYA_DORA) {
            check_dora_has_pair(file, name, &format!("{base}.lora_down.weight"), source)?;
        } else if !(name.ends_with(".lora_up.weight") || name.ends_with(".alpha") || lycoris::base_of(name).is_some()) {
            bail!("{source}: tensor {name} is not part of a kohya LoRA module (expected .lora_down.weight, .lora_up.weight, .alpha, or LyCORIS' .hada_* / .lokr_*)");
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
    alpha_of: impl Fn(&str) -> Option<f64>,
    source: &str,
) -> Result<Vec<StoredModule>> {
    let mut modules = Vec::new();
    for name in names {
        if let Some(base) = name.strip_suffix(down_suffix) {
            let up_name = format!("{base}{up_suffix}");
            if file.info(&up_name).is_none() {
                bail!("{source}: module {base} has no {}", up_suffix.trim_start_matches('.'));
            }
            modules.push(stored_module(file, base, name, &up_name, alpha_of(base), source)?.with_dora(file, &format!("{base}{PEFT_DORA}"), source)?);
        } else if let Some(base) = name.strip_suffix(PEFT_DORA) {
            check_dora_has_pair(file, name, &format!("{base}{down_suffix}"), source)?;
        } else if !(name.ends_with(up_suffix) || lycoris::base_of(name).is_some()) {
            bail!("{source}: tensor {name} is not part of a LoRA module (expected {down_suffix} / {up_suffix} pairs, or LyCORIS' .hada_* / .lokr_*)");
        }
    }
    Ok(modules)
}

/// Reads and checks one down/up pair; `alpha` None means alpha = rank.
fn stored_module(file: &TensorFile, base: &str, down_name: &str, up_name: &str, alpha: Option<f64>, source: &str) -> Result<StoredModule> {
    let down = file.tensor(down_name)?.to_kind(Kind::Float);
    let up = file.tensor(up_name)?.to_kind(Kind::Float);
    let rank = check_pair(&down, &up, base, source)?;
    for (tensor, name) in [(&down, down_name), (&up, up_name)] {
        if !crate::models::finite::all_finite(tensor) {
            bail!("{source}: tensor {name} holds NaN or infinite numbers; the LoRA is damaged (a diverged training run?), use another file");
        }
    }
    Ok(StoredModule { base: base.to_string(), down, up, alpha: alpha.unwrap_or(rank as f64), dora_scale: None })
}

/// A DoRA magnitude applies to the LoRA pair beside it; one beside a LoHa /
/// LoKr module or none would be dropped silently, so it is refused.
fn check_dora_has_pair(file: &TensorFile, name: &str, down: &str, source: &str) -> Result<()> {
    if file.info(down).is_none() {
        bail!("{source}: tensor {name} is a DoRA magnitude with no LoRA pair ({down}) beside it; sdtune applies DoRA to LoRA modules only, so this file's DoRA cannot be loaded as its tool meant");
    }
    Ok(())
}

/// DoRA's magnitude beside a module: kohya/LyCORIS `.dora_scale`, PEFT `.lora_magnitude_vector`.
const KOHYA_DORA: &str = ".dora_scale";
const PEFT_DORA: &str = ".lora_magnitude_vector";

impl StoredModule {
    /// Reads the module's DoRA magnitude `name` when the file has one. PEFT's
    /// is always per output (`[out]`, `[1, out, 1, 1]` on convs) and becomes
    /// `[out, 1]`; kohya's keeps its shape, which says its convention.
    fn with_dora(mut self, file: &TensorFile, name: &str, source: &str) -> Result<Self> {
        if file.info(name).is_none() {
            return Ok(self);
        }
        let mut m = file.tensor(name)?.to_kind(Kind::Float);
        if name.ends_with(PEFT_DORA) || m.dim() == 1 {
            m = m.reshape([-1, 1]);
        }
        if !crate::models::finite::all_finite(&m) {
            bail!("{source}: tensor {name} holds NaN or infinite numbers; the LoRA is damaged, use another file");
        }
        self.dora_scale = Some(m);
        Ok(self)
    }
}

/// The module's rank, once down [r, in(, 1, 1)] and up [out, r(, 1, 1)] are
/// shapes a LoRA can have and agree on it.
fn check_pair(down: &Tensor, up: &Tensor, base: &str, source: &str) -> Result<i64> {
    let (ds, us) = (down.size(), up.size());
    if !matches!(ds.len(), 2 | 4) || us.len() != ds.len() {
        bail!("{source}: module {base} has down {ds:?} and up {us:?} tensors, which are not LoRA shapes ([rank, in] and [out, rank], or 4-d for convs); the file is damaged or not a LoRA");
    }
    let (rank, up_rank) = (ds[0], us[1]);
    if rank != up_rank {
        bail!("{source}: module {base} has a down projection of rank {rank} but an up projection of rank {up_rank}; the two must agree, the file is damaged");
    }
    if rank == 0 || ds[1] == 0 || us[0] == 0 {
        bail!("{source}: module {base} has an empty tensor (down {ds:?}, up {us:?}); the file is damaged");
    }
    Ok(rank)
}

/// A kohya `.alpha` tensor: one finite number.
fn scalar_alpha(file: &TensorFile, name: &str, source: &str) -> Result<f64> {
    let t = file.tensor(name)?;
    if t.numel() != 1 {
        bail!("{source}: {name} holds {} numbers (shape {:?}); a LoRA alpha is one number, the file is damaged", t.numel(), t.size());
    }
    let alpha = t.to_kind(Kind::Double).reshape([-1]).double_value(&[0]);
    if !alpha.is_finite() {
        bail!("{source}: {name} is {alpha}; a LoRA alpha must be a finite number, the file is damaged");
    }
    Ok(alpha)
}

/// The prefix diffusers' files put before `component`'s layers.
fn file_prefix(component: Component) -> &'static str {
    match component {
        Component::Unet => "unet",
        Component::TextEncoder => "text_encoder",
        Component::TextEncoder2 => "text_encoder_2",
    }
}

/// `unet.x` / `text_encoder.x` / `text_encoder_2.x` / `base_model.model.x` / bare `x`:
/// the last two are the UNet unless `x` is a text-encoder path (peft's
/// `save_pretrained` of an adapted CLIPTextModel names no component).
fn split_component(base: &str) -> (Component, String) {
    if let Some(rest) = base.strip_prefix("text_encoder.") {
        return (Component::TextEncoder, rest.to_string());
    }
    if let Some(rest) = base.strip_prefix("text_encoder_2.") {
        return (Component::TextEncoder2, rest.to_string());
    }
    if let Some(rest) = unnamed_text_encoder_path(base) {
        return (Component::TextEncoder, rest.to_string());
    }
    let rest = base.strip_prefix("unet.").or_else(|| base.strip_prefix("base_model.model.")).unwrap_or(base);
    (Component::Unet, rest.to_string())
}

/// The layer of `base` when it is a text-encoder path with no component
/// prefix (`base_model.model.text_model.encoder...`, transformers 5's
/// `encoder.layers...`): no UNet module has these names.
fn unnamed_text_encoder_path(base: &str) -> Option<&str> {
    let rest = base.strip_prefix("base_model.model.").unwrap_or(base);
    let text = [TEXT_MODEL_PREFIX, "encoder.layers.", "embeddings.", "final_layer_norm"].iter().any(|p| rest.starts_with(p));
    text.then_some(rest)
}

/// A PEFT file whose text-encoder modules name no encoder cannot say which
/// of SDXL's two it was made for; refused rather than guessed.
fn check_text_encoder_named(bases: impl IntoIterator<Item = String>, layers: &ModelLayers, source: &str) -> Result<()> {
    if layers.text_encoder_2.is_none() {
        return Ok(());
    }
    if let Some(base) = bases.into_iter().find(|b| unnamed_text_encoder_path(b).is_some()) {
        bail!("{source}: module {base} is a text-encoder layer with no text_encoder. or text_encoder_2. prefix, so it does not say which of this SDXL model's two text encoders it adapts; add the prefix of the encoder it was trained on to its names");
    }
    Ok(())
}

/// A text-encoder layer by transformers 4's path (`text_model.encoder...`),
/// the one sdtune's model uses, also when the file has transformers 5's
/// (`encoder.layers.0.self_attn.q_proj`, as diffusers writes today).
/// A PEFT/diffusers module path as (component, the model's layer name):
/// text-encoder paths of transformers 5 get the `text_model.` prefix back.
fn model_layer(path: &str) -> (Component, String) {
    let (component, layer) = split_component(path);
    match component {
        Component::Unet => (component, layer),
        _ => (component, text_model_path(&layer)),
    }
}

fn text_model_path(layer: &str) -> String {
    let unprefixed = ["encoder.", "embeddings.", "final_layer_norm"].iter().any(|p| layer.starts_with(p));
    if unprefixed {
        format!("{TEXT_MODEL_PREFIX}{layer}")
    } else {
        layer.to_string()
    }
}

/// diffusers' attention-processor layout: `...attn1.processor.to_q_lora` -> `...attn1.to_q`.
fn legacy_processor_path(base: &str) -> String {
    let base = base.replace(".processor.to_out_lora", ".to_out.0");
    let base = base.replace(".processor.", ".");
    base.strip_suffix("_lora").map(str::to_string).unwrap_or(base)
}

/// The `lora_alpha`s of diffusers' `lora_adapter_metadata` header entry:
/// `save_lora_weights` keeps one per model (`unet.lora_alpha`,
/// `text_encoder.lora_alpha`, `text_encoder_2.lora_alpha`), a single
/// model's file a bare `lora_alpha`. A model with none has alpha = rank.
struct PeftAlphas {
    by_prefix: HashMap<&'static str, f64>,
    bare: Option<f64>,
}

impl PeftAlphas {
    /// Refuses an alpha that is there but not a finite number.
    fn read(metadata: &HashMap<String, String>, source: &str) -> Result<Self> {
        let mut alphas = PeftAlphas { by_prefix: HashMap::new(), bare: None };
        let Some(text) = metadata.get("lora_adapter_metadata") else { return Ok(alphas) };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else { return Ok(alphas) };
        let number = |key: &str| -> Result<Option<f64>> {
            let Some(value) = json.get(key) else { return Ok(None) };
            match value.as_f64() {
                Some(alpha) if alpha.is_finite() => Ok(Some(alpha)),
                _ => bail!("{source}: {key} in its lora_adapter_metadata is {value}, not a finite number; the file is damaged"),
            }
        };
        for component in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
            let prefix = file_prefix(component);
            if let Some(alpha) = number(&format!("{prefix}.lora_alpha"))? {
                alphas.by_prefix.insert(prefix, alpha);
            }
        }
        alphas.bare = number("lora_alpha")?;
        Ok(alphas)
    }

    /// The alpha of the module `base` (its name in the file).
    fn of(&self, base: &str) -> Option<f64> {
        self.by_prefix.get(file_prefix(split_component(base).0)).copied().or(self.bare)
    }
}

/// What peft's `adapter_config.json` beside a file says of its scale.
struct PeftConfig {
    /// LoraConfig's `lora_alpha`.
    lora_alpha: Option<f64>,
    /// LoHaConfig / LoKrConfig: `alpha / r`.
    lycoris_scale: Option<f64>,
}

/// peft's `save_pretrained` writes `adapter_model.safetensors` with the
/// alpha in `adapter_config.json` next to it; read when it is there. Per-layer
/// `rank_pattern` / `alpha_pattern` are refused rather than applied wrongly.
fn peft_adapter_config(path: &Path, source: &str) -> Result<Option<PeftConfig>> {
    let Some(config_path) = path.parent().map(|d| d.join("adapter_config.json")) else { return Ok(None) };
    if !config_path.is_file() {
        return Ok(None);
    }
    let shown = config_path.display();
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("could not read {shown}"))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{shown} (beside {source}) is not valid JSON; restore it from where the adapter came from"))?;
    for key in ["rank_pattern", "alpha_pattern"] {
        if json.get(key).and_then(|v| v.as_object()).is_some_and(|o| !o.is_empty()) {
            bail!("{shown} (beside {source}) sets a per-layer {key}, which sdtune does not apply; merge the adapter with peft and save it as a plain LoRA");
        }
    }
    let number = |key: &str| -> Result<Option<f64>> {
        match json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => bail!("{shown} (beside {source}): {key} is {v}, not a finite number; the config is damaged"),
            },
        }
    };
    let lycoris_scale = match (number("alpha")?, number("r")?) {
        (Some(alpha), Some(r)) if r > 0.0 => Some(alpha / r),
        _ => None,
    };
    Ok(Some(PeftConfig { lora_alpha: number("lora_alpha")?, lycoris_scale }))
}

/// Writes `weights` in `format` atomically with `metadata` in the header;
/// kohya files name the modules as `kohya` says for the model.
pub fn write(
    path: &Path,
    weights: &LoraWeights,
    format: LoraFormat,
    kohya: &KohyaNames,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for m in &weights.modules {
        let base = module_name(format, m.component, &m.layer, kohya)?;
        tensors.extend(pair_tensors(format, &base, &m.down, &m.up, m.alpha));
        if let Some(magnitude) = &m.dora_scale {
            tensors.push(match format {
                // kohya/LyCORIS 3.2+ keep [out, 1]; PEFT [out], or [1, out, 1, 1] on a conv.
                LoraFormat::Kohya => (format!("{base}{KOHYA_DORA}"), magnitude.shallow_clone()),
                _ if m.down.dim() == 4 => (format!("{base}{PEFT_DORA}"), magnitude.reshape([1, -1, 1, 1])),
                _ => (format!("{base}{PEFT_DORA}"), magnitude.reshape([-1])),
            });
        }
    }
    write_tensors(path, &tensors, Some(metadata))
}

/// The name `format` gives `component`'s `layer` in a file (without the
/// down/up suffixes): kohya's as `kohya` says for the model, else diffusers'
/// `unet.<layer>` / `text_encoder.<layer>`.
pub fn module_name(format: LoraFormat, component: Component, layer: &str, kohya: &KohyaNames) -> Result<String> {
    match format {
        LoraFormat::Kohya => match kohya.name(component, layer) {
            Some(base) => Ok(base),
            None => bail!("{} layer {layer} has no kohya name in an SDXL LoRA; train it in the diffusers format (--format diffusers)", component.name()),
        },
        LoraFormat::Peft | LoraFormat::DiffusersLegacy => Ok(format!("{}.{layer}", file_prefix(component))),
    }
}

/// Writes modules under their names as read from a file (`StoredModule::base`),
/// atomically: `sdtune lora resize` and `merge` keep a file's own names
/// without needing its model.
pub fn write_stored(path: &Path, modules: &[StoredModule], format: LoraFormat, metadata: HashMap<String, String>) -> Result<()> {
    let tensors: Vec<(String, Tensor)> =
        modules.iter().flat_map(|m| pair_tensors(format, &m.base, &m.down, &m.up, m.alpha)).collect();
    write_tensors(path, &tensors, Some(metadata))
}

/// One module's tensors under `base` (its name in the file without suffixes).
fn pair_tensors(format: LoraFormat, base: &str, down: &Tensor, up: &Tensor, alpha: f64) -> Vec<(String, Tensor)> {
    match format {
        LoraFormat::Kohya => vec![
            (format!("{base}.lora_down.weight"), down.shallow_clone()),
            (format!("{base}.lora_up.weight"), up.shallow_clone()),
            (format!("{base}.alpha"), Tensor::from(alpha as f32)),
        ],
        LoraFormat::Peft | LoraFormat::DiffusersLegacy => {
            // No per-module alpha in this layout: fold alpha / rank into up.
            let (down_suffix, up_suffix) = match format {
                LoraFormat::Peft => ("lora_A.weight", "lora_B.weight"),
                _ => ("lora.down.weight", "lora.up.weight"),
            };
            let scale = alpha / down.size()[0] as f64;
            vec![(format!("{base}.{down_suffix}"), down.shallow_clone()), (format!("{base}.{up_suffix}"), up * scale)]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alphas(json: &str) -> Result<PeftAlphas> {
        PeftAlphas::read(&HashMap::from([("lora_adapter_metadata".to_string(), json.to_string())]), "f.safetensors")
    }

    #[test]
    fn peft_alphas_are_per_model_with_the_bare_one_as_fallback() {
        let a = alphas(r#"{"unet.lora_alpha": 8, "text_encoder_2.lora_alpha": 6, "lora_alpha": 3}"#).unwrap();
        assert_eq!(a.of("unet.down_blocks.1.attentions.0.proj_in"), Some(8.0));
        assert_eq!(a.of("text_encoder_2.encoder.layers.0.self_attn.q_proj"), Some(6.0));
        assert_eq!(a.of("text_encoder.encoder.layers.0.self_attn.q_proj"), Some(3.0));
        let a = alphas(r#"{"unet.lora_alpha": 8}"#).unwrap();
        assert_eq!(a.of("text_encoder.encoder.layers.0.self_attn.q_proj"), None, "another model's alpha was taken");
        let err = alphas(r#"{"text_encoder.lora_alpha": "x"}"#).err().unwrap().to_string();
        assert!(err.contains("f.safetensors") && err.contains("text_encoder.lora_alpha"), "{err}");
    }

    #[test]
    fn peft_text_encoder_paths_without_a_component_are_the_text_encoder() {
        for (path, layer) in [
            ("base_model.model.text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"),
            ("base_model.model.encoder.layers.1.mlp.fc2", "text_model.encoder.layers.1.mlp.fc2"),
            ("text_model.encoder.layers.2.self_attn.out_proj", "text_model.encoder.layers.2.self_attn.out_proj"),
        ] {
            assert_eq!(model_layer(path), (Component::TextEncoder, layer.to_string()), "{path}");
        }
        for path in ["base_model.model.down_blocks.0.attentions.0.proj_in", "mid_block.resnets.0.conv1", "base_model.model.encoder_hid_proj"] {
            assert_eq!(model_layer(path).0, Component::Unet, "{path}");
        }
    }

    #[test]
    fn text_encoder_layers_get_transformers_4_paths() {
        assert_eq!(text_model_path("encoder.layers.0.self_attn.q_proj"), "text_model.encoder.layers.0.self_attn.q_proj");
        assert_eq!(text_model_path("text_model.encoder.layers.0.mlp.fc1"), "text_model.encoder.layers.0.mlp.fc1");
        assert_eq!(text_model_path("text_projection"), "text_projection");
    }
}
