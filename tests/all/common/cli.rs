//! Running the sdtune binary from a test, and reading what it says.
use std::path::Path;
use std::process::{Command, Output};

/// `sdtune ARGS` run in `dir`.
pub fn sdtune(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdtune")).current_dir(dir).args(args).output().unwrap()
}

/// Its stdout and stderr, asserting that it succeeded.
pub fn ok(out: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "sdtune failed:\n{text}");
    text
}

/// The one `error: ...` line of a run that failed with exit code 1.
pub fn one_sentence_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected an error:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}
