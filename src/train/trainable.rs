//! What a run trains: a LoRA attached to the frozen UNet, or (`--full`)
//! every weight of the UNet itself. The loop, optimizer and checkpoints see
//! only this trait, so both modes share them.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::lora::network::LoraNetwork;
use crate::models::config::UNetConfig;
use crate::loaders::tensor_file::write_tensors;

pub trait Trainable {
    /// Every trained tensor under its name in the resumable state
    /// (`lora.<kohya name>` or `unet.<diffusers name>`), sorted by name.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// The optimizer's parameters, in a fixed order.
    fn parameters(&self) -> Vec<Tensor>;
}

impl Trainable for LoraNetwork {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors: Vec<(String, Tensor)> =
            self.vs.variables().into_iter().map(|(name, t)| (format!("lora.{name}"), t)).collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors
    }

    fn parameters(&self) -> Vec<Tensor> {
        LoraNetwork::parameters(self)
    }
}

/// Every weight of a UNet, trained in place in fp32.
pub struct FullUnet {
    /// Diffusers names and the model's own variables, sorted by name.
    named: Vec<(String, Tensor)>,
}

impl FullUnet {
    /// Makes every variable of the UNet's store trainable. The weights must
    /// be fp32: they are the master weights.
    pub fn new(vs: &VarStore) -> Result<Self> {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some((name, t)) = named.iter().find(|(_, t)| t.kind() != Kind::Float) {
            bail!("full training needs the UNet in fp32, but {name} is {:?}; use --precision fp32", t.kind());
        }
        let named = named.into_iter().map(|(n, t)| (n, t.set_requires_grad(true))).collect();
        Ok(FullUnet { named })
    }

    /// Writes a diffusers `unet/` folder: `config.json` and
    /// `diffusion_pytorch_model.safetensors` (fp32), with `metadata` in its header.
    pub fn write_diffusers(&self, dir: &Path, config: &UNetConfig, metadata: HashMap<String, String>) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self.named.iter().map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu))).collect();
        for (name, t) in &tensors {
            if !crate::models::finite::all_finite(t) {
                bail!("UNet weight {name} holds NaN or infinite values; it was not saved");
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut json = serde_json::to_value(config).context("cannot write the UNet config")?;
        if let Some(map) = json.as_object_mut() {
            map.insert("_class_name".into(), "UNet2DConditionModel".into());
        }
        crate::fsutil::write_atomic(&dir.join("config.json"), (serde_json::to_string_pretty(&json)? + "\n").as_bytes())?;
        let mut meta = metadata;
        meta.insert("format".into(), "pt".into());
        write_tensors(&dir.join("diffusion_pytorch_model.safetensors"), &tensors, Some(meta))
    }
}

impl Trainable for FullUnet {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.named.iter().map(|(n, t)| (format!("unet.{n}"), t.shallow_clone())).collect()
    }

    fn parameters(&self) -> Vec<Tensor> {
        self.named.iter().map(|(_, t)| t.shallow_clone()).collect()
    }
}
