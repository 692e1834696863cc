//! The settings a PNG carries, so it can be rendered again.
//!
//! Two text chunks: `parameters`, in the form AUTOMATIC1111's web UI writes
//! and reads (its "PNG Info" tab, civitai and most tools show it), and
//! `sdtune`, JSON holding what A1111's form loses: the exact scheduler
//! name, the model and LoRA paths with their strengths, precision, fuse,
//! and the batch an image was rendered in (batched images differ from
//! single ones in the last float bits; `--from` renders the same batch to
//! reproduce the image bit for bit).
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::schedulers::SchedulerKind;

/// The PNG text keyword of A1111's settings line.
pub const PARAMETERS_KEY: &str = "parameters";
/// The PNG text keyword of sdtune's JSON.
pub const SDTUNE_KEY: &str = "sdtune";

/// A LoRA as applied to an image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraUse {
    /// File stem, as A1111 names LoRAs.
    pub name: String,
    pub path: String,
    pub scale: f64,
    /// A1111's short LoRA hash: 12 hex digits of [`lora_hash`].
    pub hash: String,
}

/// What every image of one render shares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub steps: usize,
    pub guidance: f64,
    pub width: i64,
    pub height: i64,
    /// sdtune's `--scheduler` name.
    pub scheduler: String,
    pub clip_skip: usize,
    /// The model as loaded (an absolute path where it is a local one).
    pub model: String,
    /// A1111's short model hash: 10 hex digits of [`model_hash`].
    pub model_hash: String,
    /// Weight variant of a diffusers folder (`fp16`), when one was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// `--vae`, when another VAE replaced the model's (an absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    /// `--prediction-type`, when it overrode the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<String>,
    pub loras: Vec<LoraUse>,
    /// LoRAs were fused into the weights (changes the last bits).
    pub fuse: bool,
    /// `--vae-tiling`: decoded tile by tile (changes pixels near tile seams).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vae_tiling: bool,
    pub precision: String,
    /// Where it was rendered (a seed gives the same image elsewhere up to precision).
    pub device: String,
    /// SDXL's `--original-size` / `--crop` / `--target-size`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_conditioning: Option<crate::sample::pipeline::SizeConditioning>,
}

/// One image of a batch: what differs between batch-mates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    pub seed: u64,
}

/// The batch an image went through the UNet with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// This image's place in `members`.
    pub index: usize,
    pub members: Vec<Member>,
}

/// A single image's recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageRecipe {
    #[serde(flatten)]
    pub member: Member,
    #[serde(flatten)]
    pub settings: Settings,
    /// Present when the image was rendered in a batch of more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
}

/// A grid's recipe: rows are prompts, columns seeds (times compare strengths).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GridRecipe {
    pub prompts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    pub seeds: Vec<u64>,
    /// LoRA strength multipliers laid beside the base model; empty: no comparison.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compare: Vec<f64>,
    pub batch_size: usize,
    #[serde(flatten)]
    pub settings: Settings,
}

/// The `sdtune` chunk: an image or a whole grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Recipe {
    Image(ImageRecipe),
    Grid(GridRecipe),
}

#[derive(Serialize, Deserialize)]
struct Chunk {
    /// The sdtune version that wrote it.
    sdtune: String,
    #[serde(flatten)]
    recipe: Recipe,
}

impl Recipe {
    /// The `sdtune` chunk's text: JSON with non-ASCII escaped, so it always
    /// fits a plain tEXt chunk.
    pub fn to_json(&self) -> String {
        let chunk = Chunk { sdtune: env!("CARGO_PKG_VERSION").into(), recipe: self.clone() };
        ascii_json(&serde_json::to_string(&chunk).expect("recipes serialize"))
    }

    pub fn from_json(text: &str, source: &Path) -> Result<Self> {
        let chunk: Chunk = serde_json::from_str(text).with_context(|| {
            format!("the sdtune settings in {} cannot be read; it was written by another sdtune version or edited", source.display())
        })?;
        Ok(chunk.recipe)
    }
}

/// JSON text with every non-ASCII character written as `\uXXXX` (they can
/// only occur inside strings, where that escape means the same).
fn ascii_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// A1111's sampler name and schedule type for a scheduler.
pub fn a1111_sampler(kind: SchedulerKind) -> (&'static str, &'static str) {
    match kind {
        SchedulerKind::Ddim => ("DDIM", "Automatic"),
        SchedulerKind::Euler => ("Euler", "Automatic"),
        SchedulerKind::EulerAncestral => ("Euler a", "Automatic"),
        SchedulerKind::DpmPp2m => ("DPM++ 2M", "Automatic"),
        SchedulerKind::DpmPp2mKarras => ("DPM++ 2M", "Karras"),
        SchedulerKind::Heun => ("Heun", "Automatic"),
        SchedulerKind::Lms => ("LMS", "Automatic"),
        SchedulerKind::Pndm => ("PLMS", "Automatic"),
    }
}

/// The scheduler an A1111 sampler name (and schedule type) stands for.
pub fn scheduler_from_a1111(sampler: &str, schedule: Option<&str>) -> Option<SchedulerKind> {
    let karras = schedule == Some("Karras") || sampler.ends_with(" Karras");
    let base = sampler.trim_end_matches(" Karras");
    Some(match (base, karras) {
        ("DDIM", _) => SchedulerKind::Ddim,
        ("Euler", false) => SchedulerKind::Euler,
        ("Euler a", false) => SchedulerKind::EulerAncestral,
        ("DPM++ 2M", false) => SchedulerKind::DpmPp2m,
        ("DPM++ 2M", true) => SchedulerKind::DpmPp2mKarras,
        ("Heun", false) => SchedulerKind::Heun,
        ("LMS", false) => SchedulerKind::Lms,
        ("PLMS", _) => SchedulerKind::Pndm,
        _ => return None,
    })
}

/// A float as Python's `str` writes it (7.5, 7.0), as A1111's text has it.
fn py_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// A value quoted as A1111's `infotext_utils.quote` does: JSON-quoted when
/// it holds a comma, colon or newline.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).expect("strings serialize")
    } else {
        v.to_string()
    }
}

/// The model's display name: the folder or file name without extension.
pub fn model_name(model: &str) -> String {
    let p = Path::new(model);
    let name = if p.extension().is_some_and(|e| e == "safetensors" || e == "ckpt") { p.file_stem() } else { p.file_name() };
    name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| model.to_string())
}

impl ImageRecipe {
    /// The `parameters` text, keys in A1111's order:
    /// `PROMPT\nNegative prompt: NEG\nSteps: 20, Sampler: DDIM, Schedule type: Automatic,
    /// CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: .., Model: .., Clip skip: 2,
    /// Lora hashes: "name: hash", Version: sdtune 0.1.0`.
    pub fn to_parameters(&self) -> Result<String> {
        let s = &self.settings;
        let (sampler, schedule) = a1111_sampler(SchedulerKind::parse(&s.scheduler)?);
        let mut fields: Vec<(&str, String)> = vec![
            ("Steps", s.steps.to_string()),
            ("Sampler", sampler.into()),
            ("Schedule type", schedule.into()),
            ("CFG scale", py_float(s.guidance)),
            ("Seed", self.member.seed.to_string()),
            ("Size", format!("{}x{}", s.width, s.height)),
            ("Model hash", s.model_hash.clone()),
            ("Model", model_name(&s.model)),
        ];
        if let Some(vae) = &s.vae {
            fields.push(("VAE", model_name(vae)));
        }
        // A1111 counts the last layer as clip skip 1 and writes it only above 1.
        if s.clip_skip > 0 {
            fields.push(("Clip skip", (s.clip_skip + 1).to_string()));
        }
        if !s.loras.is_empty() {
            let hashes: Vec<String> =
                s.loras.iter().map(|l| format!("{}: {}", l.name.replace([':', ','], ""), l.hash)).collect();
            fields.push(("Lora hashes", hashes.join(", ")));
        }
        fields.push(("Version", format!("sdtune {}", env!("CARGO_PKG_VERSION"))));
        let line: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect();
        let negative = match self.member.negative_prompt.as_deref() {
            Some(n) if !n.is_empty() => format!("\nNegative prompt: {n}"),
            _ => String::new(),
        };
        // A1111 applies a LoRA through a `<lora:NAME:SCALE>` tag in the prompt.
        let tags: String = s.loras.iter().map(|l| format!(" <lora:{}:{}>", l.name, py_float(l.scale))).collect();
        Ok(format!("{}{tags}{negative}\n{}", self.member.prompt, line.join(", ")).trim().to_string())
    }

    /// The PNG text chunks of this image.
    pub fn text_chunks(&self) -> Result<Vec<(String, String)>> {
        Ok(vec![
            (PARAMETERS_KEY.into(), self.to_parameters()?),
            (SDTUNE_KEY.into(), Recipe::Image(self.clone()).to_json()),
        ])
    }
}

/// What an A1111 `parameters` text says; the model and LoRAs it names by
/// hash only, so they come from the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub scheduler: SchedulerKind,
    pub guidance: f64,
    pub seed: u64,
    pub width: i64,
    pub height: i64,
    pub clip_skip: usize,
    pub model_hash: Option<String>,
    pub lora_hashes: Option<String>,
    /// The prompt's `<lora:NAME:SCALE>` tags (taken out of `prompt`).
    pub lora_tags: Vec<String>,
}

/// Splits A1111's `<lora:NAME:SCALE>` (and `<lyco:..>`) tags off a prompt:
/// they choose LoRAs, they are not text for the text encoder.
pub fn split_lora_tags(prompt: &str) -> (String, Vec<String>) {
    let re = regex::Regex::new(r"<(?:lora|lyco):([^>]+)>").expect("valid regex");
    let tags: Vec<String> = re.captures_iter(prompt).map(|c| c[1].to_string()).collect();
    if tags.is_empty() {
        return (prompt.to_string(), tags);
    }
    let text = re.replace_all(prompt, "");
    (text.split(' ').filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ").trim().to_string(), tags)
}

/// Parses A1111's `parameters` text (as its `parse_generation_parameters`:
/// the last line holds `Key: value` pairs, a line starting `Negative prompt:`
/// begins the negative prompt, the lines before it are the prompt).
pub fn parse_parameters(text: &str, source: &Path) -> Result<Parameters> {
    let mut lines: Vec<&str> = text.trim().lines().collect();
    let last = lines.pop().unwrap_or("");
    if !last.contains("Steps:") {
        bail!("{} holds a parameters text without a `Steps:` line; it was not written by A1111 or sdtune", source.display());
    }
    let (mut prompt, mut negative, mut in_negative) = (Vec::new(), Vec::new(), false);
    for line in lines {
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative.push(rest.trim_start());
        } else if in_negative {
            negative.push(line);
        } else {
            prompt.push(line);
        }
    }
    let fields = parse_fields(last);
    let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let need = |k: &str| get(k).with_context(|| format!("{} has no `{k}` in its parameters", source.display()));
    let number = |k: &str| -> Result<f64> {
        need(k)?.trim().parse::<f64>().with_context(|| format!("{}: `{k}` in its parameters is not a number", source.display()))
    };
    let sampler = need("Sampler")?;
    let Some(scheduler) = scheduler_from_a1111(sampler, get("Schedule type")) else {
        bail!("{} was made with the sampler {sampler:?}, which sdtune does not have; sdtune has DDIM, Euler, Euler a, DPM++ 2M (Karras), Heun, LMS and PLMS", source.display());
    };
    let size = need("Size")?;
    let Some((w, h)) = size.split_once('x').and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?))) else {
        bail!("{}: `Size: {size}` in its parameters is not WIDTHxHEIGHT", source.display());
    };
    let negative = negative.join("\n");
    let (prompt, lora_tags) = split_lora_tags(&prompt.join("\n"));
    Ok(Parameters {
        prompt,
        lora_tags,
        negative_prompt: (!negative.is_empty()).then_some(negative),
        steps: number("Steps")? as usize,
        scheduler,
        guidance: number("CFG scale")?,
        seed: number("Seed")? as u64,
        width: w,
        height: h,
        clip_skip: get("Clip skip").and_then(|v| v.trim().parse::<usize>().ok()).map_or(0, |n| n.saturating_sub(1)),
        model_hash: get("Model hash").map(str::to_string),
        lora_hashes: get("Lora hashes").map(str::to_string),
    })
}

/// `Key: value, Key: "quoted, value"` pairs, values unquoted.
fn parse_fields(line: &str) -> Vec<(String, String)> {
    let re = regex::Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#).expect("valid regex");
    re.captures_iter(line)
        .map(|c| {
            let value = &c[2];
            let value = if value.starts_with('"') {
                serde_json::from_str::<String>(value).unwrap_or_else(|_| value.trim_matches('"').to_string())
            } else {
                value.to_string()
            };
            (c[1].to_string(), value)
        })
        .collect()
}

/// What a PNG's text chunks hold.
pub enum Found {
    Recipe(Recipe),
    Parameters(Parameters),
}

/// Reads the settings of a PNG written by sdtune (or by A1111).
pub fn read_png(path: &Path) -> Result<Found> {
    if !path.is_file() {
        bail!("--from {} {}; give a PNG written by `sdtune sample`", path.display(), crate::fsutil::why_not_a_file(path));
    }
    let texts = crate::sample::image_out::read_png_text(path)?;
    let text = |key: &str| texts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    if let Some(json) = text(SDTUNE_KEY) {
        return Ok(Found::Recipe(Recipe::from_json(json, path)?));
    }
    match text(PARAMETERS_KEY) {
        Some(p) => Ok(Found::Parameters(parse_parameters(p, path)?)),
        None => bail!(
            "{} carries no generation settings (no `parameters` text chunk); give a PNG written by `sdtune sample` or A1111, not one re-saved by an editor",
            path.display()
        ),
    }
}

/// sha256 (hex) of everything `reader` yields.
fn sha256_of(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::data::decode::hex(&hasher.finalize()))
}

/// How a recipe names the model `spec` so that `--from` finds it again:
/// the built-in model by its name (its cache folder differs per machine),
/// a local path made absolute, anything else (a Hub id) as given.
pub fn recorded_model(spec: &str) -> String {
    let local = Path::new(spec);
    if crate::loaders::builtin::is_builtin(spec) {
        crate::loaders::builtin::SPEC.to_string()
    } else if local.exists() {
        std::fs::canonicalize(local).map_or(spec.to_string(), |p| p.display().to_string())
    } else {
        spec.to_string()
    }
}

/// The model hash: sha256 of the weights file for a single-file checkpoint
/// (A1111's own model hash), else of the UNet's weight files in order (a
/// diffusers folder has no one file; the UNet is the part that tells models
/// apart). A1111 shows the first 10 hex digits.
pub fn model_hash(model: &Path, variant: Option<&str>) -> Result<String> {
    let files = if model.is_file() {
        vec![model.to_path_buf()]
    } else {
        crate::loaders::weights::component_weights(&model.join("unet"), "diffusion_pytorch_model", variant)?
    };
    let hashes = files.iter().map(|f| file_sha256(f)).collect::<Result<Vec<_>>>()?;
    let full = match hashes.as_slice() {
        [one] => one.clone(),
        many => crate::data::decode::hex(&Sha256::digest(many.concat().as_bytes())),
    };
    Ok(full[..10].to_string())
}

/// The model hash of a model rendered with another VAE (`--vae`): the model's
/// hash and the VAE's weight files hashed together, so images made with and
/// without it do not claim the same model.
pub fn with_vae(model_hash: &str, vae: &Path) -> Result<String> {
    let files = if vae.is_file() {
        vec![vae.to_path_buf()]
    } else {
        crate::loaders::weights::component_weights(vae, "diffusion_pytorch_model", None)?
    };
    let mut all = model_hash.to_string();
    for f in &files {
        all.push_str(&file_sha256(f)?);
    }
    Ok(crate::data::decode::hex(&Sha256::digest(all.as_bytes()))[..10].to_string())
}

fn file_sha256(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    sha256_of(file).with_context(|| format!("cannot read {}", path.display()))
}

/// A1111's LoRA hash: sha256 of a .safetensors file after its header (the
/// "addnet" hash, unchanged by metadata edits), of the whole file otherwise;
/// the first 12 hex digits.
pub fn lora_hash(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "safetensors") {
        let mut len = [0u8; 8];
        file.read_exact(&mut len).with_context(|| format!("{} is too short to be a safetensors file", path.display()))?;
        let header = u64::from_le_bytes(len);
        std::io::copy(&mut (&mut file).take(header), &mut std::io::sink())
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(sha256_of(file).with_context(|| format!("cannot read {}", path.display()))?[..12].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> ImageRecipe {
        ImageRecipe {
            member: Member { prompt: "a red car, studio".into(), negative_prompt: Some("blurry".into()), seed: 42 },
            settings: Settings {
                steps: 20,
                guidance: 7.0,
                width: 512,
                height: 768,
                scheduler: "dpmpp_2m_karras".into(),
                clip_skip: 1,
                model: "/models/sd15".into(),
                model_hash: "0123456789".into(),
                vae: None,
                variant: None,
                prediction_type: Some("v".into()),
                loras: vec![LoraUse { name: "acme".into(), path: "/l/acme.safetensors".into(), scale: 0.8, hash: "abcdefabcdef".into() }],
                fuse: false,
                vae_tiling: false,
                precision: "fp32".into(),
                device: "cpu".into(),
                size_conditioning: None,
            },
            batch: None,
        }
    }

    #[test]
    fn parameters_follow_a1111() {
        let text = recipe().to_parameters().unwrap();
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            text,
            format!("a red car, studio <lora:acme:0.8>\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 512x768, Model hash: 0123456789, Model: sd15, Clip skip: 2, Lora hashes: \"acme: abcdefabcdef\", Version: sdtune {version}")
        );
        let back = parse_parameters(&text, Path::new("x.png")).unwrap();
        assert_eq!(back.prompt, "a red car, studio");
        assert_eq!(back.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!((back.steps, back.seed, back.width, back.height, back.clip_skip), (20, 42, 512, 768, 1));
        assert_eq!(back.scheduler, SchedulerKind::DpmPp2mKarras);
        assert_eq!(back.guidance, 7.0);
        assert_eq!(back.lora_hashes.as_deref(), Some("acme: abcdefabcdef"));
        assert_eq!(back.lora_tags, vec!["acme:0.8".to_string()]);
    }

    #[test]
    fn recipe_json_round_trips_and_is_ascii() {
        let mut r = recipe();
        r.member.prompt = "café ☕ 🚗".into();
        r.batch = Some(Batch { index: 1, members: vec![r.member.clone(), r.member.clone()] });
        let json = Recipe::Image(r.clone()).to_json();
        assert!(json.is_ascii(), "{json}");
        assert_eq!(Recipe::from_json(&json, Path::new("x")).unwrap(), Recipe::Image(r));
    }

    #[test]
    fn every_scheduler_maps_to_a1111_and_back() {
        for &k in SchedulerKind::ALL {
            let (sampler, schedule) = a1111_sampler(k);
            assert_eq!(scheduler_from_a1111(sampler, Some(schedule)), Some(k), "{k:?}");
        }
        assert_eq!(scheduler_from_a1111("DPM++ 2M Karras", None), Some(SchedulerKind::DpmPp2mKarras));
        assert_eq!(scheduler_from_a1111("UniPC", None), None);
    }

    #[test]
    fn a_parameters_text_without_steps_is_refused() {
        let err = parse_parameters("just a caption", Path::new("x.png")).unwrap_err().to_string();
        assert!(err.contains("x.png"), "{err}");
    }
}
