//! Where prior preservation's rendered class images live and how prepare
//! takes them in: `.sdtune/class/class-NNNNN.png` (rendered by
//! `sample::class_images` before prepare scans), one class (regularisation)
//! concept captioned with the class prompt and no trigger word.
use std::path::{Path, PathBuf};

use super::concepts::{Concept, Layout, Source};
use super::scan::Found;

/// The folder of the rendered class images, inside the working folder.
pub const CLASS_DIR: &str = ".sdtune/class";

/// `class-00003.png`: the file of class image `index`.
pub fn file_name(index: usize) -> String {
    format!("class-{index:05}.png")
}

/// The files of class images `0..count` under `work_dir`.
pub fn files(work_dir: &Path, count: usize) -> Vec<PathBuf> {
    (0..count).map(|i| work_dir.join(CLASS_DIR).join(file_name(i))).collect()
}

/// Whether `concept` is the rendered class set (its images have no
/// caption file by design: the class prompt is their caption).
pub fn is_rendered(concept: &Concept) -> bool {
    concept.is_class && concept.path == format!("{CLASS_DIR}/")
}

/// Adds the rendered class images of `prompt` to `layout` as a class concept.
pub fn add_to_layout(layout: &mut Layout, work_dir: &Path, prompt: &str, count: usize) {
    let index = layout.concepts.len();
    layout.concepts.push(Concept {
        name: format!("class images ({prompt})"),
        path: format!("{CLASS_DIR}/"),
        trigger: None,
        caption_template: Some(prompt.to_string()),
        repeats: 1,
        loss_weight: 1.0,
        flip: false,
        is_class: true,
    });
    for (i, path) in files(work_dir, count).into_iter().enumerate() {
        let found = Found { path, rel: format!("{CLASS_DIR}/{}", file_name(i)) };
        layout.candidates.push(Source { found, concept: Some(index) });
    }
}
