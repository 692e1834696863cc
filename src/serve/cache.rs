//! LoRA files kept loaded between requests, least recently used dropped
//! first once their files' bytes pass the budget. An entry is read again
//! when its file changed (size or time), so a retrained LoRA is served as
//! it is now and its images record its new hash.
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};

use crate::lora::ModelLayers;
use crate::sample::render::LoadedLora;

struct Entry {
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
    lora: LoadedLora,
}

pub struct AdapterCache {
    budget: u64,
    /// Most recently used last.
    entries: Vec<Entry>,
    pub hits: u64,
    pub loads: u64,
}

impl AdapterCache {
    pub fn new(budget: u64) -> Self {
        AdapterCache { budget, entries: Vec::new(), hits: 0, loads: 0 }
    }

    /// The LoRA at `path` at strength 1, from memory when its file is unchanged.
    pub fn get(&mut self, path: &Path, layers: &ModelLayers) -> Result<LoadedLora> {
        let meta = std::fs::metadata(path).with_context(|| format!("the adapter file {} is gone", path.display()))?;
        let (bytes, modified) = (meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        if let Some(i) = self.entries.iter().position(|e| e.path == path) {
            let entry = self.entries.remove(i);
            if entry.bytes == bytes && entry.modified == modified {
                self.hits += 1;
                let lora = entry.lora.clone();
                self.entries.push(entry);
                return Ok(lora);
            }
        }
        self.loads += 1;
        let lora = LoadedLora::from_file(path.to_path_buf(), 1.0, layers)?;
        self.entries.push(Entry { path: path.to_path_buf(), bytes, modified, lora: lora.clone() });
        // The entry just loaded stays even when it alone is over the budget.
        while self.entries.len() > 1 && self.entries.iter().map(|e| e.bytes).sum::<u64>() > self.budget {
            self.entries.remove(0);
        }
        Ok(lora)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
