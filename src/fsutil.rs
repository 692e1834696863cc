//! Files that are either fully written or not there at all.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder and a
/// rename, so a crash never leaves a half-written file under `path`, and a
/// failed write (a full disk) leaves no temporary file behind either.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// [`write_atomic`] with the content written by `write`.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let tmp = temp_path(dir, path);
    let _tracked = crate::interrupt::track_temp(&tmp);
    let written = write_then_rename(&tmp, path, write);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_then_rename(tmp: &Path, path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    // Messages name the file the user asked for, not the temporary one.
    let mut file = File::create(tmp).with_context(|| format!("cannot create {}", path.display()))?;
    write(&mut file).with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all().with_context(|| format!("cannot write {}", path.display()))?;
    drop(file);
    std::fs::rename(tmp, path).with_context(|| format!("cannot move {} into place as {}", tmp.display(), path.display()))
}

/// `.NAME.tmp-PID` beside the target: hidden, and never taken for a result.
fn temp_path(dir: &Path, target: &Path) -> PathBuf {
    let stem = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{stem}.tmp-{}", std::process::id()))
}

/// SHA-256 of `bytes` in lowercase hex (cache shards, states, file identities).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Why `path` is not a readable file, for "--flag PATH <why>; ..." sentences:
/// a folder is named as one, never as missing.
pub fn why_not_a_file(path: &Path) -> &'static str {
    if path.is_dir() {
        "is a folder, not a file"
    } else if path.exists() {
        "is not a regular file"
    } else {
        "does not exist"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_neither_the_target_nor_a_temp_file() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let target = tmp.path().join("out.bin");
        std::fs::write(&target, b"earlier").unwrap();
        let err = write_atomic_with(&target, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("No space left on device"))
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("No space left"), "{err:#}");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["out.bin"], "a temp file was left behind");
        assert_eq!(std::fs::read(&target).unwrap(), b"earlier", "the earlier file was touched");
    }
}
