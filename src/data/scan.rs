//! Walking the image folder: every regular file under it, symlinks followed
//! but never into a folder already visited (so loops end), hidden and
//! system files set aside, caption sources told apart from candidates.
//! Whether a candidate is an image is decided later, by its content.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// A file found under the data folder.
#[derive(Clone, Debug)]
pub struct Found {
    /// The real path, which every read goes through.
    pub path: PathBuf,
    /// The path relative to the data folder, for messages and the report;
    /// a name that is not valid UTF-8 shows U+FFFD for its bad bytes
    /// ([`resolve`] finds the file again from it).
    pub rel: String,
}

impl Found {
    /// Whether `rel` shows a name that is not valid UTF-8 (lossily).
    pub fn rel_is_lossy(&self) -> bool {
        self.rel.contains(char::REPLACEMENT_CHARACTER) && self.path.to_str().is_none()
    }
}

/// A file or folder left out, and why.
#[derive(Clone, Debug)]
pub struct Ignored {
    pub rel: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Scan {
    /// Files that may be images (decided by content), sorted by path.
    pub candidates: Vec<Found>,
    /// `NAME.txt` files: captions for the image `NAME.*` beside them.
    pub sidecars: Vec<Found>,
    /// `metadata.jsonl` files.
    pub metadata: Vec<Found>,
    /// Hidden and system files, symlink loops, unreadable folders.
    pub ignored: Vec<Ignored>,
}

/// Folder names that hold operating-system or NAS bookkeeping, not photos.
const SYSTEM_DIRS: &[&str] = &["__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information", "lost+found"];
/// File names that hold operating-system bookkeeping.
const SYSTEM_FILES: &[&str] = &["Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r"];

/// Why a file is set aside whose name reads the same as a sibling's once
/// its bytes that are not UTF-8 show as U+FFFD: not on purpose like a hidden
/// file, so prepare reports it as skipped, with [`SAME_SHOWN_NAME_FIX`].
pub const SAME_SHOWN_NAME: &str =
    "has a name that is not valid UTF-8 and reads the same as another file's in its folder, so sdtune cannot tell them apart";
pub const SAME_SHOWN_NAME_FIX: &str = "rename one of them to UTF-8";

/// Lists `root` recursively. Errs only when `root` itself is unusable.
pub fn scan(root: &Path, on_file: &mut dyn FnMut(usize)) -> Result<Scan> {
    if !root.exists() {
        bail!("{} does not exist; pass the folder that holds your images", root.display());
    }
    if !root.is_dir() {
        bail!("{} is a file, not a folder; pass the folder that holds your images", root.display());
    }
    let mut scan = Scan::default();
    let mut visited = HashSet::new();
    if let Some(id) = dir_id(root) {
        visited.insert(id);
    }
    let mut stack = vec![(root.to_path_buf(), String::new())];
    let mut count = 0;
    while let Some((dir, rel_dir)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                scan.ignored
                    .push(Ignored { rel: display_dir(&rel_dir), reason: format!("folder cannot be read ({e})") });
                continue;
            }
        };
        let mut names: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        names.sort();
        // Names as shown: two that are not valid UTF-8 may read the same.
        let mut shown = HashSet::new();
        for name in names {
            let path = dir.join(&name);
            let name = name.to_string_lossy().into_owned();
            let rel = if rel_dir.is_empty() { name.clone() } else { format!("{rel_dir}/{name}") };
            if !shown.insert(name.clone()) {
                scan.ignored.push(Ignored { rel, reason: SAME_SHOWN_NAME.into() });
                continue;
            }
            if name.starts_with('.') {
                scan.ignored.push(Ignored { rel, reason: "hidden file".into() });
                continue;
            }
            let is_link = std::fs::symlink_metadata(&path).map(|m| m.file_type().is_symlink()).unwrap_or(false);
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(_) if is_link => {
                    scan.ignored.push(Ignored { rel, reason: "symbolic link to nothing".into() });
                    continue;
                }
                Err(e) => {
                    scan.ignored.push(Ignored { rel, reason: format!("cannot be read ({e})") });
                    continue;
                }
            };
            if meta.is_dir() {
                if SYSTEM_DIRS.contains(&name.as_str()) {
                    scan.ignored.push(Ignored { rel, reason: "system folder".into() });
                    continue;
                }
                let first_visit = dir_id(&path).is_none_or(|id| visited.insert(id));
                if !first_visit {
                    let reason = if is_link {
                        "symbolic link to a folder already scanned (a loop or a repeat); not followed"
                    } else {
                        "folder already scanned"
                    };
                    scan.ignored.push(Ignored { rel, reason: reason.into() });
                    continue;
                }
                stack.push((path, rel));
                continue;
            }
            if !meta.is_file() {
                scan.ignored.push(Ignored { rel, reason: "not a regular file".into() });
                continue;
            }
            if SYSTEM_FILES.contains(&name.as_str()) {
                scan.ignored.push(Ignored { rel, reason: "system file".into() });
                continue;
            }
            count += 1;
            on_file(count);
            let found = Found { path, rel };
            let lower = name.to_lowercase();
            if lower == "metadata.jsonl" {
                scan.metadata.push(found);
            } else if lower.ends_with(".txt") {
                scan.sidecars.push(found);
            } else {
                scan.candidates.push(found);
            }
        }
    }
    scan.candidates.sort_by(|a, b| a.rel.cmp(&b.rel));
    scan.sidecars.sort_by(|a, b| a.rel.cmp(&b.rel));
    scan.metadata.sort_by(|a, b| a.rel.cmp(&b.rel));
    scan.ignored.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(scan)
}

/// The file a recorded path names: the path itself when it exists, else,
/// component by component, the one entry of each folder whose name reads
/// the same once its bytes that are not valid UTF-8 show as U+FFFD (how
/// [`Found::rel`] records them; of several, the first in byte order, the
/// one [`scan`] keeps). Parts that match nothing are kept as they are, so
/// a caller's "not found" names what was asked for.
pub fn resolve(path: &Path) -> PathBuf {
    if path.symlink_metadata().is_ok() || !path.to_string_lossy().contains(char::REPLACEMENT_CHARACTER) {
        return path.to_path_buf();
    }
    let mut out = PathBuf::new();
    for part in path.components() {
        let std::path::Component::Normal(name) = part else {
            out.push(part);
            continue;
        };
        let next = out.join(name);
        if next.symlink_metadata().is_ok() || !name.to_string_lossy().contains(char::REPLACEMENT_CHARACTER) {
            out = next;
            continue;
        }
        let dir = if out.as_os_str().is_empty() { Path::new(".") } else { out.as_path() };
        let shown = name.to_string_lossy();
        // Of names that read alike, the first in byte order, as the scan keeps.
        let first = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy() == shown)
            .min();
        out = first.map_or(next, |n| out.join(n));
    }
    out
}

fn display_dir(rel: &str) -> String {
    if rel.is_empty() {
        ".".into()
    } else {
        format!("{rel}/")
    }
}

/// A folder's identity (device, inode), following symlinks.
#[cfg(unix)]
fn dir_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Elsewhere the canonical path stands in for the inode.
#[cfg(not(unix))]
fn dir_id(path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_nested_folders_and_sets_aside_the_rest() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("__MACOSX")).unwrap();
        std::fs::write(root.join("a/b/x.jpg"), b"1").unwrap();
        std::fs::write(root.join("a/b/x.txt"), b"cap").unwrap();
        std::fs::write(root.join(".DS_Store"), b"1").unwrap();
        std::fs::write(root.join("Thumbs.db"), b"1").unwrap();
        std::fs::write(root.join("metadata.jsonl"), b"{}").unwrap();
        std::fs::write(root.join("y.PNG"), b"1").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.join("a"), root.join("a/b/loop")).unwrap();
        let scan = scan(root, &mut |_| {}).unwrap();
        let rels: Vec<_> = scan.candidates.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(rels, ["a/b/x.jpg", "y.PNG"]);
        assert_eq!(scan.sidecars.len(), 1);
        assert_eq!(scan.metadata.len(), 1);
        let ignored: Vec<_> = scan.ignored.iter().map(|i| i.rel.as_str()).collect();
        assert!(ignored.contains(&".DS_Store") && ignored.contains(&"Thumbs.db") && ignored.contains(&"__MACOSX"));
        #[cfg(unix)]
        assert!(scan.ignored.iter().any(|i| i.rel == "a/b/loop" && i.reason.contains("loop")));
    }

    #[cfg(unix)]
    #[test]
    fn names_that_are_not_utf8_are_found_again_from_their_shown_path() {
        use std::os::unix::ffi::OsStrExt;
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let root = tmp.path();
        let dir = root.join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
        std::fs::create_dir(&dir).unwrap();
        let image = dir.join(std::ffi::OsStr::from_bytes(b"photo \xff.png"));
        std::fs::write(&image, b"1").unwrap();
        std::fs::write(dir.join(std::ffi::OsStr::from_bytes(b"photo \xfe.png")), b"2").unwrap();
        let scan = scan(root, &mut |_| {}).unwrap();
        assert_eq!(scan.candidates.len(), 1, "{:?}", scan.candidates);
        let found = &scan.candidates[0];
        assert_eq!(found.rel, "caf\u{fffd}/photo \u{fffd}.png");
        assert!(found.rel_is_lossy());
        assert_eq!(found.path, dir.join(std::ffi::OsStr::from_bytes(b"photo \xfe.png")));
        assert!(scan.ignored.iter().any(|i| i.reason == SAME_SHOWN_NAME), "{:?}", scan.ignored);
        // Shown paths resolve back to the file the scan kept.
        assert_eq!(resolve(&root.join("caf\u{fffd}")), dir);
        assert_eq!(resolve(&root.join(&found.rel)), found.path);
        assert_eq!(resolve(&root.join("caf\u{fffd}/other.png")), dir.join("other.png"));
    }

    #[test]
    fn missing_folder_is_one_sentence() {
        let err = scan(Path::new("/nonexistent/photos"), &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
