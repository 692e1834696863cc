//! Ctrl-C and SIGTERM. `train` stops after the current step and saves its
//! state; every other command stops at once. Either way the process exits
//! with [`EXIT_INTERRUPTED`] (130, as shells report a SIGINT), never 0, so
//! `sdtune train && sdtune sample` does not go on with a missing result,
//! and no temporary file of a write in progress is left behind.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};

/// The exit code of an interrupted command.
pub const EXIT_INTERRUPTED: i32 = 130;

/// What the first signal does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Ask the running loop to save and stop ([`requested`]); a second
    /// signal quits without that save.
    SaveThenStop,
    /// Quit now: nothing in progress is worth finishing (prepare's cache
    /// and every file sdtune writes survive a stop at any point).
    Now,
    /// `serve`: stop taking requests, finish the running job ([`requested`]);
    /// a second signal quits at once.
    FinishThenStop,
}

const NOW: u8 = 0;
const SAVE_THEN_STOP: u8 = 1;
const FINISH_THEN_STOP: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(NOW);
static REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
/// Temporary files being written right now (see `fsutil::write_atomic`).
static TEMP_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The error a command returns when it stopped for a signal; the command
/// line prints nothing more and exits 130.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Installs the handler (once per process) and sets what a signal does.
pub fn install(mode: Mode) -> Result<()> {
    let code = match mode {
        Mode::Now => NOW,
        Mode::SaveThenStop => SAVE_THEN_STOP,
        Mode::FinishThenStop => FINISH_THEN_STOP,
    };
    MODE.store(code, Ordering::SeqCst);
    INSTALLED
        .get_or_init(|| ctrlc::set_handler(on_signal).map_err(|e| e.to_string()))
        .clone()
        .map_err(anyhow::Error::msg)
        .context("cannot install the Ctrl-C handler")
}

/// Whether a signal asked the running loop to save and stop.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The flag [`requested`] reads, for loops that take an `AtomicBool`.
pub fn flag() -> &'static AtomicBool {
    &REQUESTED
}

fn on_signal() {
    let first = !REQUESTED.swap(true, Ordering::SeqCst);
    let mode = MODE.load(Ordering::SeqCst);
    if first && mode == SAVE_THEN_STOP {
        eprintln!("\ninterrupted: saving and stopping after this step (press Ctrl-C again to quit without saving)");
        return;
    }
    if first && mode == FINISH_THEN_STOP {
        eprintln!("\ninterrupted: taking no more requests, finishing the running job (press Ctrl-C again to quit now)");
        return;
    }
    if mode == SAVE_THEN_STOP {
        eprintln!("\nquitting without saving; the last save is kept");
    } else {
        eprintln!("\ninterrupted");
    }
    remove_temp_files();
    // `_exit`, not `exit`: the main thread is inside libtorch, and running
    // the process's exit handlers under it ends in an abort, not a clean 130.
    unsafe { libc::_exit(EXIT_INTERRUPTED) }
}

/// Removes the temporary files of writes still in progress. Never blocks:
/// a write holding the list right now is skipped rather than waited for.
fn remove_temp_files() {
    if let Ok(files) = TEMP_FILES.try_lock() {
        for path in files.iter() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Marks `path` as a temporary file being written until the guard drops.
pub fn track_temp(path: &Path) -> TempGuard {
    TEMP_FILES.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_path_buf());
    TempGuard(path.to_path_buf())
}

pub struct TempGuard(PathBuf);

impl Drop for TempGuard {
    fn drop(&mut self) {
        let mut files = TEMP_FILES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = files.iter().position(|p| *p == self.0) {
            files.swap_remove(i);
        }
    }
}

/// Writes that hit a file-size limit fail with an error sdtune reports
/// (and cleans up after) instead of the process dying of SIGXFSZ.
pub fn report_file_size_limits_as_errors() {
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
