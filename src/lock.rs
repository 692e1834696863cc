//! Advisory locks on a folder (flock on a lock file inside it): one
//! writer, or any number of readers. The kernel drops a lock when its
//! process dies, so a killed run never leaves a folder locked.
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A held lock; released when dropped.
pub struct FolderLock {
    _file: Option<File>,
}

/// Takes `dir/name` exclusively for a writer. `what` names the holder in
/// the message a second writer gets (`sdtune train`), `fix` what to do.
pub fn exclusive(dir: &Path, name: &str, what: &str, fix: &str) -> Result<FolderLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = holder_pid(&mut file).map(|pid| format!(" (process {pid})")).unwrap_or_default();
            bail!("another {what}{holder} is using {} (it holds {}); {fix}", dir.display(), path.display());
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
    // The holder's pid, for the message above; a failure to write it only
    // makes that message shorter.
    let _ = file.set_len(0).and_then(|()| write!(file, "{}\n", std::process::id()));
    Ok(FolderLock { _file: Some(file) })
}

/// Takes `dir/name` shared, for a reader. A folder the reader may not
/// write (a read-only cache) is read without a lock when the lock file
/// cannot be made: nothing can write there either.
pub fn shared(dir: &Path, name: &str, what: &str) -> Result<FolderLock> {
    let path = dir.join(name);
    let file = match open_for_reading(&path) {
        Ok(file) => file,
        Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) => {
            return Ok(FolderLock { _file: None });
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(FolderLock { _file: Some(file) }),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another {what} is writing {} (it holds {}); wait for it to finish", dir.display(), path.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// An existing lock file is opened read-only (a shared flock needs no
/// more); a missing one is created.
fn open_for_reading(path: &PathBuf) -> std::io::Result<File> {
    match File::open(path) {
        Ok(file) => Ok(file),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            OpenOptions::new().create(true).truncate(false).write(true).open(path)
        }
        Err(e) => Err(e),
    }
}

fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holders_pid_and_a_reader_too() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let held = exclusive(tmp.path(), ".lock", "sdtune train", "wait").unwrap();
        let err = exclusive(tmp.path(), ".lock", "sdtune train", "wait for it").err().unwrap().to_string();
        assert!(err.contains(&format!("process {}", std::process::id())) && err.contains("wait for it"), "{err}");
        assert!(shared(tmp.path(), ".lock", "sdtune prepare").is_err());
        drop(held);
        let r1 = shared(tmp.path(), ".lock", "x").unwrap();
        let _r2 = shared(tmp.path(), ".lock", "x").unwrap();
        assert!(exclusive(tmp.path(), ".lock", "x", "y").is_err(), "readers keep writers out");
        drop(r1);
    }
}
