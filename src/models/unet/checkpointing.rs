//! How the blocks run their resnets and transformers: as they are, or
//! (diffusers' `enable_gradient_checkpointing`) each as one checkpointed
//! segment whose activations backward computes again.
use std::ops::Deref;
use std::sync::Arc;

use anyhow::Result;
use tch::Tensor;

use super::attention::Transformer2DModel;
use super::resnet::ResnetBlock2D;
use crate::models::gradient_checkpoint::checkpointed;

/// A layer the UNet and its checkpointed segments share: a segment keeps
/// its layer alive until backward has run it again.
pub struct Shared<T>(Arc<T>);

// SAFETY: a segment may run again on autograd's thread for the device
// while the thread that recorded it waits in backward. It only reads the
// layer, and libtorch tensors may be read from any thread (their reference
// counts are atomic); tch merely does not mark them Sync.
unsafe impl<T> Send for Shared<T> {}

impl<T> Shared<T> {
    pub fn new(layer: T) -> Self {
        Shared(Arc::new(layer))
    }

    fn share(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[derive(Clone, Copy)]
pub enum Segments<'a> {
    Direct,
    /// Checkpointed, with the trained tensors whose gradients pass through.
    Checkpointed(&'a [Tensor]),
}

impl Segments<'_> {
    pub fn resnet(&self, resnet: &Shared<ResnetBlock2D>, x: &Tensor, temb: &Tensor) -> Tensor {
        match self {
            Segments::Checkpointed(_) if needs_no_backward(resnet.trains(), &[x, temb]) => resnet.forward(x, temb),
            Segments::Direct => resnet.forward(x, temb),
            Segments::Checkpointed(params) => {
                let resnet = resnet.share();
                one(checkpointed(&[x, temb], params, move |t| Ok(vec![resnet.forward(&t[0], &t[1])])))
            }
        }
    }

    pub fn transformer(&self, attention: &Shared<Transformer2DModel>, x: &Tensor, context: &Tensor) -> Tensor {
        match self {
            Segments::Checkpointed(_) if needs_no_backward(attention.trains(), &[x, context]) => {
                attention.forward(x, context)
            }
            Segments::Direct => attention.forward(x, context),
            Segments::Checkpointed(params) => {
                let attention = attention.share();
                one(checkpointed(&[x, context], params, move |t| Ok(vec![attention.forward(&t[0], &t[1])])))
            }
        }
    }
}

/// A segment that trains nothing on inputs that need no gradient (the
/// first resnets, before the first LoRA layer) is left out of backward
/// altogether: run directly it records nothing, where a checkpoint would
/// run it again in backward for no gradient at all.
fn needs_no_backward(trains: bool, inputs: &[&Tensor]) -> bool {
    !trains && !inputs.iter().any(|t| t.requires_grad())
}

/// The one output of a segment. The forward is infallible like tch's own
/// operations, so a failure here panics as theirs do; a failure of the
/// recompute comes back from backward as an error.
fn one(outputs: Result<Vec<Tensor>>) -> Tensor {
    match outputs {
        Ok(mut outputs) if outputs.len() == 1 => outputs.remove(0),
        Ok(outputs) => panic!("a checkpointed UNet segment gave {} outputs instead of one", outputs.len()),
        Err(e) => panic!("{e:#}"),
    }
}
