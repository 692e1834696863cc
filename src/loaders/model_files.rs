//! What a model is made of before anything is loaded: each part's config
//! and the files its weights come from, for a diffusers folder (Hub ids and
//! the built-in model resolve to folders) or a single-file checkpoint. Any
//! part loads on its own (prepare needs only the VAE and the text stack);
//! [`ModelFiles::load`] loads them all and assembles the model, and
//! [`StableDiffusion::load`] is the one entry every command loads through.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::{Device, Kind};

use super::bundled_tokenizer;
use super::folder::{check_is_diffusers_folder, load_text_encoder, load_vae};
use super::single_file::{self, Beside, Family, Plan};
use super::source::{check_checkpoint, parse, LoadOptions, ModelSource};
use super::tensor_file::TensorFile;
use super::vae_file::VaeSwap;
use super::weights::{build_and_load, component_weights};
use super::hub;
use crate::models::built::Built;
use crate::models::clip::ClipTextModel;
use crate::models::config::{ClipTextConfig, Prediction, SchedulerConfig, UNetConfig, VaeConfig};
use crate::models::stable_diffusion::{Parts, Placement, StableDiffusion};
use crate::models::text_stack::{TextEncoder, TextStack};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;

/// Where the weights are read from.
#[derive(Clone)]
enum Weights {
    /// A diffusers folder's component folders (weights found on load).
    Folder { dir: PathBuf, variant: Option<String>, vae: Vec<PathBuf>, text: Vec<PathBuf>, text_2: Vec<PathBuf> },
    /// A single-file LDM checkpoint, renamed as its plan says.
    SingleFile(Box<Plan>),
}

/// Where the tokenizer is read from.
#[derive(Clone)]
enum TokenizerFiles {
    /// A `tokenizer/` folder (the model's, beside a single file, or the cache's).
    Folder(PathBuf),
    /// The CLIP files built into sdtune, padded as this family pads.
    Bundled(Family),
}

/// The parts of one model and the files behind each.
#[derive(Clone)]
pub struct ModelFiles {
    /// The folder or file the model comes from.
    pub source: PathBuf,
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub text_config: ClipTextConfig,
    /// SDXL's second text encoder (`text_encoder_2`, with projection).
    pub text_config_2: Option<ClipTextConfig>,
    /// SDXL: zero unconditional conditioning when there is no negative prompt.
    pub zeros_for_no_negative: bool,
    pub scheduler: SchedulerConfig,
    /// Every file the VAE's latents depend on (configs and weights): its identity.
    pub vae_files: Vec<PathBuf>,
    /// Every file the caption embeddings depend on (tokenizer, configs, weights).
    pub text_files: Vec<PathBuf>,
    /// What the user should know before loading (a guessed prediction type).
    pub warnings: Vec<String>,
    tokenizer: TokenizerFiles,
    /// SDXL's `tokenizer_2`.
    tokenizer_2: Option<TokenizerFiles>,
    weights: Weights,
    /// A VAE given with `--vae`, used instead of the model's.
    vae_swap: Option<VaeSwap>,
}

impl ModelFiles {
    /// The files of the model a `--model` value names: a diffusers folder,
    /// a Hub id in the local Hugging Face cache, or a single-file checkpoint.
    pub fn of(model: &str, opts: &LoadOptions) -> Result<Self> {
        let variant = opts.variant.as_deref();
        let mut files = match parse(model)? {
            ModelSource::Folder(dir) => Self::folder(&dir, variant)?,
            ModelSource::Hub(id) => Self::folder(&super::hub::resolve_model(&id, variant)?, variant)?,
            ModelSource::SingleFile(path) => Self::single_file(&path, opts.prediction_type)?,
        };
        if let Some(p) = opts.prediction_type {
            files.scheduler.prediction_type = p.as_config_str().to_string();
        }
        if let Some(vae) = &opts.vae {
            files.swap_vae(vae)?;
        }
        Ok(files)
    }

    /// Uses the VAE at `path` (a diffusers vae/ folder or a VAE file) instead
    /// of the model's own; the latents' identity becomes its files.
    pub fn swap_vae(&mut self, path: &Path) -> Result<()> {
        let swap = VaeSwap::open(path, &self.vae_config)?;
        self.vae_config = swap.config.clone();
        self.vae_files = swap.files.clone();
        self.vae_swap = Some(swap);
        Ok(())
    }

    /// A diffusers pipeline folder (`model_index.json` + components).
    pub fn folder(dir: &Path, variant: Option<&str>) -> Result<Self> {
        let index = check_is_diffusers_folder(dir)?;
        let text_config_path = dir.join("text_encoder/config.json");
        let vae_config_path = dir.join("vae/config.json");
        let text_config = ClipTextConfig::from_file(&text_config_path)?;
        let unet_config = UNetConfig::from_file(&dir.join("unet/config.json"))?;
        let vae_config = VaeConfig::from_file(&vae_config_path)?;
        let scheduler = SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        let tokenizer_dir = dir.join("tokenizer");
        let text_weights = component_weights(&dir.join("text_encoder"), "model", variant)?;
        let vae_weights = component_weights(&dir.join("vae"), "diffusion_pytorch_model", variant)?;
        let vae_files = std::iter::once(vae_config_path).chain(vae_weights.iter().cloned()).collect();
        let mut text_files: Vec<PathBuf> = files_in(&tokenizer_dir)?
            .into_iter()
            .chain(std::iter::once(text_config_path))
            .chain(text_weights.iter().cloned())
            .collect();
        let (mut text_config_2, mut tokenizer_2, mut text_weights_2) = (None, None, Vec::new());
        if index.is_sdxl() {
            let config_path = dir.join("text_encoder_2/config.json");
            let config = ClipTextConfig::from_file(&config_path)?;
            if !config.with_projection() {
                anyhow::bail!(
                    "{} describes a {:?} model; SDXL's second text encoder is a CLIPTextModelWithProjection",
                    config_path.display(),
                    config.architectures
                );
            }
            text_weights_2 = component_weights(&dir.join("text_encoder_2"), "model", variant)?;
            text_files.extend(files_in(&dir.join("tokenizer_2"))?);
            text_files.push(config_path);
            text_files.extend(text_weights_2.iter().cloned());
            text_config_2 = Some(config);
            tokenizer_2 = Some(TokenizerFiles::Folder(dir.join("tokenizer_2")));
        }
        Ok(ModelFiles {
            source: dir.to_path_buf(),
            unet_config,
            vae_config,
            text_config,
            text_config_2,
            zeros_for_no_negative: index.is_sdxl() && index.force_zeros_for_empty_prompt.unwrap_or(true),
            scheduler,
            vae_files,
            text_files,
            warnings: Vec::new(),
            tokenizer: TokenizerFiles::Folder(tokenizer_dir),
            tokenizer_2,
            weights: Weights::Folder {
                dir: dir.to_path_buf(),
                variant: variant.map(str::to_string),
                vae: vae_weights,
                text: text_weights,
                text_2: text_weights_2,
            },
            vae_swap: None,
        })
    }

    /// A single-file checkpoint: configs from the folder or `NAME.yaml`
    /// beside it, else read from the tensors. The whole file is the
    /// weights' identity.
    pub fn single_file(path: &Path, prediction: Option<Prediction>) -> Result<Self> {
        check_checkpoint(path)?;
        let plan = Plan::new(path, &TensorFile::open(path)?, prediction)?;
        let sdxl = plan.layout.family == Family::Sdxl;
        let tokenizer = single_file_tokenizer(&plan, false);
        let tokenizer_2 = sdxl.then(|| single_file_tokenizer(&plan, true));
        let mut tokenizer_files = Vec::new();
        for t in std::iter::once(&tokenizer).chain(tokenizer_2.as_ref()) {
            // A bundled tokenizer's identity is the binary's; the checkpoint says which padding.
            if let TokenizerFiles::Folder(dir) = t {
                tokenizer_files.extend(files_in(dir)?);
            }
        }
        let beside = Beside::find(path)?;
        let yaml = beside.yaml.as_ref().map(|y| y.path.clone());
        let vae_files =
            std::iter::once(path.to_path_buf()).chain(beside.file("vae/config.json")).chain(yaml).collect();
        let text_files = tokenizer_files
            .into_iter()
            .chain(beside.file("text_encoder/config.json"))
            .chain(beside.file("text_encoder_2/config.json"))
            .chain(std::iter::once(path.to_path_buf()))
            .collect();
        Ok(ModelFiles {
            source: path.to_path_buf(),
            unet_config: plan.unet.clone(),
            vae_config: plan.vae.clone(),
            text_config: plan.text.clone(),
            text_config_2: plan.text_2.clone(),
            // SDXL base's force_zeros_for_empty_prompt (a single file has no model_index.json).
            zeros_for_no_negative: sdxl,
            scheduler: plan.scheduler.clone(),
            vae_files,
            text_files,
            warnings: plan.warnings.clone(),
            tokenizer,
            tokenizer_2,
            weights: Weights::SingleFile(Box::new(plan)),
            vae_swap: None,
        })
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        self.tokenizer.load()
    }

    pub fn load_unet(&self, device: Device, kind: Kind) -> Result<Built<UNet2DConditionModel>> {
        match &self.weights {
            Weights::Folder { dir, variant, .. } => {
                let files = component_weights(&dir.join("unet"), "diffusion_pytorch_model", variant.as_deref())?;
                build_and_load(&files, device, kind, |vb| UNet2DConditionModel::new(vb, &self.unet_config))
            }
            Weights::SingleFile(plan) => single_file::load_unet(&TensorFile::open(&plan.path)?, plan, device, kind),
        }
    }

    pub fn load_vae(&self, device: Device, kind: Kind) -> Result<Built<AutoencoderKL>> {
        if let Some(swap) = &self.vae_swap {
            return swap.load(device, kind);
        }
        match &self.weights {
            Weights::Folder { vae, .. } => load_vae(vae, device, kind, &self.vae_config),
            Weights::SingleFile(plan) => single_file::load_vae(&TensorFile::open(&plan.path)?, plan, device, kind),
        }
    }

    /// The tokenizers and text encoders as the model's text stack.
    pub fn load_text_stack(&self, device: Device, kind: Kind) -> Result<TextStack> {
        let model: Built<ClipTextModel> = match &self.weights {
            Weights::Folder { text, .. } => load_text_encoder(text, device, kind, &self.text_config)?,
            Weights::SingleFile(plan) => {
                single_file::load_text_encoder(&TensorFile::open(&plan.path)?, plan, device, kind)?
            }
        };
        let first = TextEncoder { tokenizer: Some(self.tokenizer()?), model, config: self.text_config.clone() };
        let (Some(config_2), Some(tokenizer_2)) = (&self.text_config_2, &self.tokenizer_2) else {
            return TextStack::new(vec![first]);
        };
        let model = match &self.weights {
            Weights::Folder { text_2, .. } => load_text_encoder(text_2, device, kind, config_2)?,
            Weights::SingleFile(plan) => {
                single_file::load_text_encoder_2(&TensorFile::open(&plan.path)?, plan, device, kind)?
            }
        };
        let second = TextEncoder { tokenizer: Some(tokenizer_2.load()?), model, config: config_2.clone() };
        TextStack::sdxl(vec![first, second], self.zeros_for_no_negative)
    }

    /// Every part loaded into `placement` and assembled; `warn` receives
    /// what the user should know (a guessed prediction type).
    pub fn load(&self, placement: Placement, warn: &mut dyn FnMut(String)) -> Result<StableDiffusion> {
        for w in &self.warnings {
            warn(w.clone());
        }
        let text = self.load_text_stack(placement.device, placement.kind)?;
        let unet = self.load_unet(placement.device, placement.kind)?;
        // An fp16 VAE overflows (black images) unless its config says it
        // does not (`force_upcast: false`, the fp16-fix VAE), as diffusers.
        let upcast = placement.vae_kind == Kind::Half && self.vae_config.force_upcast != Some(false);
        let vae_kind = if upcast { Kind::Float } else { placement.vae_kind };
        let vae = self.load_vae(placement.device, vae_kind)?;
        StableDiffusion::assemble(Parts {
            source: Some(self.source.clone()),
            text,
            unet,
            unet_config: self.unet_config.clone(),
            vae,
            vae_config: self.vae_config.clone(),
            scheduler: self.scheduler.clone(),
        })
    }
}

impl StableDiffusion {
    /// Loads a diffusers pipeline folder (`model_index.json` + components).
    pub fn from_diffusers_folder(dir: &Path, placement: Placement, variant: Option<&str>) -> Result<Self> {
        ModelFiles::folder(dir, variant)?.load(placement, &mut |_| {})
    }

    /// Loads a single-file LDM checkpoint (`.safetensors`), every weight read
    /// from the memory mapping straight into `placement`'s dtype and device.
    /// `warn` receives what the user should know (a guessed prediction type).
    pub fn from_single_file(
        path: &Path,
        placement: Placement,
        prediction: Option<Prediction>,
        warn: &mut dyn FnMut(String),
    ) -> Result<Self> {
        ModelFiles::single_file(path, prediction)?.load(placement, warn)
    }

    /// Loads the model a `--model` value names (see [`parse`]), printing
    /// warnings (a guessed prediction type) to stderr.
    pub fn load(model: &str, placement: Placement, opts: &LoadOptions) -> Result<Self> {
        Self::load_with(model, placement, opts, &mut |w| eprintln!("warning: {w}"))
    }

    /// [`Self::load`] with warnings passed to `warn`.
    pub fn load_with(
        model: &str,
        placement: Placement,
        opts: &LoadOptions,
        warn: &mut dyn FnMut(String),
    ) -> Result<Self> {
        ModelFiles::of(model, opts)?.load(placement, warn)
    }
}

impl TokenizerFiles {
    fn load(&self) -> Result<ClipTokenizer> {
        match self {
            TokenizerFiles::Folder(dir) => ClipTokenizer::from_folder(dir),
            TokenizerFiles::Bundled(family) => bundled_tokenizer::tokenizer(*family),
        }
    }
}

/// Where a single file's tokenizer (`second`: SDXL's `tokenizer_2`) comes
/// from: beside it, else the Hugging Face cache, else the binary's copy of
/// CLIP's files, which give the same ids (said on stderr).
fn single_file_tokenizer(plan: &Plan, second: bool) -> TokenizerFiles {
    if let Ok(dir) = plan.find_tokenizer(second) {
        return TokenizerFiles::Folder(dir);
    }
    // SDXL's first tokenizer pads as SD1's (EOS), its second as SD2's ("!").
    let pads_as = match (plan.layout.family, second) {
        (Family::Sdxl, false) => Family::Sd1,
        (Family::Sdxl, true) => Family::Sd2,
        (family, _) => family,
    };
    let cache = hub::cache_dir();
    let why = if hub::offline() {
        format!("none is in the Hugging Face cache ({}) with HF_HUB_OFFLINE set", cache.display())
    } else {
        format!("none is in the Hugging Face cache ({}) and downloading one failed", cache.display())
    };
    eprintln!("{}", bundled_tokenizer::notice(&plan.path, pads_as, &why));
    TokenizerFiles::Bundled(pads_as)
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
