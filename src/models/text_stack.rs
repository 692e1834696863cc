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

/// How a model reads its encoders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextStyle {
    /// SD1/SD2: the state `clip_skip` layers from the end, through the
    /// final layer norm; no pooled embedding.
    FinalNormed,
    /// SDXL: each encoder's `hidden_states[-(clip_skip + 2)]` without the
    /// final layer norm, joined; pooled = the last encoder's projected pooled output.
    Sdxl,
}

/// Every text encoder of a model, in the order their states are joined.
pub struct TextStack {
    pub encoders: Vec<TextEncoder>,
    pub style: TextStyle,
    /// With no negative prompt, guidance uses zero states and pooled
    /// embedding instead of the empty prompt's (SDXL's
    /// `force_zeros_for_empty_prompt`).
    pub zeros_for_no_negative: bool,
}

/// What one prompt became, per batch element.
pub struct Encoded {
    pub conditioning: Conditioning,
    /// Indices of the prompts cut off at the tokenizer's 77 tokens.
    pub truncated: Vec<usize>,
}

impl TextStack {
    /// SD1/SD2's single encoder (or several read the same way).
    pub fn new(encoders: Vec<TextEncoder>) -> Result<Self> {
        if encoders.is_empty() {
            bail!("a model needs at least one text encoder");
        }
        Ok(TextStack { encoders, style: TextStyle::FinalNormed, zeros_for_no_negative: false })
    }

    /// SDXL's two encoders; the last must have a projection for the pooled embedding.
    pub fn sdxl(encoders: Vec<TextEncoder>, zeros_for_no_negative: bool) -> Result<Self> {
        match encoders.last() {
            None => bail!("a model needs at least one text encoder"),
            Some(last) if !last.config.with_projection() => {
                bail!("SDXL's last text encoder must be a CLIPTextModelWithProjection (its pooled embedding feeds the UNet)")
            }
            Some(_) => Ok(TextStack { encoders, style: TextStyle::Sdxl, zeros_for_no_negative }),
        }
    }

    /// Width of the pooled embedding, for SDXL-style stacks.
    pub fn pooled_size(&self) -> Option<i64> {
        match self.style {
            TextStyle::FinalNormed => None,
            TextStyle::Sdxl => self.encoders.last().and_then(|e| e.config.projection_dim),
        }
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

    /// The largest clip skip that applies to every encoder (SDXL already
    /// starts one layer before the last).
    pub fn max_clip_skip(&self) -> usize {
        let fewest = self.encoders.iter().map(|e| e.config.num_hidden_layers as usize).min().unwrap_or(0);
        match self.style {
            TextStyle::FinalNormed => fewest,
            TextStyle::Sdxl => fewest.saturating_sub(1),
        }
    }

    /// The adaptable layers of each encoder, for text-encoder LoRA.
    pub fn layers(&self) -> Vec<&LayerIndex> {
        self.encoders.iter().map(|e| &e.model.layers).collect()
    }

    /// `prompts` as one batch of conditioning, in the encoders' kind on
    /// their device: each encoder's hidden state as [`TextStyle`] says
    /// (diffusers' `clip_skip`), joined along the width, and for SDXL the
    /// pooled embedding.
    pub fn encode(&self, prompts: &[&str], clip_skip: usize) -> Result<Encoded> {
        if prompts.is_empty() {
            bail!("nothing to encode: no prompt was given");
        }
        let max = self.max_clip_skip();
        if clip_skip > max {
            bail!("clip skip {clip_skip} is more than the text encoder's {max} layers; use at most {max}");
        }
        let mut truncated = Vec::new();
        let mut ids_per_encoder = Vec::with_capacity(self.encoders.len());
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
            ids_per_encoder.push(Tensor::from_slice(&ids).view([prompts.len() as i64, -1]));
        }
        let conditioning = self.encode_ids(&ids_per_encoder, clip_skip)?;
        Ok(Encoded { conditioning, truncated })
    }

    /// Token ids (one `[B, 77]` tensor per encoder, in order) as one batch of
    /// conditioning, as [`Self::encode`] gives it; what training runs when
    /// the text encoders learn.
    pub fn encode_ids(&self, ids_per_encoder: &[Tensor], clip_skip: usize) -> Result<Conditioning> {
        if ids_per_encoder.len() != self.encoders.len() {
            bail!("internal: token ids for {} text encoders, the model has {}", ids_per_encoder.len(), self.encoders.len());
        }
        let mut states = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for (encoder, ids) in self.encoders.iter().zip(ids_per_encoder) {
            let ids = ids.to_device(self.device());
            match self.style {
                TextStyle::FinalNormed => states.push(encoder.model.model.f_encode(&ids, clip_skip)?),
                TextStyle::Sdxl => {
                    let out = encoder.model.model.f_encode_sdxl(&ids, clip_skip)?;
                    states.push(out.hidden);
                    // diffusers keeps the pooled output of the last encoder that gives one.
                    pooled = out.pooled.or(pooled);
                }
            }
        }
        let text = if states.len() == 1 { states.pop().expect("one state") } else { Tensor::f_cat(&states, -1)? };
        Ok(Conditioning { text, pooled, time_ids: None })
    }
}
