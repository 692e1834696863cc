//! What the UNet is conditioned on besides the noisy latents and the
//! timestep: the text encoders' per-token states and, for models that take
//! them (SDXL's `text_time` added embedding), a pooled text embedding and
//! the size/crop time ids. SD1 and SD2 use the text states alone.
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// A batch of conditioning; every tensor's first dimension is the batch.
#[derive(Debug)]
pub struct Conditioning {
    /// Per-token text states, `[B, tokens, D]`.
    pub text: Tensor,
    /// Pooled text embedding, `[B, P]`, for models with an added text embedding.
    pub pooled: Option<Tensor>,
    /// Original size, crop offset and target size, `[B, 6]`, for SDXL-style models.
    pub time_ids: Option<Tensor>,
}

impl Conditioning {
    /// Text states alone (SD1, SD2).
    pub fn text_only(text: Tensor) -> Self {
        Conditioning { text, pooled: None, time_ids: None }
    }

    pub fn batch_size(&self) -> i64 {
        self.text.size()[0]
    }

    pub fn shallow_clone(&self) -> Self {
        Conditioning {
            text: self.text.shallow_clone(),
            pooled: self.pooled.as_ref().map(Tensor::shallow_clone),
            time_ids: self.time_ids.as_ref().map(Tensor::shallow_clone),
        }
    }

    pub fn to_device(&self, device: Device) -> Self {
        Conditioning {
            text: self.text.to_device(device),
            pooled: self.pooled.as_ref().map(|t| t.to_device(device)),
            time_ids: self.time_ids.as_ref().map(|t| t.to_device(device)),
        }
    }

    pub fn to_kind(&self, kind: Kind) -> Self {
        Conditioning {
            text: self.text.to_kind(kind),
            pooled: self.pooled.as_ref().map(|t| t.to_kind(kind)),
            time_ids: self.time_ids.as_ref().map(|t| t.to_kind(kind)),
        }
    }

    /// Batch element `index` as a batch of one.
    pub fn select(&self, index: i64) -> Self {
        Conditioning {
            text: self.text.narrow(0, index, 1),
            pooled: self.pooled.as_ref().map(|t| t.narrow(0, index, 1)),
            time_ids: self.time_ids.as_ref().map(|t| t.narrow(0, index, 1)),
        }
    }

    /// The batches one after the other (e.g. unconditional then conditional
    /// for classifier-free guidance). All must carry the same parts.
    pub fn cat(parts: &[Conditioning]) -> Result<Self> {
        ensure!(!parts.is_empty(), "no conditioning to concatenate");
        let has_pooled = parts[0].pooled.is_some();
        let has_time_ids = parts[0].time_ids.is_some();
        ensure!(
            parts.iter().all(|p| p.pooled.is_some() == has_pooled && p.time_ids.is_some() == has_time_ids),
            "conditionings of one batch must carry the same parts"
        );
        let texts: Vec<&Tensor> = parts.iter().map(|p| &p.text).collect();
        let cat_opt = |pick: &dyn Fn(&Conditioning) -> Option<&Tensor>| -> Option<Tensor> {
            let all: Option<Vec<&Tensor>> = parts.iter().map(pick).collect();
            all.map(|t| Tensor::cat(&t, 0))
        };
        Ok(Conditioning {
            text: Tensor::f_cat(&texts, 0)?,
            pooled: cat_opt(&|p| p.pooled.as_ref()),
            time_ids: cat_opt(&|p| p.time_ids.as_ref()),
        })
    }

    /// Whether every value is finite (a text encoder in half precision can overflow).
    pub fn is_finite(&self) -> bool {
        crate::models::finite::all_finite(&self.text)
            && self.pooled.as_ref().is_none_or(crate::models::finite::all_finite)
            && self.time_ids.as_ref().is_none_or(crate::models::finite::all_finite)
    }
}
