//! Building blocks every model is made of, each created by its exact weight
//! name through [`Vb`] (`vb.pp("to_q").linear(..)` makes `...to_q.weight`).
//!
//! Linear and conv layers carry an [`Adapters`] slot: LoRA attaches there
//! without the model knowing what LoRA is. Every such layer is also listed in
//! the model's [`LayerIndex`], so adapters can be attached by diffusers name.
use std::sync::{Arc, Mutex};

use tch::{nn, Kind, Tensor};

/// How the variables of a freshly built model are filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightInit {
    /// Zeros, cheap: the weights are about to be loaded from a file.
    Zeros,
    /// Random, like torch's defaults: benchmarks and fixtures need no file.
    Random,
}

/// Something added to a layer's output: `y = base(x) + sum(adapter.delta(x))`.
pub trait Adapter: Send {
    fn delta(&self, x: &Tensor) -> Tensor;
}

/// The adapters attached to one layer; cloning shares the slot.
#[derive(Clone, Default)]
pub struct Adapters(Arc<Mutex<Vec<Box<dyn Adapter>>>>);

impl Adapters {
    pub fn push(&self, adapter: Box<dyn Adapter>) {
        self.lock().push(adapter);
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn apply(&self, x: &Tensor, y: Tensor) -> Tensor {
        let adapters = self.lock();
        adapters.iter().fold(y, |y, a| y + a.delta(x))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn Adapter>>> {
        // A poisoned lock only means another thread panicked mid-push; the
        // vector itself is still valid.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The shape of an adaptable layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerShape {
    Linear { in_features: i64, out_features: i64 },
    Conv2d { in_channels: i64, out_channels: i64, kernel: i64 },
}

/// One adaptable layer of a model: its diffusers name, weight and adapter slot.
pub struct LayerEntry {
    pub name: String,
    pub shape: LayerShape,
    pub weight: Tensor,
    pub adapters: Adapters,
    /// A conv layer's stride and padding (adapters with a kxk kernel, such
    /// as LoCon's down conv, must use the layer's own); None for a linear layer.
    pub conv: Option<ConvConfig>,
}

/// All adaptable layers of a model in construction order.
#[derive(Clone, Default)]
pub struct LayerIndex(Arc<Mutex<Vec<LayerEntry>>>);

impl LayerIndex {
    fn register(&self, entry: LayerEntry) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
    }

    /// Calls `f` on every layer, in construction order.
    pub fn for_each(&self, mut f: impl FnMut(&LayerEntry)) {
        for entry in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            f(entry);
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        self.for_each(|e| names.push(e.name.clone()));
        names
    }

    /// Runs `f` on the layer named `name` (diffusers path, no `.weight`).
    pub fn with<R>(&self, name: &str, f: impl FnOnce(&LayerEntry) -> R) -> Option<R> {
        let entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().find(|e| e.name == name).map(f)
    }
}

/// A variable builder: an `nn::Path` plus how to fill new variables and the
/// index adaptable layers register into.
#[derive(Clone)]
pub struct Vb<'a> {
    path: nn::Path<'a>,
    init: WeightInit,
    layers: LayerIndex,
}

impl<'a> Vb<'a> {
    pub fn new(path: nn::Path<'a>, init: WeightInit, layers: LayerIndex) -> Self {
        Vb { path, init, layers }
    }

    /// The sub-builder for `name` (`vb.pp("down_blocks").pp(0)`).
    pub fn pp<S: ToString>(&self, name: S) -> Vb<'a> {
        Vb { path: self.path.sub(name), init: self.init, layers: self.layers.clone() }
    }

    /// Full dotted name of `name` under this builder.
    pub fn name(&self, name: &str) -> String {
        self.path.path(name)
    }

    /// This builder's own dotted prefix (`down_blocks.0.attentions.0`).
    pub fn prefix(&self) -> String {
        self.path.components().collect::<Vec<_>>().join(".")
    }

    pub fn init(&self) -> WeightInit {
        self.init
    }

    pub fn device(&self) -> tch::Device {
        self.path.device()
    }

    pub fn kind(&self) -> Kind {
        self.path.kind()
    }

    /// A variable filled with `random` when building random weights, zeros otherwise.
    pub fn var(&self, name: &str, dims: &[i64], random: nn::Init) -> Tensor {
        let init = match self.init {
            WeightInit::Zeros => nn::Init::Const(0.),
            WeightInit::Random => random,
        };
        self.path.var(name, dims, init)
    }

    /// A fan-in uniform weight like torch's default for Linear and Conv2d.
    fn fan_in_weight(&self, dims: &[i64]) -> Tensor {
        let fan_in: i64 = dims[1..].iter().product();
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        self.var("weight", dims, nn::Init::Uniform { lo: -bound, up: bound })
    }

    fn fan_in_bias(&self, fan_in: i64, size: i64) -> Tensor {
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        self.var("bias", &[size], nn::Init::Uniform { lo: -bound, up: bound })
    }

    pub fn linear(&self, in_features: i64, out_features: i64, bias: bool) -> Linear {
        let weight = self.fan_in_weight(&[out_features, in_features]);
        let bias = bias.then(|| self.fan_in_bias(in_features, out_features));
        let adapters = Adapters::default();
        self.layers.register(LayerEntry {
            name: self.prefix(),
            shape: LayerShape::Linear { in_features, out_features },
            weight: weight.shallow_clone(),
            adapters: adapters.clone(),
            conv: None,
        });
        Linear { weight, bias, adapters }
    }

    pub fn conv2d(&self, in_channels: i64, out_channels: i64, kernel: i64, cfg: ConvConfig) -> Conv2d {
        let weight = self.fan_in_weight(&[out_channels, in_channels, kernel, kernel]);
        let bias = self.fan_in_bias(in_channels * kernel * kernel, out_channels);
        let adapters = Adapters::default();
        self.layers.register(LayerEntry {
            name: self.prefix(),
            shape: LayerShape::Conv2d { in_channels, out_channels, kernel },
            weight: weight.shallow_clone(),
            adapters: adapters.clone(),
            conv: Some(cfg),
        });
        Conv2d { weight, bias, stride: cfg.stride, padding: cfg.padding, adapters }
    }

    pub fn group_norm(&self, groups: i64, channels: i64, eps: f64) -> GroupNorm {
        let weight = self.var("weight", &[channels], nn::Init::Const(1.));
        let bias = self.var("bias", &[channels], nn::Init::Const(0.));
        GroupNorm { weight, bias, groups, eps }
    }

    pub fn layer_norm(&self, dim: i64, eps: f64) -> LayerNorm {
        let weight = self.var("weight", &[dim], nn::Init::Const(1.));
        let bias = self.var("bias", &[dim], nn::Init::Const(0.));
        LayerNorm { weight, bias, dim, eps }
    }

    pub fn embedding(&self, count: i64, dim: i64) -> Embedding {
        let weight =
            self.var("weight", &[count, dim], nn::Init::Randn { mean: 0., stdev: 0.02 });
        Embedding { weight }
    }
}

/// `y = x W^T + b`, plus whatever adapters are attached.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapters: Adapters,
}

impl Linear {
    /// Whether backward must reach into this layer: a trained weight or bias, or an adapter.
    pub fn trains(&self) -> bool {
        self.weight.requires_grad() || self.bias.as_ref().is_some_and(Tensor::requires_grad) || !self.adapters.is_empty()
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = super::onednn::linear(x, &self.weight, self.bias.as_ref());
        super::flop_count::linear(x, &self.weight);
        self.adapters.apply(x, y)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ConvConfig {
    pub stride: i64,
    pub padding: i64,
}

impl ConvConfig {
    /// Stride 1, padding that keeps the size for an odd kernel.
    pub fn same(kernel: i64) -> Self {
        ConvConfig { stride: 1, padding: kernel / 2 }
    }
}

pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: i64,
    pub padding: i64,
    pub adapters: Adapters,
}

impl Conv2d {
    /// Whether backward must reach into this layer: a trained weight or bias, or an adapter.
    pub fn trains(&self) -> bool {
        self.weight.requires_grad() || self.bias.requires_grad() || !self.adapters.is_empty()
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = super::conv::conv2d(x, &self.weight, &self.bias, self.stride, self.padding);
        super::flop_count::conv(&y, &self.weight);
        self.adapters.apply(x, y)
    }
}

pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    pub fn trains(&self) -> bool {
        self.weight.requires_grad() || self.bias.requires_grad()
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub fn trains(&self) -> bool {
        self.weight.requires_grad() || self.bias.requires_grad()
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}
