//! Training the text encoders' LoRA alongside the UNet's. A caption's
//! cached embedding is of the encoder as it was at prepare time, so while
//! the encoder learns each step runs it again, with gradients, on the
//! caption's token ids. The cache keeps every caption's text; each is
//! turned into token ids by the model's own tokenizers once, when the run
//! starts (the ids prepare's encoder saw), so caches of any age train it.
use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::data::TrainingData;
use crate::lora::network::{DownInit, LoraNetwork};
use crate::lora::targets::Targets;
use crate::lora::Component;
use crate::models::conditioning::Conditioning;
use crate::models::text_stack::TextStack;

/// The text stack whose LoRA trains, and the token ids of every caption.
pub struct TextEncoderTraining<'a> {
    stack: &'a TextStack,
    /// Per training item, one `[1, 77]` id tensor per encoder.
    ids: HashMap<usize, Vec<Tensor>>,
    /// The empty caption's (caption dropout).
    empty: Vec<Tensor>,
}

impl<'a> TextEncoderTraining<'a> {
    /// Tokenizes the caption of every item `buckets` holds.
    pub fn new(stack: &'a TextStack, data: &dyn TrainingData) -> Result<Self> {
        let tokenize = |caption: &str| -> Result<Vec<Tensor>> {
            stack
                .encoders
                .iter()
                .map(|e| {
                    let tokenizer = e.tokenizer().context("training the text encoder needs the model's tokenizer")?;
                    Ok(Tensor::from_slice(&tokenizer.encode(caption).ids).unsqueeze(0))
                })
                .collect()
        };
        let mut ids = HashMap::new();
        // Class samples (prior preservation) are encoded in the step too.
        for &item in data.buckets().iter().flatten().chain(&data.class_items()) {
            if let std::collections::hash_map::Entry::Vacant(slot) = ids.entry(item) {
                slot.insert(tokenize(&data.caption(item)?)?);
            }
        }
        Ok(TextEncoderTraining { stack, empty: tokenize("")?, ids })
    }

    /// The conditioning of a batch, encoded now (gradients reach the
    /// encoders' LoRA): `Some(item)` is that item's caption, `None` the
    /// empty caption of a dropped one. Time ids are the caller's.
    pub fn encode(&self, batch: &[Option<usize>]) -> Result<Conditioning> {
        let mut per_encoder: Vec<Vec<Tensor>> = self.stack.encoders.iter().map(|_| Vec::with_capacity(batch.len())).collect();
        for item in batch {
            let ids = match item {
                Some(i) => self.ids.get(i).with_context(|| format!("internal: item {i} has no token ids"))?,
                None => &self.empty,
            };
            for (all, one) in per_encoder.iter_mut().zip(ids) {
                all.push(one.shallow_clone());
            }
        }
        let joined: Vec<Tensor> = per_encoder.iter().map(|ids| Tensor::cat(ids, 0)).collect();
        // Training always encodes as prepare does: no clip skip.
        self.stack.encode_ids(&joined, 0)
    }
}

/// Adds LoRA pairs to every text encoder of `text` (the components kohya
/// names `lora_te_`, or `lora_te1_` / `lora_te2_` for SDXL's two).
pub fn inject(lora: &mut LoraNetwork, text: &TextStack, targets: Targets) -> Result<()> {
    let components = [Component::TextEncoder, Component::TextEncoder2];
    if text.encoders.len() > components.len() {
        bail!("this model has {} text encoders; sdtune trains a LoRA on one or two", text.encoders.len());
    }
    for (encoder, component) in text.encoders.iter().zip(components) {
        lora.inject_text_encoder(component, &encoder.model.layers, targets, DownInit::KaimingUniform)?;
    }
    Ok(())
}

/// Each optimizer parameter's learning rate as a multiple of the UNet's:
/// `te_lr / unet_lr` for the text encoders' (the schedule scales both alike).
pub fn lr_factors(lora: &LoraNetwork, unet_lr: f64, te_lr: f64) -> Vec<f64> {
    lora.text_encoder_parameters().into_iter().map(|te| if te { te_lr / unet_lr } else { 1.0 }).collect()
}
