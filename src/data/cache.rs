//! `.sdtune/cache/`: latent distributions and caption embeddings in
//! safetensors shards, listed by a manifest.
//!
//! Crash safety: a shard is written whole (temp file + rename) before the
//! journal line that lists it is appended and synced; the manifest is
//! rewritten (also temp + rename) only when the journal is folded into it.
//! Opening the cache replays the journal up to its last whole line, drops
//! entries whose shard is missing or unreadable and deletes files no entry
//! lists, so a run killed at any point leaves a consistent cache and the
//! next run continues from what was recorded. `complete` is true once a run
//! finished; training reads only a complete cache. A later run that fails
//! or is killed leaves that finished dataset as it was: entries it no longer
//! needs are dropped only when it finishes in turn.
//!
//! Integrity: every shard's SHA-256 is recorded with it (journal line and
//! manifest). Opening the cache for writing checks them and drops the
//! entries of a damaged shard, so the next prepare encodes them again;
//! training checks each shard as it first reads it and names a bad one.
//!
//! Layout: `manifest.json`, `journal.jsonl`, `lock`, `model-ids.json`,
//! `shards/latents-<hash>.safetensors` (`<key>.mean`, `<key>.std`, each
//! `[C, h, w]` fp32, unscaled: multiply a sample by the VAE's
//! `scaling_factor`), `shards/texts-<hash>.safetensors` (`<key>`, `[77, D]` fp32
//! text states, and `<key>.pooled` for models with a pooled text embedding).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::buckets::{Bucket, Crop};
use super::concepts::Concept;
use super::keys::short_hash;
use crate::loaders::tensor_file::{serialize_tensors, TensorFile};
use crate::lock::FolderLock;
use crate::models::conditioning::Conditioning;

/// The cache folder inside the working folder.
pub const CACHE_DIR: &str = ".sdtune/cache";
const MANIFEST: &str = "manifest.json";
const JOURNAL: &str = "journal.jsonl";
const LOCK: &str = "lock";
const SHARDS: &str = "shards";
pub const FORMAT_VERSION: u32 = 1;
/// Beside a caption's text states `<key>`: its pooled embedding, if any.
const POOLED_SUFFIX: &str = ".pooled";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// A prepare run finished and `dataset` describes the image folder.
    pub complete: bool,
    pub latents: BTreeMap<String, LatentEntry>,
    pub texts: BTreeMap<String, TextEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<Dataset>,
    /// SHA-256 (hex) of each shard file, by shard name. Caches written
    /// before checksums have none; their shards are only checked to parse.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checksums: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatentEntry {
    pub shard: String,
    /// The image's path when it was encoded (relative to the data folder).
    pub source: String,
    pub content_hash: String,
    pub bucket: Bucket,
    pub flipped: bool,
    /// Half precision gave non-finite values, so this one was encoded in fp32.
    #[serde(default)]
    pub fp32_fallback: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextEntry {
    pub shard: String,
    pub caption: String,
}

/// What training reads: every usable image with its cache keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub data_dir: String,
    pub model: String,
    /// The `--vae` the latents were encoded with, when not the model's own
    /// (the latent keys hold its weights' identity too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    pub resolution: u32,
    /// Multiply a latent sample by this before the UNet (VAE `scaling_factor`).
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    /// Key of the empty caption's embedding (for caption dropout).
    pub empty_text: String,
    /// The concepts of a kohya tree or of `data.concepts`; empty for a flat folder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub concepts: Vec<Concept>,
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub path: String,
    pub content_hash: String,
    /// Upright size of the source image.
    pub width: u32,
    pub height: u32,
    pub bucket: Bucket,
    pub crop: Crop,
    pub caption: String,
    pub text: String,
    pub latent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flipped_latent: Option<String>,
    /// Index into the dataset's concepts (an image in two concepts is two
    /// items sharing its latents); `None` for a flat folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concept: Option<usize>,
}

/// One journal line: a shard and the entries it holds.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Latents {
        shard: String,
        entries: BTreeMap<String, LatentEntry>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    Texts {
        shard: String,
        entries: BTreeMap<String, TextEntry>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
}

/// A latent distribution to store.
pub struct NewLatent {
    pub key: String,
    pub entry: LatentEntry,
    pub mean: Tensor,
    pub std: Tensor,
}

/// The cache opened for writing, holding the folder's lock.
pub struct CacheWriter {
    dir: PathBuf,
    manifest: Manifest,
    journal: Option<File>,
    /// The entries this run wants ([`Self::retain`]), applied at finish.
    wanted: Option<(BTreeSet<String>, BTreeSet<String>)>,
    /// Shards found damaged when opened (their entries were dropped).
    damaged: Vec<String>,
    _lock: FolderLock,
}

impl CacheWriter {
    /// Opens (or creates) the cache in `dir`, recovering from any earlier crash.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join(SHARDS)).with_context(|| format!("cannot create {}", dir.display()))?;
        let lock = crate::lock::exclusive(dir, LOCK, "sdtune prepare", "wait for it to finish")?;
        let mut manifest = read_manifest(dir)?.unwrap_or_default();
        if manifest.version != FORMAT_VERSION {
            // An older layout (or none): start afresh; its shards are collected below.
            manifest = Manifest { version: FORMAT_VERSION, ..Default::default() };
        }
        replay_journal(&dir.join(JOURNAL), &mut manifest);
        let damaged = drop_unreadable(dir, &mut manifest);
        let mut writer =
            CacheWriter { dir: dir.to_path_buf(), manifest, journal: None, wanted: None, damaged, _lock: lock };
        writer.compact()?;
        Ok(writer)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn has_latent(&self, key: &str) -> bool {
        self.manifest.latents.contains_key(key)
    }

    pub fn has_text(&self, key: &str) -> bool {
        self.manifest.texts.contains_key(key)
    }

    /// Shards that were damaged (checksum, truncation) when the cache was
    /// opened; their images are encoded again.
    pub fn damaged_shards(&self) -> &[String] {
        &self.damaged
    }

    /// Keeps only the entries `latents` and `texts` name once this run
    /// finishes ([`Self::finish`]); until then the last finished dataset
    /// stays whole, so a run that fails leaves it usable. Returns how many
    /// latent entries will be dropped.
    pub fn retain(&mut self, latents: &BTreeSet<String>, texts: &BTreeSet<String>) -> Result<usize> {
        let dropped = self.manifest.latents.keys().filter(|k| !latents.contains(*k)).count();
        self.wanted = Some((latents.clone(), texts.clone()));
        Ok(dropped)
    }

    /// Writes one shard of latents, then records it in the journal.
    pub fn add_latents(&mut self, latents: Vec<NewLatent>) -> Result<()> {
        if latents.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = latents.iter().map(|l| l.key.as_str()).collect();
        let shard = format!("latents-{}.safetensors", short_hash(keys.join("\n").as_bytes()));
        let mut tensors = Vec::with_capacity(2 * latents.len());
        let mut entries = BTreeMap::new();
        for l in latents {
            tensors.push((format!("{}.mean", l.key), l.mean));
            tensors.push((format!("{}.std", l.key), l.std));
            entries.insert(l.key, LatentEntry { shard: shard.clone(), ..l.entry });
        }
        let sha256 = self.write_shard(&shard, &tensors, "latents")?;
        self.append(&Record::Latents { shard: shard.clone(), entries: entries.clone(), sha256: Some(sha256.clone()) })?;
        self.manifest.latents.extend(entries);
        self.manifest.checksums.insert(shard, sha256);
        Ok(())
    }

    /// Writes one shard of caption conditionings `(key, caption, batch of one)`:
    /// `<key>` holds the text states `[77, D]`, `<key>.pooled` the pooled
    /// embedding of models that have one.
    pub fn add_texts(&mut self, texts: Vec<(String, String, Conditioning)>) -> Result<()> {
        if texts.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = texts.iter().map(|t| t.0.as_str()).collect();
        let shard = format!("texts-{}.safetensors", short_hash(keys.join("\n").as_bytes()));
        let mut tensors = Vec::with_capacity(texts.len());
        let mut entries = BTreeMap::new();
        for (key, caption, c) in texts {
            tensors.push((key.clone(), c.text.squeeze_dim(0)));
            if let Some(pooled) = &c.pooled {
                tensors.push((format!("{key}{POOLED_SUFFIX}"), pooled.squeeze_dim(0)));
            }
            entries.insert(key, TextEntry { shard: shard.clone(), caption });
        }
        let sha256 = self.write_shard(&shard, &tensors, "texts")?;
        self.append(&Record::Texts { shard: shard.clone(), entries: entries.clone(), sha256: Some(sha256.clone()) })?;
        self.manifest.texts.extend(entries);
        self.manifest.checksums.insert(shard, sha256);
        Ok(())
    }

    /// Writes one shard whole; returns its SHA-256.
    fn write_shard(&self, shard: &str, tensors: &[(String, Tensor)], what: &str) -> Result<String> {
        let bytes = serialize_tensors(tensors, Some(shard_metadata(what)))?;
        crate::fsutil::write_atomic(&self.dir.join(SHARDS).join(shard), &bytes)?;
        Ok(crate::fsutil::sha256_hex(&bytes))
    }

    /// Records the finished dataset and marks the cache complete.
    pub fn finish(&mut self, dataset: Dataset) -> Result<()> {
        for item in &dataset.items {
            for key in std::iter::once(&item.latent).chain(item.flipped_latent.as_ref()) {
                if !self.has_latent(key) {
                    bail!("internal: {} has no cached latent {key}", item.path);
                }
            }
            if !self.has_text(&item.text) {
                bail!("internal: {} has no cached caption embedding", item.path);
            }
        }
        if let Some((latents, texts)) = self.wanted.take() {
            self.manifest.latents.retain(|k, _| latents.contains(k));
            self.manifest.texts.retain(|k, _| texts.contains(k));
        }
        self.manifest.dataset = Some(dataset);
        self.manifest.complete = true;
        self.compact()
    }

    fn append(&mut self, record: &Record) -> Result<()> {
        let path = self.dir.join(JOURNAL);
        if self.journal.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            self.journal = Some(file);
        }
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let journal = self.journal.as_mut().expect("opened above");
        journal.write_all(&line).with_context(|| format!("cannot write {}", path.display()))?;
        journal.sync_data().with_context(|| format!("cannot flush {}", path.display()))
    }

    /// Folds the journal into the manifest and deletes unlisted shards.
    fn compact(&mut self) -> Result<()> {
        let used: BTreeSet<String> = used_shards(&self.manifest).into_iter().map(str::to_string).collect();
        self.manifest.checksums.retain(|shard, _| used.contains(shard));
        let bytes = serde_json::to_vec(&self.manifest)?;
        crate::fsutil::write_atomic(&self.dir.join(MANIFEST), &bytes)?;
        self.journal = None;
        let journal = self.dir.join(JOURNAL);
        if journal.exists() {
            std::fs::remove_file(&journal).with_context(|| format!("cannot remove {}", journal.display()))?;
        }
        self.collect_garbage();
        Ok(())
    }

    /// Removes shard files no entry lists, and temp files of killed writes.
    fn collect_garbage(&self) {
        let used = used_shards(&self.manifest);
        let Ok(entries) = std::fs::read_dir(self.dir.join(SHARDS)) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !used.contains(name.as_str()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        // Temp files of an interrupted manifest write.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains(".tmp-") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

fn shard_metadata(what: &str) -> HashMap<String, String> {
    HashMap::from([("format".to_string(), format!("sdtune-cache-{what}-v{FORMAT_VERSION}"))])
}

/// Every shard an entry lists.
fn used_shards(manifest: &Manifest) -> BTreeSet<&str> {
    manifest.latents.values().map(|e| e.shard.as_str()).chain(manifest.texts.values().map(|e| e.shard.as_str())).collect()
}

fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
    // The manifest is written whole; one that does not parse was damaged
    // from outside, and the cache is rebuilt rather than trusted.
    Ok(serde_json::from_slice(&bytes).ok())
}

/// Applies the journal's whole lines; a torn last line is ignored.
fn replay_journal(path: &Path, manifest: &mut Manifest) {
    let Ok(file) = File::open(path) else { return };
    for line in BufReader::new(file).split(b'\n') {
        let Ok(line) = line else { break };
        let Ok(record) = serde_json::from_slice::<Record>(&line) else { break };
        // New entries beside a finished dataset leave it whole (and complete).
        let (shard, sha256) = match record {
            Record::Latents { shard, entries, sha256 } => {
                manifest.latents.extend(entries);
                (shard, sha256)
            }
            Record::Texts { shard, entries, sha256 } => {
                manifest.texts.extend(entries);
                (shard, sha256)
            }
        };
        if let Some(sum) = sha256 {
            manifest.checksums.insert(shard, sum);
        }
    }
}

/// Drops entries whose shard is missing, unreadable, fails its checksum or
/// lacks their tensors; returns the shards that exist but are damaged. A
/// finished dataset that loses an entry is no longer complete.
fn drop_unreadable(dir: &Path, manifest: &mut Manifest) -> Vec<String> {
    let shards: BTreeSet<String> = used_shards(manifest).into_iter().map(str::to_string).collect();
    let mut names: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut damaged = Vec::new();
    for shard in shards {
        let path = dir.join(SHARDS).join(&shard);
        match TensorFile::open(&path) {
            Ok(file) if manifest.checksums.get(&shard).is_none_or(|sum| file.sha256() == *sum) => {
                names.insert(shard, file.names().into_iter().collect());
            }
            _ if path.exists() => damaged.push(shard),
            _ => {}
        }
    }
    let has = |shard: &str, name: &str| names.get(shard).is_some_and(|n| n.contains(name));
    manifest.latents.retain(|k, e| has(&e.shard, &format!("{k}.mean")) && has(&e.shard, &format!("{k}.std")));
    manifest.texts.retain(|k, e| has(&e.shard, k));
    if manifest.dataset.as_ref().is_some_and(|d| !dataset_is_whole(d, manifest)) {
        manifest.complete = false;
    }
    damaged
}

/// Whether every entry the dataset's items name is in the manifest.
fn dataset_is_whole(dataset: &Dataset, manifest: &Manifest) -> bool {
    dataset.items.iter().all(|item| {
        std::iter::once(&item.latent).chain(item.flipped_latent.as_ref()).all(|k| manifest.latents.contains_key(k))
            && manifest.texts.contains_key(&item.text)
    }) && manifest.texts.contains_key(&dataset.empty_text)
}


/// The cache opened for reading (training): complete, with tensors read on demand.
pub struct CacheReader {
    dir: PathBuf,
    manifest: Manifest,
    shards: Mutex<HashMap<String, Arc<TensorFile>>>,
    /// A later prepare started and did not finish (its journal is there).
    unfinished_prepare: bool,
    _lock: FolderLock,
}

impl CacheReader {
    /// Opens the cache under the working folder `work_dir`.
    pub fn open(work_dir: &Path) -> Result<Self> {
        let dir = work_dir.join(CACHE_DIR);
        if !dir.join(MANIFEST).is_file() {
            bail!("{} holds no cache; run `sdtune prepare DIR` first", work_dir.display());
        }
        let lock = crate::lock::shared(&dir, LOCK, "sdtune prepare")?;
        let mut manifest = read_manifest(&dir)?
            .with_context(|| format!("{} is damaged; run `sdtune prepare` again", dir.join(MANIFEST).display()))?;
        let unfinished_prepare = dir.join(JOURNAL).exists();
        if unfinished_prepare {
            replay_journal(&dir.join(JOURNAL), &mut manifest);
        }
        let whole = manifest.dataset.as_ref().is_some_and(|d| dataset_is_whole(d, &manifest));
        if manifest.version != FORMAT_VERSION || !manifest.complete || !whole {
            bail!(
                "the cache in {} is incomplete (a prepare run was stopped); run `sdtune prepare` again to finish it",
                dir.display()
            );
        }
        Ok(CacheReader { dir, manifest, shards: Mutex::new(HashMap::new()), unfinished_prepare, _lock: lock })
    }

    /// Whether a prepare began after the last finished one and did not
    /// finish: training then reads the last finished dataset.
    pub fn unfinished_prepare(&self) -> bool {
        self.unfinished_prepare
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dataset(&self) -> &Dataset {
        self.manifest.dataset.as_ref().expect("checked when opened")
    }

    /// The latent distribution `(mean, std)` of `key`, each `[C, h, w]` fp32 on the CPU.
    pub fn latent(&self, key: &str) -> Result<(Tensor, Tensor)> {
        let entry = self.manifest.latents.get(key).with_context(|| format!("the cache has no latent {key}"))?;
        let file = self.shard(&entry.shard)?;
        Ok((file.tensor(&format!("{key}.mean"))?, file.tensor(&format!("{key}.std"))?))
    }

    /// The caption text states of `key`, `[77, D]` fp32 on the CPU.
    pub fn text(&self, key: &str) -> Result<Tensor> {
        let entry =
            self.manifest.texts.get(key).with_context(|| format!("the cache has no caption embedding {key}"))?;
        self.shard(&entry.shard)?.tensor(key)
    }

    /// The caption conditioning of `key` as a batch of one, fp32 on the CPU.
    /// Shards written before pooled embeddings existed (SD1/SD2) hold the
    /// text states alone, which is all those models take.
    pub fn conditioning(&self, key: &str) -> Result<Conditioning> {
        let entry =
            self.manifest.texts.get(key).with_context(|| format!("the cache has no caption embedding {key}"))?;
        let shard = self.shard(&entry.shard)?;
        let pooled_name = format!("{key}{POOLED_SUFFIX}");
        let pooled = shard.info(&pooled_name).is_some().then(|| shard.tensor(&pooled_name)).transpose()?;
        Ok(Conditioning {
            text: shard.tensor(key)?.unsqueeze(0),
            pooled: pooled.map(|p| p.unsqueeze(0)),
            time_ids: None,
        })
    }

    /// Item indices grouped by bucket (a batch never mixes buckets), buckets
    /// in order. Items of regularisation (class) concepts are left out: they
    /// are prior preservation's class samples (`TrainingData::class_items`).
    pub fn items_by_bucket(&self) -> Vec<Vec<usize>> {
        let mut groups: BTreeMap<Bucket, Vec<usize>> = BTreeMap::new();
        for (i, item) in self.dataset().items.iter().enumerate() {
            if !self.concept_of(i).is_some_and(|c| c.is_class) {
                groups.entry(item.bucket).or_default().push(i);
            }
        }
        groups.into_values().collect()
    }

    /// The concept item `index` belongs to (`None` for a flat folder).
    pub fn concept_of(&self, index: usize) -> Option<&Concept> {
        let dataset = self.dataset();
        dataset.items.get(index)?.concept.and_then(|c| dataset.concepts.get(c))
    }

    /// Whether flipped latents were cached for any item (concepts choose
    /// flipping each for itself; a flat folder has them for all or none).
    pub fn has_flips(&self) -> bool {
        self.dataset().items.iter().any(|i| i.flipped_latent.is_some())
    }

    /// Item `index`: `(mean, std, text states)`, the flipped latent when
    /// `flip` and one was cached.
    pub fn item(&self, index: usize, flip: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let (mean, std) = self.item_latent(index, flip)?;
        Ok((mean, std, self.text(&self.item_at(index)?.text)?))
    }

    /// Item `index`'s latent distribution `(mean, std)`, flipped when `flip`
    /// and a flipped one was cached.
    pub fn item_latent(&self, index: usize, flip: bool) -> Result<(Tensor, Tensor)> {
        let item = self.item_at(index)?;
        let key = match (&item.flipped_latent, flip) {
            (Some(flipped), true) => flipped,
            _ => &item.latent,
        };
        self.latent(key)
    }

    /// Item `index`'s caption conditioning (a batch of one).
    pub fn item_conditioning(&self, index: usize) -> Result<Conditioning> {
        self.conditioning(&self.item_at(index)?.text)
    }

    /// Item `index`'s SDXL time ids as kohya gives them, for the latent
    /// [`Self::item_latent`] returns with `flip`: they follow from the
    /// stored size and bucket alone, so caches of any age have them.
    pub fn item_time_ids(&self, index: usize, flip: bool) -> Result<[f32; 6]> {
        let item = self.item_at(index)?;
        let flipped = flip && item.flipped_latent.is_some();
        Ok(super::time_ids::kohya_time_ids(item.width, item.height, item.bucket, flipped))
    }

    /// Item `index`'s caption, as its embedding was made from it.
    pub fn item_caption(&self, index: usize) -> Result<String> {
        Ok(self.item_at(index)?.caption.clone())
    }

    fn item_at(&self, index: usize) -> Result<&Item> {
        self.dataset().items.get(index).with_context(|| format!("the cache has no item {index}"))
    }

    /// The empty caption's text states `[77, D]`.
    pub fn empty_caption(&self) -> Result<Tensor> {
        self.text(&self.dataset().empty_text)
    }

    /// The empty caption's conditioning (caption dropout).
    pub fn empty_conditioning(&self) -> Result<Conditioning> {
        self.conditioning(&self.dataset().empty_text)
    }

    fn shard(&self, name: &str) -> Result<Arc<TensorFile>> {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = shards.get(name) {
            return Ok(f.clone());
        }
        let path = self.dir.join(SHARDS).join(name);
        const AGAIN: &str = "run `sdtune prepare` again to encode its images afresh";
        let file = Arc::new(TensorFile::open_with_advice(&path, AGAIN)?);
        if self.manifest.checksums.get(name).is_some_and(|sum| file.sha256() != *sum) {
            bail!("the cached shard {} is damaged (its SHA-256 no longer matches what prepare wrote); {AGAIN}", path.display());
        }
        shards.insert(name.to_string(), file.clone());
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loaders::tensor_file::write_tensors;

    fn latent(key: &str, v: f64) -> NewLatent {
        NewLatent {
            key: key.into(),
            entry: LatentEntry {
                shard: String::new(),
                source: format!("{key}.png"),
                content_hash: key.into(),
                bucket: Bucket { width: 16, height: 16 },
                flipped: false,
                fp32_fallback: false,
            },
            mean: Tensor::full([4, 2, 2], v, (tch::Kind::Float, tch::Device::Cpu)),
            std: Tensor::ones([4, 2, 2], (tch::Kind::Float, tch::Device::Cpu)),
        }
    }

    #[test]
    fn journal_survives_a_crash_and_torn_lines_are_ignored() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let dir = tmp.path().join("cache");
        {
            let mut w = CacheWriter::open(&dir).unwrap();
            w.add_latents(vec![latent("a", 1.0), latent("b", 2.0)]).unwrap();
            w.add_latents(vec![latent("c", 3.0)]).unwrap();
            // "Crash": the writer is dropped without finish; add a torn line
            // and an orphan shard as a kill between the two writes leaves.
            drop(w);
        }
        let mut j = OpenOptions::new().append(true).open(dir.join(JOURNAL)).unwrap();
        j.write_all(b"{\"op\":\"latents\",\"shard\":\"x").unwrap();
        std::fs::write(dir.join(SHARDS).join("latents-orphan.safetensors"), b"junk").unwrap();
        let w = CacheWriter::open(&dir).unwrap();
        assert_eq!(w.manifest().latents.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(!w.manifest().complete);
        assert!(!dir.join(SHARDS).join("latents-orphan.safetensors").exists());
        assert!(!dir.join(JOURNAL).exists());
    }

    /// A dataset of one item, `a.png`, with latent `latent` and caption key `text`.
    fn dataset_of(latent: &str, text: &str) -> Dataset {
        let item = Item {
            path: "a.png".into(),
            content_hash: latent.into(),
            width: 16,
            height: 16,
            bucket: Bucket { width: 16, height: 16 },
            crop: Crop { left: 0, top: 0, width: 16, height: 16 },
            caption: "cap".into(),
            text: text.into(),
            latent: latent.into(),
            flipped_latent: None,
            concept: None,
        };
        Dataset {
            data_dir: "d".into(),
            model: "m".into(),
            vae: None,
            resolution: 16,
            scaling_factor: 0.18215,
            shift_factor: None,
            empty_text: text.into(),
            concepts: Vec::new(),
            items: vec![item],
        }
    }

    fn text(key: &str) -> (String, String, Conditioning) {
        let states = Tensor::zeros([1, 77, 8], (tch::Kind::Float, tch::Device::Cpu));
        (key.into(), "cap".into(), Conditioning::text_only(states))
    }

    #[test]
    fn missing_shards_drop_their_entries_and_retain_collects_at_finish() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let dir = tmp.path().join("cache");
        let mut w = CacheWriter::open(&dir).unwrap();
        w.add_latents(vec![latent("a", 1.0)]).unwrap();
        w.add_latents(vec![latent("b", 2.0)]).unwrap();
        w.add_texts(vec![text("t")]).unwrap();
        let shard_a = w.manifest().latents["a"].shard.clone();
        let removed = w.retain(&BTreeSet::from(["b".to_string()]), &BTreeSet::from(["t".to_string()])).unwrap();
        assert_eq!(removed, 1);
        assert!(dir.join(SHARDS).join(&shard_a).exists(), "dropped before the run finished");
        w.finish(dataset_of("b", "t")).unwrap();
        assert!(!dir.join(SHARDS).join(&shard_a).exists());
        assert!(!w.manifest().checksums.contains_key(&shard_a));
        let shard_b = w.manifest().latents["b"].shard.clone();
        drop(w);
        std::fs::remove_file(dir.join(SHARDS).join(&shard_b)).unwrap();
        let w = CacheWriter::open(&dir).unwrap();
        assert!(w.manifest().latents.is_empty());
        assert!(!w.manifest().complete, "a dataset that lost a latent is not complete");
    }

    #[test]
    fn a_run_that_does_not_finish_leaves_the_finished_dataset_readable() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let dir = tmp.path().join(CACHE_DIR);
        let mut w = CacheWriter::open(&dir).unwrap();
        w.add_latents(vec![latent("a", 1.0)]).unwrap();
        w.add_texts(vec![text("t")]).unwrap();
        w.finish(dataset_of("a", "t")).unwrap();
        drop(w);
        // A second run wants none of it, adds a shard, and dies (or fails).
        let mut w = CacheWriter::open(&dir).unwrap();
        w.retain(&BTreeSet::new(), &BTreeSet::new()).unwrap();
        w.add_latents(vec![latent("z", 9.0)]).unwrap();
        drop(w);
        let r = CacheReader::open(tmp.path()).unwrap();
        assert!(r.unfinished_prepare());
        assert_eq!(r.latent("a").unwrap().0.double_value(&[0, 0, 0]), 1.0);
        drop(r);
        let w = CacheWriter::open(&dir).unwrap();
        assert!(w.manifest().complete && w.manifest().latents.contains_key("a") && w.manifest().latents.contains_key("z"));
    }

    #[test]
    fn a_flipped_byte_in_a_shard_is_named_by_the_reader_and_re_encoded_by_the_writer() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let dir = tmp.path().join(CACHE_DIR);
        let mut w = CacheWriter::open(&dir).unwrap();
        w.add_latents(vec![latent("a", 1.0)]).unwrap();
        w.add_texts(vec![text("t")]).unwrap();
        w.finish(dataset_of("a", "t")).unwrap();
        let shard = w.manifest().latents["a"].shard.clone();
        drop(w);
        let path = dir.join(SHARDS).join(&shard);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01; // inside the tensor data: the file still parses
        std::fs::write(&path, &bytes).unwrap();

        let r = CacheReader::open(tmp.path()).unwrap();
        let err = format!("{:#}", r.latent("a").unwrap_err());
        assert!(err.contains(&shard) && err.contains("damaged") && err.contains("sdtune prepare"), "{err}");
        drop(r);
        let w = CacheWriter::open(&dir).unwrap();
        assert_eq!(w.damaged_shards(), [shard]);
        assert!(!w.has_latent("a") && !w.manifest().complete, "the damaged entry must be encoded again");
    }

    #[test]
    fn a_second_writer_is_refused() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let _w = CacheWriter::open(tmp.path()).unwrap();
        let err = CacheWriter::open(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("another sdtune prepare"), "{err}");
    }

    #[test]
    fn reader_needs_a_complete_cache() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let dir = tmp.path().join(CACHE_DIR);
        let mut w = CacheWriter::open(&dir).unwrap();
        w.add_latents(vec![latent("a", 1.5)]).unwrap();
        let text = Conditioning::text_only(Tensor::zeros([1, 77, 8], (tch::Kind::Float, tch::Device::Cpu)));
        w.add_texts(vec![("t".into(), "cap".into(), text)]).unwrap();
        drop(w);
        assert!(CacheReader::open(tmp.path()).err().unwrap().to_string().contains("incomplete"));
        let mut w = CacheWriter::open(&dir).unwrap();
        w.finish(dataset_of("a", "t")).unwrap();
        drop(w);
        let r = CacheReader::open(tmp.path()).unwrap();
        let (mean, std) = r.latent("a").unwrap();
        assert_eq!(mean.double_value(&[0, 0, 0]), 1.5);
        assert_eq!(std.size(), [4, 2, 2]);
        assert_eq!(r.text("t").unwrap().size(), [77, 8]);
    }

    /// A finished one-item cache whose text shard is written by `write_texts`.
    fn cache_with_texts(dir: &Path, write_texts: impl FnOnce(&mut CacheWriter)) {
        let mut w = CacheWriter::open(dir).unwrap();
        w.add_latents(vec![latent("a", 1.0)]).unwrap();
        write_texts(&mut w);
        w.finish(dataset_of("a", "t")).unwrap();
    }

    #[test]
    fn text_shards_of_sd1_sd2_caches_read_as_text_only_conditioning() {
        // The layout every cache had before pooled embeddings: `<key>` alone,
        // written here by hand as the old `add_texts` wrote it.
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let dir = tmp.path().join(CACHE_DIR);
        let states = Tensor::arange(77 * 8, (tch::Kind::Float, tch::Device::Cpu)).view([77, 8]);
        cache_with_texts(&dir, |w| {
            let shard = "texts-old.safetensors".to_string();
            write_tensors(&w.dir.join(SHARDS).join(&shard), &[("t".to_string(), states.shallow_clone())], None).unwrap();
            let entries = BTreeMap::from([("t".to_string(), TextEntry { shard: shard.clone(), caption: "cap".into() })]);
            w.append(&Record::Texts { shard, entries: entries.clone(), sha256: None }).unwrap();
            w.manifest.texts.extend(entries);
        });
        let r = CacheReader::open(tmp.path()).unwrap();
        let c = r.conditioning("t").unwrap();
        assert_eq!(c.text.size(), [1, 77, 8]);
        assert!(c.text.squeeze_dim(0).equal(&states), "the old states must be read unchanged");
        assert!(c.pooled.is_none() && c.time_ids.is_none());
        assert!(r.item_conditioning(0).unwrap().text.equal(&c.text));
    }

    #[test]
    fn pooled_embeddings_round_trip_beside_the_text_states() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let dir = tmp.path().join(CACHE_DIR);
        let text = Tensor::randn([1, 77, 8], (tch::Kind::Float, tch::Device::Cpu));
        let pooled = Tensor::randn([1, 12], (tch::Kind::Float, tch::Device::Cpu));
        let cond = Conditioning { text: text.shallow_clone(), pooled: Some(pooled.shallow_clone()), time_ids: None };
        cache_with_texts(&dir, |w| w.add_texts(vec![("t".into(), "cap".into(), cond)]).unwrap());
        let r = CacheReader::open(tmp.path()).unwrap();
        let back = r.conditioning("t").unwrap();
        assert!(back.text.equal(&text));
        assert!(back.pooled.unwrap().equal(&pooled));
        assert_eq!(r.text("t").unwrap().size(), [77, 8], "text() keeps giving the states alone");
    }
}
