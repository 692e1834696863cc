//! `sdtune train --nproc N` on one machine: starts N copies of this
//! `sdtune train` with torchrun's variables (a free port on 127.0.0.1 for
//! the store) and watches them. Rank 0 keeps this terminal (its progress
//! bar and messages appear as in a run of one process); the other ranks'
//! output is kept, and their last lines are shown when one of them fails.
//! If a rank dies, the others are stopped (SIGTERM, then SIGKILL after a
//! grace period) and the launch fails naming the rank and its last line.
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::distributed::JOB_VARS;

/// How long the other ranks get to stop after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(10);
/// Lines of a non-zero rank's output kept for the failure message.
const KEPT_LINES: usize = 20;

/// `args` without `--nproc N` / `--nproc=N`: what each rank runs.
pub fn rank_args(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_next = false;
    for arg in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        match arg.to_str() {
            Some("--nproc") => skip_next = true,
            Some(a) if a.starts_with("--nproc=") => {}
            _ => out.push(arg.clone()),
        }
    }
    out
}

/// A port nothing listens on now, on 127.0.0.1 (as torchrun's standalone
/// mode picks one; another program could take it before rank 0 does).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port on 127.0.0.1 for the job's store")?;
    Ok(listener.local_addr()?.port())
}

/// One started rank.
struct Rank {
    pid: i32,
    /// Its last lines (ranks above 0; rank 0 writes to this terminal).
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
    exited: Option<ExitStatus>,
}

/// Runs `nproc` ranks of `sdtune <args>` and waits for them all.
pub fn launch(nproc: usize, args: &[OsString]) -> Result<()> {
    if nproc == 0 {
        bail!("--nproc 0 starts no process; pass 1 or more");
    }
    let exe = std::env::current_exe().context("cannot find this sdtune's own executable to start the ranks")?;
    let port = free_port()?;
    // Signals reach the launcher alone (the ranks have their own process
    // groups); it passes each on, so one Ctrl-C is one save-and-stop.
    crate::interrupt::install(crate::interrupt::Mode::SaveThenStop)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).div_ceil(nproc).max(1);
    let (done_tx, done_rx) = mpsc::channel::<(usize, ExitStatus)>();
    let mut ranks: Vec<Rank> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(rank_args(args));
        for var in JOB_VARS {
            cmd.env_remove(var);
        }
        cmd.env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .process_group(0);
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            // The machine's cores shared out, not each rank taking all of them.
            cmd.env("OMP_NUM_THREADS", threads.to_string());
        }
        if rank > 0 {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        // SAFETY: prctl is async-signal-safe; a rank dies with the launcher.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                stop_all(&ranks, libc::SIGKILL);
                return Err(e).with_context(|| format!("cannot start rank {rank} ({})", exe.display()));
            }
        };
        let tail = (rank > 0).then(|| Arc::new(Mutex::new(VecDeque::new())));
        if let Some(tail) = &tail {
            if let Some(out) = child.stdout.take() {
                keep_lines(out, tail.clone());
            }
            if let Some(err) = child.stderr.take() {
                keep_lines(err, tail.clone());
            }
        }
        ranks.push(Rank { pid: child.id() as i32, tail, exited: None });
        let done = done_tx.clone();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = done.send((rank, status));
            }
        });
    }
    let pids: Vec<String> = ranks.iter().map(|r| r.pid.to_string()).collect();
    let processes = if nproc == 1 { "process" } else { "processes" };
    eprintln!("started {nproc} {processes} on 127.0.0.1:{port} (pids {})", pids.join(", "));

    let mut failed: Option<usize> = None;
    let mut killed_at: Option<Instant> = None;
    let mut forwarded = false;
    while ranks.iter().any(|r| r.exited.is_none()) {
        if crate::interrupt::requested() && !forwarded {
            forwarded = true;
            stop_all(&ranks, libc::SIGTERM);
        }
        if killed_at.is_some_and(|t| t.elapsed() > GRACE) {
            stop_all(&ranks, libc::SIGKILL);
            killed_at = None;
        }
        let Ok((rank, status)) = done_rx.recv_timeout(Duration::from_millis(100)) else { continue };
        ranks[rank].exited = Some(status);
        let graceful = status.success() || status.code() == Some(crate::interrupt::EXIT_INTERRUPTED);
        if !graceful && failed.is_none() {
            failed = Some(rank);
            stop_all(&ranks, libc::SIGTERM);
            killed_at = Some(Instant::now());
        }
    }
    if let Some(rank) = failed {
        return Err(failure(rank, &ranks[rank]));
    }
    if ranks.iter().any(|r| r.exited.and_then(|s| s.code()) == Some(crate::interrupt::EXIT_INTERRUPTED)) {
        return Err(crate::interrupt::Interrupted.into());
    }
    Ok(())
}

/// Sends `signal` to every rank still running.
fn stop_all(ranks: &[Rank], signal: i32) {
    for r in ranks.iter().filter(|r| r.exited.is_none()) {
        // SAFETY: a signal to our own child, which has not been reaped.
        unsafe {
            libc::kill(r.pid, signal);
        }
    }
}

/// Keeps the last [`KEPT_LINES`] lines of `stream` (progress redraws,
/// split at `\r`, count as lines).
fn keep_lines(stream: impl Read + Send + 'static, tail: Arc<Mutex<VecDeque<String>>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while let Ok(n) = reader.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&line).to_string();
            for part in text.split(['\r', '\n']).map(str::trim).filter(|p| !p.is_empty()) {
                let mut kept = tail.lock().unwrap_or_else(|e| e.into_inner());
                kept.push_back(part.to_string());
                while kept.len() > KEPT_LINES {
                    kept.pop_front();
                }
            }
            line.clear();
        }
    });
}

/// The launch's one-sentence failure: which rank, how it ended, its last line.
fn failure(rank: usize, r: &Rank) -> anyhow::Error {
    let how = match r.exited {
        Some(s) if s.signal().is_some() => format!("was killed by signal {}", s.signal().unwrap_or(0)),
        Some(s) => format!("exited with status {}", s.code().unwrap_or(-1)),
        None => "did not exit".into(),
    };
    let last = match &r.tail {
        // Its reader thread may still be draining the pipe.
        Some(tail) => {
            std::thread::sleep(Duration::from_millis(50));
            let kept = tail.lock().unwrap_or_else(|e| e.into_inner());
            match kept.back() {
                Some(line) => format!("its last line: {line}"),
                None => "it printed nothing".into(),
            }
        }
        None => "its messages are above".into(),
    };
    anyhow!("rank {rank} {how} ({last}); the other ranks were stopped, and the last save in the run's state/ folder is kept (`--resume` continues)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_run_the_same_command_without_nproc() {
        let args: Vec<OsString> = ["train", "--nproc", "2", "--steps", "3", "--nproc=4", "--resume"].map(OsString::from).to_vec();
        let expected: Vec<OsString> = ["train", "--steps", "3", "--resume"].map(OsString::from).to_vec();
        assert_eq!(rank_args(&args), expected);
    }
}
