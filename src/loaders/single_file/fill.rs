//! Filling the models of a single file: each diffusers weight from the LDM
//! tensor it comes from, straight from the memory mapping into the target
//! dtype and device.
use std::collections::HashSet;

use anyhow::{bail, ensure, Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind};

use super::detect::{ignored_text_tensor, Shapes};
use super::plan::Plan;
use crate::loaders::ldm_names::{
    clip_source, unet_ldm_name, vae_ldm_name, ClipNames, Source, UnetLayout, SGM_OPEN_CLIP_PREFIX, UNET_PREFIX,
    VAE_PREFIX,
};
use crate::loaders::tensor_file::TensorFile;
use crate::loaders::weights::copy_into;
use crate::models::built::{build, Built};
use crate::models::clip::ClipTextModel;
use crate::models::config::VaeConfig;
use crate::models::layers::WeightInit;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;

/// Fills every variable of `vs` from `file` through `map` (diffusers name ->
/// file tensor), then checks that every file tensor under `prefix` was used
/// or is `ignored`: a checkpoint that does not fit the config is an error
/// naming the tensor, never half-loaded.
fn fill(
    vs: &VarStore,
    file: &TensorFile,
    what: &str,
    prefix: &str,
    map: &dyn Fn(&str) -> Option<Source>,
    ignored: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let shown = file.path().display();
    let variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    let mut used: HashSet<String> = HashSet::new();
    for name in names {
        let var = &variables[name];
        let source = map(name).with_context(|| format!("sdtune has no LDM name for the {what}'s {name}"))?;
        if file.info(&source.name).is_none() {
            bail!(
                "{shown} has no tensor {} (the {what}'s {name}); the checkpoint does not match the architecture read from it or the config beside it",
                source.name
            );
        }
        file.with_view(&source.name, |src| {
            let src = match source.rows {
                Some((start, len)) => {
                    ensure!(
                        src.dim() >= 1 && src.size()[0] >= start + len,
                        "{shown}: tensor {} has shape {:?}, too small to hold rows {start}..{} (the {what}'s {name})",
                        source.name,
                        src.size(),
                        start + len
                    );
                    src.narrow(0, start, len)
                }
                None => src.shallow_clone(),
            };
            let src = if source.transposed {
                ensure!(src.dim() == 2, "{shown}: tensor {} is not a matrix (the {what}'s {name})", source.name);
                src.tr()
            } else {
                src
            };
            let (have, want) = (src.size(), var.size());
            let src = if have == want {
                src
            } else if drop_unit_dims(&have) == drop_unit_dims(&want) {
                // LDM keeps the VAE's mid attention as 1x1 convs: [C, C, 1, 1] -> [C, C].
                src.reshape(&want)
            } else {
                bail!(
                    "{shown}: tensor {} has shape {have:?} but the {what}'s {name} needs {want:?}; the checkpoint does not match the architecture read from it or the config beside it",
                    source.name
                );
            };
            copy_into(var, &src).with_context(|| format!("{shown}: cannot load tensor {}", source.name))
        })?;
        file.release(&source.name);
        used.insert(source.name);
    }
    let mut unused: Vec<String> =
        file.names().into_iter().filter(|n| n.starts_with(prefix) && !used.contains(n) && !ignored(n)).collect();
    if !unused.is_empty() {
        unused.sort();
        bail!(
            "{shown} holds {} {what} tensor(s) the model has no place for (first: {}); the checkpoint does not match the architecture read from it or the config beside it",
            unused.len(),
            unused.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

fn drop_unit_dims(shape: &[i64]) -> Vec<i64> {
    shape.iter().copied().filter(|&d| d != 1).collect()
}

/// The UNet of a single file, filled from `file` (opened from `plan.path`).
pub fn load_unet(file: &TensorFile, plan: &Plan, device: Device, kind: Kind) -> Result<Built<UNet2DConditionModel>> {
    let layout = UnetLayout::of(&plan.unet)?;
    let unet = build(device, kind, WeightInit::Zeros, |vb| UNet2DConditionModel::new(vb, &plan.unet))?;
    fill(
        &unet.vs,
        file,
        "UNet",
        UNET_PREFIX,
        &|n| unet_ldm_name(n, &layout).map(|l| Source::whole(format!("{UNET_PREFIX}{l}"))),
        &|_| false,
    )?;
    Ok(unet)
}

/// The VAE of a single file.
pub fn load_vae(file: &TensorFile, plan: &Plan, device: Device, kind: Kind) -> Result<Built<AutoencoderKL>> {
    load_ldm_vae(file, &plan.vae, VAE_PREFIX, device, kind)
}

/// A VAE in LDM names under `prefix` (`first_stage_model.` in a checkpoint,
/// nothing in a VAE-only file such as A1111's `*.vae.safetensors`).
pub fn load_ldm_vae(
    file: &TensorFile,
    cfg: &VaeConfig,
    prefix: &str,
    device: Device,
    kind: Kind,
) -> Result<Built<AutoencoderKL>> {
    let blocks = cfg.block_out_channels.len();
    let vae = build(device, kind, WeightInit::Zeros, |vb| AutoencoderKL::new(vb, cfg))?;
    fill(
        &vae.vs,
        file,
        "VAE",
        prefix,
        &|n| vae_ldm_name(n, blocks).map(|l| Source::whole(format!("{prefix}{l}"))),
        &|_| false,
    )?;
    Ok(vae)
}

/// The (first) text encoder of a single file (OpenAI CLIP or OpenCLIP names).
pub fn load_text_encoder(file: &TensorFile, plan: &Plan, device: Device, kind: Kind) -> Result<Built<ClipTextModel>> {
    let layout = &plan.layout;
    fill_text(file, plan, &plan.text, "text encoder", layout.text_prefix(), layout.clip_names(), device, kind)
}

/// SDXL's second text encoder (OpenCLIP bigG under `conditioner.embedders.1.model.`).
pub fn load_text_encoder_2(file: &TensorFile, plan: &Plan, device: Device, kind: Kind) -> Result<Built<ClipTextModel>> {
    let cfg = plan.text_2.as_ref().context("this checkpoint has no second text encoder")?;
    let names = ClipNames::OpenClip(SGM_OPEN_CLIP_PREFIX);
    fill_text(file, plan, cfg, "second text encoder", SGM_OPEN_CLIP_PREFIX, names, device, kind)
}

#[allow(clippy::too_many_arguments)]
fn fill_text(
    file: &TensorFile,
    plan: &Plan,
    cfg: &crate::models::config::ClipTextConfig,
    what: &str,
    prefix: &str,
    names: ClipNames,
    device: Device,
    kind: Kind,
) -> Result<Built<ClipTextModel>> {
    let shapes = Shapes::of(file);
    let text_encoder = build(device, kind, WeightInit::Zeros, |vb| ClipTextModel::new(vb, cfg))?;
    fill(&text_encoder.vs, file, what, prefix, &|n| clip_source(n, names, cfg.hidden_size), &|n| {
        ignored_text_tensor(n, &plan.layout, &shapes)
    })?;
    Ok(text_encoder)
}
