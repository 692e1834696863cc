//! Consistency figures per concept: each concept's prompts measured against
//! that concept's own images, so a run with several subjects shows which
//! the LoRA has learned and which it has not.
//!
//! A grid prompt belongs to the concept one of whose captions it is; else to
//! the concept whose own trigger word (or, failing that, name) it holds, the
//! longest such match winning; else to none (it still counts in the figures
//! against the whole set).
use std::path::Path;

use anyhow::Result;

use super::metrics::{self, Brand, Cell, ConceptFigures, LabHistogram};

/// A training concept's palette and the grid rows (prompts) that are its.
#[derive(Clone, Debug)]
pub struct ConceptPalette {
    pub name: String,
    pub source: String,
    pub images: usize,
    pub histogram: LabHistogram,
    /// Indices of the grid's prompts that belong to the concept.
    pub rows: Vec<usize>,
}

/// A prepared concept's images, for its palette.
pub struct PreparedConcept {
    pub name: String,
    pub trigger: Option<String>,
    pub captions: Vec<String>,
    pub brand: Brand,
}

/// Each training concept of the set prepared under `work_dir` with its
/// pooled palette; empty for a flat folder or when nothing was prepared.
pub fn prepared_concepts(work_dir: &Path) -> Result<Vec<PreparedConcept>> {
    if !work_dir.join(crate::data::cache::CACHE_DIR).join("manifest.json").is_file() {
        return Ok(Vec::new());
    }
    let cache = crate::data::cache::CacheReader::open(work_dir)?;
    let dataset = cache.dataset();
    let data_dir = work_dir.join(&dataset.data_dir);
    let mut out = Vec::new();
    for (i, concept) in dataset.concepts.iter().enumerate() {
        if concept.is_class {
            continue;
        }
        let items: Vec<_> = dataset.items.iter().filter(|item| item.concept == Some(i)).collect();
        if items.is_empty() {
            continue;
        }
        let mut files = Vec::new();
        let mut captions: Vec<String> = Vec::new();
        for item in &items {
            // The recorded path shows names that are not UTF-8 lossily; find the file again.
            let file = crate::data::scan::resolve(&data_dir.join(&item.path));
            if !files.contains(&file) {
                files.push(file);
            }
            if !captions.contains(&item.caption) {
                captions.push(item.caption.clone());
            }
        }
        if let Some(gone) = files.iter().find(|f| !f.is_file()) {
            anyhow::bail!(
                "the prepared image {} of concept {:?} is gone; run `sdtune prepare` again",
                gone.display(),
                concept.name
            );
        }
        let brand = Brand::from_files(&files, format!("concept {:?} ({})", concept.name, concept.path))?;
        out.push(PreparedConcept { name: concept.name.clone(), trigger: concept.trigger.clone(), captions, brand });
    }
    Ok(out)
}

/// The palettes with the grid rows each concept owns (see the module notes).
pub fn palettes(prompts: &[String], concepts: Vec<PreparedConcept>) -> Vec<ConceptPalette> {
    let owners: Vec<Option<usize>> = prompts.iter().map(|p| owner(p, &concepts)).collect();
    concepts
        .into_iter()
        .enumerate()
        .map(|(i, c)| ConceptPalette {
            name: c.name,
            source: c.brand.source,
            images: c.brand.images,
            histogram: c.brand.histogram,
            rows: (0..prompts.len()).filter(|&r| owners[r] == Some(i)).collect(),
        })
        .collect()
}

/// The concept `prompt` belongs to.
fn owner(prompt: &str, concepts: &[PreparedConcept]) -> Option<usize> {
    if let Some(i) = concepts.iter().position(|c| c.captions.iter().any(|cap| cap == prompt)) {
        return Some(i);
    }
    // A trigger shared by every concept (kohya's data.trigger) tells none apart.
    fn own_trigger<'a>(c: &'a PreparedConcept, all: &[PreparedConcept]) -> Option<&'a str> {
        c.trigger.as_deref().filter(|t| all.iter().filter(|o| o.trigger.as_deref() == Some(*t)).count() == 1)
    }
    let lower = prompt.to_lowercase();
    concepts
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let key = own_trigger(c, concepts).unwrap_or(&c.name).to_lowercase();
            holds_phrase(&lower, &key).then_some((key.len(), i))
        })
        .max_by_key(|&(len, i)| (len, std::cmp::Reverse(i)))
        .map(|(_, i)| i)
}

/// Whether `phrase` occurs in `text` as whole words.
fn holds_phrase(text: &str, phrase: &str) -> bool {
    if phrase.is_empty() {
        return false;
    }
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    text.match_indices(phrase).any(|(at, _)| {
        let before = text[..at].chars().next_back().is_none_or(|c| !word(c));
        let after = text[at + phrase.len()..].chars().next().is_none_or(|c| !word(c));
        before && after
    })
}

/// Each concept's figures: its rows' cells against its own images.
/// `prompts` are the grid's prompts, in row order, as the cells hold them.
pub fn per_concept(cells: &[Cell], prompts: &[String], concepts: &[ConceptPalette]) -> Vec<ConceptFigures> {
    concepts
        .iter()
        .filter(|c| !c.rows.is_empty())
        .map(|c| {
            let mine: Vec<&str> = c.rows.iter().filter_map(|&r| prompts.get(r).map(String::as_str)).collect();
            let cells: Vec<Cell> = cells
                .iter()
                .filter(|cell| mine.contains(&cell.prompt))
                .map(|cell| Cell { file: cell.file.clone(), prompt: cell.prompt, seed: cell.seed, variant: cell.variant, image: cell.image })
                .collect();
            let brand = Brand { source: c.source.clone(), images: c.images, histogram: c.histogram.clone() };
            let figures = metrics::consistency(&cells, &brand);
            ConceptFigures {
                concept: c.name.clone(),
                brand: c.source.clone(),
                brand_images: c.images,
                variants: figures.variants,
                prompts: figures.prompts,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;

    fn concept(name: &str, trigger: Option<&str>, captions: &[&str], rgb: [u8; 3]) -> PreparedConcept {
        let histogram = LabHistogram::of(&RgbImage::from_pixel(8, 8, image::Rgb(rgb)));
        PreparedConcept {
            name: name.into(),
            trigger: trigger.map(String::from),
            captions: captions.iter().map(|c| c.to_string()).collect(),
            brand: Brand { source: name.into(), images: 1, histogram },
        }
    }

    #[test]
    fn prompts_go_to_the_concept_of_their_caption_trigger_or_name() {
        let concepts = vec![
            concept("roadster", Some("rdx"), &["rdx, a red car"], [200, 20, 20]),
            concept("logo", Some("lgx"), &["lgx, a logo"], [20, 20, 200]),
        ];
        let prompts: Vec<String> =
            ["lgx, a logo", "rdx on a beach", "a photo of lgx-like things", "a sunset", "rdx2 car"].map(String::from).to_vec();
        let p = palettes(&prompts, concepts);
        assert_eq!(p[0].rows, [1]);
        assert_eq!(p[1].rows, [0]);
        // Shared triggers (kohya's one data.trigger) fall back to names.
        let kohya = vec![
            concept("tidewave circle", Some("tw"), &[], [1, 1, 1]),
            concept("tidewave star", Some("tw"), &[], [1, 1, 1]),
        ];
        let prompts: Vec<String> = ["tw, tidewave star on sand", "tw, Tidewave Circle"].map(String::from).to_vec();
        let p = palettes(&prompts, kohya);
        assert_eq!((p[0].rows.clone(), p[1].rows.clone()), (vec![1], vec![0]));
    }

    #[test]
    fn each_concept_is_measured_against_its_own_images() {
        let red = RgbImage::from_pixel(8, 8, image::Rgb([200, 20, 20]));
        let blue = RgbImage::from_pixel(8, 8, image::Rgb([20, 20, 200]));
        let prompts: Vec<String> = ["rdx car", "lgx logo"].map(String::from).to_vec();
        let palettes = palettes(
            &prompts,
            vec![concept("roadster", Some("rdx"), &[], [200, 20, 20]), concept("logo", Some("lgx"), &[], [20, 20, 200])],
        );
        // The roadster prompt drew red (its own colour), the logo prompt red too (not learned).
        let cells = vec![
            Cell { file: "g.png".into(), prompt: &prompts[0], seed: 1, variant: "lora", image: &red },
            Cell { file: "g.png".into(), prompt: &prompts[1], seed: 1, variant: "lora", image: &red },
        ];
        let figures = per_concept(&cells, &prompts, &palettes);
        assert_eq!(figures.len(), 2);
        assert_eq!(figures[0].concept, "roadster");
        assert_eq!(figures[0].variants[0].mean, 0.0);
        let far = metrics::emd(&LabHistogram::of(&red), &LabHistogram::of(&blue));
        assert!((figures[1].variants[0].mean - far).abs() < 1e-9 && far > 10.0, "{figures:?}");
        assert_eq!(figures[1].prompts[0].prompt, "lgx logo");
    }
}
