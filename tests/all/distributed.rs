//! Data-parallel training over c10d (Gloo on the CPU) on the tiny SD1
//! fixture, fp32, one thread per process: `--nproc 2` against one process
//! taking the same samples, a rank killed mid-run and the job resumed, a
//! rank that cannot reach the store, and the same job started by torchrun.
//! Every process runs under a deadline, so nothing here can hang.
use crate::train_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use train_support::{lora_tensors, prepared, run_dir, FAST};

use sdtune::loaders::tensor_file::TensorFile;

/// What each job's processes wait for each other, in seconds.
const DIST_TIMEOUT: &str = "20";
/// The longest any one command here may run.
const DEADLINE: Duration = Duration::from_secs(60);

/// Whether this build has the c10d shim; says why not when it has not.
fn has_c10d() -> bool {
    match sdtune::train::c10d::missing() {
        None => true,
        Some(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

fn command(dir: &Path, program: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(dir).args(args).env("OMP_NUM_THREADS", "1").stdin(Stdio::null());
    for var in sdtune::train::distributed::JOB_VARS {
        cmd.env_remove(var);
    }
    cmd
}

fn sdtune_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sdtune"))
}

/// `cmd`'s output, or a failed test when it runs past [`DEADLINE`].
fn output_within(mut cmd: Command) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: our own child, not yet reaped (its waiter still runs).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} ran past {DEADLINE:?}");
        }
    }
}

/// What every run here adds to [`FAST`] (which pins fp32): the job's timeout.
const JOB: [&str; 2] = ["--dist-timeout", DIST_TIMEOUT];

fn train(dir: &Path, extra: &[&str]) -> Output {
    let args: Vec<&str> = FAST.iter().copied().chain(JOB).chain(extra.iter().copied()).collect();
    output_within(command(dir, &sdtune_bin(), &args))
}

fn succeeded(out: &Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn final_lora(dir: &Path, name: &str) -> Vec<(String, Vec<u8>)> {
    lora_tensors(&run_dir(dir, name).join(format!("{name}.safetensors")))
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn assert_identical(a: &[(String, Vec<u8>)], b: &[(String, Vec<u8>)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: tensor count");
    for ((name, x), (other, y)) in a.iter().zip(b) {
        assert_eq!(name, other);
        assert!(x == y, "{what}: LoRA tensor {name} differs");
    }
}

#[test]
fn two_processes_train_what_one_process_trains_on_the_same_samples() {
    if !has_c10d() {
        return;
    }
    let dir = prepared();
    let steps = ["--steps", "4", "--save-every", "0"];
    let with = |extra: &[&str]| -> Vec<String> { steps.iter().chain(extra).map(|s| s.to_string()).collect() };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = train(dir.path(), &args);
        succeeded(&out);
        out
    };
    run(with(&["--nproc", "1", "--batch-size", "1", "--grad-accum", "2", "--name", "accum"]));
    let split = run(with(&["--nproc", "2", "--batch-size", "1", "--name", "split"]));
    run(with(&["--nproc", "1", "--batch-size", "2", "--name", "batch"]));
    let accum = final_lora(dir.path(), "accum");
    assert_identical(&accum, &final_lora(dir.path(), "split"), "--nproc 2 vs --nproc 1 --grad-accum 2");
    assert!(String::from_utf8_lossy(&split.stderr).contains("2 processes"), "the run says it is one of 2 processes");

    for ((name, a), (_, b)) in accum.iter().zip(&final_lora(dir.path(), "batch")) {
        let (a, b) = (floats(a), floats(b));
        let norm = a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let diff = a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>().sqrt();
        assert!(diff <= 1e-5 * norm.max(1e-12), "{name}: |2 x 1 - 1 x 2| = {diff:e}, |w| = {norm:e}");
    }
    let metrics = std::fs::read_to_string(run_dir(dir.path(), "split").join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["world_size"], 2, "{last}");
    assert!(last["samples_per_s"].as_f64().is_some_and(|r| r > 0.0), "{last}");
}

/// The launcher's `started N processes ... (pids A, B)` line, read from its stderr.
fn rank_pids(child: &mut Child) -> (Vec<i32>, mpsc::Receiver<String>) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("the launcher named no pids");
        if let Some(list) = line.split("(pids ").nth(1) {
            let pids = list.trim_end_matches(')').split(", ").map(|p| p.parse().unwrap()).collect();
            return (pids, rx);
        }
    }
}

#[test]
fn a_killed_rank_stops_the_job_and_resume_ends_as_an_uninterrupted_run() {
    if !has_c10d() {
        return;
    }
    let args = ["--nproc", "2", "--steps", "20", "--save-every", "4", "--name", "k"];
    let straight = prepared();
    succeeded(&train(straight.path(), &args));
    let want = final_lora(straight.path(), "k");

    let killed = prepared();
    let all: Vec<&str> = FAST.iter().copied().chain(JOB).chain(args).collect();
    let mut launcher = command(killed.path(), &sdtune_bin(), &all).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let (pids, lines) = rank_pids(&mut launcher);
    assert_eq!(pids.len(), 2);
    let first_save = run_dir(killed.path(), "k").join("state/state-000004.safetensors");
    let deadline = Instant::now() + DEADLINE;
    while !first_save.exists() {
        assert!(Instant::now() < deadline, "no save at step 4 within {DEADLINE:?}");
        assert!(launcher.try_wait().unwrap().is_none(), "the job ended before its first save");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: rank 1, the launcher's child, alive until the launcher reaps it.
    unsafe { libc::kill(pids[1], libc::SIGKILL) };
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = launcher.try_wait().unwrap() {
            break status;
        }
        assert!(killed_at.elapsed() < DEADLINE, "the launcher did not exit after rank 1 was killed");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stopped_in = killed_at.elapsed();
    assert!(!status.success(), "the launcher exits non-zero when a rank dies");
    assert!(stopped_in < Duration::from_secs(20), "the job took {stopped_in:?} to stop");
    let said: Vec<String> = lines.try_iter().collect();
    let last = said.last().cloned().unwrap_or_default();
    assert!(last.contains("rank 1 was killed by signal 9"), "the launcher names the dead rank: {said:?}");
    assert!(last.contains("its last line: "), "{last}");
    for pid in &pids {
        // SAFETY: signal 0 only asks whether the process is there.
        let alive = unsafe { libc::kill(*pid, 0) } == 0;
        assert!(!alive, "rank pid {pid} outlived the launcher");
    }
    let run = run_dir(killed.path(), "k");
    let saves = TensorFile::open(&run.join("lora/step-000004.safetensors"));
    assert!(saves.is_ok(), "the save before the kill is intact");

    succeeded(&train(killed.path(), &[&args[..], &["--resume"]].concat()));
    assert_identical(&want, &final_lora(killed.path(), "k"), "resumed after the kill vs uninterrupted");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 20, "metrics.jsonl holds each step once");
}

#[test]
fn a_rank_that_cannot_reach_the_store_says_so_after_the_timeout() {
    if !has_c10d() {
        return;
    }
    let dir = prepared();
    // A port nothing listens on: taken and let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let args: Vec<&str> = FAST.iter().copied().chain(["--dist-timeout", "3", "--steps", "2", "--name", "lost"]).collect();
    let mut cmd = command(dir.path(), &sdtune_bin(), &args);
    cmd.env("RANK", "1").env("WORLD_SIZE", "2").env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", &port);
    let began = Instant::now();
    let out = output_within(cmd);
    let took = began.elapsed();
    assert!(!out.status.success());
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(30), "gave up after {took:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let want = format!("rank 1 of 2 could not join the job at 127.0.0.1:{port} within 3 s");
    assert!(last.contains(&want), "{stderr}");
    assert!(last.ends_with("and that rank 0 is running"), "one sentence: {last}");
}

#[test]
fn a_job_resumes_with_another_number_of_processes_taking_the_same_samples() {
    if !has_c10d() {
        return;
    }
    let run = ["--save-every", "4", "--batch-size", "1", "--name", "n"];
    let with = |steps: &str, extra: &[&str]| -> Vec<String> {
        ["--steps", steps].iter().chain(&run).chain(extra).map(|s| s.to_string()).collect()
    };
    let train_ok = |dir: &Path, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = train(dir, &args);
        succeeded(&out);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let straight = prepared();
    train_ok(straight.path(), with("8", &["--nproc", "2"]));
    let want = final_lora(straight.path(), "n");

    // Two processes stop after their save at step 4; one process
    // accumulating two micro-batches (the same 2 samples a step) continues.
    let two_then_one = prepared();
    train_ok(two_then_one.path(), with("4", &["--nproc", "2"]));
    let said = train_ok(two_then_one.path(), with("8", &["--nproc", "1", "--grad-accum", "2", "--resume"]));
    assert!(said.contains("resuming from") && said.contains("state-000004"), "{said}");
    assert_identical(&want, &final_lora(two_then_one.path(), "n"), "--nproc 2, resumed by --nproc 1 --grad-accum 2");
    let metrics = std::fs::read_to_string(run_dir(two_then_one.path(), "n").join("metrics.jsonl")).unwrap();
    let worlds: Vec<u64> = metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["world_size"].as_u64().unwrap()).collect();
    assert_eq!(worlds, [2, 2, 2, 2, 1, 1, 1, 1], "each step once, with the processes that trained it");

    // And the other way round.
    let one_then_two = prepared();
    train_ok(one_then_two.path(), with("4", &["--nproc", "1", "--grad-accum", "2"]));
    train_ok(one_then_two.path(), with("8", &["--nproc", "2", "--resume"]));
    assert_identical(&want, &final_lora(one_then_two.path(), "n"), "--nproc 1 --grad-accum 2, resumed by --nproc 2");

    // Other samples per step would be another run: refused in one sentence.
    let args: Vec<String> = with("8", &["--nproc", "1", "--resume"]);
    let out = train(one_then_two.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let said = err.lines().find(|l| l.contains("micro-batches per step")).unwrap_or_else(|| panic!("{err}"));
    assert!(said.contains("was saved with 2 micro-batches per step (--grad-accum x processes), but this run has 1;"), "{said}");
}

#[test]
fn torchrun_starts_the_same_job() {
    if !has_c10d() {
        return;
    }
    let torchrun = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun");
    if !torchrun.is_file() {
        println!("skipped: torch's torchrun is not in .venv/bin (scripts/bootstrap.sh installs the torch wheel that has it)");
        return;
    }
    let dir = prepared();
    let steps = ["--steps", "4", "--save-every", "0", "--batch-size", "1"];
    succeeded(&train(dir.path(), &[&steps[..], &["--nproc", "1", "--grad-accum", "2", "--name", "accum"]].concat()));
    let bin = sdtune_bin();
    let mut args: Vec<&str> = vec!["--standalone", "--nproc-per-node", "2", "--no-python", bin.to_str().unwrap()];
    args.extend(FAST);
    args.extend(JOB);
    args.extend(steps);
    let want = final_lora(dir.path(), "accum");
    // torchrun's standalone rendezvous serves the store from its agent and
    // says so (TORCHELASTIC_USE_AGENT_STORE=True): rank 0 joins it rather
    // than serving one. With the store sharing turned off, rank 0 serves it.
    for (name, share, served_by) in [("agent", None, "served by torchrun's agent"), ("own", Some("1"), "served by rank 0")] {
        let mut named = args.clone();
        named.extend(["--name", name]);
        let mut cmd = command(dir.path(), &torchrun, &named);
        match share {
            Some(off) => cmd.env("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", off),
            None => cmd.env_remove("TORCH_DISABLE_SHARE_RDZV_TCP_STORE"),
        };
        let out = output_within(cmd);
        succeeded(&out);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("2 processes") && said.contains(served_by), "{name}: {said}");
        assert_identical(&want, &final_lora(dir.path(), name), &format!("torchrun x 2 ({served_by}) vs one process accumulating"));
    }
}
