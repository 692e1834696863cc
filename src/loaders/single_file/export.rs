//! A model written back as a single-file LDM state dict (benchmarks and
//! fixtures).
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::detect::Family;
use crate::loaders::ldm_names::{
    unet_ldm_name, vae_ldm_name, UnetLayout, CLIP_PREFIX, OPEN_CLIP_PREFIX, SGM_CLIP_PREFIX, SGM_OPEN_CLIP_PREFIX,
    UNET_PREFIX, VAE_PREFIX,
};
use crate::models::config::SchedulerConfig;
use crate::models::stable_diffusion::StableDiffusion;

/// The model as a single-file LDM state dict (what A1111 and diffusers'
/// `from_single_file` read): UNet, VAE (mid attention as 1x1 convs), text
/// encoder (SD2: OpenCLIP names, fused q/k/v, plus the unused last layer as
/// a copy of the last one and an identity `text_projection`), and the
/// schedule buffers LDM files carry. SDXL is written in the SGM layout of
/// diffusers' `convert_diffusers_to_original_sdxl.py`: CLIP ViT-L under
/// `conditioner.embedders.0.transformer.`, bigG in open_clip names (every
/// layer, `text_projection` transposed), no schedule buffers. For benchmarks
/// and fixtures.
pub fn to_ldm(model: &StableDiffusion, family: Family) -> Result<Vec<(String, Tensor)>> {
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let layout = UnetLayout::of(&model.unet_config)?;
    for (name, t) in sorted(&model.unet.vs) {
        let ldm = unet_ldm_name(&name, &layout).with_context(|| format!("no LDM name for UNet {name}"))?;
        out.push((format!("{UNET_PREFIX}{ldm}"), t));
    }
    let blocks = model.vae_config.block_out_channels.len();
    for (name, t) in sorted(&model.vae.vs) {
        let ldm = vae_ldm_name(&name, blocks).with_context(|| format!("no LDM name for VAE {name}"))?;
        let t = if ldm.contains(".mid.attn_1.") && ldm.ends_with(".weight") && t.dim() == 2 {
            t.unsqueeze(-1).unsqueeze(-1)
        } else {
            t
        };
        out.push((format!("{VAE_PREFIX}{ldm}"), t));
    }
    let encoder = model.text.first();
    let text: BTreeMap<String, Tensor> = sorted(&encoder.model.vs).into_iter().collect();
    let cfg = &encoder.config;
    match family {
        Family::Sd1 => {
            for (name, t) in &text {
                out.push((format!("{CLIP_PREFIX}{name}"), t.shallow_clone()));
            }
            let ids = Tensor::arange(cfg.max_position_embeddings, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
            out.push((format!("{CLIP_PREFIX}text_model.embeddings.position_ids"), ids));
        }
        Family::Sd2 => {
            let p = OPEN_CLIP_PREFIX;
            let layers = cfg.num_hidden_layers as usize;
            // SD2 files hold one more layer than SD2 reads: a copy of the last stands in.
            out.extend(open_clip_tensors(&text, p, layers, layers + 1)?);
            let kind = text["text_model.final_layer_norm.weight"].kind();
            out.push((format!("{p}text_projection"), Tensor::eye(cfg.hidden_size, (kind, tch::Device::Cpu))));
        }
        Family::Sdxl => {
            for (name, t) in &text {
                out.push((format!("{SGM_CLIP_PREFIX}{name}"), t.shallow_clone()));
            }
            let second = model.text.encoders.get(1).context("an SDXL model needs a second text encoder")?;
            let text: BTreeMap<String, Tensor> = sorted(&second.model.vs).into_iter().collect();
            let layers = second.config.num_hidden_layers as usize;
            out.extend(open_clip_tensors(&text, SGM_OPEN_CLIP_PREFIX, layers, layers)?);
            let projection =
                text.get("text_projection.weight").context("the second text encoder has no text_projection")?;
            out.push((format!("{SGM_OPEN_CLIP_PREFIX}text_projection"), projection.tr().contiguous()));
            // SGM files carry no schedule buffers (diffusers' converter writes none).
            return Ok(out);
        }
    }
    out.extend(schedule_buffers(&model.scheduler));
    Ok(out)
}

/// A transformers CLIP text encoder's tensors in open_clip's names under
/// `p`: `count` resblocks, those past the model's `layers` copies of its last.
fn open_clip_tensors(
    text: &BTreeMap<String, Tensor>,
    p: &str,
    layers: usize,
    count: usize,
) -> Result<Vec<(String, Tensor)>> {
    let get = |n: &str| text.get(n).map(|t| t.shallow_clone()).with_context(|| format!("text encoder has no {n}"));
    let mut out = vec![
        (format!("{p}token_embedding.weight"), get("text_model.embeddings.token_embedding.weight")?),
        (format!("{p}positional_embedding"), get("text_model.embeddings.position_embedding.weight")?),
        (format!("{p}ln_final.weight"), get("text_model.final_layer_norm.weight")?),
        (format!("{p}ln_final.bias"), get("text_model.final_layer_norm.bias")?),
    ];
    for i in 0..count {
        let src = format!("text_model.encoder.layers.{}.", i.min(layers - 1));
        let dst = format!("{p}transformer.resblocks.{i}.");
        for (new, old) in [
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
            ("self_attn.out_proj", "attn.out_proj"),
        ] {
            for param in ["weight", "bias"] {
                let t = get(&format!("{src}{new}.{param}"))?;
                // A stand-in layer must own its data (no shared storage in a file).
                let t = if i >= layers { t.copy() } else { t };
                out.push((format!("{dst}{old}.{param}"), t));
            }
        }
        for param in ["weight", "bias"] {
            let parts = ["q", "k", "v"]
                .iter()
                .map(|x| get(&format!("{src}self_attn.{x}_proj.{param}")))
                .collect::<Result<Vec<_>>>()?;
            out.push((format!("{dst}attn.in_proj_{param}"), Tensor::cat(&parts, 0)));
        }
    }
    Ok(out)
}

/// `betas`, `alphas_cumprod`, `alphas_cumprod_prev` (fp32) as LDM saves them.
fn schedule_buffers(s: &SchedulerConfig) -> Vec<(String, Tensor)> {
    let opts = (Kind::Double, tch::Device::Cpu);
    let n = s.num_train_timesteps;
    let betas = if s.beta_schedule == "scaled_linear" {
        Tensor::linspace(s.beta_start.powf(0.5), s.beta_end.powf(0.5), n, opts).pow_tensor_scalar(2)
    } else {
        Tensor::linspace(s.beta_start, s.beta_end, n, opts)
    };
    let alphas_cumprod = (Tensor::ones_like(&betas) - &betas).cumprod(0, Kind::Double);
    let prev = Tensor::cat(&[Tensor::ones([1], opts), alphas_cumprod.narrow(0, 0, n - 1)], 0);
    vec![
        ("betas".into(), betas.to_kind(Kind::Float)),
        ("alphas_cumprod".into(), alphas_cumprod.to_kind(Kind::Float)),
        ("alphas_cumprod_prev".into(), prev.to_kind(Kind::Float)),
    ]
}

fn sorted(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}
