//! LoRA: low-rank adapters on a model's linear and conv layers (LoCon on
//! kxk convs), and LyCORIS' LoHa and LoKr as weight deltas (`lycoris`).
//!
//! It knows the model only through its [`LayerIndex`] (names, shapes,
//! adapter slots) and nothing of the training loop.
pub mod dora;
pub mod edit;
pub mod format;
pub mod kohya_names;
pub mod layer;
pub mod lycoris;
pub mod merge;
pub mod model_edit;
pub mod network;
pub mod resize;
pub mod svd;
pub mod targets;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use crate::models::layers::{LayerIndex, LayerShape};
use kohya_names::KohyaNames;
use layer::{weight_delta, LoraAdapter};
use lycoris::{LycorisModule, WeightDeltaAdapter};

/// Which model a LoRA module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP bigG).
    TextEncoder2,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "UNet",
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "second text encoder",
        }
    }
}

/// One layer's low-rank pair, named by the layer's diffusers path.
pub struct LoraModule {
    pub component: Component,
    /// e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q`.
    pub layer: String,
    /// [r, in] or [r, in, k, k] (k > 1: LoCon).
    pub down: Tensor,
    /// [out, r] or [out, r, 1, 1].
    pub up: Tensor,
    pub alpha: f64,
    /// DoRA's magnitude as the file stores it: `[out, 1]` or `[1, in]` (`dora.rs`).
    pub dora_scale: Option<Tensor>,
}

impl LoraModule {
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }
}

/// A LoRA as read from or written to a file.
#[derive(Default)]
pub struct LoraWeights {
    pub modules: Vec<LoraModule>,
    /// LoHa / LoKr modules (read only; sdtune trains and writes plain LoRA).
    pub lycoris: Vec<LycorisModule>,
    pub metadata: std::collections::HashMap<String, String>,
}

impl LoraWeights {
    pub fn rank(&self) -> Option<i64> {
        self.modules.first().map(LoraModule::rank)
    }

    pub fn alpha(&self) -> Option<f64> {
        self.modules.first().map(|m| m.alpha)
    }
}

/// The model's layer indexes LoRA modules attach to.
pub struct ModelLayers<'a> {
    pub unet: &'a LayerIndex,
    pub text_encoder: Option<&'a LayerIndex>,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<&'a LayerIndex>,
    /// How kohya files name these layers (SGM paths for SDXL).
    pub kohya: KohyaNames,
}

impl ModelLayers<'_> {
    fn index(&self, component: Component) -> Option<&LayerIndex> {
        match component {
            Component::Unet => Some(self.unet),
            Component::TextEncoder => self.text_encoder,
            Component::TextEncoder2 => self.text_encoder_2,
        }
    }
}

/// Checks every module against its layer: it exists and the shapes fit.
/// `source` names the file in errors.
pub fn check_fits(weights: &LoraWeights, layers: &ModelLayers, source: &str) -> Result<()> {
    for m in &weights.modules {
        let Some(index) = layers.index(m.component) else {
            bail!("{source} has a {} LoRA for {}, but the model has no {} to apply it to", m.component.name(), m.layer, m.component.name());
        };
        let Some(shape) = index.with(&m.layer, |e| e.shape) else {
            bail!(
                "{source}: LoRA module for {} layer {} matches no layer of this model; the LoRA was made for a different architecture",
                m.component.name(),
                m.layer
            );
        };
        let (want_in, want_out) = match shape {
            LayerShape::Linear { in_features, out_features } => {
                if m.down.dim() == 4 && m.down.size()[2..].iter().any(|&k| k > 1) {
                    bail!("{source}: LoRA module for {} is a conv LoRA (LoCon) but the layer is linear; the LoRA was made for a different architecture", m.layer);
                }
                (in_features, out_features)
            }
            LayerShape::Conv2d { in_channels, out_channels, kernel } => {
                // LoCon: down carries the layer's kernel, up is 1x1.
                let (ds, us) = (m.down.size(), m.up.size());
                let down_k = if ds.len() == 4 { (ds[2], ds[3]) } else { (1, 1) };
                let up_k = if us.len() == 4 { (us[2], us[3]) } else { (1, 1) };
                if down_k != (kernel, kernel) || up_k != (1, 1) {
                    bail!(
                        "{source}: LoRA module for {} has a {}x{} down and a {}x{} up kernel but the layer is a {kernel}x{kernel} conv; the LoRA was made for a different architecture",
                        m.layer, down_k.0, down_k.1, up_k.0, up_k.1
                    );
                }
                (in_channels, out_channels)
            }
        };
        let got_in = m.down.size()[1];
        let got_out = m.up.size()[0];
        if let (Some(magnitude), true) = (&m.dora_scale, got_in == want_in && got_out == want_out) {
            let size = index.with(&m.layer, |e| e.weight.size()).expect("found above");
            dora::axis_of(magnitude, &size, &m.layer, source)?;
        }
        if got_in != want_in || got_out != want_out {
            let hint = if m.layer.contains("attn2.to_k") || m.layer.contains("attn2.to_v") {
                format!(
                    "; it expects {got_in}-wide text features and this model has {want_in} (an SD2.x LoRA on an SD1.x model or the reverse)"
                )
            } else {
                String::new()
            };
            bail!(
                "{source}: LoRA module for {} maps {got_in} -> {got_out} features but the layer has {want_in} -> {want_out}; the LoRA was trained for a different base model{hint}",
                m.layer
            );
        }
    }
    for m in &weights.lycoris {
        let (shape, size, _) = lycoris_layer(m, layers, source)?;
        lycoris::check_fits_layer(m, shape, &size, source)?;
    }
    Ok(())
}

/// A LoHa/LoKr module's scaled delta in its layer's weight shape, with the
/// layer's conv settings; an error names the module and the file.
pub fn lycoris_delta(m: &LycorisModule, layers: &ModelLayers, source: &str) -> Result<(Tensor, Option<crate::models::layers::ConvConfig>)> {
    let (shape, size, conv) = lycoris_layer(m, layers, source)?;
    Ok((lycoris::delta_for(m, shape, &size, source)?, conv))
}

fn lycoris_deltas(weights: &LoraWeights, layers: &ModelLayers, source: &str) -> Result<Vec<(Tensor, Option<crate::models::layers::ConvConfig>)>> {
    weights.lycoris.iter().map(|m| lycoris_delta(m, layers, source)).collect()
}

/// The layer a LoHa/LoKr module names: its shape, weight size and conv settings.
fn lycoris_layer(m: &LycorisModule, layers: &ModelLayers, source: &str) -> Result<(LayerShape, Vec<i64>, Option<crate::models::layers::ConvConfig>)> {
    let Some(index) = layers.index(m.component) else {
        bail!("{source} has a {} {} module for {}, but the model has no {} to apply it to", m.component.name(), m.factors.kind_name(), m.layer, m.component.name());
    };
    let Some((shape, size, conv)) = index.with(&m.layer, |e| (e.shape, e.weight.size(), e.conv)) else {
        bail!(
            "{source}: {} module for {} layer {} matches no layer of this model; the adapter was made for a different architecture",
            m.factors.kind_name(),
            m.component.name(),
            m.layer
        );
    };
    Ok((shape, size, conv))
}

/// `W' - W` of a DoRA module on `weight` (`None` for a plain LoRA); its
/// shape was checked by `check_fits`.
pub fn dora_delta(m: &LoraModule, weight: &Tensor, source: &str) -> Option<Tensor> {
    let magnitude = m.dora_scale.as_ref()?;
    let axis = dora::axis_of(magnitude, &weight.size(), &m.layer, source).expect("checked by check_fits");
    Some(tch::no_grad(|| dora::weight_delta_of(weight, &m.down, &m.up, m.scale(), magnitude, axis)))
}

/// Attaches every module as an adapter with `strength` (kept separate from
/// the base weights, so it can be removed or re-weighted).
pub fn attach(weights: &LoraWeights, layers: &ModelLayers, strength: f64, source: &str) -> Result<()> {
    check_fits(weights, layers, source)?;
    // Multiplied out before anything is attached, so a failure attaches nothing.
    let deltas = lycoris_deltas(weights, layers, source)?;
    for m in &weights.modules {
        let index = layers.index(m.component).expect("checked by check_fits");
        index.with(&m.layer, |e| {
            if let Some(delta) = dora_delta(m, &e.weight, source) {
                // DoRA renormalises the whole weight: applied as its exact delta, scaled as ComfyUI does.
                let delta = (delta * strength).to_device(e.weight.device());
                e.adapters.push(Box::new(WeightDeltaAdapter { delta, conv: e.conv }));
                return;
            }
            let down = m.down.to_device(e.weight.device());
            let up = m.up.to_device(e.weight.device());
            e.adapters.push(Box::new(LoraAdapter::new(&down, &up, m.scale() * strength, e.shape).with_conv(e.conv)));
        });
    }
    for (m, (delta, conv)) in weights.lycoris.iter().zip(deltas) {
        let index = layers.index(m.component).expect("checked by check_fits");
        index.with(&m.layer, |e| {
            let delta = (delta * strength).to_device(e.weight.device());
            e.adapters.push(Box::new(WeightDeltaAdapter { delta, conv }));
        });
    }
    Ok(())
}

/// Adds `strength * scale * up @ down` (and each LoHa/LoKr delta) into the base weights (faster
/// sampling; the base model is changed in memory only).
pub fn fuse(weights: &LoraWeights, layers: &ModelLayers, strength: f64, source: &str) -> Result<()> {
    check_fits(weights, layers, source)?;
    let deltas = lycoris_deltas(weights, layers, source)?;
    tch::no_grad(|| {
        for m in &weights.modules {
            let index = layers.index(m.component).expect("checked by check_fits");
            index.with(&m.layer, |e| {
                let delta = match dora_delta(m, &e.weight, source) {
                    Some(delta) => delta * strength,
                    None => weight_delta(&m.down, &m.up, m.scale() * strength, &e.weight.size()),
                };
                let mut w = e.weight.shallow_clone();
                let updated = w.to_kind(Kind::Float) + delta.to_device(w.device());
                w.copy_(&updated.to_kind(w.kind()));
            });
        }
        for (m, (delta, _)) in weights.lycoris.iter().zip(deltas) {
            let index = layers.index(m.component).expect("checked by check_fits");
            index.with(&m.layer, |e| {
                let mut w = e.weight.shallow_clone();
                let updated = w.to_kind(Kind::Float) + (delta * strength).to_device(w.device());
                w.copy_(&updated.to_kind(w.kind()));
            });
        }
    });
    Ok(())
}

/// `FILE[:SCALE]` as `--lora` takes it: the scale after the last colon, 1 if
/// absent. A strength out of range is refused; a high one is printed as a warning.
pub fn parse_spec(spec: &str) -> Result<(std::path::PathBuf, f64)> {
    if let Some((file, scale)) = spec.rsplit_once(':') {
        if let Ok(scale) = scale.trim().parse::<f64>() {
            if let Some(warning) = crate::ranges::check_lora_scale(scale, &format!("--lora {spec}"))? {
                eprintln!("{warning}");
            }
            return Ok((file.into(), scale));
        }
    }
    Ok((spec.into(), 1.0))
}

/// `--lora FILE`: a file that is there (a folder or a missing path is named as such).
pub fn check_lora_path(path: &std::path::Path) -> Result<()> {
    let source = path.display();
    if path.is_dir() {
        bail!("--lora {source} is a folder; give the path of a .safetensors LoRA file inside it");
    }
    if !path.is_file() {
        bail!("--lora {source} does not exist; give the path of a .safetensors LoRA file");
    }
    Ok(())
}

