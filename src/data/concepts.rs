//! Concepts: several subjects in one run, each with its own folder,
//! trigger word, caption template, repeats and loss weight.
//!
//! Three layouts reach `sdtune prepare`:
//! - a flat folder (no concepts): every image under it, the `data:`
//!   settings for all, exactly as before concepts existed;
//! - kohya's layout: sub-folders named `N_name` (N repeats per epoch;
//!   `name` is the concept and the caption of its images that have none),
//!   and under a `reg/` sub-folder the same for regularisation (class) sets;
//! - `data.concepts` in `sdtune.yaml`: a list of folders with their own
//!   settings, relative paths resolved against the config's folder.
//!
//! Regularisation concepts (`is_class`, kohya's `reg/`, and the class
//! images prepare renders from `data.class_prompt`) are prepared and
//! recorded apart: training draws them as prior preservation's class
//! samples, one beside each brand sample.
use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::scan::{scan, Found, Ignored};

/// The most repeats a concept may ask for (an epoch is materialised in memory).
pub const MAX_REPEATS: u32 = 10_000;

/// kohya's folder of regularisation concepts inside the data folder.
const REG_FOLDER: &str = "reg";

/// One entry of `data.concepts` in `sdtune.yaml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConceptConfig {
    /// The concept's image folder, relative to the config's folder.
    pub path: PathBuf,
    /// How the report names it [default: the folder's name].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Replaces `[trigger]` in its captions, else is prepended [default: data.trigger].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Caption of its images that have none [default: data.caption_template].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_template: Option<String>,
    /// Times each of its images is seen per epoch.
    #[serde(default = "one")]
    pub repeats: u32,
    /// Multiplies the loss of its samples.
    #[serde(default = "unit")]
    pub loss_weight: f64,
    /// Also cache flipped latents [default: data.flip].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip: Option<bool>,
    /// A regularisation (class) set for prior preservation, not a subject.
    #[serde(default)]
    pub is_class: bool,
}

fn one() -> u32 {
    1
}

fn unit() -> f64 {
    1.0
}

/// A concept with every setting resolved, as the prepared dataset records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Concept {
    pub name: String,
    /// Its folder as messages show it.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_template: Option<String>,
    pub repeats: u32,
    pub loss_weight: f64,
    pub flip: bool,
    #[serde(default)]
    pub is_class: bool,
}

/// Rejects concept settings no run can use, naming the entry.
pub fn validate(concepts: &[ConceptConfig]) -> Result<()> {
    for (i, c) in concepts.iter().enumerate() {
        let at = format!("data.concepts[{i}] ({})", c.path.display());
        if c.path.as_os_str().is_empty() {
            bail!("data.concepts[{i}] has an empty path; give the folder of the concept's images");
        }
        if c.repeats == 0 || c.repeats > MAX_REPEATS {
            bail!("{at}: repeats is {}; it must be 1 to {MAX_REPEATS} (times each image is seen per epoch)", c.repeats);
        }
        if !(c.loss_weight.is_finite() && c.loss_weight > 0.0) {
            bail!("{at}: loss_weight is {}; it must be a positive number (1.0 is usual)", c.loss_weight);
        }
        if c.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            bail!("{at}: name is empty; give the concept a name or leave the key out");
        }
    }
    Ok(())
}

/// `10_acme roadster` -> (10, "acme roadster"); `None` when the name is not
/// kohya's `N_name` (digits, an underscore, a non-empty name).
pub fn kohya_folder(name: &str) -> Option<(u64, String)> {
    let (count, rest) = name.split_once('_')?;
    let rest = rest.trim();
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) || rest.is_empty() {
        return None;
    }
    // More digits than u64 holds still reads as a (far too large) count.
    Some((count.parse().unwrap_or(u64::MAX), rest.to_string()))
}

/// A candidate file and the concept it belongs to (`None`: the flat folder).
#[derive(Clone, Debug)]
pub struct Source {
    pub found: Found,
    pub concept: Option<usize>,
}

/// A file under the data folder that no concept uses, and why.
#[derive(Clone, Debug)]
pub struct Outside {
    pub path: PathBuf,
    pub rel: String,
    pub reason: String,
    pub fix: String,
}

/// What prepare works on: the concepts and every file with its concept.
#[derive(Debug, Default)]
pub struct Layout {
    /// Empty for a flat folder.
    pub concepts: Vec<Concept>,
    pub candidates: Vec<Source>,
    pub sidecars: Vec<Found>,
    pub metadata: Vec<Found>,
    pub ignored: Vec<Ignored>,
    /// Files of a kohya tree outside its concept folders.
    pub outside: Vec<Outside>,
}

impl Layout {
    /// The concept settings of `concept` (`None`: the `data:` settings).
    pub fn concept(&self, concept: Option<usize>) -> Option<&Concept> {
        concept.and_then(|i| self.concepts.get(i))
    }
}

/// The `data:` settings every concept inherits.
pub struct Defaults<'a> {
    pub trigger: Option<&'a str>,
    pub caption_template: Option<&'a str>,
    pub flip: bool,
}

/// Scans `data_dir` as a flat folder or a kohya tree.
pub fn from_folder(data_dir: &Path, defaults: &Defaults, on_file: &mut dyn FnMut(usize)) -> Result<Layout> {
    let scanned = scan(data_dir, on_file)?;
    let folders = kohya_folders(data_dir, defaults);
    let mut layout = Layout { sidecars: scanned.sidecars, metadata: scanned.metadata, ignored: scanned.ignored, ..Default::default() };
    if folders.is_empty() {
        layout.candidates = scanned.candidates.into_iter().map(|found| Source { found, concept: None }).collect();
        return Ok(layout);
    }
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for folder in folders {
        match folder {
            Ok((rel, concept)) => {
                index.insert(rel, layout.concepts.len());
                layout.concepts.push(concept);
            }
            Err(outside) => layout.outside.push(outside),
        }
    }
    make_names_unique(&mut layout.concepts);
    for found in scanned.candidates {
        let parts: Vec<&str> = found.rel.split('/').collect();
        let (folder, is_reg) = match parts.as_slice() {
            [reg, folder, _, ..] if reg.eq_ignore_ascii_case(REG_FOLDER) && kohya_folder(folder).is_some() => {
                (format!("{reg}/{folder}"), true)
            }
            [folder, _, ..] => (folder.to_string(), false),
            _ => (String::new(), false),
        };
        match index.get(&folder) {
            Some(&i) => layout.candidates.push(Source { found, concept: Some(i) }),
            None => {
                let outside = outside_reason(&found, &folder, is_reg, &layout.outside);
                layout.outside.push(outside);
            }
        }
    }
    // Folder-level entries only explained the files in them.
    layout.outside.retain(|o| !o.rel.ends_with('/'));
    Ok(layout)
}

/// The kohya concept folders of `data_dir` (and of its `reg/`), in name
/// order: `Ok((folder rel, concept))`, or `Err` for an `N_name` folder that
/// cannot be used (0 or too many repeats). Empty when the tree is not kohya's.
fn kohya_folders(data_dir: &Path, defaults: &Defaults) -> Vec<std::result::Result<(String, Concept), Outside>> {
    let mut out = Vec::new();
    for (name, is_reg) in sub_folders(data_dir).into_iter().map(|n| (n, false)).chain(
        sub_folders(data_dir)
            .into_iter()
            .filter(|n| n.eq_ignore_ascii_case(REG_FOLDER))
            .flat_map(|reg| sub_folders(&data_dir.join(&reg)).into_iter().map(move |n| (format!("{reg}/{n}"), true))),
    ) {
        let leaf = name.rsplit('/').next().unwrap_or(&name);
        let Some((repeats, concept)) = kohya_folder(leaf) else { continue };
        if repeats == 0 || repeats > MAX_REPEATS as u64 {
            out.push(Err(Outside {
                path: data_dir.join(&name),
                rel: format!("{name}/"),
                reason: format!("is in {name}/, a concept folder with {repeats} repeats"),
                fix: format!("rename the folder with 1 to {MAX_REPEATS} repeats (N_{concept}) to train on it"),
            }));
            continue;
        }
        out.push(Ok((
            name.clone(),
            Concept {
                name: if is_reg { format!("{concept} (reg)") } else { concept.clone() },
                path: format!("{name}/"),
                trigger: defaults.trigger.map(String::from),
                // kohya: the folder's name is the caption of images without one.
                caption_template: Some(concept),
                repeats: repeats as u32,
                loss_weight: 1.0,
                flip: defaults.flip,
                is_class: is_reg,
            },
        )));
    }
    out
}

/// Why a file of a kohya tree is in no concept.
fn outside_reason(found: &Found, folder: &str, is_reg: bool, folder_notes: &[Outside]) -> Outside {
    let (rel, path) = (found.rel.as_str(), found.path.clone());
    if let Some(note) = folder_notes.iter().find(|o| o.rel == format!("{folder}/")) {
        return Outside { path, rel: rel.into(), reason: note.reason.clone(), fix: note.fix.clone() };
    }
    if !rel.contains('/') || (folder.is_empty() && !is_reg) {
        return Outside {
            path,
            rel: rel.into(),
            reason: "lies outside the concept folders (the folder holds kohya-style N_name sub-folders)".into(),
            fix: "move it into a concept folder such as 1_name/ to train on it".into(),
        };
    }
    let top = rel.split('/').next().unwrap_or(rel);
    let shown = if top.eq_ignore_ascii_case(REG_FOLDER) { rel.rsplit_once('/').map_or(top, |(d, _)| d) } else { top };
    Outside {
        path,
        rel: rel.into(),
        reason: format!("is in {shown}/, which is not a concept folder (kohya-style N_name)"),
        fix: "rename the folder N_name (N: repeats per epoch) to train on it".into(),
    }
}

/// Names of the visible sub-folders of `dir`, sorted.
fn sub_folders(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// Scans each folder of `data.concepts`, resolved against `config_dir`.
/// A file's `rel` is its path relative to `config_dir` as the config writes it.
pub fn from_config(
    configs: &[ConceptConfig],
    config_dir: &Path,
    defaults: &Defaults,
    on_file: &mut dyn FnMut(usize),
) -> Result<Layout> {
    validate(configs)?;
    let mut layout = Layout::default();
    let mut seen_sidecars = HashSet::new();
    let mut seen_metadata = HashSet::new();
    let mut files = 0;
    for (i, c) in configs.iter().enumerate() {
        let root = config_dir.join(&c.path);
        let shown = display_path(&c.path);
        if !root.is_dir() {
            bail!(
                "data.concepts[{i}].path {shown} {} (paths are relative to the folder of sdtune.yaml); fix the path or remove the concept",
                if root.exists() { "is a file, not a folder" } else { "does not exist" }
            );
        }
        let scanned = scan(&root, &mut |n| on_file(files + n))?;
        files += scanned.candidates.len() + scanned.sidecars.len() + scanned.metadata.len();
        let prefixed = |f: Found| Found { rel: format!("{shown}/{}", f.rel), path: f.path };
        layout.candidates.extend(scanned.candidates.into_iter().map(|f| Source { found: prefixed(f), concept: Some(i) }));
        // A folder listed twice (two triggers for one set) is read once for captions.
        for f in scanned.sidecars {
            if seen_sidecars.insert(f.path.clone()) {
                layout.sidecars.push(prefixed(f));
            }
        }
        for f in scanned.metadata {
            if seen_metadata.insert(f.path.clone()) {
                layout.metadata.push(prefixed(f));
            }
        }
        layout.ignored.extend(scanned.ignored.into_iter().map(|g| Ignored { rel: format!("{shown}/{}", g.rel), reason: g.reason }));
        let folder_name = c
            .path
            .components()
            .rev()
            .find_map(|p| match p {
                Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
                _ => None,
            })
            .unwrap_or_else(|| shown.clone());
        layout.concepts.push(Concept {
            name: c.name.clone().map(|n| n.trim().to_string()).unwrap_or(folder_name),
            path: format!("{shown}/"),
            trigger: c.trigger.clone().or(defaults.trigger.map(String::from)),
            caption_template: c.caption_template.clone().or(defaults.caption_template.map(String::from)),
            repeats: c.repeats,
            loss_weight: c.loss_weight,
            flip: c.flip.unwrap_or(defaults.flip),
            is_class: c.is_class,
        });
    }
    make_names_unique(&mut layout.concepts);
    Ok(layout)
}

/// A path as the config writes it, with `/` separators and no trailing one.
fn display_path(path: &Path) -> String {
    let text = path.to_string_lossy().replace('\\', "/");
    let trimmed = text.trim_end_matches('/');
    if trimmed.is_empty() {
        text
    } else {
        trimmed.to_string()
    }
}

/// Two concepts of one name (a folder listed twice) get their trigger, or a number, added.
fn make_names_unique(concepts: &mut [Concept]) {
    let mut taken: HashSet<String> = HashSet::new();
    for i in 0..concepts.len() {
        let mut name = concepts[i].name.clone();
        if taken.contains(&name) {
            if let Some(t) = &concepts[i].trigger {
                name = format!("{name} [{t}]");
            }
            let base = name.clone();
            let mut n = 2;
            while taken.contains(&name) {
                name = format!("{base} ({n})");
                n += 1;
            }
        }
        taken.insert(name.clone());
        concepts[i].name = name;
    }
}

/// Each concept's share of an epoch: images x repeats over the sum for
/// every training (non-class) concept; class concepts get 0.
pub fn epoch_shares(concepts: &[Concept], images: &[usize]) -> Vec<f64> {
    let draws: Vec<f64> =
        concepts.iter().zip(images).map(|(c, &n)| if c.is_class { 0.0 } else { (n as u64 * c.repeats as u64) as f64 }).collect();
    let total: f64 = draws.iter().sum();
    draws.iter().map(|d| if total > 0.0 { d / total } else { 0.0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults<'static> {
        Defaults { trigger: Some("tw"), caption_template: None, flip: false }
    }

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    #[test]
    fn kohya_folder_names() {
        assert_eq!(kohya_folder("10_acme roadster"), Some((10, "acme roadster".into())));
        assert_eq!(kohya_folder("2_tidewave_star"), Some((2, "tidewave_star".into())));
        assert_eq!(kohya_folder("0_logo"), Some((0, "logo".into())));
        assert_eq!(kohya_folder("99999999999999999999999_x").map(|f| f.0), Some(u64::MAX));
        for not in ["photos", "_x", "10_", "10_  ", "a1_x", "10-x"] {
            assert_eq!(kohya_folder(not), None, "{not}");
        }
    }

    #[test]
    fn a_kohya_tree_gives_concepts_with_repeats_and_folder_captions() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let d = tmp.path();
        touch(&d.join("10_tidewave circle/a.png"));
        touch(&d.join("10_tidewave circle/b.png"));
        touch(&d.join("2_tidewave star/c.png"));
        touch(&d.join("0_unused/d.png"));
        touch(&d.join("notes/e.png"));
        touch(&d.join("stray.png"));
        touch(&d.join("reg/1_circle/f.png"));
        let layout = from_folder(d, &defaults(), &mut |_| {}).unwrap();
        let names: Vec<_> = layout.concepts.iter().map(|c| (c.name.as_str(), c.repeats, c.is_class)).collect();
        assert_eq!(names, [("tidewave circle", 10, false), ("tidewave star", 2, false), ("circle (reg)", 1, true)]);
        let circle = &layout.concepts[0];
        assert_eq!(circle.caption_template.as_deref(), Some("tidewave circle"));
        assert_eq!(circle.trigger.as_deref(), Some("tw"));
        let used: Vec<_> = layout.candidates.iter().map(|s| (s.found.rel.as_str(), s.concept)).collect();
        assert_eq!(
            used,
            [("10_tidewave circle/a.png", Some(0)), ("10_tidewave circle/b.png", Some(0)), ("2_tidewave star/c.png", Some(1)), ("reg/1_circle/f.png", Some(2))]
        );
        let outside: Vec<_> = layout.outside.iter().map(|o| o.rel.as_str()).collect();
        assert_eq!(outside, ["0_unused/d.png", "notes/e.png", "stray.png"]);
        assert!(layout.outside[0].reason.contains("0 repeats"), "{:?}", layout.outside[0]);
        assert!(layout.outside[1].reason.contains("not a concept folder"), "{:?}", layout.outside[1]);
    }

    #[test]
    fn a_flat_folder_has_no_concepts() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        touch(&tmp.path().join("a/b/x.png"));
        touch(&tmp.path().join("y.png"));
        let layout = from_folder(tmp.path(), &defaults(), &mut |_| {}).unwrap();
        assert!(layout.concepts.is_empty() && layout.outside.is_empty());
        assert!(layout.candidates.iter().all(|s| s.concept.is_none()));
        assert_eq!(layout.candidates.len(), 2);
    }

    fn entry(path: &str) -> ConceptConfig {
        ConceptConfig {
            path: path.into(),
            name: None,
            trigger: None,
            caption_template: None,
            repeats: 1,
            loss_weight: 1.0,
            flip: None,
            is_class: false,
        }
    }

    #[test]
    fn configured_concepts_resolve_against_the_config_folder() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let work = tmp.path().join("project");
        touch(&work.join("photos/roadster/a.png"));
        touch(&work.join("photos/roadster/a.txt"));
        touch(&tmp.path().join("shared/logo/l.png"));
        let configs = vec![
            ConceptConfig { trigger: Some("rdx".into()), repeats: 3, ..entry("photos/roadster") },
            ConceptConfig { trigger: Some("lgx".into()), loss_weight: 0.5, flip: Some(true), ..entry("../shared/logo/") },
            ConceptConfig { trigger: Some("other".into()), ..entry("photos/roadster") },
        ];
        let layout = from_config(&configs, &work, &defaults(), &mut |_| {}).unwrap();
        let rels: Vec<_> = layout.candidates.iter().map(|s| (s.found.rel.as_str(), s.concept)).collect();
        assert_eq!(rels, [("photos/roadster/a.png", Some(0)), ("../shared/logo/l.png", Some(1)), ("photos/roadster/a.png", Some(2))]);
        assert!(layout.candidates[1].found.path.is_file());
        assert_eq!(layout.sidecars.len(), 1, "a folder listed twice is read once for captions");
        let c = &layout.concepts;
        assert_eq!((c[0].name.as_str(), c[0].repeats, c[0].trigger.as_deref()), ("roadster", 3, Some("rdx")));
        assert_eq!((c[1].name.as_str(), c[1].loss_weight, c[1].flip), ("logo", 0.5, true));
        assert_eq!(c[2].name, "roadster [other]");
        assert_eq!(c[1].path, "../shared/logo/");
    }

    #[test]
    fn bad_concepts_are_one_sentence() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let err = from_config(&[entry("nowhere")], tmp.path(), &defaults(), &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("data.concepts[0].path nowhere does not exist"), "{err}");
        let err = validate(&[ConceptConfig { repeats: 0, ..entry("a") }]).unwrap_err().to_string();
        assert!(err.contains("repeats is 0"), "{err}");
        let err = validate(&[ConceptConfig { loss_weight: f64::NAN, ..entry("a") }]).unwrap_err().to_string();
        assert!(err.contains("loss_weight"), "{err}");
    }

    #[test]
    fn shares_count_images_times_repeats_of_training_concepts() {
        let concept = |repeats, is_class| Concept {
            name: String::new(),
            path: String::new(),
            trigger: None,
            caption_template: None,
            repeats,
            loss_weight: 1.0,
            flip: false,
            is_class,
        };
        let shares = epoch_shares(&[concept(10, false), concept(2, false), concept(1, true)], &[4, 5, 9]);
        assert_eq!(shares, [0.8, 0.2, 0.0]);
    }
}
