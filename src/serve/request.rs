//! `POST /v1/images`: the JSON a request sends, checked into an [`Order`]
//! the worker renders. Every refusal is one sentence naming the field.
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::adapters::{Adapter, Registry};
use super::limits::Limits;
use super::rejection::Rejection;
use crate::ranges;
use crate::sample::session;
use crate::sample::settings::Settings;
use crate::schedulers::SchedulerKind;

/// What a client asks for; every field but `prompt` has a default
/// (`sdtune sample`'s: seed 42, 30 DDIM steps, guidance 7.5, the model's size).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub adapters: Vec<AdapterChoice>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Several images: these seeds (or `count` seeds from `seed` on).
    #[serde(default)]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub count: Option<usize>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub guidance: Option<f64>,
    #[serde(default)]
    pub width: Option<i64>,
    #[serde(default)]
    pub height: Option<i64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub clip_skip: Option<usize>,
    /// The training run's adapter whose brand set the grid is measured
    /// against [default: each run adapter of the request].
    #[serde(default)]
    pub brand: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterChoice {
    pub name: String,
    #[serde(default = "full_strength")]
    pub scale: f64,
}

fn full_strength() -> f64 {
    1.0
}

/// A checked request: what the worker renders.
#[derive(Clone, Debug)]
pub struct Order {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seeds: Vec<u64>,
    /// Each adapter with its strength, in the order given.
    pub adapters: Vec<(Adapter, f64)>,
    /// The render's own settings (steps, guidance, size, scheduler, clip
    /// skip); a size of 0 is the model's native size.
    pub settings: Settings,
    /// The run adapters whose brand sets the images are measured against.
    pub brand_of: Vec<Adapter>,
    /// `brand_of` was asked for by name (so a missing brand set is said).
    pub brand_named: bool,
    /// Legal but unusual values (a very high guidance), said back to the client.
    pub warnings: Vec<String>,
}

/// `body` as JSON of type `T`, or a 400 saying what is wrong with it.
pub fn parse_json<T: DeserializeOwned>(body: &[u8], example: &str) -> Result<T, Rejection> {
    serde_json::from_slice(body).map_err(|e| {
        Rejection::bad(format!("the request body is not the JSON this route takes ({e}); send an object such as {example}"))
    })
}

pub const EXAMPLE: &str = r#"{"prompt": "acme mug on a desk", "adapters": [{"name": "acme", "scale": 0.8}], "seed": 1}"#;

/// Checks `req` against the adapter listing and the server's limits.
pub fn check(req: ImagesRequest, registry: &Registry, limits: &Limits) -> Result<Order, Rejection> {
    let mut warnings = Vec::new();
    let mut note = |w: Option<String>| warnings.extend(w.map(|w| w.trim_start_matches("warning: ").to_string()));
    if req.prompt.trim().is_empty() {
        return Err(Rejection::bad("prompt is empty; say what to render, e.g. {\"prompt\": \"acme mug on a desk\"}"));
    }
    for (field, text) in [("prompt", Some(&req.prompt)), ("negative_prompt", req.negative_prompt.as_ref())] {
        if text.is_some_and(|t| t.chars().count() > limits.max_prompt_chars) {
            return Err(Rejection::bad(format!("{field} is longer than this server's {} characters; shorten it", limits.max_prompt_chars)));
        }
    }
    let seeds = seeds(&req, limits)?;
    let steps = req.steps.unwrap_or(30);
    if steps == 0 || steps > limits.max_steps {
        return Err(Rejection::bad(format!("steps {steps} is out of range; this server renders 1 to {} steps (30 is usual)", limits.max_steps)));
    }
    let guidance = req.guidance.unwrap_or(7.5);
    note(ranges::check_guidance(guidance, "guidance").map_err(|e| Rejection::bad(e.to_string()))?);
    let side = |value: Option<i64>, field: &str| -> Result<i64, Rejection> {
        match value {
            None | Some(0) => Ok(0),
            Some(px) if px < 0 || px % 8 != 0 => {
                Err(Rejection::bad(format!("{field} {px} is not a size sdtune can render; use a positive multiple of 8, or leave it out for the model's own size")))
            }
            Some(px) if px > limits.max_side => Err(Rejection::bad(format!(
                "{field} {px} is over this server's limit of {} pixels; ask for at most {}, or start the server with a larger --max-side",
                limits.max_side, limits.max_side
            ))),
            Some(px) => Ok(px),
        }
    };
    let (width, height) = (side(req.width, "width")?, side(req.height, "height")?);
    let scheduler = match &req.scheduler {
        None => SchedulerKind::Ddim,
        Some(name) => SchedulerKind::parse(name).map_err(|e| Rejection::bad(e.to_string()))?,
    };
    let clip_skip = req.clip_skip.unwrap_or(0);
    if clip_skip >= limits.text_layers {
        return Err(Rejection::bad(format!(
            "clip_skip {clip_skip} skips every layer of this model's text encoder, which has {}; use 0 to {}",
            limits.text_layers,
            limits.text_layers.saturating_sub(1)
        )));
    }
    let mut adapters = Vec::with_capacity(req.adapters.len());
    for choice in &req.adapters {
        let adapter = registry.find(&choice.name).map_err(Rejection::bad)?;
        note(ranges::check_lora_scale(choice.scale, &format!("adapter {}", choice.name)).map_err(|e| Rejection::bad(e.to_string()))?);
        adapters.push((adapter, choice.scale));
    }
    let brand_of = brand_sets(req.brand.as_deref(), &adapters, registry)?;
    let mut settings = session::default_settings();
    settings.steps = steps;
    settings.guidance = guidance;
    settings.width = width;
    settings.height = height;
    settings.scheduler = scheduler.name().into();
    settings.clip_skip = clip_skip;
    let brand_named = req.brand.is_some();
    Ok(Order { prompt: req.prompt, negative_prompt: req.negative_prompt, seeds, adapters, settings, brand_of, brand_named, warnings })
}

/// The adapter `named`, which must come from a training run, else every
/// run adapter of the request (each once).
fn brand_sets(named: Option<&str>, adapters: &[(Adapter, f64)], registry: &Registry) -> Result<Vec<Adapter>, Rejection> {
    let Some(name) = named else {
        let mut runs: Vec<Adapter> = Vec::new();
        for (a, _) in adapters.iter().filter(|(a, _)| a.run_dir().is_some()) {
            if !runs.iter().any(|r| r.name == a.name) {
                runs.push(a.clone());
            }
        }
        return Ok(runs);
    };
    let adapter = registry.find(name).map_err(|e| Rejection::bad(format!("brand: {e}")))?;
    if adapter.run_dir().is_none() {
        return Err(Rejection::bad(format!(
            "brand {name:?} is a file in the adapter folder, not a training run's LoRA, so no brand set is known for it; name a run's adapter (source \"run\" in GET /v1/adapters) or leave brand out"
        )));
    }
    Ok(vec![adapter])
}

/// `seeds`, else `count` seeds from `seed` (42) on; each once, at most the limit.
fn seeds(req: &ImagesRequest, limits: &Limits) -> Result<Vec<u64>, Rejection> {
    let max = limits.max_images;
    if !req.seeds.is_empty() {
        if req.count.is_some() || req.seed.is_some() {
            return Err(Rejection::bad("seeds lists every seed; leave out seed and count beside it"));
        }
        if req.seeds.len() > max {
            return Err(Rejection::bad(format!("seeds lists {} images; this server renders at most {max} a request", req.seeds.len())));
        }
        for (i, s) in req.seeds.iter().enumerate() {
            if req.seeds[..i].contains(s) {
                return Err(Rejection::bad(format!("seeds lists {s} twice; the same seed gives the same image, so list each once")));
            }
        }
        return Ok(req.seeds.clone());
    }
    let count = req.count.unwrap_or(1);
    if count == 0 || count > max {
        return Err(Rejection::bad(format!("count {count} is out of range; this server renders 1 to {max} images a request")));
    }
    let first = req.seed.unwrap_or(42);
    if first.checked_add(count as u64 - 1).is_none() {
        return Err(Rejection::bad(format!("seed {first} with count {count} runs past the largest seed; start from a smaller seed")));
    }
    Ok((first..first + count as u64).collect())
}
