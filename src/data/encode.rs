//! The model side of prepare: the VAE turns preprocessed pixels into latent
//! distributions, the text encoder turns captions into embeddings. Only
//! these two components (and the tokenizer) are loaded, never the UNet.
//! A latent that comes out non-finite in half precision is encoded again
//! with an fp32 copy of the VAE, loaded on first need.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::models::clip::ClipTextModel;
use crate::models::config::{ClipTextConfig, VaeConfig};
use crate::models::load::{build_and_load, component_weights, Built};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::vae::AutoencoderKL;

/// The files a model's VAE and text encoder come from.
pub struct ModelFiles {
    pub dir: PathBuf,
    pub vae_config: VaeConfig,
    /// `vae/config.json` and the weights.
    pub vae_files: Vec<PathBuf>,
    pub vae_weights: Vec<PathBuf>,
    pub text_config: ClipTextConfig,
    /// Tokenizer files, `text_encoder/config.json` and the weights.
    pub text_files: Vec<PathBuf>,
    pub text_weights: Vec<PathBuf>,
}

impl ModelFiles {
    /// Checks `dir` is a diffusers Stable Diffusion folder and lists its files.
    pub fn find(dir: &Path) -> Result<Self> {
        crate::models::stable_diffusion::check_is_diffusers_folder(dir)?;
        let vae_config_path = dir.join("vae/config.json");
        let vae_config = VaeConfig::from_file(&vae_config_path)?;
        let vae_weights = component_weights(&dir.join("vae"), "diffusion_pytorch_model", None)?;
        let text_config_path = dir.join("text_encoder/config.json");
        let text_config = ClipTextConfig::from_file(&text_config_path)?;
        let text_weights = component_weights(&dir.join("text_encoder"), "model", None)?;
        let mut tokenizer_files: Vec<PathBuf> = std::fs::read_dir(dir.join("tokenizer"))
            .with_context(|| format!("cannot read {}", dir.join("tokenizer").display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        tokenizer_files.sort();
        let vae_files = std::iter::once(vae_config_path).chain(vae_weights.iter().cloned()).collect();
        let text_files = tokenizer_files
            .into_iter()
            .chain(std::iter::once(text_config_path))
            .chain(text_weights.iter().cloned())
            .collect();
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            vae_config,
            vae_files,
            vae_weights,
            text_config,
            text_files,
            text_weights,
        })
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        ClipTokenizer::from_folder(&self.dir.join("tokenizer"))
    }
}

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
    text: Option<Built<ClipTextModel>>,
    files: ModelFilesRef,
}

/// What the lazily loaded parts need.
struct ModelFilesRef {
    vae_weights: Vec<PathBuf>,
    vae_config: VaeConfig,
    text_weights: Vec<PathBuf>,
    text_config: ClipTextConfig,
}

impl Encoders {
    /// Encoders on `device` in `kind`; each model is loaded on first use,
    /// so a run with nothing new to encode loads none.
    pub fn new(files: &ModelFiles, device: Device, kind: Kind) -> Result<Self> {
        Ok(Encoders {
            device,
            kind,
            vae: None,
            vae_fp32: None,
            text: None,
            files: ModelFilesRef {
                vae_weights: files.vae_weights.clone(),
                vae_config: files.vae_config.clone(),
                text_weights: files.text_weights.clone(),
                text_config: files.text_config.clone(),
            },
        })
    }

    /// Encodes same-sized RGB images (one batch) to latent distributions.
    pub fn encode_images(&mut self, images: &[&RgbImage]) -> Result<Vec<Latent>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        if self.vae.is_none() {
            let vae = AutoencoderKL::load(&self.files.vae_weights, self.device, self.kind, &self.files.vae_config)?;
            self.vae = Some(vae);
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
            if self.kind != Kind::Float && !(is_finite(&m) && is_finite(&s)) {
                (m, s) = self.encode_fp32(&pixels.narrow(0, i, 1))?;
                fp32_fallback = true;
            }
            let finite = is_finite(&m) && is_finite(&s);
            out.push(Latent { mean: m.to_device(Device::Cpu), std: s.to_device(Device::Cpu), fp32_fallback, finite });
        }
        Ok(out)
    }

    fn encode_fp32(&mut self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.vae_fp32.is_none() {
            let vae = AutoencoderKL::load(&self.files.vae_weights, self.device, Kind::Float, &self.files.vae_config)?;
            self.vae_fp32 = Some(vae);
        }
        let vae = &self.vae_fp32.as_ref().expect("loaded above").model;
        tch::no_grad(|| {
            let dist = vae.f_encode(&pixels.to_kind(Kind::Float))?;
            Ok((dist.mean.get(0), dist.std().get(0)))
        })
    }

    /// Caption embeddings, `[77, D]` fp32 on the CPU each (last hidden state
    /// after the final layer norm, `clip_skip` layers from the end).
    pub fn encode_texts(
        &mut self,
        tokenizer: &ClipTokenizer,
        captions: &[String],
        clip_skip: usize,
    ) -> Result<Vec<Tensor>> {
        if captions.is_empty() {
            return Ok(Vec::new());
        }
        if self.text.is_none() {
            let cfg = self.files.text_config.clone();
            let built =
                build_and_load(&self.files.text_weights, self.device, self.kind, |vb| ClipTextModel::new(vb, &cfg))?;
            self.text = Some(built);
        }
        let model = &self.text.as_ref().expect("loaded above").model;
        let ids: Vec<i64> = captions.iter().flat_map(|c| tokenizer.encode(c).ids).collect();
        let ids = Tensor::from_slice(&ids).view([captions.len() as i64, -1]).to_device(self.device);
        let hidden = tch::no_grad(|| model.f_encode(&ids, clip_skip))?.to_kind(Kind::Float).to_device(Device::Cpu);
        Ok((0..captions.len() as i64).map(|i| hidden.get(i)).collect())
    }
}

fn is_finite(t: &Tensor) -> bool {
    t.isfinite().all().int64_value(&[]) == 1
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
