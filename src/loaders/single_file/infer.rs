//! The configs a single file's tensors describe, for what no config beside
//! the file says: sizes from shapes, head counts and norm groups from SD's
//! own rules.
use anyhow::{bail, ensure, Context, Result};

use super::detect::{open_clip_resblocks, Family, Layout, Shapes};
use crate::loaders::ldm_names::{OPEN_CLIP_PREFIX, SGM_OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX};
use crate::models::config::{ClipTextConfig, UNetConfig, VaeConfig};

/// One level of the UNet's down path as the tensors show it.
#[derive(Default)]
struct Level {
    channels: i64,
    resnets: usize,
    attention: bool,
    depth: usize,
    linear: bool,
}

/// How many attention heads each block gets when no config says.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeadHints {
    /// LDM `num_heads`: the same head count in every block (SD1: 8).
    pub num_heads: Option<i64>,
    /// LDM `num_head_channels`: the same head width everywhere (SD2: 64).
    pub num_head_channels: Option<i64>,
}

/// The UNet config the tensors describe. Head counts come from `hints`,
/// else SD's rules (SD1: 8 heads; SD2 and SDXL: 64-wide heads); norms have
/// 32 groups (LDM's `normalization`). SDXL's text/time embedding widths come
/// from `label_emb` and bigG's projection. `sample_size` is left for the caller.
pub fn infer_unet_config(shapes: &Shapes, family: Family, hints: HeadHints) -> Result<UNetConfig> {
    let p = |s: String| format!("{UNET_PREFIX}{s}");
    let conv_in = shapes.need(&p("input_blocks.0.0.weight".into()))?.to_vec();
    let conv_out = shapes.need(&p("out.2.weight".into()))?.to_vec();
    let mut levels: Vec<Level> = Vec::new();
    let mut current = Level::default();
    let mut i = 1;
    loop {
        if shapes.has(&p(format!("input_blocks.{i}.0.op.weight"))) {
            levels.push(std::mem::take(&mut current));
            i += 1;
            continue;
        }
        let Some(conv2) = shapes.get(&p(format!("input_blocks.{i}.0.out_layers.3.weight"))) else { break };
        current.channels = conv2[0];
        current.resnets += 1;
        let attn = p(format!("input_blocks.{i}.1."));
        if let Some(proj_in) = shapes.get(&format!("{attn}proj_in.weight")) {
            current.attention = true;
            current.linear = proj_in.len() == 2;
            current.depth = shapes.count_while(|n| format!("{attn}transformer_blocks.{n}.attn1.to_q.weight"));
        }
        i += 1;
    }
    levels.push(current);
    let lpb = levels[0].resnets;
    ensure!(lpb > 0, "the UNet has no down blocks");
    ensure!(
        levels.iter().all(|l| l.resnets == lpb),
        "the UNet's levels have different numbers of resnets, which no SD1/SD2/SDXL UNet has"
    );
    let n = levels.len();
    let up_attention: Vec<bool> =
        (0..n).map(|j| shapes.has(&p(format!("output_blocks.{}.1.proj_in.weight", j * (lpb + 1))))).collect();
    ensure!(
        shapes.has(&p(format!("output_blocks.{}.0.out_layers.3.weight", n * (lpb + 1) - 1)))
            && !shapes.has(&p(format!("output_blocks.{}.0.out_layers.3.weight", n * (lpb + 1)))),
        "the UNet's up path does not mirror its {n} down levels"
    );
    ensure!(
        shapes.has(&p("middle_block.1.proj_in.weight".into())),
        "the UNet has no attention in its middle block, which no SD1/SD2/SDXL UNet lacks"
    );
    let first_attn = levels.iter().position(|l| l.attention).context("the UNet has no attention blocks")?;
    let channels: Vec<i64> = levels.iter().map(|l| l.channels).collect();
    let attn_prefix =
        p(format!("input_blocks.{}.1.transformer_blocks.0.attn2.to_k.weight", 1 + first_attn * (lpb + 1)));
    let cross_attention_dim = shapes.need(&attn_prefix)?[1];
    let heads: Vec<i64> = match (hints.num_heads.filter(|&h| h > 0), hints.num_head_channels.filter(|&c| c > 0)) {
        (Some(h), _) => vec![h; n],
        (None, Some(width)) => channels.iter().map(|c| c / width).collect(),
        (None, None) => match family {
            Family::Sd1 => vec![8; n],
            Family::Sd2 | Family::Sdxl => channels.iter().map(|c| c / 64).collect(),
        },
    };
    for (level, (&c, &h)) in levels.iter().zip(channels.iter().zip(&heads)) {
        if level.attention && (h <= 0 || c % h != 0) {
            bail!(
                "cannot tell the UNet's attention heads from its tensors ({c} channels do not split into {h} heads by the SD rule); put a diffusers unet/config.json in a folder named like the file beside it"
            );
        }
    }
    let depths: Vec<i64> = levels.iter().map(|l| if l.attention { l.depth as i64 } else { 1 }).collect();
    let depth =
        if depths.iter().all(|&d| d == depths[0]) { serde_json::json!(depths[0]) } else { serde_json::json!(depths) };
    let down: Vec<&str> =
        levels.iter().map(|l| if l.attention { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
    let up: Vec<&str> = up_attention.iter().map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
    let mut json = serde_json::json!({
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": conv_out[2],
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": levels[first_attn].linear,
        // diffusers' SD2 single-file config (stabilityai/stable-diffusion-2-1) upcasts.
        "upcast_attention": family == Family::Sd2,
    });
    if family == Family::Sdxl {
        let (extra, key) = text_time(shapes)?;
        json["addition_embed_type"] = "text_time".into();
        json["addition_time_embed_dim"] = extra.into();
        json["projection_class_embeddings_input_dim"] = key.into();
    }
    let cfg: UNetConfig =
        serde_json::from_value(json).context("the UNet config inferred from the tensors is invalid")?;
    cfg.check()?;
    Ok(cfg)
}

/// SDXL's (time-id sinusoid width, `add_embedding` input width): the input
/// is the pooled text embedding (bigG's projection) then 6 time-id sinusoids.
fn text_time(shapes: &Shapes) -> Result<(i64, i64)> {
    let input = shapes.need(&format!("{UNET_PREFIX}label_emb.0.0.weight"))?[1];
    let pooled = shapes.need(&format!("{SGM_OPEN_CLIP_PREFIX}text_projection"))?[1];
    ensure!(
        input > pooled && (input - pooled) % 6 == 0,
        "the UNet's text/time embedding takes {input} values, which is not the {pooled}-wide pooled text embedding plus 6 time ids"
    );
    Ok(((input - pooled) / 6, input))
}

/// LDM's norms have 32 groups: channels that do not split into them mean a
/// non-SD model whose config must come from beside the file.
pub fn check_norm_groups(what: &str, channels: &[i64], groups: i64, config: &str) -> Result<()> {
    if let Some(c) = channels.iter().find(|&&c| c % groups != 0) {
        bail!(
            "the {what}'s {c} channels do not split into LDM's {groups} norm groups, so this is not a standard SD model; put a diffusers {config} (with norm_num_groups) in a folder named like the file beside it"
        );
    }
    Ok(())
}

/// The VAE config the tensors describe (32 norm groups, as LDM's).
pub fn infer_vae_config(shapes: &Shapes, scaling_factor: Option<f64>, image_size: i64) -> Result<VaeConfig> {
    let v = |s: String| format!("{VAE_PREFIX}{s}");
    let blocks = shapes.count_while(|i| v(format!("encoder.down.{i}.block.0.conv1.weight")));
    ensure!(blocks > 0, "the VAE has no encoder blocks");
    let channels: Vec<i64> = (0..blocks)
        .map(|i| shapes.need(&v(format!("encoder.down.{i}.block.0.conv2.weight"))).map(|s| s[0]))
        .collect::<Result<_>>()?;
    let layers = shapes.count_while(|j| v(format!("encoder.down.0.block.{j}.conv1.weight")));
    let in_channels = shapes.need(&v("encoder.conv_in.weight".into()))?[1];
    let out_channels = shapes.need(&v("decoder.conv_out.weight".into()))?[0];
    let latent = shapes.need(&v("decoder.conv_in.weight".into()))?[1];
    ensure!(
        shapes.has(&v("quant_conv.weight".into())) && shapes.has(&v("post_quant_conv.weight".into())),
        "the VAE has no quant_conv / post_quant_conv, which every SD VAE has"
    );
    let cfg: VaeConfig = serde_json::from_value(serde_json::json!({
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent,
        "sample_size": image_size,
        "scaling_factor": scaling_factor.unwrap_or(0.18215),
        "down_block_types": vec!["DownEncoderBlock2D"; blocks],
        "up_block_types": vec!["UpDecoderBlock2D"; blocks],
        "mid_block_add_attention": shapes.has(&v("encoder.mid.attn_1.q.weight".into())),
    }))
    .context("the VAE config inferred from the tensors is invalid")?;
    Ok(cfg)
}

/// The (first) text-encoder config the tensors describe: OpenAI CLIP
/// (quick_gelu, every layer) for SD1 and SDXL, OpenCLIP (gelu, all layers
/// but the last) for SD2; 64-wide heads.
pub fn infer_text_config(shapes: &Shapes, layout: &Layout, heads: Option<i64>) -> Result<ClipTextConfig> {
    let (token, position, layers, fc1, act) = match layout.family {
        Family::Sd1 | Family::Sdxl => {
            let p = &layout.clip_prefix;
            (
                format!("{p}embeddings.token_embedding.weight"),
                format!("{p}embeddings.position_embedding.weight"),
                shapes.count_while(|i| format!("{p}encoder.layers.{i}.self_attn.q_proj.weight")),
                format!("{p}encoder.layers.0.mlp.fc1.weight"),
                "quick_gelu",
            )
        }
        Family::Sd2 => {
            let p = OPEN_CLIP_PREFIX;
            let blocks = open_clip_resblocks(shapes, p);
            ensure!(blocks >= 2, "the OpenCLIP text encoder has {blocks} layer(s); SD2 uses all but the last");
            (
                format!("{p}token_embedding.weight"),
                format!("{p}positional_embedding"),
                blocks - 1,
                format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
                "gelu",
            )
        }
    };
    let projection = if layout.family == Family::Sd2 { 512 } else { 768 };
    let json = text_json(shapes, [&token, &position, &fc1], layers, act, heads, "text_encoder/config.json")?;
    let mut json = json;
    json["projection_dim"] = projection.into();
    serde_json::from_value(json).context("the text-encoder config inferred from the tensors is invalid")
}

/// SDXL's second text encoder (OpenCLIP bigG, open_clip names): every
/// layer (SDXL reads the penultimate one itself), gelu, the projection its
/// `text_projection` shows, and SDXL base's legacy special-token ids (so the
/// pooled state is taken where transformers takes it for that model).
pub fn infer_text_config_2(shapes: &Shapes, heads: Option<i64>) -> Result<ClipTextConfig> {
    let p = SGM_OPEN_CLIP_PREFIX;
    let layers = open_clip_resblocks(shapes, p);
    let names = [
        &format!("{p}token_embedding.weight"),
        &format!("{p}positional_embedding"),
        &format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
    ];
    let mut json = text_json(shapes, names, layers, "gelu", heads, "text_encoder_2/config.json")?;
    json["projection_dim"] = shapes.need(&format!("{p}text_projection"))?[1].into();
    json["architectures"] = serde_json::json!(["CLIPTextModelWithProjection"]);
    json["eos_token_id"] = 2.into();
    serde_json::from_value(json).context("the second text-encoder config inferred from the tensors is invalid")
}

/// The config fields every CLIP text encoder's tensors show: `names` are its
/// token embedding, position embedding and first `fc1` weight.
fn text_json(
    shapes: &Shapes,
    names: [&String; 3],
    layers: usize,
    act: &str,
    heads: Option<i64>,
    config: &str,
) -> Result<serde_json::Value> {
    let [token, position, fc1] = names;
    ensure!(layers > 0, "the text encoder has no layers");
    let token = shapes.need(token)?;
    let (vocab, hidden) = (token[0], token[1]);
    let heads = heads.unwrap_or(hidden / 64);
    ensure!(
        heads > 0 && hidden % heads == 0,
        "cannot tell the text encoder's attention heads from its tensors ({hidden} wide, not a multiple of 64); put a diffusers {config} in a folder named like the file beside it"
    );
    Ok(serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes.need(fc1)?[0],
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": shapes.need(position)?[0],
        "hidden_act": act,
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn sd_head_rules() {
        // Shapes of an SD2.1-like UNet reduced to the tensors inference reads.
        let mut m = BTreeMap::new();
        let p = |s: &str| format!("{UNET_PREFIX}{s}");
        m.insert(p("input_blocks.0.0.weight"), vec![320, 4, 3, 3]);
        m.insert(p("out.2.weight"), vec![4, 320, 3, 3]);
        let channels = [320, 640, 1280, 1280];
        let mut i = 1;
        for (level, c) in channels.iter().enumerate() {
            for _ in 0..2 {
                m.insert(p(&format!("input_blocks.{i}.0.out_layers.3.weight")), vec![*c, *c, 3, 3]);
                if level < 3 {
                    let a = format!("input_blocks.{i}.1.");
                    m.insert(p(&format!("{a}proj_in.weight")), vec![*c, *c]);
                    m.insert(p(&format!("{a}transformer_blocks.0.attn1.to_q.weight")), vec![*c, *c]);
                    m.insert(p(&format!("{a}transformer_blocks.0.attn2.to_k.weight")), vec![*c, 1024]);
                }
                i += 1;
            }
            if level < 3 {
                m.insert(p(&format!("input_blocks.{i}.0.op.weight")), vec![*c, *c, 3, 3]);
                i += 1;
            }
        }
        for j in 0..12 {
            m.insert(p(&format!("output_blocks.{j}.0.out_layers.3.weight")), vec![1, 1, 3, 3]);
            if j >= 3 {
                m.insert(p(&format!("output_blocks.{j}.1.proj_in.weight")), vec![1, 1]);
            }
        }
        m.insert(p("middle_block.1.proj_in.weight"), vec![1280, 1280]);
        let shapes = Shapes::from_map(m);
        let cfg = infer_unet_config(&shapes, Family::Sd2, HeadHints::default()).unwrap();
        assert_eq!(cfg.heads_per_block(), vec![5, 10, 20, 20]);
        assert!(cfg.use_linear_projection && cfg.upcast_attention);
        assert_eq!(cfg.cross_attention_dims(), vec![1024; 4]);
        assert_eq!(cfg.down_block_types[3], "DownBlock2D");
        assert_eq!(cfg.up_block_types[0], "UpBlock2D");
        let cfg = infer_unet_config(&shapes, Family::Sd1, HeadHints::default()).unwrap();
        assert_eq!(cfg.heads_per_block(), vec![8; 4]);
        let cfg = infer_unet_config(&shapes, Family::Sd1, HeadHints { num_heads: None, num_head_channels: Some(64) })
            .unwrap();
        assert_eq!(cfg.heads_per_block(), vec![5, 10, 20, 20]);
    }

    #[test]
    fn sdxl_base_config_from_its_shapes() {
        // SDXL base's shapes reduced to the tensors inference reads.
        let mut m = BTreeMap::new();
        let p = |s: &str| format!("{UNET_PREFIX}{s}");
        m.insert(p("input_blocks.0.0.weight"), vec![320, 4, 3, 3]);
        m.insert(p("out.2.weight"), vec![4, 320, 3, 3]);
        let (channels, depth) = ([320, 640, 1280], [0, 2, 10]);
        let mut i = 1;
        for level in 0..3 {
            let c = channels[level];
            for _ in 0..2 {
                m.insert(p(&format!("input_blocks.{i}.0.out_layers.3.weight")), vec![c, c, 3, 3]);
                for d in 0..depth[level] {
                    let a = format!("input_blocks.{i}.1.");
                    m.insert(p(&format!("{a}proj_in.weight")), vec![c, c]);
                    m.insert(p(&format!("{a}transformer_blocks.{d}.attn1.to_q.weight")), vec![c, c]);
                    m.insert(p(&format!("{a}transformer_blocks.{d}.attn2.to_k.weight")), vec![c, 2048]);
                }
                i += 1;
            }
            if level < 2 {
                m.insert(p(&format!("input_blocks.{i}.0.op.weight")), vec![c, c, 3, 3]);
                i += 1;
            }
        }
        for j in 0..9 {
            m.insert(p(&format!("output_blocks.{j}.0.out_layers.3.weight")), vec![1, 1, 3, 3]);
            if j < 6 {
                m.insert(p(&format!("output_blocks.{j}.1.proj_in.weight")), vec![1, 1]);
            }
        }
        m.insert(p("middle_block.1.proj_in.weight"), vec![1280, 1280]);
        m.insert(p("label_emb.0.0.weight"), vec![1280, 2816]);
        m.insert(format!("{SGM_OPEN_CLIP_PREFIX}text_projection"), vec![1280, 1280]);
        let cfg = infer_unet_config(&Shapes::from_map(m), Family::Sdxl, HeadHints::default()).unwrap();
        assert_eq!(cfg.down_block_types, ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]);
        assert_eq!(cfg.up_block_types, ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]);
        assert_eq!(cfg.heads_per_block(), vec![5, 10, 20]);
        assert_eq!(serde_json::to_value(&cfg.transformer_layers_per_block).unwrap(), serde_json::json!([1, 2, 10]));
        assert!(cfg.use_linear_projection && !cfg.upcast_attention);
        assert_eq!(cfg.addition_embed_type.as_deref(), Some("text_time"));
        assert_eq!((cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim), (Some(256), Some(2816)));
    }

    #[test]
    fn sdxl_big_g_config_from_its_shapes() {
        let p = SGM_OPEN_CLIP_PREFIX;
        let mut m = BTreeMap::new();
        m.insert(format!("{p}token_embedding.weight"), vec![49408, 1280]);
        m.insert(format!("{p}positional_embedding"), vec![77, 1280]);
        m.insert(format!("{p}text_projection"), vec![1280, 1280]);
        for i in 0..32 {
            m.insert(format!("{p}transformer.resblocks.{i}.ln_1.weight"), vec![1280]);
        }
        m.insert(format!("{p}transformer.resblocks.0.mlp.c_fc.weight"), vec![5120, 1280]);
        let cfg = infer_text_config_2(&Shapes::from_map(m), None).unwrap();
        assert_eq!((cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads), (32, 1280, 20));
        assert_eq!((cfg.intermediate_size, cfg.projection_dim, cfg.eos_token_id), (5120, Some(1280), 2));
        assert!(cfg.with_projection() && cfg.hidden_act == "gelu");
    }
}
