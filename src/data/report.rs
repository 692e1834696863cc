//! What prepare did: counts, the bucket histogram, every skipped file with
//! its reason and fix, warnings. Written as `.sdtune/prepare-report.json`
//! and shown as a table on the terminal.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::buckets::Bucket;
use super::concepts::{epoch_shares, Concept};

/// A training concept under this share of an epoch is warned about.
pub const SMALL_SHARE: f64 = 0.05;

/// Warnings of one kind shown in full on the terminal.
const WARNINGS_PER_KIND: usize = 3;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub data_dir: String,
    pub model: String,
    pub resolution: u32,
    pub device: String,
    pub precision: String,
    pub counts: Counts,
    pub buckets: Vec<BucketCount>,
    /// Per concept (kohya folders or `data.concepts`); empty for a flat folder.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub concepts: Vec<ConceptRow>,
    pub captions: CaptionCounts,
    /// Files that are not used, each with why and what to do.
    pub skipped: Vec<Skipped>,
    /// Used files with something worth knowing (caption issues, duplicates, ...).
    pub warnings: Vec<Warning>,
    /// Hidden and system files, symlink loops: left out on purpose.
    pub ignored: Vec<Ignored>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    /// Files under the folder that could be images (captions not counted).
    pub files: usize,
    pub usable: usize,
    pub skipped: usize,
    pub duplicates: usize,
    /// Latents encoded by this run (flipped ones included).
    pub encoded: usize,
    /// Latents already in the cache and reused.
    pub reused: usize,
    /// Latents dropped from the cache (images removed, edited or resettled).
    pub removed: usize,
    pub texts_encoded: usize,
    pub texts_reused: usize,
    /// Latents re-encoded in fp32 after half precision gave non-finite values.
    pub fp32_fallbacks: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BucketCount {
    pub width: u32,
    pub height: u32,
    pub images: usize,
}

/// One concept's part of the set.
#[derive(Clone, Debug, Serialize)]
pub struct ConceptRow {
    pub name: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Usable images.
    pub images: usize,
    pub repeats: u32,
    pub loss_weight: f64,
    /// A regularisation set (prior preservation's class images).
    pub is_class: bool,
    /// Its fraction of an epoch's draws: images x repeats over every training concept's.
    pub share: f64,
    pub buckets: Vec<BucketCount>,
    /// Files under its folder that are not used.
    pub skipped: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CaptionCounts {
    pub sidecar: usize,
    pub metadata: usize,
    pub template: usize,
    pub trigger_only: usize,
    pub none: usize,
    pub missing: usize,
    pub empty: usize,
    pub not_utf8: usize,
    pub too_long: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
    pub fix: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Warning {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A short tag: `no_caption`, `empty_caption`, `caption_not_utf8`,
    /// `long_caption`, `duplicate`, `extension`, `animated`, `upscaled`,
    /// `orphan_caption`, `metadata`, `few_images`, `uneven_buckets`,
    /// `cropped` (the bucket keeps under half the image), `name_not_utf8`,
    /// `caption_unreadable`, `encode_batch` (lowered to fit memory).
    pub kind: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub path: String,
    pub reason: String,
}

impl Report {
    pub fn skip(&mut self, path: &str, reason: impl Into<String>, fix: impl Into<String>) {
        self.skipped.push(Skipped { path: path.into(), reason: reason.into(), fix: fix.into() });
    }

    pub fn warn(&mut self, path: Option<&str>, kind: &str, message: impl Into<String>) {
        self.warnings.push(Warning { path: path.map(String::from), kind: kind.into(), message: message.into() });
    }

    /// Fills the histogram and adds the set-wide warnings.
    pub fn finish(&mut self, buckets: &BTreeMap<Bucket, usize>) {
        self.buckets =
            buckets.iter().map(|(b, &n)| BucketCount { width: b.width, height: b.height, images: n }).collect();
        self.skipped.sort_by(|a, b| a.path.cmp(&b.path));
        self.counts.skipped = self.skipped.len();
        if self.counts.usable > 0 && self.counts.usable < 5 {
            self.warn(
                None,
                "few_images",
                format!(
                    "only {} usable image{}; a LoRA needs about 5 or more (15-50 is typical) to learn a consistent look",
                    self.counts.usable,
                    plural(self.counts.usable)
                ),
            );
        }
        let largest = buckets.values().copied().max().unwrap_or(0);
        let sparse: Vec<String> = buckets
            .iter()
            .filter(|(_, &n)| buckets.len() > 1 && n * 10 < largest)
            .map(|(b, n)| format!("{b} ({n} image{})", plural(*n)))
            .collect();
        if !sparse.is_empty() {
            self.warn(
                None,
                "uneven_buckets",
                format!(
                    "buckets are very uneven: {} hold under a tenth of the largest bucket's {largest} images, so they train in short batches; crop those images to the common shape or add more like them",
                    sparse.join(", ")
                ),
            );
        }
    }

    /// The per-concept rows and their warnings: a concept with no usable
    /// image, one under 5% of the epoch, a class set that waits for prior
    /// preservation. `buckets[i]`: the bucket of each usable image of concept i.
    pub fn add_concepts(&mut self, concepts: &[Concept], buckets: &[Vec<Bucket>]) {
        let images: Vec<usize> = buckets.iter().map(Vec::len).collect();
        let shares = epoch_shares(concepts, &images);
        for ((c, share), in_concept) in concepts.iter().zip(shares).zip(buckets) {
            let mut histogram: BTreeMap<Bucket, usize> = BTreeMap::new();
            for b in in_concept {
                *histogram.entry(*b).or_default() += 1;
            }
            let skipped = self.skipped.iter().filter(|s| s.path.starts_with(&c.path)).count();
            let row = ConceptRow {
                name: c.name.clone(),
                path: c.path.clone(),
                trigger: c.trigger.clone(),
                images: in_concept.len(),
                repeats: c.repeats,
                loss_weight: c.loss_weight,
                is_class: c.is_class,
                share,
                buckets: histogram.iter().map(|(b, &n)| BucketCount { width: b.width, height: b.height, images: n }).collect(),
                skipped,
            };
            self.concept_warnings(&row);
            self.concepts.push(row);
        }
    }

    fn concept_warnings(&mut self, c: &ConceptRow) {
        let named = format!("concept {:?} ({})", c.name, c.path);
        if c.images == 0 {
            let files = if c.skipped == 0 {
                "holds no image files".to_string()
            } else {
                format!("has no usable image ({} file{} skipped, reasons listed above)", c.skipped, plural(c.skipped))
            };
            self.warn(None, "empty_concept", format!("{named} {files}; it is left out and the other concepts train"));
        } else if c.is_class {
            // Trained as prior preservation's class samples (train --prior-loss-weight): nothing to warn of.
        } else if c.share < SMALL_SHARE {
            self.warn(
                None,
                "small_concept",
                format!(
                    "{named} has only {:.1}% of an epoch ({} image{} x {} repeat{}); raise its repeats so the other concepts do not drown it",
                    100.0 * c.share,
                    c.images,
                    plural(c.images),
                    c.repeats,
                    plural(c.repeats as usize)
                ),
            );
        }
    }

    /// The concepts as table rows: images, repeats, share, buckets, skipped.
    fn concept_table(&self, out: &mut String) {
        let width = self.concepts.iter().map(|c| c.name.chars().count()).max().unwrap_or(0).clamp(7, 32);
        let _ = writeln!(out, "\nconcepts");
        let _ = writeln!(
            out,
            "  {:<width$}  {:>6}  {:>7}  {:>6}  {:>7}  buckets",
            "concept", "images", "repeats", "share", "skipped"
        );
        for c in &self.concepts {
            let buckets: Vec<String> = c.buckets.iter().map(|b| format!("{}×{} ({})", b.width, b.height, b.images)).collect();
            let share = if c.is_class { "class".to_string() } else { format!("{:.1}%", 100.0 * c.share) };
            let name: String = c.name.chars().take(width).collect();
            let _ = writeln!(
                out,
                "  {name:<width$}  {:>6}  {:>7}  {share:>6}  {:>7}  {}",
                c.images,
                c.repeats,
                c.skipped,
                buckets.join(", ")
            );
        }
    }

    /// The terminal summary.
    pub fn table(&self) -> String {
        let c = &self.counts;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "sdtune prepare  {}  (model {}, {} px, {} {})",
            self.data_dir, self.model, self.resolution, self.device, self.precision
        );
        let row = |out: &mut String, name: &str, value: String| {
            let _ = writeln!(out, "  {name:<22} {value}");
        };
        row(&mut out, "files checked", c.files.to_string());
        row(&mut out, "usable", c.usable.to_string());
        row(&mut out, "skipped", c.skipped.to_string());
        if c.duplicates > 0 {
            row(&mut out, "duplicates (left out)", c.duplicates.to_string());
        }
        row(&mut out, "latents encoded now", c.encoded.to_string());
        row(&mut out, "latents from cache", c.reused.to_string());
        if c.removed > 0 {
            row(&mut out, "stale latents dropped", c.removed.to_string());
        }
        if c.fp32_fallbacks > 0 {
            row(&mut out, "re-encoded in fp32", c.fp32_fallbacks.to_string());
        }
        row(&mut out, "captions encoded now", format!("{} ({} from cache)", c.texts_encoded, c.texts_reused));
        let k = &self.captions;
        row(
            &mut out,
            "captions from",
            format!(
                "{} .txt, {} metadata.jsonl, {} template, {} trigger only, {} none",
                k.sidecar, k.metadata, k.template, k.trigger_only, k.none
            ),
        );
        if !self.buckets.is_empty() {
            let _ = writeln!(out, "\nbuckets (width×height  images)");
            let most = self.buckets.iter().map(|b| b.images).max().unwrap_or(1).max(1);
            for b in &self.buckets {
                let bar = "#".repeat(((b.images * 30).div_ceil(most)).max(1));
                let _ = writeln!(out, "  {:>11}  {:>5}  {bar}", format!("{}×{}", b.width, b.height), b.images);
            }
        }
        if !self.concepts.is_empty() {
            self.concept_table(&mut out);
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "\nskipped ({})", self.skipped.len());
            for s in &self.skipped {
                let _ = writeln!(out, "  {} {}; {}", s.path, s.reason, s.fix);
            }
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(out, "\nwarnings ({})", self.warnings.len());
            // Per kind, the first few in full; the rest are in the JSON report.
            let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
            for w in &self.warnings {
                let n = shown.entry(w.kind.as_str()).or_default();
                *n += 1;
                if *n > WARNINGS_PER_KIND {
                    continue;
                }
                match &w.path {
                    Some(p) => {
                        let _ = writeln!(out, "  {p}: {}", w.message);
                    }
                    None => {
                        let _ = writeln!(out, "  {}", w.message);
                    }
                }
            }
            for (kind, n) in shown.into_iter().filter(|(_, n)| *n > WARNINGS_PER_KIND) {
                let _ =
                    writeln!(out, "  ... and {} more {kind} warnings, all listed in the report", n - WARNINGS_PER_KIND);
            }
        }
        if !self.ignored.is_empty() {
            let _ = writeln!(
                out,
                "\nignored {} hidden or system file{} (listed in the report)",
                self.ignored.len(),
                plural(self.ignored.len())
            );
        }
        out
    }
}

pub fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_wide_warnings() {
        let mut r = Report::default();
        r.counts.usable = 3;
        let mut buckets = BTreeMap::new();
        buckets.insert(Bucket { width: 64, height: 64 }, 30);
        buckets.insert(Bucket { width: 48, height: 80 }, 1);
        r.finish(&buckets);
        let kinds: Vec<_> = r.warnings.iter().map(|w| w.kind.as_str()).collect();
        assert_eq!(kinds, ["few_images", "uneven_buckets"]);
        assert!(r.warnings[1].message.contains("48×80 (1 image)"));
        let table = r.table();
        assert!(table.contains("64×64"), "{table}");
    }

    #[test]
    fn concept_rows_and_their_warnings() {
        let concept = |name: &str, repeats, is_class| Concept {
            name: name.into(),
            path: format!("{repeats}_{name}/"),
            trigger: None,
            caption_template: None,
            repeats,
            loss_weight: 1.0,
            flip: false,
            is_class,
        };
        let mut r = Report::default();
        r.skip("3_broken/a.png", "is not an image", "remove it");
        r.skip("3_broken/b.png", "is not an image", "remove it");
        let b = Bucket { width: 64, height: 64 };
        let concepts = [concept("big", 20, false), concept("tiny", 1, false), concept("broken", 3, false), concept("dog", 1, true)];
        r.add_concepts(&concepts, &[vec![b; 10], vec![b], vec![], vec![b; 4]]);
        let shares: Vec<f64> = r.concepts.iter().map(|c| c.share).collect();
        assert_eq!(shares, [200.0 / 201.0, 1.0 / 201.0, 0.0, 0.0]);
        assert_eq!(r.concepts[2].skipped, 2);
        let kinds: Vec<_> = r.warnings.iter().map(|w| w.kind.as_str()).collect();
        // The class set trains as prior preservation's class samples: no warning.
        assert_eq!(kinds, ["small_concept", "empty_concept"]);
        assert!(r.warnings[1].message.starts_with("concept \"broken\" (3_broken/) has no usable image (2 files skipped"), "{}", r.warnings[1].message);
        let table = r.table();
        assert!(table.contains("concepts") && table.contains("99.5%") && table.contains("64×64 (10)"), "{table}");
    }
}
