//! Files that are either fully written or not there at all.
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder and a
/// rename, so a crash never leaves a half-written file under `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let mut tmp = tempfile_in(dir, path)?;
    tmp.1.write_all(bytes).with_context(|| format!("cannot write {}", tmp.0.display()))?;
    tmp.1.sync_all().with_context(|| format!("cannot flush {}", tmp.0.display()))?;
    drop(tmp.1);
    std::fs::rename(&tmp.0, path)
        .with_context(|| format!("cannot move {} into place as {}", tmp.0.display(), path.display()))
}

fn tempfile_in(dir: &Path, target: &Path) -> Result<(std::path::PathBuf, std::fs::File)> {
    let stem = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{stem}.tmp-{}", std::process::id()));
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok((tmp, file))
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
