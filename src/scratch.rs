//! A fresh folder that is removed with its contents when dropped: the tests'
//! working folders (the library's own and the integration tests').
//!
//! sdtune's own rather than the `tempfile` crate's: that crate, as a
//! dev-dependency, turned on features of a crate the binary shares, so
//! `cargo test` and `cargo build` compiled the library twice.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// `sdtune-PID-N-NANOS` under the system's temporary folder; never one
    /// that exists already.
    pub fn new() -> std::io::Result<Self> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        loop {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            let name = format!("sdtune-{}-{}-{nanos}", std::process::id(), COUNT.fetch_add(1, Ordering::Relaxed));
            let path = std::env::temp_dir().join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(ScratchDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_is_new_and_goes_with_its_contents() {
        let (a, b) = (super::ScratchDir::new().unwrap(), super::ScratchDir::new().unwrap());
        assert_ne!(a.path(), b.path());
        std::fs::create_dir(a.path().join("sub")).unwrap();
        std::fs::write(a.path().join("sub/file"), b"x").unwrap();
        let kept = a.path().to_path_buf();
        drop(a);
        assert!(!kept.exists());
        assert!(b.path().is_dir());
    }
}
