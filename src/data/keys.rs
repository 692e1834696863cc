//! Cache keys: a latent is keyed by the image's content hash and every
//! setting that changes it; a text embedding by the caption and the text
//! encoder. Model identities are content hashes of the weight files,
//! remembered per (path, size, mtime) so unchanged models are not re-read.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::buckets::{Bucket, Crop, FILTER_NAME};
use super::decode::hex;
use crate::data::config::Background;

/// Bumped whenever preprocessing changes in a way that changes latents.
const LATENT_VERSION: &str = "sdtune-latent-v1";
const TEXT_VERSION: &str = "sdtune-text-v1";

/// Everything besides the image that a latent depends on.
#[derive(Clone, Debug)]
pub struct LatentSettings {
    pub vae_id: String,
    /// The VAE weights' precision name (fp32, bf16, fp16).
    pub precision: String,
    pub background: Background,
}

/// Everything besides the caption that a text embedding depends on.
#[derive(Clone, Debug)]
pub struct TextSettings {
    /// Tokenizer and text-encoder identity.
    pub encoder_id: String,
    pub precision: String,
    pub clip_skip: usize,
}

/// The key of one cached latent distribution.
pub fn latent_key(settings: &LatentSettings, content_hash: &str, bucket: Bucket, crop: Crop, flipped: bool) -> String {
    let text = format!(
        "{LATENT_VERSION}\nimage={content_hash}\nbucket={}x{}\ncrop={},{},{},{}\nflip={flipped}\nfilter={FILTER_NAME}\nbackground={}\nvae={}\nprecision={}",
        bucket.width,
        bucket.height,
        crop.left,
        crop.top,
        crop.width,
        crop.height,
        settings.background.name(),
        settings.vae_id,
        settings.precision,
    );
    short_hash(text.as_bytes())
}

/// The key of one cached caption embedding.
pub fn text_key(settings: &TextSettings, caption: &str) -> String {
    let text = format!(
        "{TEXT_VERSION}\nencoder={}\nprecision={}\nclip_skip={}\ncaption={caption}",
        settings.encoder_id, settings.precision, settings.clip_skip
    );
    short_hash(text.as_bytes())
}

/// 128 bits of SHA-256 in hex: plenty against accidental collisions.
pub fn short_hash(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes)[..16])
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct Remembered {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// Content hashes of model files, remembered in a small JSON file.
pub struct FileHashes {
    path: PathBuf,
    known: BTreeMap<String, Remembered>,
    dirty: bool,
}

impl FileHashes {
    pub fn open(path: &Path) -> Self {
        let known = std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        FileHashes { path: path.to_path_buf(), known, dirty: false }
    }

    /// SHA-256 of the file, reused while its size and mtime are unchanged.
    pub fn hash(&mut self, file: &Path) -> Result<String> {
        let meta = std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
        let mtime_ns =
            meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        let name = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf()).display().to_string();
        if let Some(r) = self.known.get(&name) {
            if r.size == meta.len() && r.mtime_ns == mtime_ns {
                return Ok(r.sha256.clone());
            }
        }
        let sha256 = hash_file(file)?;
        self.known.insert(name, Remembered { size: meta.len(), mtime_ns, sha256: sha256.clone() });
        self.dirty = true;
        Ok(sha256)
    }

    /// One identity for a set of files (config and weights of a component).
    pub fn identity(&mut self, files: &[PathBuf]) -> Result<String> {
        let mut text = String::new();
        for f in files {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            text.push_str(&format!("{name}={}\n", self.hash(f)?));
        }
        Ok(short_hash(text.as_bytes()))
    }

    pub fn save(&mut self) -> Result<()> {
        if self.dirty {
            crate::fsutil::write_atomic(&self.path, &serde_json::to_vec_pretty(&self.known)?)?;
            self.dirty = false;
        }
        Ok(())
    }
}

fn hash_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_changes_the_key() {
        let s = LatentSettings { vae_id: "v".into(), precision: "fp32".into(), background: Background::WHITE };
        let b = Bucket { width: 64, height: 64 };
        let c = Crop { left: 0, top: 0, width: 64, height: 64 };
        let base = latent_key(&s, "h", b, c, false);
        assert_eq!(base, latent_key(&s, "h", b, c, false));
        assert_ne!(base, latent_key(&s, "h2", b, c, false));
        assert_ne!(base, latent_key(&s, "h", Bucket { width: 64, height: 48 }, c, false));
        assert_ne!(base, latent_key(&s, "h", b, Crop { left: 1, ..c }, false));
        assert_ne!(base, latent_key(&s, "h", b, c, true));
        assert_ne!(base, latent_key(&LatentSettings { vae_id: "w".into(), ..s.clone() }, "h", b, c, false));
        let t = TextSettings { encoder_id: "e".into(), precision: "fp32".into(), clip_skip: 0 };
        assert_ne!(text_key(&t, "a"), text_key(&t, "b"));
        assert_ne!(text_key(&t, "a"), text_key(&TextSettings { encoder_id: "f".into(), ..t.clone() }, "a"));
    }

    #[test]
    fn file_hashes_are_remembered() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let f = tmp.path().join("w.bin");
        std::fs::write(&f, b"weights").unwrap();
        let memo = tmp.path().join("ids.json");
        let mut hashes = FileHashes::open(&memo);
        let h = hashes.hash(&f).unwrap();
        hashes.save().unwrap();
        let mut again = FileHashes::open(&memo);
        assert_eq!(again.hash(&f).unwrap(), h);
        assert!(!again.dirty);
    }
}
