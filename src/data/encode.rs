//! The model side of prepare: the VAE turns preprocessed pixels into latent
//! distributions, the text encoder turns captions into embeddings. Only
//! these two components (and the tokenizer) are loaded, never the UNet,
//! from a diffusers folder or a single-file checkpoint alike.
//! A latent that comes out non-finite in half precision is encoded again
//! with an fp32 copy of the VAE, loaded on first need.
use anyhow::Result;
use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::loaders::model_files::ModelFiles;
use crate::models::built::Built;
use crate::models::conditioning::Conditioning;
use crate::models::finite::all_finite;
use crate::models::text_stack::TextStack;
use crate::models::vae::AutoencoderKL;

/// One image's latent distribution, fp32 on the CPU, `[C, h, w]` each.
pub struct Latent {
    pub mean: Tensor,
    pub std: Tensor,
    pub fp32_fallback: bool,
    /// False when even fp32 gave NaN or infinity (the image is not used).
    pub finite: bool,
}

pub struct Encoders {
    device: Device,
    kind: Kind,
    vae: Option<Built<AutoencoderKL>>,
    vae_fp32: Option<Built<AutoencoderKL>>,
    text: Option<TextStack>,
    files: ModelFiles,
}

impl Encoders {
    /// Encoders on `device` in `kind`; each model is loaded on first use,
    /// so a run with nothing new to encode loads none.
    pub fn new(files: &ModelFiles, device: Device, kind: Kind) -> Result<Self> {
        Ok(Encoders { device, kind, vae: None, vae_fp32: None, text: None, files: files.clone() })
    }

    fn load_vae(&self, kind: Kind) -> Result<Built<AutoencoderKL>> {
        self.files.load_vae(self.device, kind)
    }

    /// Encodes same-sized RGB images (one batch) to latent distributions.
    pub fn encode_images(&mut self, images: &[&RgbImage]) -> Result<Vec<Latent>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        if self.vae.is_none() {
            self.vae = Some(self.load_vae(self.kind)?);
        }
        let vae = &self.vae.as_ref().expect("loaded above").model;
        let pixels = to_tensor(images)?.to_device(self.device);
        let (mean, std) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
            let dist = vae.f_encode(&pixels)?;
            Ok((dist.mean.to_kind(Kind::Float), dist.std().to_kind(Kind::Float)))
        })?;
        let mut out = Vec::with_capacity(images.len());
        for i in 0..images.len() as i64 {
            let (mut m, mut s) = (mean.get(i), std.get(i));
            let mut fp32_fallback = false;
            if self.kind != Kind::Float && !(all_finite(&m) && all_finite(&s)) {
                (m, s) = self.encode_fp32(&pixels.narrow(0, i, 1))?;
                fp32_fallback = true;
            }
            let finite = all_finite(&m) && all_finite(&s);
            out.push(Latent { mean: m.to_device(Device::Cpu), std: s.to_device(Device::Cpu), fp32_fallback, finite });
        }
        Ok(out)
    }

    fn encode_fp32(&mut self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.vae_fp32.is_none() {
            self.vae_fp32 = Some(self.load_vae(Kind::Float)?);
        }
        let vae = &self.vae_fp32.as_ref().expect("loaded above").model;
        tch::no_grad(|| {
            let dist = vae.f_encode(&pixels.to_kind(Kind::Float))?;
            Ok((dist.mean.get(0), dist.std().get(0)))
        })
    }

    /// Caption conditioning, one batch-of-one per caption, fp32 on the CPU
    /// (what the text stack gives, `clip_skip` layers from the end).
    pub fn encode_texts(&mut self, captions: &[String], clip_skip: usize) -> Result<Vec<Conditioning>> {
        if captions.is_empty() {
            return Ok(Vec::new());
        }
        if self.text.is_none() {
            self.text = Some(self.files.load_text_stack(self.device, self.kind)?);
        }
        let stack = self.text.as_ref().expect("loaded above");
        let prompts: Vec<&str> = captions.iter().map(String::as_str).collect();
        let encoded = tch::no_grad(|| stack.encode(&prompts, clip_skip))?;
        let all = encoded.conditioning.to_device(Device::Cpu);
        Ok((0..captions.len() as i64).map(|i| all.select(i).to_kind(Kind::Float)).collect())
    }
}

/// `[B, 3, H, W]` fp32 in [-1, 1] from 8-bit RGB (x / 127.5 - 1, as
/// diffusers' `ToTensor()` + `Normalize([0.5], [0.5])`).
pub fn to_tensor(images: &[&RgbImage]) -> Result<Tensor> {
    let (w, h) = images[0].dimensions();
    let mut bytes = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for img in images {
        anyhow::ensure!(img.dimensions() == (w, h), "internal: one VAE batch mixes image sizes");
        bytes.extend_from_slice(img.as_raw());
    }
    let t = Tensor::from_slice(&bytes).view([images.len() as i64, h as i64, w as i64, 3]).permute([0, 3, 1, 2]);
    Ok(t.to_kind(Kind::Float) / 127.5 - 1.0)
}
