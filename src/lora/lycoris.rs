//! LyCORIS adapters that are not a plain low-rank pair: LoHa (Hadamard
//! product of two low-rank products) and LoKr (Kronecker product), in
//! kohya/LyCORIS naming (`lora_unet_<path>.hada_w1_a`) and peft's
//! (`base_model.model.<path>.hada_w1_a`). Each becomes one weight delta of
//! the layer's shape, added per forward or fused; formulas as LyCORIS'
//! `lycoris/modules/{loha,lokr}.py` and peft's `tuners/{loha,lokr}/layer.py`.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::Component;
use crate::loaders::tensor_file::TensorFile;
use crate::models::layers::{Adapter, ConvConfig, LayerShape};

/// The tensor suffixes of LoHa and LoKr modules (after `<module>.`).
pub const SUFFIXES: &[&str] = &[
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
    "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
];

/// The base of a LyCORIS tensor name (`x.hada_w1_a` -> `x`), if it is one.
pub fn base_of(name: &str) -> Option<&str> {
    let (base, suffix) = name.rsplit_once('.')?;
    SUFFIXES.contains(&suffix).then_some(base)
}

/// One side of a Kronecker product: stored whole or as a low-rank product.
pub enum Part {
    Full(Tensor),
    /// `a @ b`, or with Tucker (`t` [r, r, k, k]) the einsum of t, a [r, out], b [r, in].
    Product { a: Tensor, b: Tensor, t: Option<Tensor> },
}

pub enum Factors {
    /// `(w1a @ w1b) * (w2a @ w2b)`; each product may be Tucker (t1, t2).
    Hadamard { w1: Part, w2: Part },
    /// `kron(w1, w2)`.
    Kronecker { w1: Part, w2: Part },
}

impl Factors {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Factors::Hadamard { .. } => "LoHa",
            Factors::Kronecker { .. } => "LoKr",
        }
    }

    /// The inner size of the factorised parts (LyCORIS' `lora_dim`); None for
    /// a LoKr with both sides whole.
    pub fn rank(&self) -> Option<i64> {
        let (w1, w2) = match self {
            Factors::Hadamard { w1, w2 } | Factors::Kronecker { w1, w2 } => (w1, w2),
        };
        [w1, w2].into_iter().find_map(|p| match p {
            Part::Full(_) => None,
            Part::Product { b, .. } => Some(b.size()[0]),
        })
    }

    /// The unscaled delta in fp32: [out, in * k * k] or [out, in, k, k]
    /// (fallible ops: the factors come from a user's file).
    pub fn delta(&self) -> Result<Tensor> {
        Ok(match self {
            Factors::Hadamard { w1, w2 } => hadamard_side(w1)?.f_mul(&hadamard_side(w2)?)?,
            Factors::Kronecker { w1, w2 } => {
                // kron needs contiguous inputs (a Tucker einsum's output is not).
                let (w1, w2) = (kron_side(w1)?.contiguous(), kron_side(w2)?.contiguous());
                // A 4-d w2 (conv kernel) makes w1 [a, c, 1, 1], as peft's make_kron.
                let w1 = if w2.dim() == 4 { w1.f_unsqueeze(2)?.f_unsqueeze(2)? } else { w1 };
                w1.f_kron(&w2)?
            }
        })
    }
}

fn hadamard_side(p: &Part) -> Result<Tensor> {
    Ok(match p {
        Part::Full(w) => w.shallow_clone(),
        Part::Product { a, b, t: None } => a.f_matmul(b)?,
        // LyCORIS/peft: einsum("i j k l, j r, i p -> p r k l", t, b, a).
        Part::Product { a, b, t: Some(t) } => Tensor::f_einsum("ijkl,jr,ip->prkl", &[t, b, a], None::<&[i64]>)?,
    })
}

fn kron_side(p: &Part) -> Result<Tensor> {
    Ok(match p {
        Part::Full(w) => w.shallow_clone(),
        Part::Product { a, b, t: None } => a.f_matmul(b)?,
        // peft's lokr make_weight_cp: einsum("i j k l, i p, j r -> p r k l", t, a, b).
        Part::Product { a, b, t: Some(t) } => Tensor::f_einsum("ijkl,ip,jr->prkl", &[t, a, b], None::<&[i64]>)?,
    })
}

/// One LoHa/LoKr module as the file stores it, its scale already decided
/// by the naming's own rule.
pub struct StoredLycoris {
    pub base: String,
    pub factors: Factors,
    /// The file's alpha, if any (shown by `sdtune info`).
    pub alpha: Option<f64>,
    pub scale: f64,
}

/// A LoHa/LoKr module resolved to a model layer.
pub struct LycorisModule {
    pub component: Component,
    pub layer: String,
    pub factors: Factors,
    /// alpha / rank as the file's tool means it (before the user's strength).
    pub scale: f64,
}

/// How the module's scale is found: kohya/LyCORIS files carry an alpha per
/// module; peft's carry none, its adapter_config.json holds `r` and `alpha`.
pub enum ScaleRule {
    /// LyCORIS (and A1111, ComfyUI): alpha / rank with rank the inner size of
    /// a factorised part; 1 when no alpha is stored or no part is factorised.
    Kohya,
    /// peft: alpha / r for every module.
    Peft { scale: Option<f64> },
}

/// Reads every LoHa/LoKr module of `file` (names from `names` that end in a
/// LyCORIS suffix), checking shapes that no model is needed for.
/// `scalar_alpha` reads a `.alpha` tensor as the LoRA reader does.
pub fn read_stored(
    file: &TensorFile,
    names: &[String],
    rule: &ScaleRule,
    scalar_alpha: &dyn Fn(&str) -> Result<f64>,
    source: &str,
) -> Result<Vec<StoredLycoris>> {
    let mut bases: Vec<&str> = names.iter().filter_map(|n| base_of(n)).collect();
    bases.sort();
    bases.dedup();
    let mut out = Vec::new();
    for base in bases {
        let get = |suffix: &str| -> Result<Option<Tensor>> {
            let name = format!("{base}.{suffix}");
            if file.info(&name).is_none() {
                return Ok(None);
            }
            let t = file.tensor(&name)?.to_kind(Kind::Float);
            if !crate::models::finite::all_finite(&t) {
                bail!("{source}: tensor {name} holds NaN or infinite numbers; the adapter is damaged (a diverged training run?), use another file");
            }
            Ok(Some(t))
        };
        let is_loha = SUFFIXES.iter().any(|sfx| sfx.starts_with("hada_") && file.info(&format!("{base}.{sfx}")).is_some());
        let factors = if is_loha {
            let part = |i: u8| -> Result<Part> {
                let (Some(a), Some(b)) = (get(&format!("hada_w{i}_a"))?, get(&format!("hada_w{i}_b"))?) else {
                    bail!("{source}: LoHa module {base} lacks hada_w{i}_a or hada_w{i}_b; the file is damaged");
                };
                Ok(Part::Product { a, b, t: get(&format!("hada_t{i}"))? })
            };
            Factors::Hadamard { w1: part(1)?, w2: part(2)? }
        } else {
            let part = |i: u8| -> Result<Part> {
                if let Some(w) = get(&format!("lokr_w{i}"))? {
                    return Ok(Part::Full(w));
                }
                let (Some(a), Some(b)) = (get(&format!("lokr_w{i}_a"))?, get(&format!("lokr_w{i}_b"))?) else {
                    bail!("{source}: LoKr module {base} has neither lokr_w{i} nor lokr_w{i}_a and lokr_w{i}_b; the file is damaged, or it is not a LoKr");
                };
                let t = if i == 2 { get("lokr_t2")? } else { None };
                Ok(Part::Product { a, b, t })
            };
            Factors::Kronecker { w1: part(1)?, w2: part(2)? }
        };
        check_inner_shapes(&factors, base, source)?;
        let alpha_name = format!("{base}.alpha");
        let alpha = match file.info(&alpha_name) {
            Some(_) => Some(scalar_alpha(&alpha_name)?),
            None => None,
        };
        let scale = match rule {
            ScaleRule::Kohya => match (alpha, factors.rank()) {
                // LyCORIS: an alpha of 0 means alpha = rank.
                (Some(a), Some(r)) if a != 0.0 => a / r as f64,
                _ => 1.0,
            },
            ScaleRule::Peft { scale: Some(s) } => *s,
            ScaleRule::Peft { scale: None } => bail!(
                "{source} is a peft {} adapter without its adapter_config.json beside it; its scale (alpha / r) is written only there, so put the file back next to it",
                factors.kind_name()
            ),
        };
        out.push(StoredLycoris { base: base.to_string(), factors, alpha, scale });
    }
    Ok(out)
}

/// The products must be computable: inner sizes agree, Tucker cores fit.
fn check_inner_shapes(factors: &Factors, base: &str, source: &str) -> Result<()> {
    let (w1, w2) = match factors {
        Factors::Hadamard { w1, w2 } | Factors::Kronecker { w1, w2 } => (w1, w2),
    };
    for (i, p) in [(1, w1), (2, w2)] {
        let Part::Product { a, b, t } = p else { continue };
        let (sa, sb) = (a.size(), b.size());
        let fits = match t {
            None => sa.len() == 2 && sb.len() == 2 && sa[1] == sb[0],
            Some(t) => {
                let st = t.size();
                sa.len() == 2 && sb.len() == 2 && st.len() == 4 && st[0] == sa[0] && st[1] == sb[0]
            }
        };
        if !fits || sb.iter().chain(sa.iter()).any(|&d| d == 0) {
            let core = t.as_ref().map(|t| format!(" and core {:?}", t.size())).unwrap_or_default();
            bail!("{source}: {} module {base} has w{i} factors {sa:?} and {sb:?}{core}, which do not multiply; the file is damaged", factors.kind_name());
        }
    }
    if let Factors::Hadamard { .. } = factors {
        let (s1, s2) = (product_shape(w1), product_shape(w2));
        if s1 != s2 {
            bail!("{source}: LoHa module {base} has products of shapes {s1:?} and {s2:?}; a Hadamard product needs equal shapes, the file is damaged");
        }
    }
    Ok(())
}

fn product_shape(p: &Part) -> Vec<i64> {
    match p {
        Part::Full(w) => w.size(),
        Part::Product { a, b, t: None } => vec![a.size()[0], b.size()[1]],
        Part::Product { a, b, t: Some(t) } => vec![a.size()[1], b.size()[1], t.size()[2], t.size()[3]],
    }
}

/// Torch's errors carry a backtrace; the sentence keeps their first line.
fn first_line(e: &anyhow::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// The shape `Factors::delta` will have, from the factors' shapes alone
/// (checking a file against a model multiplies nothing out).
pub fn delta_shape(factors: &Factors) -> Vec<i64> {
    match factors {
        Factors::Hadamard { w1, .. } => product_shape(w1),
        Factors::Kronecker { w1, w2 } => {
            let (mut s1, s2) = (product_shape(w1), product_shape(w2));
            // As in `delta`: a 4-d w2 makes w1 [a, c, 1, 1].
            while s1.len() < s2.len() {
                s1.push(1);
            }
            s1.iter().zip(&s2).map(|(a, b)| a * b).collect()
        }
    }
}

/// One sentence naming the module and the file when its delta does not fit
/// the layer's weight.
pub fn check_fits_layer(m: &LycorisModule, shape: LayerShape, weight_size: &[i64], source: &str) -> Result<()> {
    let (want_out, want_in, kernel) = match shape {
        LayerShape::Linear { in_features, out_features } => (out_features, in_features, 1),
        LayerShape::Conv2d { in_channels, out_channels, kernel } => (out_channels, in_channels, kernel),
    };
    let got = delta_shape(&m.factors);
    let fits = got[0] == want_out
        && got.iter().product::<i64>() == want_out * want_in * kernel * kernel
        && (got.len() != 4 || (got[2] == kernel && got[3] == kernel));
    if !fits {
        bail!(
            "{source}: {} module for {} layer {} makes a {got:?} weight change but the layer's weight is {weight_size:?}; the adapter was trained for a different base model",
            m.factors.kind_name(),
            m.component.name(),
            m.layer
        );
    }
    Ok(())
}

/// The scaled delta in the layer weight's shape, or one sentence naming the
/// module and the file when it does not fit the layer.
pub fn delta_for(m: &LycorisModule, shape: LayerShape, weight_size: &[i64], source: &str) -> Result<Tensor> {
    check_fits_layer(m, shape, weight_size, source)?;
    let delta = tch::no_grad(|| m.factors.delta()).map_err(|e| {
        anyhow::anyhow!("{source}: {} module for {} could not be multiplied out ({}); the file is damaged", m.factors.kind_name(), m.layer, first_line(&e))
    })?;
    Ok(delta.f_reshape(weight_size)? * m.scale)
}

/// A fixed weight change applied per forward: `x W_delta^T` or a conv with
/// the layer's own stride and padding.
pub struct WeightDeltaAdapter {
    pub delta: Tensor,
    pub conv: Option<ConvConfig>,
}

impl Adapter for WeightDeltaAdapter {
    fn delta(&self, x: &Tensor) -> Tensor {
        let w = if self.delta.kind() == x.kind() { self.delta.shallow_clone() } else { self.delta.to_kind(x.kind()) };
        match self.conv {
            Some(c) => x.conv2d(&w, None::<&Tensor>, [c.stride, c.stride], [c.padding, c.padding], [1, 1], 1),
            None => x.linear(&w, None::<&Tensor>),
        }
    }
}
