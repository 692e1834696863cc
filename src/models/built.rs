//! A model built by its weight names: the module, the store that owns its
//! weights and the index of its adaptable layers.
use anyhow::Result;
use tch::{nn::VarStore, Device, Kind};

use super::layers::{LayerIndex, Vb, WeightInit};

/// A built model with the store that owns its weights and its adaptable layers.
pub struct Built<M> {
    pub model: M,
    pub vs: VarStore,
    pub layers: LayerIndex,
}

/// Builds a model on `device` in `kind`, its weights filled per `init`.
/// The weights are frozen: nothing of the base model ever gets a gradient.
pub fn build<M>(
    device: Device,
    kind: Kind,
    init: WeightInit,
    make: impl FnOnce(Vb) -> Result<M>,
) -> Result<Built<M>> {
    let mut vs = VarStore::new(device);
    // New variables are created directly in `kind`: no fp32 copy first.
    vs.set_kind(kind);
    let layers = LayerIndex::default();
    let model = make(Vb::new(vs.root(), init, layers.clone()))?;
    // bf16 on the CPU: convolution weights NHWC before any weight is loaded
    // into them (loading copies into the layout), see `channels_last.rs`.
    super::channels_last::lay_out_convs(&layers);
    vs.freeze();
    Ok(Built { model, vs, layers })
}

