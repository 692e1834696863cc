//! The model side of prepare: the VAE turns preprocessed pixels into latent
//! distributions, the text encoder turns captions into embeddings. Only
//! these two components (and the tokenizer) are loaded, never the UNet,
//! from a diffusers folder or a single-file checkpoint alike.
//! A latent that comes out non-finite in half precision is encoded again
//! with an fp32 copy of the VAE, loaded on first need.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::models::clip::ClipTextModel;
use crate::models::config::{ClipTextConfig, VaeConfig};
use crate::models::load::{build_and_load, component_weights, Built};
use crate::models::single_file::{self, Beside, Plan};
use crate::models::source::{check_checkpoint, parse, ModelSource};
use crate::models::tensor_file::TensorFile;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::vae::AutoencoderKL;

/// Where the VAE and text-encoder weights are read from.
#[derive(Clone)]
enum Weights {
    /// A diffusers folder's component files.
    Folder { vae: Vec<PathBuf>, text: Vec<PathBuf> },
    /// A single-file LDM checkpoint, renamed as its plan says.
    SingleFile(Box<Plan>),
}

/// The files a model's VAE and text encoder come from.
pub struct ModelFiles {
    pub vae_config: VaeConfig,
    /// Every file the VAE's latents depend on (configs and weights): its identity.
    pub vae_files: Vec<PathBuf>,
    pub text_config: ClipTextConfig,
    /// Every file the caption embeddings depend on (tokenizer, configs, weights).
    pub text_files: Vec<PathBuf>,
    tokenizer_dir: PathBuf,
    weights: Weights,
}

impl ModelFiles {
    /// The files of the model a `--model` value names: a diffusers folder,
    /// a Hub id in the local Hugging Face cache, or a single-file checkpoint.
    pub fn of(model: &Path) -> Result<Self> {
        match parse(&model.to_string_lossy())? {
            ModelSource::Folder(dir) => Self::folder(&dir),
            ModelSource::Hub(id) => Self::folder(&crate::models::hub::resolve_model(&id, None)?),
            ModelSource::SingleFile(path) => Self::single_file(&path),
        }
    }

    /// Checks `dir` is a diffusers Stable Diffusion folder and lists its files.
    fn folder(dir: &Path) -> Result<Self> {
        crate::models::stable_diffusion::check_is_diffusers_folder(dir)?;
        let vae_config_path = dir.join("vae/config.json");
        let vae_config = VaeConfig::from_file(&vae_config_path)?;
        let vae_weights = component_weights(&dir.join("vae"), "diffusion_pytorch_model", None)?;
        let text_config_path = dir.join("text_encoder/config.json");
        let text_config = ClipTextConfig::from_file(&text_config_path)?;
        let text_weights = component_weights(&dir.join("text_encoder"), "model", None)?;
        let tokenizer_dir = dir.join("tokenizer");
        let vae_files = std::iter::once(vae_config_path).chain(vae_weights.iter().cloned()).collect();
        let text_files = files_in(&tokenizer_dir)?
            .into_iter()
            .chain(std::iter::once(text_config_path))
            .chain(text_weights.iter().cloned())
            .collect();
        Ok(ModelFiles {
            vae_config,
            vae_files,
            text_config,
            text_files,
            tokenizer_dir,
            weights: Weights::Folder { vae: vae_weights, text: text_weights },
        })
    }

    /// A single-file checkpoint: configs from the folder or `NAME.yaml`
    /// beside it, else read from the tensors, as `sdtune sample` and
    /// `sdtune train` load it. The whole file is the weights' identity.
    fn single_file(path: &Path) -> Result<Self> {
        check_checkpoint(path)?;
        let plan = Plan::new(path, &TensorFile::open(path)?, None)?;
        let tokenizer_dir = plan.find_tokenizer()?;
        let beside = Beside::find(path)?;
        let yaml = beside.yaml.as_ref().map(|y| y.path.clone());
        let vae_files =
            std::iter::once(path.to_path_buf()).chain(beside.file("vae/config.json")).chain(yaml.clone()).collect();
        let text_files = files_in(&tokenizer_dir)?
            .into_iter()
            .chain(beside.file("text_encoder/config.json"))
            .chain(std::iter::once(path.to_path_buf()))
            .collect();
        Ok(ModelFiles {
            vae_config: plan.vae.clone(),
            vae_files,
            text_config: plan.text.clone(),
            text_files,
            tokenizer_dir,
            weights: Weights::SingleFile(Box::new(plan)),
        })
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        ClipTokenizer::from_folder(&self.tokenizer_dir)
    }
}

/// The files directly in `dir`, sorted.
fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
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
    vae_config: VaeConfig,
    text_config: ClipTextConfig,
    weights: Weights,
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
            vae_config: files.vae_config.clone(),
            text_config: files.text_config.clone(),
            weights: files.weights.clone(),
        })
    }

    fn load_vae(&self, kind: Kind) -> Result<Built<AutoencoderKL>> {
        match &self.weights {
            Weights::Folder { vae, .. } => AutoencoderKL::load(vae, self.device, kind, &self.vae_config),
            Weights::SingleFile(plan) => single_file::load_vae(&TensorFile::open(&plan.path)?, plan, self.device, kind),
        }
    }

    fn load_text_encoder(&self) -> Result<Built<ClipTextModel>> {
        match &self.weights {
            Weights::Folder { text, .. } => {
                build_and_load(text, self.device, self.kind, |vb| ClipTextModel::new(vb, &self.text_config))
            }
            Weights::SingleFile(plan) => {
                single_file::load_text_encoder(&TensorFile::open(&plan.path)?, plan, self.device, self.kind)
            }
        }
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
            self.vae_fp32 = Some(self.load_vae(Kind::Float)?);
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
            self.text = Some(self.load_text_encoder()?);
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
