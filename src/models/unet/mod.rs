//! diffusers' `UNet2DConditionModel` for SD1.x, SD2.x and SDXL: the noise
//! (or v) predictor, conditioned on the timestep and the text encoders'
//! states, and for SDXL (`addition_embed_type: text_time`) on a pooled text
//! embedding and the size/crop time ids as well.
//!
//! `new` turns the config into plain sizes and builds every layer by its
//! diffusers weight name; `forward` reads no config.
mod attention;
mod blocks;
mod checkpointing;
mod embeddings;
mod resnet;

use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use self::blocks::{AttentionSpec, BlockSpec, Common, DownBlock, MidBlock, UpBlock};
use self::checkpointing::Segments;
use self::embeddings::{TimestepEmbedding, Timesteps};
use self::resnet::group_norm;
use super::conditioning::Conditioning;
use super::config::UNetConfig;
use super::gradient_checkpoint::grad_enabled;
use super::layers::{Conv2d, ConvConfig, GroupNorm, Vb};

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    /// SDXL's added conditioning: each time id's own sinusoid, then an MLP
    /// of [pooled, sinusoids] added to the time embedding.
    added: Option<AddedEmbedding>,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Where and in what precision the weights live; inputs are moved there.
    device: Device,
    kind: Kind,
    /// Set: gradient checkpointing is on, and these are the trained
    /// tensors (see [`Self::set_gradient_checkpointing`]).
    checkpointing: Mutex<Option<Vec<Tensor>>>,
}

/// `add_time_proj` + `add_embedding` (SDXL's `text_time`).
struct AddedEmbedding {
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
    /// Width of the pooled text embedding the MLP expects beside the sinusoids.
    pooled_dim: i64,
}

impl AddedEmbedding {
    fn new(vb: Vb, cfg: &UNetConfig, temb_channels: i64) -> Result<Option<Self>> {
        if !cfg.takes_text_time() {
            return Ok(None);
        }
        let time_dim = cfg.addition_time_embed_dim.context("checked by UNetConfig::check")?;
        let input = cfg.projection_class_embeddings_input_dim.context("checked by UNetConfig::check")?;
        let pooled_dim = input - 6 * time_dim;
        if pooled_dim <= 0 {
            bail!("projection_class_embeddings_input_dim {input} leaves no room for a pooled text embedding beside 6 time ids of width {time_dim}");
        }
        Ok(Some(AddedEmbedding {
            add_time_proj: Timesteps { dim: time_dim, flip_sin_to_cos: cfg.flip_sin_to_cos, freq_shift: cfg.freq_shift as f64 },
            add_embedding: TimestepEmbedding::new(vb.pp("add_embedding"), input, temb_channels),
            pooled_dim,
        }))
    }

    /// [B, temb] from `pooled` [B, P] and `time_ids` [B, 6], as diffusers:
    /// sinusoids in fp32, joined after the pooled embedding, in `kind`.
    fn forward(&self, pooled: &Tensor, time_ids: &Tensor, kind: Kind) -> Tensor {
        let batch = pooled.size()[0];
        let time = self.add_time_proj.forward(&time_ids.reshape([-1])).reshape([batch, -1]);
        let input = Tensor::cat(&[pooled.to_kind(Kind::Float), time], -1).to_kind(kind);
        self.add_embedding.forward(&input)
    }
}

/// The config's per-block lists, each checked to have one entry per block.
struct PerBlock {
    heads: Vec<i64>,
    layers: Vec<i64>,
    cross_attention_dims: Vec<i64>,
    transformer_layers: Vec<i64>,
}

impl PerBlock {
    fn of(cfg: &UNetConfig) -> Result<Self> {
        let blocks = cfg.block_out_channels.len();
        let checked = |name: &str, v: Vec<i64>| -> Result<Vec<i64>> {
            if v.len() != blocks {
                bail!("{name} has {} entries but there are {blocks} blocks (block_out_channels)", v.len());
            }
            Ok(v)
        };
        Ok(PerBlock {
            heads: checked("attention_head_dim / num_attention_heads", cfg.heads_per_block())?,
            layers: checked("layers_per_block", cfg.layers_per_block())?,
            cross_attention_dims: checked("cross_attention_dim", cfg.cross_attention_dims())?,
            transformer_layers: checked("transformer_layers_per_block", cfg.transformer_layers())?,
        })
    }

    fn attention(&self, i: usize) -> AttentionSpec {
        AttentionSpec {
            heads: self.heads[i],
            cross_attention_dim: self.cross_attention_dims[i],
            transformer_layers: self.transformer_layers[i],
        }
    }

    /// The same lists in up-block order (deepest level first).
    fn reversed(&self) -> Self {
        let rev = |v: &Vec<i64>| v.iter().rev().copied().collect();
        PerBlock {
            heads: rev(&self.heads),
            layers: rev(&self.layers),
            cross_attention_dims: rev(&self.cross_attention_dims),
            transformer_layers: rev(&self.transformer_layers),
        }
    }
}

/// Rejects options this implementation does not have, before any layer is built.
fn check_supported(cfg: &UNetConfig) -> Result<()> {
    cfg.check()?;
    if cfg.block_out_channels.is_empty() {
        bail!("block_out_channels is empty");
    }
    if !matches!(cfg.act_fn.as_str(), "silu" | "swish") {
        bail!("act_fn {:?} is not supported (only silu)", cfg.act_fn);
    }
    if let Some(t) = cfg.time_embedding_type.as_deref().filter(|t| *t != "positional") {
        bail!("time_embedding_type {t:?} is not supported (only positional)");
    }
    let only_cross = cfg.only_cross_attention.as_ref().map(|o| o.expand(1)).unwrap_or_default();
    if only_cross.contains(&true) || cfg.mid_block_only_cross_attention == Some(true) {
        bail!("only_cross_attention is not supported");
    }
    for (name, k) in [("conv_in_kernel", cfg.conv_in_kernel), ("conv_out_kernel", cfg.conv_out_kernel)] {
        if k <= 0 || k % 2 == 0 {
            bail!("{name} {k} is not supported (only odd sizes keep the latent size)");
        }
    }
    Ok(())
}

fn is_cross_attention(block_type: &str) -> bool {
    block_type.starts_with("CrossAttn")
}

impl UNet2DConditionModel {
    pub fn new(vb: Vb, cfg: &UNetConfig) -> Result<Self> {
        check_supported(cfg).context("the UNet's config.json describes a model sdtune cannot build")?;
        let per_block = PerBlock::of(cfg).context("the UNet's config.json is inconsistent")?;
        let channels = &cfg.block_out_channels;
        let base = channels[0];
        let temb_channels = 4 * base;
        let common = Common {
            temb_channels,
            groups: cfg.norm_num_groups,
            resnet_eps: cfg.norm_eps,
            use_linear_projection: cfg.use_linear_projection,
            upcast_attention: cfg.upcast_attention,
            downsample_padding: cfg.downsample_padding,
        };
        let time_proj =
            Timesteps { dim: base, flip_sin_to_cos: cfg.flip_sin_to_cos, freq_shift: cfg.freq_shift as f64 };
        let conv_in = vb.pp("conv_in").conv2d(
            cfg.in_channels,
            base,
            cfg.conv_in_kernel,
            ConvConfig::same(cfg.conv_in_kernel),
        );
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), base, temb_channels);
        let added = AddedEmbedding::new(vb.clone(), cfg, temb_channels)?;
        let down_blocks = Self::down_blocks(&vb, cfg, &common, &per_block)?;
        let mid_block = match cfg.mid_block_type {
            Some(_) => {
                let last = channels.len() - 1;
                Some(MidBlock::new(vb.pp("mid_block"), &common, channels[last], per_block.attention(last))?)
            }
            None => None,
        };
        let up_blocks = Self::up_blocks(&vb, cfg, &common, &per_block.reversed())?;
        let conv_norm_out = group_norm(&vb.pp("conv_norm_out"), cfg.norm_num_groups, base, cfg.norm_eps)?;
        let conv_out = vb.pp("conv_out").conv2d(
            base,
            cfg.out_channels,
            cfg.conv_out_kernel,
            ConvConfig::same(cfg.conv_out_kernel),
        );
        Ok(UNet2DConditionModel {
            config: cfg.clone(),
            time_proj,
            time_embedding,
            added,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            device: vb.device(),
            kind: vb.kind(),
            checkpointing: Mutex::new(None),
        })
    }

    /// Gradient checkpointing, as diffusers' `enable_gradient_checkpointing`:
    /// while grad is enabled, each resnet and transformer of the down, mid
    /// and up blocks keeps only its inputs and runs again in backward
    /// (much less activation memory, about a third more compute).
    /// `trained` is every tensor that gets a gradient (the LoRA's, or the
    /// UNet's own in full training): gradients reach them through the
    /// checkpoints only if they are named. `None` turns it off.
    pub fn set_gradient_checkpointing(&self, trained: Option<Vec<Tensor>>) {
        *self.checkpointing.lock().unwrap_or_else(|e| e.into_inner()) = trained;
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The trained tensors to checkpoint with in this forward, if any.
    fn checkpointed_params(&self) -> Option<Vec<Tensor>> {
        if !grad_enabled() {
            return None;
        }
        let trained = self.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
        trained.as_ref().map(|params| params.iter().map(Tensor::shallow_clone).collect())
    }

    /// Level i goes from block_out_channels[i-1] to [i]; all but the last halve the size.
    fn down_blocks(
        vb: &Vb,
        cfg: &UNetConfig,
        common: &Common,
        per_block: &PerBlock,
    ) -> Result<Vec<DownBlock>> {
        let channels = &cfg.block_out_channels;
        let vb = vb.pp("down_blocks");
        cfg.down_block_types
            .iter()
            .enumerate()
            .map(|(i, block_type)| {
                let spec = BlockSpec {
                    in_channels: channels[i.saturating_sub(1)],
                    out_channels: channels[i],
                    prev_output_channels: 0,
                    resnets: per_block.layers[i],
                    attention: is_cross_attention(block_type).then(|| per_block.attention(i)),
                    resample: i + 1 < channels.len(),
                };
                DownBlock::new(vb.pp(i), common, &spec)
            })
            .collect()
    }

    /// Mirror of the down path (`per_block` already reversed), with one
    /// resnet more per level to take the downsampler's skip as well.
    fn up_blocks(vb: &Vb, cfg: &UNetConfig, common: &Common, per_block: &PerBlock) -> Result<Vec<UpBlock>> {
        let channels: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let last = channels.len() - 1;
        let vb = vb.pp("up_blocks");
        cfg.up_block_types
            .iter()
            .enumerate()
            .map(|(i, block_type)| {
                let spec = BlockSpec {
                    in_channels: channels[(i + 1).min(last)],
                    out_channels: channels[i],
                    prev_output_channels: channels[i.saturating_sub(1)],
                    resnets: per_block.layers[i] + 1,
                    attention: is_cross_attention(block_type).then(|| per_block.attention(i)),
                    resample: i < last,
                };
                UpBlock::new(vb.pp(i), common, &spec)
            })
            .collect()
    }

    /// Width of the pooled text embedding it takes, for SDXL-style UNets.
    pub fn pooled_dim(&self) -> Option<i64> {
        self.added.as_ref().map(|a| a.pooled_dim)
    }

    /// `sample` [B, C, h, w], `timesteps` [B] (one per sample, any numeric
    /// kind; a single value is used for the whole batch),
    /// `conditioning` (text states [B, 77, D]; for SDXL also the pooled
    /// embedding [B, P] and time ids [B, 6]) -> prediction [B, C, h, w].
    ///
    /// Inputs in another precision than the weights (fp32 latents with bf16
    /// weights in LoRA training) are cast to it; the prediction comes back
    /// in `sample`'s kind.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, conditioning: &Conditioning) -> Tensor {
        let x = sample.to_device(self.device).to_kind(self.kind);
        let context = conditioning.text.to_device(self.device).to_kind(self.kind);
        let temb = self.embed_time(timesteps, x.size()[0]);
        let temb = match &self.added {
            Some(added) => {
                let (Some(pooled), Some(time_ids)) = (&conditioning.pooled, &conditioning.time_ids) else {
                    panic!("this UNet (SDXL) needs a pooled text embedding and time ids; the caller gave text states only");
                };
                temb + added.forward(&pooled.to_device(self.device), &time_ids.to_device(self.device), self.kind)
            }
            None => temb,
        };
        let params = self.checkpointed_params();
        let segments = params.as_deref().map_or(Segments::Direct, Segments::Checkpointed);
        let x = self.conv_in.forward(&x);
        let (x, skips) = self.down(x, &temb, &context, segments);
        let x = match &self.mid_block {
            Some(mid) => mid.forward(&x, &temb, &context, segments),
            None => x,
        };
        let x = self.up(x, skips, &temb, &context, segments);
        let x = self.conv_out.forward(&self.conv_norm_out.forward(&x).silu());
        x.to_device(sample.device()).to_kind(sample.kind())
    }

    /// The time embedding [B, 4 * block_out_channels[0]] in the weights' kind.
    fn embed_time(&self, timesteps: &Tensor, batch: i64) -> Tensor {
        let t = timesteps.to_device(self.device).reshape([-1]);
        let t = if t.numel() == 1 { t.expand([batch], false) } else { t };
        assert_eq!(t.size(), [batch], "the UNet needs one timestep per sample or a single one for all");
        // The sinusoids are computed in fp32 as diffusers does: bf16 cannot
        // even represent most timesteps above 256 exactly.
        let codes = self.time_proj.forward(&t).to_kind(self.kind);
        self.time_embedding.forward(&codes)
    }

    /// Runs the down blocks; returns the deepest state and every skip
    /// connection, conv_in's output first.
    fn down(&self, x: Tensor, temb: &Tensor, context: &Tensor, segments: Segments) -> (Tensor, Vec<Tensor>) {
        let mut skips = vec![x.shallow_clone()];
        let mut x = x;
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&x, temb, context, segments);
            skips.extend(block_skips);
            x = out;
        }
        (x, skips)
    }

    /// Runs the up blocks, each consuming its skips from the end of `skips`.
    fn up(&self, x: Tensor, mut skips: Vec<Tensor>, temb: &Tensor, context: &Tensor, segments: Segments) -> Tensor {
        let mut x = x;
        for block in &self.up_blocks {
            let taken = skips.split_off(skips.len().saturating_sub(block.skips_needed()));
            // Upsample to exactly the size of the next level's skips rather
            // than 2x: a side not divisible by 2^levels was rounded up on the
            // way down (diffusers' `upsample_size`); otherwise it is 2x anyway.
            let next_size = skips.last().map(|s| {
                let size = s.size();
                [size[2], size[3]]
            });
            x = block.forward(&x, &taken, temb, context, next_size, segments);
        }
        x
    }
}
