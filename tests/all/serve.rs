//! `sdtune serve` on 127.0.0.1 (a free port) with the tiny SD1 fixture and
//! two kohya LoRAs: a served image is `sdtune sample`'s image byte for byte
//! (and `--from` renders it again), adapters switch per request, a run's
//! final LoRA and new files appear, A1111's route reads `<lora:...>` tags,
//! bad requests get one 4xx sentence, a burst of requests is all answered
//! (served or 429), a token guards the API, and SIGTERM stops it cleanly.
use crate::common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use base64::Engine;

const PROMPT: &str = "a red square";

struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    /// `sdtune serve` in `dir` with `dir/adapters` as its adapter folder.
    fn start(dir: &Path, extra: &[&str]) -> Server {
        let log = dir.join(format!("serve-{}.log", extra.len()));
        let model = common::fixtures().join("tiny-sd1");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sdtune"))
            .current_dir(dir)
            // One thread: fast on a busy machine, and the same as `sample` below.
            .env("OMP_NUM_THREADS", "1")
            .args(["serve", "--model", model.to_str().unwrap(), "--adapters", "adapters", "--port", "0", "--device", "cpu"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on http://127.0.0.1:")
            .and_then(|rest| rest.trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| panic!("no `listening on` line: {line:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        Server { child, port, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An answer: status, body, Retry-After.
struct Reply {
    status: u16,
    body: Vec<u8>,
    retry_after: Option<String>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build()
}

fn call(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> Reply {
    let mut req = agent().request(method, url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let result = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    let retry_after = response.header("Retry-After").map(str::to_string);
    let mut bytes = Vec::new();
    response.into_reader().read_to_end(&mut bytes).unwrap();
    Reply { status, body: bytes, retry_after }
}

fn get(s: &Server, path: &str) -> Reply {
    call("GET", &s.url(path), None, None)
}

fn post(s: &Server, path: &str, body: &str) -> Reply {
    call("POST", &s.url(path), Some(body), None)
}

/// Queues `body` on /v1/images, follows its event stream to the end, and
/// returns its PNGs in seed order.
fn render(s: &Server, body: &str) -> Vec<Vec<u8>> {
    let queued = post(s, "/v1/images", body);
    assert_eq!(queued.status, 202, "{}", queued.text());
    let id = queued.json()["id"].as_str().unwrap().to_string();
    let events = get(s, &format!("/v1/jobs/{id}/events")).text();
    assert!(events.contains("event: done"), "the event stream ends with the job: {events}");
    let job = get(s, &format!("/v1/jobs/{id}")).json();
    assert_eq!(job["status"], "done", "{job}\n{}", s.log());
    job["results"].as_array().unwrap().iter().map(|r| get(s, r["url"].as_str().unwrap()).body).collect()
}

fn sdtune(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_sdtune")).current_dir(dir).env("OMP_NUM_THREADS", "1").args(args).output().unwrap();
    assert!(out.status.success(), "sdtune {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// `sdtune sample` of PROMPT at 2 steps with `extra` flags, its PNG's bytes.
fn sample(dir: &Path, out: &str, extra: &[&str]) -> Vec<u8> {
    let model = common::fixtures().join("tiny-sd1");
    let mut args = vec!["sample", "--model", model.to_str().unwrap(), "--prompt", PROMPT, "--steps", "2", "--device", "cpu", "--out", out];
    args.extend_from_slice(extra);
    sdtune(dir, &args);
    std::fs::read(dir.join(out)).unwrap()
}

/// A temporary folder with `adapters/kohya_a.safetensors` and `kohya_b`,
/// and a training run `output/acme/` whose final LoRA is kohya_b's weights.
fn workspace() -> sdtune::scratch::ScratchDir {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let adapters = dir.path().join("adapters");
    std::fs::create_dir(&adapters).unwrap();
    for name in ["kohya_a", "kohya_b"] {
        std::fs::copy(common::fixtures().join(format!("lora/{name}.safetensors")), adapters.join(format!("{name}.safetensors"))).unwrap();
    }
    let run = dir.path().join("output/acme");
    std::fs::create_dir_all(run.join("lora")).unwrap();
    std::fs::copy(common::fixtures().join("lora/kohya_b.safetensors"), run.join("acme.safetensors")).unwrap();
    // A periodic save beside it is not the run's adapter.
    std::fs::copy(common::fixtures().join("lora/kohya_a.safetensors"), run.join("lora/step-000010.safetensors")).unwrap();
    dir
}

#[test]
fn served_images_are_sampled_images_byte_for_byte_and_adapters_switch_per_request() {
    let dir = workspace();
    let d = dir.path();
    let server = Server::start(d, &[]);
    let with = |adapters: &str| format!(r#"{{"prompt": "{PROMPT}", "seed": 3, "steps": 2, "adapters": [{adapters}]}}"#);
    let a = r#"{"name": "kohya_a", "scale": 0.8}"#;
    let b = r#"{"name": "kohya_b"}"#;

    // Switching every request: base, a, b, a, base.
    let order = [with(""), with(a), with(b), with(a), with("")];
    let images: Vec<Vec<u8>> = order.iter().map(|body| render(&server, body).remove(0)).collect();
    assert_eq!(images[1], images[3], "kohya_a gives the same image after kohya_b as after the base");
    assert_eq!(images[0], images[4], "the base comes back with no adapter");
    let pixels: Vec<image::RgbImage> = images.iter().map(|png| image::load_from_memory(png).unwrap().to_rgb8()).collect();
    assert!(pixels[0] != pixels[1] && pixels[1] != pixels[2] && pixels[0] != pixels[2], "each adapter changes the image");

    // The same recipes through `sdtune sample`: the same bytes. Several
    // seeds go through the UNet as one batch, as `sample --batch-size` does.
    let lora_a = format!("{}:0.8", d.join("adapters/kohya_a.safetensors").display());
    let lora_b = d.join("adapters/kohya_b.safetensors").display().to_string();
    assert!(sample(d, "b.png", &["--seed", "3", "--lora", &lora_b]) == images[2], "kohya_b's image differs from sdtune sample's");
    let batch = render(&server, &format!(r#"{{"prompt": "{PROMPT}", "seeds": [3, 5], "steps": 2, "adapters": [{a}]}}"#));
    sample(d, "grid.png", &["--seeds", "3,5", "--batch-size", "4", "--lora", &lora_a]);
    assert!(std::fs::read(d.join("grid-p1-s3.png")).unwrap() == batch[0], "seed 3 of a batch differs from sdtune sample's");
    assert!(std::fs::read(d.join("grid-p1-s5.png")).unwrap() == batch[1], "seed 5 of a batch differs from sdtune sample's");

    // `sdtune sample --from` renders a served image again, bit for bit.
    std::fs::write(d.join("served.png"), &images[2]).unwrap();
    sdtune(d, &["sample", "--from", "served.png", "--device", "cpu"]);
    assert!(std::fs::read(d.join("served-again.png")).unwrap() == images[2], "--from a served image renders other bytes");

    // The run's final LoRA is an adapter by the run's name; a file copied
    // into the adapter folder is offered at once, by its name.
    let listing = |s: &Server| -> Vec<(String, String)> {
        let json = get(s, "/v1/adapters").json();
        json["adapters"].as_array().unwrap().iter().map(|a| (a["name"].as_str().unwrap().into(), a["source"].as_str().unwrap().into())).collect()
    };
    let pair = |n: &str, s: &str| (n.to_string(), s.to_string());
    assert_eq!(listing(&server), [pair("acme", "run"), pair("kohya_a", "adapters"), pair("kohya_b", "adapters")]);
    let acme = render(&server, &with(r#"{"name": "acme"}"#)).remove(0);
    assert_eq!(image::load_from_memory(&acme).unwrap().to_rgb8(), pixels[2], "the run's LoRA holds kohya_b's weights");
    std::fs::create_dir(d.join("adapters/new")).unwrap();
    std::fs::copy(d.join("adapters/kohya_a.safetensors"), d.join("adapters/new/tidewave.safetensors")).unwrap();
    let names: Vec<String> = listing(&server).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["acme", "kohya_a", "kohya_b", "tidewave"]);
    let tidewave = render(&server, &with(r#"{"name": "tidewave", "scale": 0.8}"#)).remove(0);
    assert_eq!(image::load_from_memory(&tidewave).unwrap().to_rgb8(), pixels[1], "the same weights under a new name");

    // A1111's route: a <lora:NAME:SCALE> tag, base64 PNGs, the same image.
    let body = format!(r#"{{"prompt": "{PROMPT} <lora:kohya_a:0.8>", "seed": 3, "steps": 2, "cfg_scale": 7.5, "sampler_name": "DDIM", "width": 64, "height": 64, "restore_faces": false}}"#);
    let reply = post(&server, "/sdapi/v1/txt2img", &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    let png = base64::engine::general_purpose::STANDARD.decode(json["images"][0].as_str().unwrap()).unwrap();
    assert!(png == images[1], "A1111's route renders the same image as /v1/images");
    let info: serde_json::Value = serde_json::from_str(json["info"].as_str().unwrap()).unwrap();
    assert!(info["infotexts"][0].as_str().unwrap().contains("<lora:kohya_a:0.8>"), "{info}");
}

#[test]
fn bad_requests_get_one_sentence_and_a_4xx() {
    let dir = workspace();
    let server = Server::start(dir.path(), &[]);
    let images = "/v1/images";
    let a1111 = "/sdapi/v1/txt2img";
    let cases: &[(&str, &str, &str)] = &[
        (images, r#"{"prompt": "x", "adapters": [{"name": "nope"}]}"#, "nope"),
        (images, r#"{"prompt": "x", "adapters": [{"name": "../kohya_a"}]}"#, "path"),
        (images, r#"{"prompt": "x", "adapters": [{"name": "/etc/passwd"}]}"#, "path"),
        (images, r#"{"prompt": "x", "width": 4096}"#, "limit"),
        (images, r#"{"prompt": "x", "width": 60}"#, "multiple of 8"),
        (images, r#"{"prompt": "x", "steps": 0}"#, "steps"),
        (images, r#"{"prompt": "x", "steps": 100000}"#, "steps"),
        (images, r#"{"prompt": "x", "count": 1000}"#, "count"),
        (images, r#"{"prompt": "x", "seeds": [1, 1]}"#, "twice"),
        (images, r#"{"prompt": "x", "guidance": NaN}"#, "JSON"),
        (images, r#"{"prompt": "x", "guidance": "NaN"}"#, "JSON"),
        (images, r#"{"prompt": "x", "guidance": 1e999}"#, "JSON"),
        (images, r#"{"prompt": "x", "guidance": -3}"#, "guidance"),
        (images, r#"{"prompt": "x", "adapters": [{"name": "kohya_a", "scale": 1e9}]}"#, "strength"),
        (images, r#"{"prompt": "x", "clip_skip": 99}"#, "clip_skip"),
        (images, r#"{"prompt": "x", "scheduler": "magic"}"#, "magic"),
        (images, r#"{"prompt": "x", "colour": "red"}"#, "colour"),
        (images, r#"{"prompt": "#, "JSON"),
        (images, "", "JSON"),
        (images, r#"{"prompt": ""}"#, "prompt"),
        (a1111, r#"{"prompt": "x <lora:../x:1>"}"#, "path"),
        (a1111, r#"{"prompt": "x <lora:nope:1>"}"#, "nope"),
        (a1111, r#"{"prompt": "x", "cfg_scale": NaN}"#, "JSON"),
        (a1111, r#"{"prompt": "x", "sampler_name": "UniPC"}"#, "UniPC"),
        (a1111, r#"{"prompt": "x", "width": 8192}"#, "limit"),
    ];
    for (route, body, word) in cases {
        let reply = post(&server, route, body);
        let what = format!("POST {route} {body} -> {} {}", reply.status, reply.text());
        assert!((400..500).contains(&reply.status), "{what}");
        let message = reply.json()["error"].as_str().unwrap_or_else(|| panic!("{what}")).to_string();
        assert!(!message.is_empty() && !message.contains('\n'), "one sentence: {what}");
        assert!(message.contains(word), "the sentence should name {word:?}: {what}");
    }
    for path in ["/v1/jobs/999", "/v1/jobs/abc", "/v1/jobs/1/images/0.png", "/nothing"] {
        let reply = get(&server, path);
        assert_eq!(reply.status, 404, "GET {path}: {}", reply.text());
        assert!(reply.json()["error"].is_string(), "GET {path}: {}", reply.text());
    }
    assert_eq!(get(&server, "/healthz").status, 200, "the server is still up:\n{}", server.log());
    assert!(!server.log().contains("internal error"), "{}", server.log());
}

#[test]
fn a_burst_of_requests_is_all_answered_and_sigterm_stops_cleanly() {
    let dir = workspace();
    let mut server = Server::start(dir.path(), &["--queue", "3"]);
    let url = server.url("/v1/images");
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200)
            .map(|i| {
                let url = url.clone();
                let body = format!(r#"{{"prompt": "{PROMPT}", "seed": {i}, "steps": 1, "guidance": 1}}"#);
                s.spawn(move || call("POST", &url, Some(&body), None))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let accepted: Vec<String> =
        replies.iter().filter(|r| r.status == 202).map(|r| r.json()["id"].as_str().unwrap().to_string()).collect();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(accepted.len() + refused.len(), 200, "every request is answered with 202 or 429");
    assert!(!accepted.is_empty() && !refused.is_empty(), "{} accepted, {} refused", accepted.len(), refused.len());
    for r in &refused {
        let wait: u64 = r.retry_after.as_deref().and_then(|v| v.parse().ok()).expect("429 carries Retry-After in seconds");
        assert!(wait >= 1, "{wait}");
        assert!(r.json()["error"].as_str().unwrap().contains("queue is full"));
    }
    // None lost: every accepted job finishes with its image.
    for id in &accepted {
        let events = get(&server, &format!("/v1/jobs/{id}/events")).text();
        assert!(events.contains("event: done"), "{events}");
        let job = get(&server, &format!("/v1/jobs/{id}")).json();
        assert_eq!((job["status"].as_str(), job["results"].as_array().map(Vec::len)), (Some("done"), Some(1)), "{job}");
    }
    // Nothing is left waiting.
    let health = get(&server, "/healthz").json();
    assert_eq!(health["queued"], 0, "{health}");
    // Memory bounded: the refused requests held nothing and the served ones
    // left nothing behind (the tiny model's server peaks near 400 MB).
    let peak_mb = sdtune::bench::measure::peak_rss_mb_of(server.child.id()).expect("VmHWM in /proc/PID/status");
    assert!(peak_mb < 1024.0, "the server's peak RSS after 200 requests is {peak_mb:.0} MB");

    // SIGTERM: no more jobs, the process says so and exits 130.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{}", server.log());
    let log = server.log();
    assert!(log.contains("stopping:") && log.contains("stopped"), "{log}");
}

#[test]
fn a_token_guards_the_api_and_other_hosts_need_one() {
    let dir = workspace();
    let out = Command::new(env!("CARGO_BIN_EXE_sdtune")).current_dir(dir.path()).args(["serve", "--host", "0.0.0.0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: ") && err.contains("--token") && err.trim().lines().count() == 1, "{err}");

    let server = Server::start(dir.path(), &["--token", "s3cret"]);
    let adapters = server.url("/v1/adapters");
    assert_eq!(call("GET", &adapters, None, None).status, 401);
    assert_eq!(call("GET", &adapters, None, Some("s3cre")).status, 401);
    assert_eq!(call("GET", &adapters, None, Some("s3cret")).status, 200);
    let body = r#"{"prompt": "x", "steps": 1}"#;
    assert_eq!(call("POST", &server.url("/v1/images"), Some(body), None).status, 401);
    assert_eq!(get(&server, "/healthz").status, 200, "health needs no token");
    let page = get(&server, "/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<title>sdtune serve</title>"), "the page is served from the binary");
}

#[test]
fn cancelling_stops_a_queued_job_at_once_and_a_running_one_at_its_next_step() {
    let dir = workspace();
    let server = Server::start(dir.path(), &[]);
    // A long job in front keeps the second one queued while it is cancelled.
    let slow = post(&server, "/v1/images", &format!(r#"{{"prompt": "{PROMPT}", "steps": 100, "seeds": [1, 2, 3, 4, 5, 6, 7, 8]}}"#));
    let queued = post(&server, "/v1/images", &format!(r#"{{"prompt": "{PROMPT}", "steps": 1}}"#));
    let (slow, queued) = (slow.json()["id"].as_str().unwrap().to_string(), queued.json()["id"].as_str().unwrap().to_string());
    let cancelled = call("DELETE", &server.url(&format!("/v1/jobs/{queued}")), None, None);
    assert_eq!(cancelled.status, 200, "{}", cancelled.text());
    assert_eq!(cancelled.json()["status"], "cancelled");
    let stopped = call("DELETE", &server.url(&format!("/v1/jobs/{slow}")), None, None);
    assert_eq!(stopped.status, 200);
    let events = get(&server, &format!("/v1/jobs/{slow}/events")).text();
    assert!(events.contains("\"status\":\"cancelled\""), "the running job stops at its next step: {events}");
    let job = get(&server, &format!("/v1/jobs/{slow}")).json();
    assert!(job["results"].as_array().unwrap().is_empty() && job["step"].as_u64().unwrap() < 100, "{job}");
}

/// The job's figures against a brand set, beside what the metric code
/// (the training grids' and `sdtune pick`'s) computes on the job's own PNGs.
fn assert_figures_match(s: &Server, job: &serde_json::Value, brand: &sdtune::sample::metrics::Brand) {
    use sdtune::sample::metrics::{consistency, Cell};
    let figures = &job["consistency"][0];
    let pngs: Vec<image::RgbImage> = job["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| image::load_from_memory(&get(s, r["url"].as_str().unwrap()).body).unwrap().to_rgb8())
        .collect();
    let seeds: Vec<u64> = job["results"].as_array().unwrap().iter().map(|r| r["seed"].as_u64().unwrap()).collect();
    let cells: Vec<Cell> =
        pngs.iter().zip(&seeds).map(|(image, &seed)| Cell { file: String::new(), prompt: PROMPT, seed, variant: "lora", image }).collect();
    let want = consistency(&cells, brand);
    let close = |got: &serde_json::Value, want: f64| {
        let got = got.as_f64().unwrap_or_else(|| panic!("not a number: {got} in {figures}"));
        // Only the JSON's decimal text between them.
        assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{got} vs {want}: {figures}");
    };
    close(&figures["palette_distance"], want.variants[0].mean);
    close(&figures["seed_spread"], want.variants[0].seed_std);
    close(&figures["seed_pairwise"], want.variants[0].seed_pairwise);
    let images = figures["images"].as_array().unwrap();
    assert_eq!(images.len(), want.images.len());
    for (got, w) in images.iter().zip(&want.images) {
        close(got, w.palette_distance);
    }
    assert_eq!(figures["brand_images"], want.brand_images);
    assert!(want.variants[0].seed_std > 0.0 && want.variants[0].mean > 0.0, "two seeds, two distances: {figures}");
}

/// POST and follow a job to its end; the job's JSON.
fn finished_job(s: &Server, body: &str) -> serde_json::Value {
    let queued = post(s, "/v1/images", body);
    assert_eq!(queued.status, 202, "{}", queued.text());
    let id = queued.json()["id"].as_str().unwrap().to_string();
    assert!(get(s, &format!("/v1/jobs/{id}/events")).text().contains("event: done"));
    let job = get(s, &format!("/v1/jobs/{id}")).json();
    assert_eq!(job["status"], "done", "{job}\n{}", s.log());
    job
}

#[test]
fn a_run_adapters_grid_carries_the_consistency_figures_of_its_brand_set() {
    use sdtune::sample::brand_palette;
    use sdtune::sample::metrics::Brand;
    let dir = workspace();
    let d = dir.path();
    // This folder's brand set, prepared as for training.
    let brand_dir = d.join("brand");
    std::fs::create_dir(&brand_dir).unwrap();
    for i in 0..3u32 {
        let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(200 + i * 20) as u8, (x * 3) as u8, (y * 2 + 40 * i) as u8]));
        img.save(brand_dir.join(format!("poster{i}.png"))).unwrap();
    }
    let model = common::fixtures().join("tiny-sd1");
    sdtune(d, &["prepare", "brand", "--model", model.to_str().unwrap(), "--device", "cpu", "--resolution", "64", "--min-bucket", "32",
        "--max-bucket", "128", "--bucket-step", "32", "--min-side", "64"]);
    let prepared = Brand::from_prepared(d).unwrap().expect("prepared");
    // The run `acme` recorded another palette when it trained: that one is its brand set.
    let other = image::RgbImage::from_fn(32, 32, |x, _| image::Rgb([10, (x * 8) as u8, 230]));
    let other_file = d.join("other.png");
    other.save(&other_file).unwrap();
    let recorded = Brand::from_files(&[other_file], "elsewhere (prepared)".into()).unwrap();
    let palette = d.join("output/acme").join(brand_palette::FILE_NAME);
    brand_palette::save(&recorded, &palette).unwrap();

    let server = Server::start(d, &[]);
    let body = |adapters: &str, brand: &str| format!(r#"{{"prompt": "{PROMPT}", "seeds": [3, 5], "steps": 2, "adapters": [{adapters}]{brand}}}"#);
    let job = finished_job(&server, &body(r#"{"name": "acme"}"#, ""));
    assert_eq!(job["consistency"].as_array().unwrap().len(), 1, "{job}");
    assert_eq!(job["consistency"][0]["adapter"], "acme");
    assert_figures_match(&server, &job, &brand_palette::load(&palette).unwrap());
    assert_eq!(job["consistency"][0]["brand"], "elsewhere (prepared)");

    // The base model's grid measured against acme's brand set, for the side by side.
    let base = finished_job(&server, &body("", r#", "brand": "acme""#));
    assert_figures_match(&server, &base, &brand_palette::load(&palette).unwrap());
    assert_ne!(base["consistency"][0]["palette_distance"], job["consistency"][0]["palette_distance"], "the LoRA changes the colours");

    // A run that recorded no palette: the images prepared where the server runs.
    std::fs::remove_file(&palette).unwrap();
    let job = finished_job(&server, &body(r#"{"name": "acme"}"#, ""));
    assert_figures_match(&server, &job, &prepared);
    assert!(job["consistency"][0]["brand"].as_str().unwrap().ends_with("(prepared)"), "{job}");

    // A file from the adapter folder has no brand set: no figures, and naming it is a 400.
    let plain = finished_job(&server, &body(r#"{"name": "kohya_a"}"#, ""));
    assert_eq!(plain["consistency"], serde_json::json!([]), "{plain}");
    let refused = post(&server, "/v1/images", &body("", r#", "brand": "kohya_a""#));
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(refused.json()["error"].as_str().unwrap().contains("not a training run"), "{}", refused.text());
    let refused = post(&server, "/v1/images", &body("", r#", "brand": "../acme""#));
    assert_eq!(refused.status, 400, "{}", refused.text());
}
