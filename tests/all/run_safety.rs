//! Nothing lost, nothing silent, for runs: one run per run folder, Ctrl-C
//! and SIGTERM exit 130 with the state saved, resume never cuts a run back,
//! damaged states and cache shards are named or passed over, identical runs
//! write identical files, a failed prepare keeps the cache, a read-only
//! cache trains, a full disk leaves no temporary files.
use crate::train_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use train_support::{fixtures, prepared, run_dir, sdtune, train, FAST};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_one_sentence(err: &str) {
    assert!(
        !err.contains("panicked") && !err.contains("internal error") && !err.contains("RUST_BACKTRACE") && !err.contains("terminate called"),
        "{err}"
    );
}

/// A long training run in the background, started once its first step is
/// recorded (so it holds the run folder).
fn start_long_run(dir: &Path, name: &str) -> Child {
    let args: Vec<&str> = FAST.iter().copied().chain(["--steps", "100000", "--save-every", "0", "--name", name]).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .current_dir(dir)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = run_dir(dir, name).join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("the run ended ({status}) before it was interrupted: {}", stderr(&out));
        }
        assert!(Instant::now() < deadline, "the run recorded no step within 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn signal(child: &Child, sig: i32) {
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "cannot signal the run");
}

/// Files whose name marks a write in progress (`.NAME.tmp-PID`), anywhere under `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(temp_files(&path));
        } else if entry.file_name().to_string_lossy().contains(".tmp-") {
            found.push(path);
        }
    }
    found
}

fn states(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("state"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("state-")).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn one_run_per_folder_and_sigterm_saves_then_exits_130() {
    let dir = prepared();
    let run = run_dir(dir.path(), "busy");
    let child = start_long_run(dir.path(), "busy");

    for extra in [&["--steps", "2", "--name", "busy"][..], &["--steps", "2", "--name", "busy", "--resume"][..]] {
        let out = train(dir.path(), extra);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "a second run in a busy folder must be refused: {err}");
        assert!(err.contains("another sdtune train") && err.contains(&format!("process {}", child.id())), "{err}");
        assert_one_sentence(&err);
    }
    assert!(!run.join("busy.safetensors").exists(), "the refused run wrote a LoRA");

    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "an interrupted run must not exit 0: {err}");
    assert!(err.contains("state saved") && err.contains("--resume"), "{err}");
    assert_one_sentence(&err);
    assert!(!run.join("busy.safetensors").exists(), "an interrupted run has no final LoRA");
    let saved = states(&run);
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(temp_files(&run).is_empty(), "{:?}", temp_files(&run));

    // The folder is free again, and the run continues from its save.
    let step: u64 = saved[0].trim_start_matches("state-").trim_end_matches(".safetensors").parse().unwrap();
    let more = (step + 2).to_string();
    let out = train(dir.path(), &["--steps", &more, "--name", "busy", "--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(run.join("busy.safetensors").is_file());
}

#[test]
fn a_second_ctrl_c_quits_at_once_with_130_and_leaves_no_temp_file() {
    let dir = prepared();
    let child = start_long_run(dir.path(), "twice");
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(5));
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert_one_sentence(&err);
    let run = run_dir(dir.path(), "twice");
    assert!(temp_files(&run).is_empty(), "{:?}", temp_files(&run));
    assert!(!run.join("twice.safetensors").exists());
}

#[test]
fn sample_interrupted_exits_130_without_temp_files() {
    let dir = prepared();
    let seeds: Vec<String> = (1..=400).map(|s| s.to_string()).collect();
    let seeds = seeds.join(",");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .current_dir(dir.path())
        .args(["sample", "--device", "cpu", "--prompt", "a poster", "--seeds", &seeds, "--steps", "4", "--out", "grid.png"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted once its first images are written: the handler is surely in place.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !pngs(dir.path()).iter().any(|n| n.starts_with("grid-")) {
        assert!(child.try_wait().unwrap().is_none(), "sample ended before it could be interrupted");
        assert!(Instant::now() < deadline, "sample wrote no image within 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "400 images rendered too fast to interrupt");
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(!dir.path().join("grid.png").exists(), "an interrupted sample wrote its grid");
    assert!(temp_files(dir.path()).is_empty(), "{:?}", temp_files(dir.path()));
}

fn pngs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".png")).collect())
        .unwrap_or_default()
}

#[test]
fn resume_never_cuts_a_run_back() {
    let dir = prepared();
    let out = train(dir.path(), &["--steps", "4", "--save-every", "2", "--name", "r"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let final_lora = run_dir(dir.path(), "r").join("r.safetensors");
    let before = std::fs::read(&final_lora).unwrap();
    let out = train(dir.path(), &["--steps", "2", "--name", "r", "--resume"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("after 4 steps") && err.contains("--steps 2") && err.contains("above 4"), "{err}");
    assert_eq!(std::fs::read(&final_lora).unwrap(), before, "the refused resume touched the final LoRA");
}

#[test]
fn two_identical_runs_write_byte_identical_lora_files() {
    let a = prepared();
    let b = prepared();
    for dir in [&a, &b] {
        let out = train(dir.path(), &["--steps", "3", "--save-every", "2", "--name", "same"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for file in ["same.safetensors", "lora/step-000002.safetensors"] {
        let x = std::fs::read(run_dir(a.path(), "same").join(file)).unwrap();
        let y = std::fs::read(run_dir(b.path(), "same").join(file)).unwrap();
        assert!(x == y, "{file} differs between two identical runs");
    }
}

fn flip_byte_near_end(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x10;
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn a_damaged_state_is_passed_over_for_the_one_before() {
    let dir = prepared();
    let out = train(dir.path(), &["--steps", "6", "--save-every", "2", "--keep-last", "3", "--name", "s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let state = run_dir(dir.path(), "s").join("state");

    // Flipped bytes in the newest, a truncated one before it.
    flip_byte_near_end(&state.join("state-000006.safetensors"));
    let four = state.join("state-000004.safetensors");
    let len = std::fs::metadata(&four).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&four).unwrap().set_len(len / 2).unwrap();
    let out = train(dir.path(), &["--steps", "8", "--save-every", "2", "--name", "s", "--resume"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("state-000006.safetensors does not match its recorded checksum"), "{err}");
    assert!(err.contains("state-000004.safetensors is truncated"), "{err}");
    assert!(err.contains("resuming from") && err.contains("state-000002.safetensors (step 2)"), "{err}");
    assert!(!err.contains("download"), "a state is not downloaded: {err}");

    // Every state damaged: one sentence, nothing trained.
    for name in states(&run_dir(dir.path(), "s")) {
        flip_byte_near_end(&state.join(name));
    }
    let out = train(dir.path(), &["--steps", "12", "--name", "s", "--resume"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("every saved state") && err.contains("damaged"), "{err}");
    assert_one_sentence(&err);
}

fn shards(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join(".sdtune/cache/shards"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    found.sort();
    found
}

fn prepare_again(dir: &Path, data: &str) -> Output {
    sdtune(dir, &[
        "prepare", data, "--device", "cpu", "--resolution", "64", "--min-bucket", "32", "--max-bucket", "128",
        "--bucket-step", "32", "--min-side", "64", "--model",
    ], Some(&fixtures().join("tiny-sd1")))
}

#[test]
fn a_flipped_byte_in_a_cached_latent_is_named_by_train_and_encoded_again_by_prepare() {
    let dir = prepared();
    let shard = shards(dir.path(), "latents-").remove(0);
    flip_byte_near_end(&shard);
    let out = train(dir.path(), &["--steps", "6", "--name", "c"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "training on a damaged shard must stop: {err}");
    let name = shard.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name) && err.contains("damaged") && err.contains("sdtune prepare"), "{err}");
    assert_one_sentence(&err);

    let out = prepare_again(dir.path(), "brand");
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(".sdtune/prepare-report.json")).unwrap()).unwrap();
    assert!(report["counts"]["encoded"].as_u64().unwrap() >= 1, "{}", report["counts"]);
    let kinds: Vec<&str> = report["warnings"].as_array().unwrap().iter().filter_map(|w| w["kind"].as_str()).collect();
    assert!(kinds.contains(&"damaged_cache"), "{kinds:?}");
    let out = train(dir.path(), &["--steps", "2", "--name", "c"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_prepare_with_no_usable_image_leaves_the_cache_as_it_was() {
    let dir = prepared();
    let manifest = dir.path().join(".sdtune/cache/manifest.json");
    let before = std::fs::read(&manifest).unwrap();
    let shards_before = shards(dir.path(), "");
    // A PNG whose header reads but whose pixels are cut off, and junk.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let png = std::fs::read(dir.path().join("brand/poster0.png")).unwrap();
    std::fs::write(bad.join("cut.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(bad.join("junk.png"), b"not an image at all").unwrap();
    let out = prepare_again(dir.path(), "bad");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_one_sentence(&err);
    assert_eq!(std::fs::read(&manifest).unwrap(), before, "the failed prepare changed the manifest");
    assert_eq!(shards(dir.path(), ""), shards_before, "the failed prepare removed shards");
    let out = train(dir.path(), &["--steps", "2", "--name", "after"]);
    assert!(out.status.success(), "the earlier cache must still train: {}", stderr(&out));
}

/// Runs `sdtune ARGS` in `dir` as a user who may not write the cache: as
/// root, the `nobody` user (root writes anywhere); otherwise this user with
/// the cache made read-only.
fn run_without_write_access(dir: &Path, cache: &Path, args: &[&str]) -> Output {
    let as_root = unsafe { libc::geteuid() } == 0;
    if as_root {
        let probe = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_sdtune"), "--version"])
            .output();
        assert!(
            probe.is_ok_and(|o| o.status.success()),
            "this test runs sdtune as `nobody` under root: it needs setpriv and a checkout that user can read"
        );
        // Only the run's outputs are writable for that user.
        for d in [dir.to_path_buf(), dir.join("output")] {
            std::fs::create_dir_all(&d).unwrap();
            std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        }
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_sdtune")]);
        cmd.current_dir(dir).args(args).env("HOME", dir);
        return cmd.output().unwrap();
    }
    let status = Command::new("chmod").args(["-R", "a-w"]).arg(cache).status().unwrap();
    assert!(status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_sdtune")).current_dir(dir).args(args).output().unwrap();
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(cache).status();
    out
}

#[test]
fn train_reads_a_cache_it_may_not_write() {
    let dir = prepared();
    std::fs::remove_file(dir.path().join(".sdtune/cache/lock")).unwrap();
    // The tempdir itself is private to its owner.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cache = dir.path().join(".sdtune/cache");
    let args: Vec<&str> = FAST.iter().copied().chain(["--steps", "2", "--name", "ro"]).collect();
    let out = run_without_write_access(dir.path(), &cache, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(run_dir(dir.path(), "ro").join("ro.safetensors").is_file());
}

/// A file-size limit (as a full disk does) makes a write fail part way.
fn run_with_file_size_limit(dir: &Path, kib: u64, args: &[&str]) -> Output {
    let script = format!("ulimit -f {kib}; exec \"$0\" \"$@\"");
    Command::new("bash").current_dir(dir).arg("-c").arg(script).arg(env!("CARGO_BIN_EXE_sdtune")).args(args).output().unwrap()
}

#[test]
fn a_full_disk_leaves_no_temp_files_in_train_or_sample() {
    let dir = prepared();
    // States of the tiny model are ~100 KB: a 40 KB limit fails the first save.
    let args: Vec<&str> = FAST.iter().copied().chain(["--steps", "2", "--name", "full"]).collect();
    let out = run_with_file_size_limit(dir.path(), 40, &args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write") || err.contains("File too large"), "{err}");
    assert_one_sentence(&err);
    assert!(temp_files(dir.path()).is_empty(), "{:?}", temp_files(dir.path()));
    assert!(!run_dir(dir.path(), "full").join("full.safetensors").exists());

    let args = ["sample", "--device", "cpu", "--prompt", "a poster", "--seeds", "1,2", "--steps", "2", "--out", "s.png"];
    let out = run_with_file_size_limit(dir.path(), 1, &args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_one_sentence(&err);
    assert!(temp_files(dir.path()).is_empty(), "{:?}", temp_files(dir.path()));
    assert!(!dir.path().join("s.png").exists());
}

#[test]
fn exit_codes_are_documented() {
    let out = Command::new(env!("CARGO_BIN_EXE_sdtune")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for line in ["0    done", "1    error", "130  interrupted"] {
        assert!(help.contains(line), "--help lacks {line:?}:\n{help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sdtune")).args(["train", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
