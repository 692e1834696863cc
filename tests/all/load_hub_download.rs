//! `--model org/name` missing from the local cache is downloaded from the Hub
//! (`hf-hub`'s sync API, endpoint from `HF_ENDPOINT`) into the cache in
//! huggingface_hub's layout. The Hub is a small HTTP/1.1 server in this test
//! serving `tests/fixtures/tiny-sd1` the way huggingface.co answers the
//! requests hf-hub makes:
//!
//! - `GET /api/models/{id}/revision/{rev}`: JSON with `sha` and `siblings`;
//! - `GET /{id}/resolve/{rev}/{file}` with `Range: bytes=0-0` (metadata:
//!   `x-repo-commit`, `etag`, `content-range`), then with `Range: bytes=N-`
//!   (the download). Small files are answered directly; weights (LFS files)
//!   with a 302 to an absolute "CDN" URL and `x-linked-etag`, as the Hub does.
use crate::model_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use model_support::*;
use sha2::{Digest, Sha256};

const REPO: &str = "testorg/tiny-sd1";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct File {
    bytes: Vec<u8>,
    etag: String,
    lfs: bool,
}

/// The fake Hub: files of one repository, and a log of the requests made
/// (`METHOD path range`).
struct Hub {
    port: u16,
    files: BTreeMap<String, File>,
    log: Mutex<Vec<String>>,
}

impl Hub {
    fn start(folder: &Path) -> Arc<Hub> {
        let mut files = BTreeMap::new();
        for path in walk(folder) {
            let rel = path.strip_prefix(folder).unwrap().to_str().unwrap().replace('\\', "/");
            let bytes = std::fs::read(&path).unwrap();
            let sha = format!("{:x}", Sha256::digest(&bytes));
            let lfs = rel.ends_with(".safetensors");
            // LFS files: the sha256 (x-linked-etag); others: a git-like 40-hex id.
            let etag = if lfs { sha } else { sha[..40].to_string() };
            files.insert(rel, File { bytes, etag, lfs });
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let hub = Arc::new(Hub { port: listener.local_addr().unwrap().port(), files, log: Mutex::new(Vec::new()) });
        let server = hub.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let server = server.clone();
                std::thread::spawn(move || server.serve(stream));
            }
        });
        hub
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// One connection: requests until the client closes it, asks to, or is
    /// idle for a few seconds (keep-alive).
    fn serve(&self, stream: TcpStream) {
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let mut parts = line.split_whitespace();
            let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
            let mut headers = BTreeMap::new();
            loop {
                let mut h = String::new();
                match reader.read_line(&mut h) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            // GETs only; skip any body a client might send anyway.
            if let Some(n) = headers.get("content-length").and_then(|v| v.parse::<u64>().ok()) {
                if std::io::copy(&mut (&mut reader).take(n), &mut std::io::sink()).is_err() {
                    return;
                }
            }
            let range = headers.get("range").cloned();
            self.log.lock().unwrap().push(format!("{method} {target} {}", range.as_deref().unwrap_or("-")));
            let close = headers.get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let (status, extra, body) = self.answer(&method, &target, range.as_deref());
            let mut head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: {}\r\n",
                body.len(),
                if close { "close" } else { "keep-alive" }
            );
            for (k, v) in extra {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let sent = writer.write_all(head.as_bytes()).and_then(|_| {
                if method == "HEAD" {
                    Ok(())
                } else {
                    writer.write_all(&body)
                }
            });
            if sent.and_then(|_| writer.flush()).is_err() || close {
                return;
            }
        }
    }

    fn answer(
        &self,
        method: &str,
        target: &str,
        range: Option<&str>,
    ) -> (&'static str, Vec<(String, String)>, Vec<u8>) {
        let not_found = |what: &str| {
            (
                "404 Not Found",
                vec![("Content-Type".into(), "application/json".into()), ("X-Error-Code".into(), what.into())],
                format!("{{\"error\":\"{what}\"}}").into_bytes(),
            )
        };
        if method != "GET" && method != "HEAD" {
            return ("405 Method Not Allowed", vec![], vec![]);
        }
        if target == format!("/api/models/{REPO}/revision/main")
            || target == format!("/api/models/{REPO}/revision/{COMMIT}")
        {
            let siblings: Vec<_> = self
                .files
                .keys()
                .map(String::as_str)
                // Files the Hub lists that sdtune must not fetch.
                .chain([".gitattributes", "README.md", "unet/diffusion_pytorch_model.bin"])
                .map(|f| serde_json::json!({ "rfilename": f }))
                .collect();
            let body = serde_json::json!({
                "_id": "0000", "id": REPO, "modelId": REPO, "sha": COMMIT,
                "private": false, "tags": ["diffusers"], "siblings": siblings,
            });
            return ("200 OK", vec![("Content-Type".into(), "application/json".into())], body.to_string().into_bytes());
        }
        if let Some(rest) = target.strip_prefix(&format!("/{REPO}/resolve/")) {
            let Some((rev, name)) = rest.split_once('/') else { return not_found("EntryNotFound") };
            if rev != "main" && rev != COMMIT {
                return not_found("RevisionNotFound");
            }
            let Some(file) = self.files.get(name) else { return not_found("EntryNotFound") };
            let mut headers = vec![("X-Repo-Commit".to_string(), COMMIT.to_string())];
            if file.lfs {
                // The Hub sends LFS files to its CDN with an absolute redirect.
                headers.push(("X-Linked-Etag".into(), format!("\"{}\"", file.etag)));
                headers.push(("X-Linked-Size".into(), file.bytes.len().to_string()));
                headers.push(("ETag".into(), "\"pointer-etag\"".into()));
                headers.push(("Location".into(), format!("{}/cdn/{}", self.endpoint(), file.etag)));
                return ("302 Found", headers, vec![]);
            }
            headers.push(("ETag".into(), format!("\"{}\"", file.etag)));
            return ranged(&file.bytes, range, headers);
        }
        if let Some(etag) = target.strip_prefix("/cdn/") {
            if let Some(file) = self.files.values().find(|f| f.lfs && f.etag == etag) {
                return ranged(&file.bytes, range, vec![("ETag".into(), format!("\"{}\"", file.etag))]);
            }
        }
        not_found("RepoNotFound")
    }
}

/// 206 with the bytes of `Range: bytes=a-b` / `bytes=a-`, or 200 with all.
fn ranged(
    bytes: &[u8],
    range: Option<&str>,
    mut headers: Vec<(String, String)>,
) -> (&'static str, Vec<(String, String)>, Vec<u8>) {
    headers.push(("Accept-Ranges".into(), "bytes".into()));
    headers.push(("Content-Type".into(), "application/octet-stream".into()));
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return ("200 OK", headers, bytes.to_vec());
    };
    let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
    let len = bytes.len();
    let start: usize = a.parse().unwrap_or(0);
    let end: usize =
        if b.is_empty() { len.saturating_sub(1) } else { b.parse::<usize>().unwrap_or(len - 1).min(len - 1) };
    if start >= len || start > end {
        headers.push(("Content-Range".into(), format!("bytes */{len}")));
        return ("416 Range Not Satisfiable", headers, vec![]);
    }
    headers.push(("Content-Range".into(), format!("bytes {start}-{end}/{len}")));
    ("206 Partial Content", headers, bytes[start..=end].to_vec())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// sdtune against the fake Hub: online, cache in `cache`, no token, no proxy.
fn online(cache: &Path, home: &Path, hub: &Hub) -> Command {
    let mut cmd = sdtune(cache);
    cmd.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", hub.endpoint()).env("HF_HOME", home);
    for key in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        cmd.env_remove(key).env_remove(key.to_ascii_lowercase());
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost");
    cmd
}

fn sample_args<'a>(cmd: &'a mut Command, model: &str, out: &Path) -> &'a mut Command {
    cmd.args(["sample", "--device", "cpu", "--prompt", "a red car", "--seed", "1", "--steps", "2"])
        .args(["--width", "64", "--height", "64", "--model", model])
        .arg("--out")
        .arg(out)
}

#[test]
fn hub_id_downloads_into_the_cache_and_samples_like_the_folder() {
    let hub = Hub::start(&fixture("tiny-sd1"));
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let home = sdtune::scratch::ScratchDir::new().unwrap();
    let out = sdtune::scratch::ScratchDir::new().unwrap();

    let t = Instant::now();
    let res = run(sample_args(&mut online(cache.path(), home.path(), &hub), REPO, &out.path().join("hub.png")));
    stdout_ok(&res);
    eprintln!("download + sample: {:.1}s, {} requests", t.elapsed().as_secs_f64(), hub.requests().len());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");

    // huggingface_hub's layout: refs/main -> commit, snapshots/<commit>/ linking into blobs/.
    let repo_dir = cache.path().join("models--testorg--tiny-sd1");
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap().trim(), COMMIT);
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    for (rel, file) in &hub.files {
        let path = snapshot.join(rel);
        assert_eq!(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())), file.bytes, "{rel}");
        let blob = repo_dir.join("blobs").join(&file.etag);
        assert!(blob.is_file(), "no blob {} for {rel}", blob.display());
        #[cfg(unix)]
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink(), "{rel} is not a link into blobs/");
    }
    assert!(!snapshot.join("unet/diffusion_pytorch_model.bin").exists() && !snapshot.join("README.md").exists());
    let requests = hub.requests();
    assert!(requests.iter().any(|r| r.starts_with(&format!("GET /api/models/{REPO}/revision/main"))), "{requests:#?}");
    for unwanted in ["README.md", ".gitattributes", ".bin"] {
        assert!(!requests.iter().any(|r| r.contains(unwanted)), "{unwanted} fetched: {requests:#?}");
    }
    assert!(requests.iter().any(|r| r.contains("/cdn/")), "no LFS redirect followed: {requests:#?}");

    // The same image as from the fixture folder, bit for bit.
    let empty = sdtune::scratch::ScratchDir::new().unwrap();
    let folder = fixture("tiny-sd1");
    stdout_ok(&run(sample_args(&mut sdtune(empty.path()), folder.to_str().unwrap(), &out.path().join("folder.png"))));
    let from_hub = pixels(&out.path().join("hub.png"));
    assert!(
        from_hub == pixels(&out.path().join("folder.png")),
        "the downloaded model's image differs from the folder's"
    );

    // Offline now: resolved from the cache, no request to the Hub.
    let before = hub.requests().len();
    let mut cmd = sdtune(cache.path());
    cmd.env("HF_ENDPOINT", hub.endpoint());
    stdout_ok(&run(sample_args(&mut cmd, REPO, &out.path().join("offline.png"))));
    assert!(pixels(&out.path().join("offline.png")) == from_hub, "the cached model's image differs");
    assert_eq!(hub.requests().len(), before, "offline run talked to the Hub: {:#?}", &hub.requests()[before..]);
}

#[test]
fn repo_missing_on_the_hub_fails_in_one_line() {
    let hub = Hub::start(&fixture("tiny-sd1"));
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let home = sdtune::scratch::ScratchDir::new().unwrap();
    let out = sdtune::scratch::ScratchDir::new().unwrap();
    let t = Instant::now();
    let res =
        run(sample_args(&mut online(cache.path(), home.path(), &hub), "testorg/not-there", &out.path().join("x.png")));
    let line = one_line_error(&res);
    assert!(t.elapsed() < Duration::from_secs(60), "took {:?}", t.elapsed());
    assert!(line.contains("testorg/not-there"), "{line}");
    assert!(line.contains("downloading it from the Hub failed"), "{line}");
    // The status once: hf-hub's error already quotes ureq's.
    assert_eq!(line.matches("status code 404").count(), 1, "{line}");
    assert!(!out.path().join("x.png").exists());
    let requests = hub.requests();
    assert!(requests.iter().any(|r| r.starts_with("GET /api/models/testorg/not-there/revision/main")), "{requests:#?}");
}
