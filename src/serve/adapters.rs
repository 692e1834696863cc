//! The adapters a server offers: every LoRA file under the adapter folder,
//! and every training run's final LoRA (`output/<name>/<name>.safetensors`),
//! each by its file stem (run name). Listed afresh on each request, so new
//! files appear without a restart; a file's header is read again only when
//! its size or time changes.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::loaders::file_kind::{classify, FileKind};
use crate::loaders::tensor_file::TensorFile;

/// How deep the adapter folder is searched for files.
const MAX_DEPTH: usize = 4;

/// One adapter as `GET /v1/adapters` describes it.
#[derive(Clone, Debug, Serialize)]
pub struct Adapter {
    pub name: String,
    /// `adapters` (the adapter folder) or `run` (a training run's final LoRA).
    pub source: &'static str,
    /// The file, relative to its folder.
    pub file: String,
    #[serde(skip)]
    pub path: PathBuf,
    pub bytes: u64,
    /// Seconds since 1970 of the file's last change.
    pub modified: u64,
    #[serde(flatten)]
    pub info: Info,
}

impl Adapter {
    /// The training run's folder, for a run's final LoRA.
    pub fn run_dir(&self) -> Option<&Path> {
        (self.source == "run").then(|| self.path.parent()).flatten()
    }
}

/// What the file's header says (what `sdtune info` shows first).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Info {
    /// kohya, diffusers or peft.
    pub format: String,
    pub tensors: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<String>,
}

/// The folders adapters come from.
pub struct Registry {
    /// Every LoRA under it, by file stem.
    folder: Option<PathBuf>,
    /// Training runs: `<runs>/<name>/<name>.safetensors`.
    runs: Option<PathBuf>,
    /// Header facts by (path, size, modification time); `None`: not a LoRA.
    seen: Mutex<HashMap<PathBuf, (u64, SystemTime, Option<Info>)>>,
}

impl Registry {
    pub fn new(folder: Option<PathBuf>, runs: Option<PathBuf>) -> Self {
        Registry { folder, runs, seen: Mutex::new(HashMap::new()) }
    }

    /// Every adapter now, sorted by name; of two files with one name the
    /// adapter folder's (then the first path) wins.
    pub fn list(&self) -> Vec<Adapter> {
        let mut found: Vec<(PathBuf, PathBuf, &'static str)> = Vec::new();
        if let Some(folder) = &self.folder {
            let mut files = Vec::new();
            walk(folder, 0, &mut files);
            files.sort();
            found.extend(files.into_iter().map(|f| (folder.clone(), f, "adapters")));
        }
        if let Some(runs) = &self.runs {
            let mut files: Vec<PathBuf> = std::fs::read_dir(runs)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let file = e.path().join(format!("{name}.safetensors"));
                    (!name.starts_with('.') && file.is_file()).then_some(file)
                })
                .collect();
            files.sort();
            found.extend(files.into_iter().map(|f| (runs.clone(), f, "run")));
        }
        let mut adapters: Vec<Adapter> = Vec::new();
        for (root, path, source) in found {
            let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else { continue };
            if super::names::refusal(&name).is_some() || adapters.iter().any(|a| a.name == name) {
                continue;
            }
            if let Some(adapter) = self.describe(&root, &path, name, source) {
                adapters.push(adapter);
            }
        }
        adapters.sort_by(|a, b| a.name.cmp(&b.name));
        adapters
    }

    /// The adapter called `name`, or the sentence saying why there is none.
    pub fn find(&self, name: &str) -> Result<Adapter, String> {
        if let Some(why) = super::names::refusal(name) {
            return Err(why);
        }
        self.list().into_iter().find(|a| a.name == name).ok_or_else(|| {
            format!("there is no adapter named {name:?}; GET /v1/adapters lists the adapters this server has")
        })
    }

    fn describe(&self, root: &Path, path: &Path, name: String, source: &'static str) -> Option<Adapter> {
        let meta = std::fs::metadata(path).ok()?;
        let (bytes, modified) = (meta.len(), meta.modified().ok()?);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let info = match seen.get(path) {
            Some((b, m, info)) if *b == bytes && *m == modified => info.clone(),
            _ => {
                let info = read_info(path);
                seen.insert(path.to_path_buf(), (bytes, modified, info.clone()));
                info
            }
        }?;
        Some(Adapter {
            name,
            source,
            file: path.strip_prefix(root).unwrap_or(path).display().to_string(),
            path: path.to_path_buf(),
            bytes,
            modified: modified.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            info,
        })
    }
}

/// `.safetensors` files under `dir`, skipping hidden entries.
fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() && depth < MAX_DEPTH => walk(&path, depth + 1, out),
            Ok(t) if t.is_file() && path.extension().is_some_and(|e| e == "safetensors") => out.push(path),
            _ => {}
        }
    }
}

/// The header's facts when the file holds a LoRA (a model checkpoint or a
/// half-written file beside them is not offered).
fn read_info(path: &Path) -> Option<Info> {
    let file = TensorFile::open(path).ok()?;
    let names = file.names();
    let FileKind::Lora(format) = classify(&names) else { return None };
    let meta = file.string_metadata();
    let get = |k: &str| meta.get(k).cloned();
    Some(Info {
        format: format.name().to_string(),
        tensors: names.len(),
        rank: get("ss_network_dim"),
        alpha: get("ss_network_alpha"),
        base_model: get("ss_base_model_version"),
        network: get("ss_network_module"),
        steps: get("ss_steps"),
    })
}
