//! Training the text encoders' LoRA alongside the UNet's. A caption's
//! cached embedding is of the encoder as it was at prepare time, so while
//! the encoder learns each step runs it again, with gradients, on the
//! caption's token ids. The cache keeps every caption's text; each is
//! turned into token ids by the model's own tokenizers once, when the run
//! starts (the ids prepare's encoder saw), so caches of any age train it.
//! With caption shuffling on, a sample's shuffled caption is tokenized in
//! its step (tokenizing is far cheaper than the encoder's forward).
use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::data::TrainingData;
use super::shuffle::shuffled_caption;
use crate::lora::network::{DownInit, LoraNetwork};
use crate::lora::targets::Targets;
use crate::lora::Component;
use crate::models::conditioning::Conditioning;
use crate::models::text_stack::TextStack;

/// kohya's `shuffle_caption` as the trained encoder applies it.
#[derive(Clone, Copy, Debug)]
pub struct CaptionShuffle {
    /// Tags at the start of each caption that stay in place.
    pub keep_tokens: usize,
    /// The run's seed: a sample's order follows (seed, its global index).
    pub seed: u64,
}

/// One caption of a batch the encoder reads: training item `item` as
/// global sample `global` of the run draws it.
#[derive(Clone, Copy, Debug)]
pub struct CaptionDraw {
    pub item: usize,
    pub global: u64,
}

/// The text stack whose LoRA trains, and the token ids of every caption.
pub struct TextEncoderTraining<'a> {
    stack: &'a TextStack,
    /// Per training item, its caption as prepared.
    captions: HashMap<usize, String>,
    /// Per training item, one `[1, 77]` id tensor per encoder.
    ids: HashMap<usize, Vec<Tensor>>,
    /// The empty caption's (caption dropout).
    empty: Vec<Tensor>,
    shuffle: Option<CaptionShuffle>,
}

impl<'a> TextEncoderTraining<'a> {
    /// Tokenizes the caption of every item `buckets` holds.
    pub fn new(stack: &'a TextStack, data: &dyn TrainingData, shuffle: Option<CaptionShuffle>) -> Result<Self> {
        let mut captions = HashMap::new();
        // Class samples (prior preservation) are encoded in the step too.
        for &item in data.buckets().iter().flatten().chain(&data.class_items()) {
            if let std::collections::hash_map::Entry::Vacant(slot) = captions.entry(item) {
                slot.insert(data.caption(item)?);
            }
        }
        let ids = captions.iter().map(|(&item, caption)| Ok((item, tokenize(stack, caption)?))).collect::<Result<_>>()?;
        Ok(TextEncoderTraining { stack, empty: tokenize(stack, "")?, ids, captions, shuffle })
    }

    /// The caption `draw` reads, shuffled when shuffling is on.
    pub fn caption_of(&self, draw: CaptionDraw) -> Result<String> {
        let caption = self.captions.get(&draw.item).with_context(|| format!("internal: item {} has no caption", draw.item))?;
        Ok(match self.shuffle {
            Some(s) => shuffled_caption(caption, s.keep_tokens, s.seed, draw.global),
            None => caption.clone(),
        })
    }

    /// One `[1, 77]` id tensor per encoder for `draw`: the ids tokenized at
    /// the start unless shuffling gave another order.
    fn ids_of(&self, draw: CaptionDraw) -> Result<Vec<Tensor>> {
        let cached = self.ids.get(&draw.item).with_context(|| format!("internal: item {} has no token ids", draw.item))?;
        if self.shuffle.is_some() {
            let caption = self.caption_of(draw)?;
            if caption != self.captions[&draw.item] {
                return tokenize(self.stack, &caption);
            }
        }
        Ok(cached.iter().map(Tensor::shallow_clone).collect())
    }

    /// The conditioning of a batch, encoded now (gradients reach the
    /// encoders' LoRA): `Some(draw)` is that sample's caption, `None` the
    /// empty caption of a dropped one. Time ids are the caller's.
    pub fn encode(&self, batch: &[Option<CaptionDraw>]) -> Result<Conditioning> {
        let mut per_encoder: Vec<Vec<Tensor>> = self.stack.encoders.iter().map(|_| Vec::with_capacity(batch.len())).collect();
        for draw in batch {
            let ids = match draw {
                Some(d) => self.ids_of(*d)?,
                None => self.empty.iter().map(Tensor::shallow_clone).collect(),
            };
            for (all, one) in per_encoder.iter_mut().zip(ids) {
                all.push(one);
            }
        }
        let joined: Vec<Tensor> = per_encoder.iter().map(|ids| Tensor::cat(ids, 0)).collect();
        // Training always encodes as prepare does: no clip skip.
        self.stack.encode_ids(&joined, 0)
    }
}

/// `caption` as one `[1, 77]` id tensor per encoder of `stack`.
fn tokenize(stack: &TextStack, caption: &str) -> Result<Vec<Tensor>> {
    stack
        .encoders
        .iter()
        .map(|e| {
            let tokenizer = e.tokenizer().context("training the text encoder needs the model's tokenizer")?;
            Ok(Tensor::from_slice(&tokenizer.encode(caption).ids).unsqueeze(0))
        })
        .collect()
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
