//! CLIP text encoder, numerically transformers' `CLIPTextModel` (and
//! `CLIPTextModelWithProjection`, SDXL's second encoder, whose pooled
//! output goes through `text_projection`).
//!
//! Pre-norm transformer: token + position embeddings, `num_hidden_layers`
//! causal self-attention layers, a final layer norm. Every layer is built by
//! its transformers weight name (`text_model.encoder.layers.3.self_attn.q_proj`)
//! through [`Vb`], so LoRA can attach to the text encoder like to the UNet.
use anyhow::{bail, ensure, Context, Result};
use tch::{Kind, Tensor};

use super::config::ClipTextConfig;
use super::layers::{Embedding, LayerNorm, Linear, Vb};

pub struct ClipTextOutput {
    /// After the final layer norm, [B, 77, hidden].
    pub last_hidden_state: Tensor,
    /// Hidden state before the last layer, through the final layer norm (clip-skip 1).
    pub penultimate_hidden_state: Tensor,
    /// The EOS position of `last_hidden_state`, [B, hidden].
    pub pooled_output: Tensor,
}

/// transformers' `hidden_act` values a CLIP text model may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP (SD1).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP (SD2).
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => bail!(
                "text encoder hidden_act {other:?} is not supported; CLIP text encoders use \"quick_gelu\" or \"gelu\""
            ),
        }
    }

    fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
        }
    }
}

struct Embeddings {
    token: Embedding,
    position: Embedding,
    max_positions: i64,
}

impl Embeddings {
    fn new(vb: Vb, cfg: &ClipTextConfig) -> Self {
        Embeddings {
            token: vb.pp("token_embedding").embedding(cfg.vocab_size, cfg.hidden_size),
            position: vb.pp("position_embedding").embedding(cfg.max_position_embeddings, cfg.hidden_size),
            max_positions: cfg.max_position_embeddings,
        }
    }

    /// ids [B, L] -> [B, L, hidden]; positions are 0..L as in transformers.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let len = ids.size()[1];
        ensure!(
            len <= self.max_positions,
            "{len} tokens given to a text encoder with {} positions; truncate the prompt",
            self.max_positions
        );
        let positions = Tensor::arange(len, (Kind::Int64, ids.device())).unsqueeze(0);
        Ok(self.token.forward(ids) + self.position.forward(&positions))
    }
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl SelfAttention {
    fn new(vb: Vb, cfg: &ClipTextConfig) -> Self {
        let d = cfg.hidden_size;
        SelfAttention {
            q_proj: vb.pp("q_proj").linear(d, d, true),
            k_proj: vb.pp("k_proj").linear(d, d, true),
            v_proj: vb.pp("v_proj").linear(d, d, true),
            out_proj: vb.pp("out_proj").linear(d, d, true),
            heads: cfg.num_attention_heads,
        }
    }

    /// [B, L, D] -> [B, heads, L, D / heads]
    fn split_heads(&self, x: Tensor) -> Tensor {
        let (b, l, d) = x.size3().expect("attention input is [B, L, D]");
        x.view([b, l, self.heads, d / self.heads]).transpose(1, 2)
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, l, d) = x.size3().expect("attention input is [B, L, D]");
        let q = self.split_heads(self.q_proj.forward(x));
        let k = self.split_heads(self.k_proj.forward(x));
        let v = self.split_heads(self.v_proj.forward(x));
        // Causal only: SD pipelines pass no padding mask, so padding tokens
        // attend to everything before them, as in diffusers.
        crate::models::flop_count::attention(&q, &k, &v);
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, false);
        self.out_proj.forward(&y.transpose(1, 2).reshape([b, l, d]))
    }
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(vb: Vb, cfg: &ClipTextConfig, act: Activation) -> Self {
        Mlp {
            fc1: vb.pp("fc1").linear(cfg.hidden_size, cfg.intermediate_size, true),
            fc2: vb.pp("fc2").linear(cfg.intermediate_size, cfg.hidden_size, true),
            act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)))
    }
}

/// One pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    fn new(vb: Vb, cfg: &ClipTextConfig, act: Activation) -> Self {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        EncoderLayer {
            layer_norm1: vb.pp("layer_norm1").layer_norm(d, eps),
            self_attn: SelfAttention::new(vb.pp("self_attn"), cfg),
            layer_norm2: vb.pp("layer_norm2").layer_norm(d, eps),
            mlp: Mlp::new(vb.pp("mlp"), cfg, act),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        &x + self.mlp.forward(&self.layer_norm2.forward(&x))
    }
}

pub struct ClipTextModel {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `text_projection` (no bias), beside `text_model`, when the config has one.
    text_projection: Option<Linear>,
    eos_token_id: i64,
}

/// What SDXL takes from one of its encoders: the hidden state some layers
/// before the last without the final layer norm, and (second encoder) the
/// projected pooled output.
pub struct SdxlTextOutput {
    pub hidden: Tensor,
    pub pooled: Option<Tensor>,
}

impl ClipTextModel {
    pub fn new(vb: Vb, cfg: &ClipTextConfig) -> Result<Self> {
        check_sizes(cfg)?;
        let act = Activation::parse(&cfg.hidden_act)?;
        let text_projection = match (cfg.with_projection(), cfg.projection_dim) {
            (true, Some(dim)) => Some(vb.pp("text_projection").linear(cfg.hidden_size, dim, false)),
            (true, None) => bail!("the text encoder config names CLIPTextModelWithProjection but has no projection_dim"),
            (false, _) => None,
        };
        let vb = vb.pp("text_model");
        let layers_vb = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers).map(|i| EncoderLayer::new(layers_vb.pp(i), cfg, act)).collect();
        Ok(ClipTextModel {
            embeddings: Embeddings::new(vb.pp("embeddings"), cfg),
            layers,
            final_layer_norm: vb.pp("final_layer_norm").layer_norm(cfg.hidden_size, cfg.layer_norm_eps),
            text_projection,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// SDXL's use of an encoder (diffusers' `encode_prompt`):
    /// `hidden_states[-(clip_skip + 2)]` without the final layer norm, and
    /// with a projection the pooled output (final-normed last layer at the
    /// EOS) through it. Errs when `clip_skip` leaves no layer.
    pub fn f_encode_sdxl(&self, input_ids: &Tensor, clip_skip: usize) -> Result<SdxlTextOutput> {
        let layers = self.layers.len();
        ensure!(
            clip_skip < layers,
            "clip skip {clip_skip} is more than this text encoder allows ({}) with SDXL's penultimate layer",
            layers - 1
        );
        let keep = layers - 1 - clip_skip;
        let hidden = self.run_layers(input_ids, keep)?;
        let Some(projection) = &self.text_projection else { return Ok(SdxlTextOutput { hidden, pooled: None }) };
        let last = self.layers[keep..].iter().fold(hidden.shallow_clone(), |x, layer| layer.forward(&x));
        let pooled = projection.forward(&self.pool(&self.final_layer_norm.forward(&last), input_ids));
        Ok(SdxlTextOutput { hidden, pooled: Some(pooled) })
    }

    /// The last and penultimate hidden states and the pooled output.
    /// Panics where [`Self::f_forward`] errs.
    pub fn forward(&self, input_ids: &Tensor) -> ClipTextOutput {
        self.f_forward(input_ids).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Self::forward`]; errs on ids that are not [B, L] or are longer
    /// than the position table.
    pub fn f_forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        // With one layer the penultimate state is the embeddings, as in transformers.
        let penultimate = self.run_layers(input_ids, self.layers.len() - 1)?;
        let last = self.layers[self.layers.len() - 1].forward(&penultimate);
        let last_hidden_state = self.final_layer_norm.forward(&last);
        let pooled_output = self.pool(&last_hidden_state, input_ids);
        Ok(ClipTextOutput {
            last_hidden_state,
            penultimate_hidden_state: self.final_layer_norm.forward(&penultimate),
            pooled_output,
        })
    }

    /// The hidden state `clip_skip` layers from the end, through the final
    /// layer norm (0: last layer), as diffusers' `clip_skip` does.
    /// Panics where [`Self::f_encode`] errs.
    pub fn encode(&self, input_ids: &Tensor, clip_skip: usize) -> Tensor {
        self.f_encode(input_ids, clip_skip).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Self::encode`]; errs when `clip_skip` exceeds the layer count
    /// or the ids are longer than the position table. Skipped layers are
    /// not computed.
    pub fn f_encode(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let layers = self.layers.len();
        ensure!(
            clip_skip <= layers,
            "clip skip {clip_skip} is more than the text encoder's {layers} layers"
        );
        let hidden = self.run_layers(input_ids, layers - clip_skip)?;
        Ok(self.final_layer_norm.forward(&hidden))
    }

    /// Embeddings then the first `count` layers, without the final norm.
    /// `count` 0 gives transformers' `hidden_states[0]`, the embeddings.
    fn run_layers(&self, input_ids: &Tensor, count: usize) -> Result<Tensor> {
        let (_, _) = input_ids.size2().context("text encoder input ids must be [batch, tokens]")?;
        let ids = input_ids.f_to_kind(Kind::Int64).context("text encoder input ids must be integers")?;
        let x = self.embeddings.forward(&ids)?;
        Ok(self.layers[..count].iter().fold(x, |x, layer| layer.forward(&x)))
    }

    /// `hidden` at each sequence's EOS position, as transformers picks it:
    /// with the legacy `eos_token_id` 2 the argmax of the ids (EOS is the
    /// largest id in CLIP's vocabulary), else the first id equal to EOS.
    fn pool(&self, hidden: &Tensor, input_ids: &Tensor) -> Tensor {
        let ids = input_ids.to_kind(Kind::Int64);
        let positions = if self.eos_token_id == 2 {
            ids.argmax(-1, false)
        } else {
            // argmax returns the first maximum: the first EOS (0 when none).
            ids.eq(self.eos_token_id).to_kind(Kind::Int).argmax(-1, false)
        };
        let batch = Tensor::arange(hidden.size()[0], (Kind::Int64, hidden.device()));
        hidden.index(&[Some(batch), Some(positions)])
    }
}

/// Sizes the attention split needs, checked before anything is built.
fn check_sizes(cfg: &ClipTextConfig) -> Result<()> {
    ensure!(
        cfg.num_attention_heads > 0 && cfg.hidden_size % cfg.num_attention_heads == 0,
        "text encoder hidden_size {} is not divisible by num_attention_heads {}",
        cfg.hidden_size,
        cfg.num_attention_heads
    );
    ensure!(cfg.num_hidden_layers > 0, "text encoder num_hidden_layers must be positive");
    Ok(())
}
