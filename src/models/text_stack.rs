//! The text side of a model: one tokenizer + text encoder pair (SD1, SD2)
//! or several (SDXL has two), turning prompts into the [`Conditioning`]
//! the UNet takes. Sampling, prepare's caption cache and training all
//! encode text through [`TextStack::encode`].
use anyhow::{bail, Context, Result};
use tch::{Device, Tensor};

use super::built::Built;
use super::clip::ClipTextModel;
use super::conditioning::Conditioning;
use super::config::ClipTextConfig;
use super::layers::LayerIndex;
use super::tokenizer::ClipTokenizer;

/// One tokenizer and the encoder it feeds.
pub struct TextEncoder {
    /// `None` for models built from configs alone (benchmarks).
    pub tokenizer: Option<ClipTokenizer>,
    pub model: Built<ClipTextModel>,
    pub config: ClipTextConfig,
}

impl TextEncoder {
    pub fn tokenizer(&self) -> Result<&ClipTokenizer> {
        self.tokenizer.as_ref().context("this model was built without a tokenizer")
    }
}

/// Every text encoder of a model, in the order their states are joined.
pub struct TextStack {
    pub encoders: Vec<TextEncoder>,
}

/// What one prompt became, per batch element.
pub struct Encoded {
    pub conditioning: Conditioning,
    /// Indices of the prompts cut off at the tokenizer's 77 tokens.
    pub truncated: Vec<usize>,
}

impl TextStack {
    pub fn new(encoders: Vec<TextEncoder>) -> Result<Self> {
        if encoders.is_empty() {
            bail!("a model needs at least one text encoder");
        }
        Ok(TextStack { encoders })
    }

    /// The first (for SD1/SD2 the only) encoder.
    pub fn first(&self) -> &TextEncoder {
        &self.encoders[0]
    }

    /// Width of the joined per-token states (the UNet's cross-attention width).
    pub fn hidden_size(&self) -> i64 {
        self.encoders.iter().map(|e| e.config.hidden_size).sum()
    }

    pub fn device(&self) -> Device {
        self.first().model.vs.device()
    }

    /// The fewest layers any encoder has: the largest clip skip that applies to all.
    pub fn max_clip_skip(&self) -> usize {
        self.encoders.iter().map(|e| e.config.num_hidden_layers as usize).min().unwrap_or(0)
    }

    /// The adaptable layers of each encoder, for text-encoder LoRA.
    pub fn layers(&self) -> Vec<&LayerIndex> {
        self.encoders.iter().map(|e| &e.model.layers).collect()
    }

    /// `prompts` as one batch of conditioning, in the encoders' kind on
    /// their device: each encoder's hidden state `clip_skip` layers from
    /// the end (through its final layer norm, as diffusers' `clip_skip`),
    /// joined along the width.
    pub fn encode(&self, prompts: &[&str], clip_skip: usize) -> Result<Encoded> {
        if prompts.is_empty() {
            bail!("nothing to encode: no prompt was given");
        }
        let max = self.max_clip_skip();
        if clip_skip > max {
            bail!("clip skip {clip_skip} is more than the text encoder's {max} layers; use at most {max}");
        }
        let mut truncated = Vec::new();
        let mut states = Vec::with_capacity(self.encoders.len());
        for encoder in &self.encoders {
            let tokenizer = encoder.tokenizer()?;
            let mut ids = Vec::new();
            for (i, prompt) in prompts.iter().enumerate() {
                let encoded = tokenizer.encode(prompt);
                if encoded.truncated && !truncated.contains(&i) {
                    truncated.push(i);
                }
                ids.extend(encoded.ids);
            }
            let ids = Tensor::from_slice(&ids).view([prompts.len() as i64, -1]).to_device(self.device());
            states.push(encoder.model.model.f_encode(&ids, clip_skip)?);
        }
        let text = if states.len() == 1 { states.pop().expect("one state") } else { Tensor::f_cat(&states, -1)? };
        Ok(Encoded { conditioning: Conditioning::text_only(text), truncated })
    }
}
