//! A trainable LoRA: fp32 masters in their own VarStore, attached to the
//! targeted layers of a frozen model.
use anyhow::{bail, Result};
use tch::{nn, Device, Kind, Tensor};

use super::kohya_names::KohyaNames;
use super::dora::DoraAdapter;
use super::layer::LoraAdapter;
use super::targets::Targets;
use super::{Component, LoraModule, LoraWeights};
use crate::models::layers::{LayerIndex, LayerShape};

/// How the down projection starts (the up projection always starts at zero,
/// so a fresh LoRA leaves the model unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownInit {
    /// Kaiming-uniform with a = sqrt(5), as peft and kohya do.
    KaimingUniform,
    /// N(0, 1/r), as peft's `init_lora_weights="gaussian"`.
    Gaussian,
}

pub struct LoraNetwork {
    /// Holds every trainable tensor, named `<kohya SD1-style module>.lora_down.weight` etc.
    pub vs: nn::VarStore,
    pub modules: Vec<TrainedModule>,
    pub rank: i64,
    pub alpha: f64,
    /// Rank and alpha of the pairs on kxk convs (LoCon; kohya's conv_dim / conv_alpha).
    pub conv_rank: i64,
    pub conv_alpha: f64,
    /// Every module is DoRA (`dora.rs`): a trained magnitude per output row.
    pub dora: bool,
}

pub struct TrainedModule {
    pub component: Component,
    pub layer: String,
    pub down: Tensor,
    pub up: Tensor,
    /// This pair's alpha (a LoCon pair has the conv alpha).
    pub alpha: f64,
    /// DoRA's magnitude `[out, 1]`, starting at the base weight's row norms.
    pub magnitude: Option<Tensor>,
}

impl LoraNetwork {
    /// Creates rank-`rank` pairs on every UNet layer `targets` selects and
    /// attaches them. Uses the global torch generator (seed it first).
    pub fn inject(
        unet_layers: &LayerIndex,
        targets: Targets,
        rank: i64,
        alpha: f64,
        init: DownInit,
        device: Device,
    ) -> Result<Self> {
        Self::inject_with(unet_layers, targets, (rank, alpha), (rank, alpha), init, device, false)
    }

    /// [`Self::inject`] with `(rank, alpha)` of the kxk-conv pairs apart
    /// (LoCon) and every module DoRA when `dora`.
    pub fn inject_with(
        unet_layers: &LayerIndex,
        targets: Targets,
        (rank, alpha): (i64, f64),
        (conv_rank, conv_alpha): (i64, f64),
        init: DownInit,
        device: Device,
        dora: bool,
    ) -> Result<Self> {
        if rank < 1 {
            bail!("--rank must be at least 1, got {rank}");
        }
        if conv_rank < 1 {
            bail!("--conv-rank must be at least 1, got {conv_rank}");
        }
        check_rank_fits(unet_layers, targets, rank)?;
        let mut network = LoraNetwork { vs: nn::VarStore::new(device), modules: Vec::new(), rank, alpha, conv_rank, conv_alpha, dora };
        let added = network.add_modules(Component::Unet, unet_layers, |name| targets.matches(name), init)?;
        if added == 0 {
            bail!("--targets {} selects no layer of this UNet", targets.name());
        }
        Ok(network)
    }

    /// Adds pairs on the text encoder's layers `targets` selects (its
    /// attention projections; the MLP too with `transformer`), after the
    /// UNet's, so the optimizer's order stays fixed.
    pub fn inject_text_encoder(&mut self, component: Component, layers: &LayerIndex, targets: Targets, init: DownInit) -> Result<()> {
        let selects = |name: &str| targets.matches_text_encoder(name);
        check_rank_fits_where(layers, &selects, self.rank, component.name())?;
        if self.add_modules(component, layers, selects, init)? == 0 {
            bail!("the {} has no attention projections (q_proj, k_proj, v_proj, out_proj) to train", component.name());
        }
        Ok(())
    }

    /// Creates and attaches a pair on every layer of `layers` that `selects`;
    /// returns how many.
    fn add_modules(&mut self, component: Component, layers: &LayerIndex, selects: impl Fn(&str) -> bool, init: DownInit) -> Result<usize> {
        let dora = self.dora;
        let root = self.vs.root();
        let mut added = Vec::new();
        let mut failure = None;
        layers.for_each(|entry| {
            if failure.is_some() || !selects(&entry.name) {
                return;
            }
            let (fan_in, out, conv, kernel) = match entry.shape {
                LayerShape::Linear { in_features, out_features } => (in_features, out_features, false, 1),
                LayerShape::Conv2d { in_channels, out_channels, kernel } => (in_channels, out_channels, true, kernel),
            };
            if kernel > 1 && dora {
                failure = Some(format!("{} is a {kernel}x{kernel} conv; --dora trains linear and 1x1-conv layers only, so use --targets without conv layers", entry.name));
                return;
            }
            // LoCon: a kxk down conv with the layer's stride and padding, a 1x1 up.
            let (rank, alpha) = if kernel > 1 { (self.conv_rank, self.conv_alpha) } else { (self.rank, self.alpha) };
            // Named as kohya names an SD1 module whatever the model, so state
            // files keep one naming; LoRA files are named when written.
            let name = KohyaNames::Diffusers.name(component, &entry.name).expect("diffusers paths always name");
            let path = root.sub(name);
            let (down_dims, up_dims) = if conv {
                (vec![rank, fan_in, kernel, kernel], vec![out, rank, 1, 1])
            } else {
                (vec![rank, fan_in], vec![out, rank])
            };
            let down_init = match init {
                // kaiming_uniform(a = sqrt(5)): bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in).
                DownInit::KaimingUniform => {
                    let bound = 1.0 / ((fan_in * kernel * kernel) as f64).sqrt();
                    nn::Init::Uniform { lo: -bound, up: bound }
                }
                DownInit::Gaussian => nn::Init::Randn { mean: 0.0, stdev: 1.0 / rank as f64 },
            };
            let down = path.sub("lora_down").var("weight", &down_dims, down_init);
            let up = path.sub("lora_up").var("weight", &up_dims, nn::Init::Const(0.0));
            let scale = alpha / rank as f64;
            let magnitude = if dora {
                // ||W|| per output row: a fresh DoRA leaves the layer as it was.
                let norms = tch::no_grad(|| entry.weight.to_kind(Kind::Float).reshape([out, -1]).norm_scalaropt_dim(2, [1i64].as_slice(), true));
                let magnitude = path.var_copy("dora_scale", &norms.to_device(down.device()));
                let conv = conv.then(|| entry.conv.unwrap_or(crate::models::layers::ConvConfig::same(1)));
                entry.adapters.push(Box::new(DoraAdapter {
                    down: down.shallow_clone(),
                    up: up.shallow_clone(),
                    magnitude: magnitude.shallow_clone(),
                    scale,
                    weight: entry.weight.shallow_clone(),
                    conv,
                }));
                Some(magnitude)
            } else {
                entry.adapters.push(Box::new(LoraAdapter::new(&down, &up, scale, entry.shape).with_conv(entry.conv)));
                None
            };
            added.push(TrainedModule { component, layer: entry.name.clone(), down, up, alpha, magnitude });
        });
        if let Some(msg) = failure {
            bail!(msg);
        }
        let count = added.len();
        self.modules.extend(added);
        Ok(count)
    }

    /// Which parameters (in [`Self::parameters`]' order) belong to a text encoder.
    pub fn text_encoder_parameters(&self) -> Vec<bool> {
        self.modules.iter().flat_map(|m| vec![m.component != Component::Unet; 2 + usize::from(m.magnitude.is_some())]).collect()
    }

    /// All trainable tensors, in a fixed order (the optimizer relies on it).
    pub fn parameters(&self) -> Vec<Tensor> {
        self.modules
            .iter()
            .flat_map(|m| [m.down.shallow_clone(), m.up.shallow_clone()].into_iter().chain(m.magnitude.as_ref().map(Tensor::shallow_clone)))
            .collect()
    }

    /// A detached fp32 CPU copy, ready to write to a file.
    pub fn to_weights(&self) -> LoraWeights {
        let modules = self
            .modules
            .iter()
            .map(|m| LoraModule {
                component: m.component,
                layer: m.layer.clone(),
                down: m.down.detach().to_device(Device::Cpu).to_kind(Kind::Float),
                up: m.up.detach().to_device(Device::Cpu).to_kind(Kind::Float),
                alpha: m.alpha,
                dora_scale: m.magnitude.as_ref().map(|t| t.detach().to_device(Device::Cpu).to_kind(Kind::Float)),
            })
            .collect();
        LoraWeights { modules, ..Default::default() }
    }
}

/// A rank above a targeted layer's width adds parameters that cannot
/// learn anything the layer could not: refused, naming the narrowest layer.
fn check_rank_fits(unet_layers: &LayerIndex, targets: Targets, rank: i64) -> Result<()> {
    check_rank_fits_where(unet_layers, &|name| targets.matches(name), rank, "UNet")
}

fn check_rank_fits_where(layers: &LayerIndex, selects: &dyn Fn(&str) -> bool, rank: i64, model: &str) -> Result<()> {
    let mut narrowest: Option<(i64, String)> = None;
    layers.for_each(|entry| {
        // LoCon pairs have their own --conv-rank.
        if !selects(&entry.name) || matches!(entry.shape, LayerShape::Conv2d { kernel, .. } if kernel > 1) {
            return;
        }
        let width = match entry.shape {
            LayerShape::Linear { in_features, out_features } => in_features.min(out_features),
            LayerShape::Conv2d { in_channels, out_channels, .. } => in_channels.min(out_channels),
        };
        if narrowest.as_ref().is_none_or(|(w, _)| width < *w) {
            narrowest = Some((width, entry.name.clone()));
        }
    });
    match narrowest {
        Some((width, name)) if rank > width => bail!(
            "--rank {rank} is more than the width of the narrowest targeted layer ({model} {name}, {width} features); use --rank {width} or less"
        ),
        _ => Ok(()),
    }
}
