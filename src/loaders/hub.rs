//! Hugging Face Hub ids (`org/name`): found in the local Hugging Face cache
//! the way diffusers and huggingface_hub lay it out, downloaded into it with
//! the `hf-hub` crate when missing and the machine is online.
//!
//! Cache layout (huggingface_hub's): `<cache>/models--org--name/refs/main`
//! holds a commit hash, `snapshots/<hash>/` holds the files (links into
//! `blobs/`). `<cache>` is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A Hub model id with an optional revision (`org/name`, `org/name@rev`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub id: String,
    pub revision: Option<String>,
}

impl HubId {
    /// `org/name` or `org/name@revision`; `None` when `value` does not look like one.
    pub fn parse(value: &str) -> Option<HubId> {
        let (id, revision) = match value.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, Some(rev.to_string())),
            Some(_) => return None,
            None => (value, None),
        };
        let (org, name) = id.split_once('/')?;
        let part_ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with(['.', '-'])
                && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !part_ok(org) || !part_ok(name) || name.ends_with(".safetensors") {
            return None;
        }
        Some(HubId { id: id.to_string(), revision })
    }

    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// `models--org--name`, the repository's folder in the cache.
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.id.replace('/', "--"))
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(rev) => write!(f, "{}@{rev}", self.id),
            None => f.write_str(&self.id),
        }
    }
}

/// The hub cache folder from the environment, as huggingface_hub picks it.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(&|key| std::env::var(key).ok().filter(|v| !v.is_empty()))
}

/// [`cache_dir`] with the environment given as a lookup (for tests).
pub fn cache_dir_from(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(dir) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return PathBuf::from(dir);
    }
    if let Some(home) = env("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let cache = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) says not to use the network.
pub fn offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|k| {
        std::env::var(k)
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false)
    })
}

/// The snapshot folder of `id` in `cache`, if that revision is there.
pub fn cached_snapshot(cache: &Path, id: &HubId) -> Option<PathBuf> {
    snapshot_of_repo_dir(&cache.join(id.folder_name()), id.revision())
}

/// The snapshot of `revision` inside a cache repository folder
/// (`models--org--name`): through `refs/<revision>`, or the revision itself
/// when it is a commit hash.
pub fn snapshot_of_repo_dir(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let snapshots = repo_dir.join("snapshots");
    if let Ok(hash) = std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        let dir = snapshots.join(hash.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let direct = snapshots.join(revision);
    if revision.len() >= 7 && revision.chars().all(|c| c.is_ascii_hexdigit()) && direct.is_dir() {
        return Some(direct);
    }
    None
}

/// True for a cache repository folder (`models--org--name` with `snapshots/`).
pub fn is_repo_dir(dir: &Path) -> bool {
    dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("models--"))
        && dir.join("snapshots").is_dir()
}

/// The local folder of a diffusers model on the Hub: the cached snapshot, or
/// (online) a fresh download of its configs, tokenizer and the weights of
/// `variant` (else the default ones) into the cache.
pub fn resolve_model(id: &HubId, variant: Option<&str>) -> Result<PathBuf> {
    let cache = cache_dir();
    if let Some(dir) = cached_snapshot(&cache, id) {
        if dir.join("model_index.json").is_file() {
            return Ok(dir);
        }
    }
    if offline() {
        bail!("{}", not_cached_sentence(id, &cache, "HF_HUB_OFFLINE is set"));
    }
    download_model(id, variant, &cache).map_err(|e| {
        anyhow::anyhow!("{} ({})", not_cached_sentence(id, &cache, "downloading it from the Hub failed"), crate::errors::one_sentence(&e))
    })
}

/// One sentence: what is missing, where we looked, how to get it.
pub fn not_cached_sentence(id: &HubId, cache: &Path, why: &str) -> String {
    let rev = id.revision.as_ref().map(|r| format!(" --revision {r}")).unwrap_or_default();
    format!(
        "{id} is not in the Hugging Face cache ({}) and {why}; fetch it on a machine with network access with `huggingface-cli download {}{rev}` (or diffusers' from_pretrained) into that cache, or pass --model a local folder or .safetensors file",
        cache.join(id.folder_name()).display(),
        id.id
    )
}

/// Files of a diffusers pipeline repository worth downloading: configs,
/// tokenizers (SDXL's `tokenizer_2/` too), and for each component (SDXL's
/// `text_encoder_2/` too) the weights of `variant` if it has them, else the
/// default ones (never pickles, never other frameworks').
pub fn select_files(files: &[String], variant: Option<&str>) -> Vec<String> {
    let mut picked: Vec<String> = files
        .iter()
        .filter(|f| {
            f.as_str() == "model_index.json"
                || f.ends_with("/config.json")
                || f.ends_with("scheduler_config.json")
                || ((f.starts_with("tokenizer/") || f.starts_with("tokenizer_2/"))
                    && (f.ends_with(".json") || f.ends_with(".txt")))
        })
        .cloned()
        .collect();
    for (component, stem) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
    ] {
        // (single file, index names, shard base) in order of preference.
        let mut candidates: Vec<(String, Vec<String>, String)> = Vec::new();
        if let Some(v) = variant {
            candidates.push((
                format!("{component}/{stem}.{v}.safetensors"),
                vec![
                    format!("{component}/{stem}.safetensors.index.{v}.json"),
                    format!("{component}/{stem}.{v}.safetensors.index.json"),
                ],
                format!("{stem}.{v}"),
            ));
        }
        candidates.push((
            format!("{component}/{stem}.safetensors"),
            vec![format!("{component}/{stem}.safetensors.index.json")],
            stem.to_string(),
        ));
        for (name, indexes, base) in candidates {
            if files.contains(&name) {
                picked.push(name);
                break;
            }
            if let Some(index) = indexes.into_iter().find(|i| files.contains(i)) {
                picked.push(index);
                picked.extend(files.iter().filter(|f| is_shard_of(f, component, &base)).cloned());
                break;
            }
        }
    }
    picked.sort();
    picked.dedup();
    picked
}

fn is_shard_of(file: &str, component: &str, base: &str) -> bool {
    let Some(name) = file.strip_prefix(component).and_then(|f| f.strip_prefix('/')) else {
        return false;
    };
    let Some(rest) = name.strip_suffix(".safetensors") else { return false };
    // diffusers writes `<stem>-00001-of-00002.safetensors` and, for variants,
    // `<stem>.fp16-00001-of-00002.safetensors`.
    rest.strip_prefix(base).is_some_and(|r| r.starts_with('-') && r.contains("-of-"))
}

fn api(cache: &Path) -> Result<hf_hub::api::sync::Api> {
    hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(true)
        .build()
        .context("cannot set up the Hugging Face Hub client")
}

fn repo(api: &hf_hub::api::sync::Api, id: &HubId) -> hf_hub::api::sync::ApiRepo {
    api.repo(hf_hub::Repo::with_revision(id.id.clone(), hf_hub::RepoType::Model, id.revision().to_string()))
}

fn download_model(id: &HubId, variant: Option<&str>, cache: &Path) -> Result<PathBuf> {
    let api = api(cache)?;
    let repo = repo(&api, id);
    let info = repo.info().with_context(|| format!("cannot list the files of {id}"))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    if !files.iter().any(|f| f == "model_index.json") {
        bail!("{id} on the Hub is not a diffusers pipeline (no model_index.json)");
    }
    let mut index = None;
    eprintln!("downloading {id} into {}", cache.display());
    for file in select_files(&files, variant) {
        let path = repo.get(&file).with_context(|| format!("cannot download {file} of {id}"))?;
        if file == "model_index.json" {
            index = Some(path);
        }
    }
    let index = index.context("model_index.json was not downloaded")?;
    Ok(index.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Where a tokenizer for a single-file checkpoint may be found: the
/// repositories diffusers itself takes it from, in order.
pub fn tokenizer_repos(sd2: bool) -> &'static [(&'static str, &'static str)] {
    if sd2 {
        &[
            ("stabilityai/stable-diffusion-2-1", "tokenizer"),
            ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
            ("stabilityai/stable-diffusion-2", "tokenizer"),
            ("stabilityai/stable-diffusion-2-base", "tokenizer"),
        ]
    } else {
        &[
            ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
            ("runwayml/stable-diffusion-v1-5", "tokenizer"),
            ("CompVis/stable-diffusion-v1-4", "tokenizer"),
            ("openai/clip-vit-large-patch14", ""),
        ]
    }
}

/// Where SDXL's first tokenizer (CLIP ViT-L's, padded with EOS) is cached.
pub const SDXL_TOKENIZER_REPOS: &[(&str, &str)] =
    &[("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"), ("openai/clip-vit-large-patch14", "")];
/// Where SDXL's second tokenizer (bigG's, padded with "!") is cached.
pub const SDXL_TOKENIZER_2_REPOS: &[(&str, &str)] = &[("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2")];

/// A cached tokenizer folder (`vocab.json` + `merges.txt`, or `tokenizer.json`)
/// of the first of `repos` the cache has; downloads the first one when none
/// is cached and the machine is online.
pub fn find_tokenizer(repos: &[(&str, &str)]) -> Result<PathBuf> {
    let cache = cache_dir();
    for (repo_id, sub) in repos {
        let id = HubId { id: repo_id.to_string(), revision: None };
        if let Some(snap) = cached_snapshot(&cache, &id) {
            let dir = if sub.is_empty() { snap } else { snap.join(sub) };
            if is_tokenizer_dir(&dir) {
                return Ok(dir);
            }
        }
    }
    let (first, sub) = repos.first().context("no tokenizer repositories given")?;
    let id = HubId { id: first.to_string(), revision: None };
    let how = format!(
        "`huggingface-cli download {first} --include \"{}*\"`",
        if sub.is_empty() { String::new() } else { format!("{sub}/") }
    );
    if offline() {
        bail!(
            "no CLIP tokenizer in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set; fetch one with {how}",
            cache.display()
        );
    }
    let api = api(&cache)?;
    let repo = repo(&api, &id);
    let prefix = if sub.is_empty() { String::new() } else { format!("{sub}/") };
    let mut dir = None;
    for name in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
        let path = repo.get(&format!("{prefix}{name}")).map_err(|e| {
            anyhow::anyhow!(
                "no CLIP tokenizer in the Hugging Face cache ({}) and downloading one failed ({e}); fetch one with {how}",
                cache.display()
            )
        })?;
        dir = path.parent().map(Path::to_path_buf);
    }
    dir.context("the tokenizer download returned no files")
}

/// True when `dir` holds a CLIP tokenizer sdtune can read.
pub fn is_tokenizer_dir(dir: &Path) -> bool {
    dir.join("tokenizer.json").is_file() || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids() {
        assert_eq!(HubId::parse("org/name"), Some(HubId { id: "org/name".into(), revision: None }));
        assert_eq!(HubId::parse("org/name@v1").unwrap().revision(), "v1");
        for bad in ["./x/y", "/abs/path", "a/b/c", "model.safetensors", "x/y.safetensors", "org/", "name"] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn cache_dir_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(cache_dir_from(&env(&[("HF_HUB_CACHE", "/a"), ("HF_HOME", "/b")])), PathBuf::from("/a"));
        assert_eq!(cache_dir_from(&env(&[("HF_HOME", "/b"), ("HOME", "/h")])), PathBuf::from("/b/hub"));
        assert_eq!(cache_dir_from(&env(&[("HOME", "/h")])), PathBuf::from("/h/.cache/huggingface/hub"));
    }

    #[test]
    fn selects_variant_and_shards() {
        let files: Vec<String> = [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors.index.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let picked = select_files(&files, Some("fp16"));
        assert!(picked.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!picked.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(picked.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()));
        assert!(picked.contains(&"text_encoder/model-00002-of-00002.safetensors".to_string()));
        assert!(!picked.iter().any(|f| f.ends_with(".bin")));
    }

    #[test]
    fn selects_sdxl_parts_and_their_fp16_variant() {
        // The layout of stabilityai/stable-diffusion-xl-base-1.0 (weights only as safetensors here).
        let mut files: Vec<String> = vec!["model_index.json".into(), "scheduler/scheduler_config.json".into()];
        for part in ["unet", "vae", "text_encoder", "text_encoder_2"] {
            let stem = if part.starts_with("text") { "model" } else { "diffusion_pytorch_model" };
            files.push(format!("{part}/config.json"));
            files.push(format!("{part}/{stem}.safetensors"));
            files.push(format!("{part}/{stem}.fp16.safetensors"));
        }
        files.extend(["vae_1_0/config.json".to_string(), "vae_decoder/model.onnx".into(), "sd_xl_base_1.0.safetensors".into()]);
        for tok in ["tokenizer", "tokenizer_2"] {
            for f in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
                files.push(format!("{tok}/{f}"));
            }
        }
        let picked = select_files(&files, Some("fp16"));
        for want in [
            "text_encoder_2/config.json",
            "text_encoder_2/model.fp16.safetensors",
            "tokenizer_2/vocab.json",
            "tokenizer_2/merges.txt",
            "unet/diffusion_pytorch_model.fp16.safetensors",
        ] {
            assert!(picked.contains(&want.to_string()), "{want} not in {picked:?}");
        }
        assert!(!picked.contains(&"text_encoder_2/model.safetensors".to_string()));
        assert!(!picked.iter().any(|f| f.ends_with(".onnx") || f == "sd_xl_base_1.0.safetensors"));
        let default = select_files(&files, None);
        assert!(default.contains(&"text_encoder_2/model.safetensors".to_string()));
        assert!(!default.iter().any(|f| f.contains(".fp16.")));
    }
}
