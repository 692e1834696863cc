//! Grids on the tiny SD1 fixture: batched images equal their single
//! renders, the grid's size, layout and labels, the PNG settings chunks,
//! `--from` bit for bit on CPU, `--compare`, the run's grid from
//! sdtune.yaml, consistency figures, and errors in one sentence.
use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::RgbImage;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use sdtune::sample::grid::{self, GridGeometry};
use sdtune::sample::pipeline::{text_to_image, text_to_images, SampleRequest};
use sdtune::schedulers::SchedulerKind;

fn tiny() -> PathBuf {
    common::fixtures().join("tiny-sd1")
}

fn lora() -> PathBuf {
    common::fixtures().join("lora").join("kohya_a.safetensors")
}

fn request(prompt: &str, seed: u64, scheduler: SchedulerKind, guidance: f64) -> SampleRequest {
    SampleRequest {
        prompt: prompt.into(),
        negative_prompt: Some("blurry".into()),
        seed,
        steps: 3,
        guidance,
        width: 64,
        height: 64,
        scheduler,
        clip_skip: 0,
        size_conditioning: None,
    }
}

#[test]
fn every_batched_image_equals_its_single_render() {
    let _rng = crate::common::torch_rng();
    tch::set_num_threads(1);
    let m = StableDiffusion::from_diffusers_folder(&tiny(), Placement::cpu_f32(), None).unwrap();
    for (scheduler, guidance) in [(SchedulerKind::Ddim, 7.5), (SchedulerKind::EulerAncestral, 7.5), (SchedulerKind::EulerAncestral, 1.0)] {
        let reqs: Vec<SampleRequest> = [("a red car", 1), ("a red car", 2), ("a blue mug", 1), ("a blue mug", 7)]
            .iter()
            .map(|(p, s)| request(p, *s, scheduler, guidance))
            .collect();
        let batch = text_to_images(&m, &reqs, &mut |_| {}, &mut |_, _| {}).unwrap();
        for (i, r) in reqs.iter().enumerate() {
            let single = text_to_image(&m, r, &mut |_| {}, &mut |_, _| {}).unwrap();
            let d = common::max_abs_diff(&batch.narrow(0, i as i64, 1), &single);
            assert!(d <= 1e-5, "{scheduler:?} guidance {guidance}: image {i} differs from its single render by {d:e}");
        }
    }
}

/// `sdtune sample` on CPU in `dir`. One torch thread each: the tests run in
/// parallel, and OpenMP workers spinning against each other on a small
/// machine make a tiny render take a minute.
fn sample(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .current_dir(dir)
        .env("OMP_NUM_THREADS", "1")
        .args(["sample", "--device", "cpu"])
        .args(args)
        .output()
        .unwrap()
}

fn sample_ok(dir: &Path, args: &[&str]) -> String {
    let out = sample(dir, args);
    assert!(out.status.success(), "sdtune sample {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one-line error of a failing run.
fn sample_err(dir: &Path, args: &[&str]) -> String {
    let out = sample(dir, args);
    assert!(!out.status.success(), "sdtune sample {args:?} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(err.starts_with("error: ") && !err.contains("panicked"), "{err}");
    err
}

fn tiny_args(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["--model", tiny().to_str().unwrap(), "--steps", "2", "--width", "64", "--height", "64"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_tiny(dir: &Path, extra: &[&str]) -> String {
    let args = tiny_args(extra);
    sample_ok(dir, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn rgb(path: &Path) -> RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
}

fn max_pixel_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

/// (chunk type, keyword, text) of every tEXt/iTXt chunk, read from the raw bytes.
fn text_chunks(path: &Path) -> Vec<(String, String, String)> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let mut at = 8;
    let mut found = Vec::new();
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind = String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned();
        let data = &bytes[at + 8..at + 8 + len];
        if kind == "tEXt" {
            let nul = data.iter().position(|&b| b == 0).unwrap();
            // Latin-1: each byte is the code point.
            let text: String = data[nul + 1..].iter().map(|&b| b as char).collect();
            found.push((kind, String::from_utf8_lossy(&data[..nul]).into_owned(), text));
        } else if kind == "iTXt" {
            let nul = data.iter().position(|&b| b == 0).unwrap();
            let rest = &data[nul + 3..];
            let lang_end = rest.iter().position(|&b| b == 0).unwrap();
            let rest = &rest[lang_end + 1..];
            let tk_end = rest.iter().position(|&b| b == 0).unwrap();
            found.push((kind, String::from_utf8_lossy(&data[..nul]).into_owned(), String::from_utf8_lossy(&rest[tk_end + 1..]).into_owned()));
        }
        at += 12 + len;
    }
    found
}

fn chunk(path: &Path, keyword: &str) -> String {
    text_chunks(path).into_iter().find(|(_, k, _)| k == keyword).map(|(_, _, t)| t).unwrap_or_else(|| panic!("{} has no {keyword} chunk", path.display()))
}

#[test]
fn grid_has_its_size_layout_labels_and_images() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let stdout = run_tiny(d, &["--prompt", "a red car", "--prompt", "a blue mug", "--seeds", "1,2,3", "--negative-prompt", "blurry", "--out", "grid.png"]);
    assert!(stdout.contains("wrote grid.png (6 images beside it)"), "{stdout}");
    let grid_img = rgb(&d.join("grid.png"));
    let g = GridGeometry::new(64, 64, 2, 3);
    assert_eq!(grid_img.dimensions(), (g.width(), g.height()));

    // Each image beside the grid, in its cell, under the expected labels:
    // the grid equals one composed from those files and labels.
    let prompts = ["a red car", "a blue mug"];
    let rows: Vec<Vec<RgbImage>> = (1..=2)
        .map(|r| [1, 2, 3].iter().map(|s| rgb(&d.join(format!("grid-p{r}-s{s}.png")))).collect())
        .collect();
    let labels: Vec<String> = prompts.iter().map(|p| p.to_string()).collect();
    let cols: Vec<String> = ["seed 1", "seed 2", "seed 3"].iter().map(|s| s.to_string()).collect();
    let expected = grid::compose(&rows, &labels, &cols);
    assert!(expected == grid_img, "the grid differs from its images laid out under their labels");
    let (x, y) = g.cell_origin(1, 2);
    assert_eq!(grid_img.get_pixel(x, y), rows[1][2].get_pixel(0, 0));

    // A grid image equals the same image rendered alone (up to 1/255 rounding).
    run_tiny(d, &["--prompt", "a blue mug", "--seed", "3", "--negative-prompt", "blurry", "--out", "alone.png"]);
    let diff = max_pixel_diff(&rgb(&d.join("alone.png")), &rows[1][2]);
    assert!(diff <= 1, "grid image p2 s3 differs from its single render by {diff}/255");

    // Seeds from --seed and --count, prompts from a file.
    std::fs::write(d.join("prompts.txt"), "# brand prompts\na red car\n\na blue mug\n").unwrap();
    run_tiny(d, &["--prompts", "prompts.txt", "--seed", "5", "--count", "2", "--out", "counted.png", "--batch-size", "3"]);
    for name in ["counted-p1-s5.png", "counted-p1-s6.png", "counted-p2-s5.png", "counted-p2-s6.png"] {
        assert!(d.join(name).is_file(), "{name} missing");
    }
    assert_eq!(rgb(&d.join("counted.png")).dimensions(), (GridGeometry::new(64, 64, 2, 2).width(), GridGeometry::new(64, 64, 2, 2).height()));
}

#[test]
fn every_png_carries_a1111_parameters_and_sdtune_settings() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let spec = format!("{}:0.8", lora().display());
    run_tiny(d, &["--prompt", "a red car, studio", "--negative-prompt", "blurry", "--seed", "7", "--lora", &spec, "--out", "one.png"]);
    let chunks = text_chunks(&d.join("one.png"));
    let (kind, _, params) = chunks.iter().find(|(_, k, _)| k == "parameters").expect("parameters chunk");
    assert_eq!(kind, "tEXt", "parameters must be a plain tEXt chunk");
    let (first, rest) = params.split_once('\n').unwrap();
    assert_eq!(first, "a red car, studio <lora:kohya_a:0.8>", "A1111 applies a LoRA by its prompt tag");
    let (neg, line) = rest.split_once('\n').unwrap();
    assert_eq!(neg, "Negative prompt: blurry");
    let start = "Steps: 2, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.5, Seed: 7, Size: 64x64, Model hash: ";
    assert!(line.starts_with(start), "{line}");
    let hash = &line[start.len()..start.len() + 10];
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()), "model hash {hash:?}");
    assert!(line.contains(", Model: tiny-sd1, Lora hashes: \"kohya_a: "), "{line}");
    assert!(line.ends_with(&format!(", Version: sdtune {}", env!("CARGO_PKG_VERSION"))), "{line}");

    let json: serde_json::Value = serde_json::from_str(&chunk(&d.join("one.png"), "sdtune")).unwrap();
    assert_eq!(json["kind"], "image");
    assert_eq!(json["scheduler"], "ddim");
    assert_eq!(json["seed"], 7);
    assert_eq!(json["loras"][0]["scale"], 0.8);
    assert_eq!(json["precision"], "fp32");
    assert_eq!(json["model_hash"], hash);
}

#[test]
fn from_renders_images_and_grids_again_bit_for_bit() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let spec = format!("{}:0.7", lora().display());
    // An ancestral sampler: per-step noise must be replayed too.
    run_tiny(d, &["--prompt", "a red car", "--negative-prompt", "blurry", "--seed", "11", "--scheduler", "euler_a", "--lora", &spec, "--out", "a.png"]);
    sample_ok(d, &["--from", "a.png", "--out", "b.png"]);
    assert!(rgb(&d.join("a.png")) == rgb(&d.join("b.png")), "--from a.png did not reproduce it bit for bit");
    assert_eq!(chunk(&d.join("a.png"), "parameters"), chunk(&d.join("b.png"), "parameters"));

    // A grid's image, rendered in a batch, comes back bit for bit; so does the grid.
    run_tiny(d, &["--prompt", "a red car", "--prompt", "a blue mug", "--seeds", "1,2", "--scheduler", "euler_a", "--batch-size", "3", "--out", "g.png"]);
    sample_ok(d, &["--from", "g-p2-s1.png"]);
    assert!(rgb(&d.join("g-p2-s1.png")) == rgb(&d.join("g-p2-s1-again.png")), "a grid image did not come back bit for bit");
    sample_ok(d, &["--from", "g.png", "--out", "h.png"]);
    assert!(rgb(&d.join("g.png")) == rgb(&d.join("h.png")), "the grid did not come back bit for bit");
    assert!(rgb(&d.join("g-p1-s2.png")) == rgb(&d.join("h-p1-s2.png")));
}

#[test]
fn the_built_in_model_is_recorded_by_name_and_replays_from_another_cache() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let with_cache = |cache: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sdtune"))
            .current_dir(d)
            .env("OMP_NUM_THREADS", "1")
            .env("SDTUNE_CACHE_DIR", d.join(cache))
            .args(["sample", "--device", "cpu"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    with_cache("cache-a", &["--prompt", "a red circle", "--seed", "3", "--steps", "2", "--out", "a.png"]);
    let settings = chunk(&d.join("a.png"), "sdtune");
    assert!(settings.contains("\"model\":\"sdtune-tiny-sd\""), "{settings}");
    assert!(!settings.contains("cache-a"), "the cache folder leaked into the settings: {settings}");
    // Another machine (another cache folder) renders it again, bit for bit.
    with_cache("cache-b", &["--from", "a.png", "--out", "b.png"]);
    assert!(rgb(&d.join("a.png")) == rgb(&d.join("b.png")));
}

#[test]
fn compare_lays_base_and_lora_strengths_side_by_side() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let spec = format!("{}:0.8", lora().display());
    run_tiny(d, &["--prompt", "a red car", "--seeds", "1,2", "--lora", &spec, "--compare", "0.5,1", "--out", "c.png"]);
    let g = GridGeometry::new(64, 64, 1, 6);
    assert_eq!(rgb(&d.join("c.png")).dimensions(), (g.width(), g.height()));
    let base = rgb(&d.join("c-p1-s1-base.png"));
    let half = rgb(&d.join("c-p1-s1-lora0.5.png"));
    let full = rgb(&d.join("c-p1-s1-lora1.png"));
    assert!(base != full && half != full, "the LoRA columns must differ from the base");
    let json: serde_json::Value = serde_json::from_str(&chunk(&d.join("c-p1-s1-lora0.5.png"), "sdtune")).unwrap();
    assert!((json["loras"][0]["scale"].as_f64().unwrap() - 0.4).abs() < 1e-12, "{json}");
    let json: serde_json::Value = serde_json::from_str(&chunk(&d.join("c-p1-s1-base.png"), "sdtune")).unwrap();
    assert_eq!(json["loras"].as_array().unwrap().len(), 0);

    // The base column is the model without the LoRA.
    run_tiny(d, &["--prompt", "a red car", "--seed", "1", "--out", "plain.png"]);
    assert!(max_pixel_diff(&base, &rgb(&d.join("plain.png"))) <= 1);
    // And its image comes back from its settings, LoRA switched off.
    sample_ok(d, &["--from", "c-p1-s1-lora0.5.png"]);
    assert!(half == rgb(&d.join("c-p1-s1-lora0.5-again.png")));
}

#[test]
fn the_runs_grid_renders_from_sdtune_yaml_with_consistency_figures() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let yaml = format!(
        "model: {}\nsample:\n  prompts: [\"a red car\", \"a blue mug\"]\n  seeds: [3, 4]\ntrain:\n  name: acme\n  sample_steps: 2\n",
        tiny().display()
    );
    std::fs::write(d.join("sdtune.yaml"), yaml).unwrap();
    let err = sample_err(d, &[]);
    assert!(err.contains("acme.safetensors") && err.contains("sdtune train"), "{err}");
    std::fs::create_dir_all(d.join("output/acme")).unwrap();
    std::fs::copy(lora(), d.join("output/acme/acme.safetensors")).unwrap();
    let brand = common::fixtures().join("images");
    let stdout = sample_ok(d, &["--width", "64", "--height", "64", "--brand", brand.to_str().unwrap()]);
    let out = d.join("output/acme/samples/final.png");
    assert!(out.is_file(), "{stdout}");
    let g = GridGeometry::new(64, 64, 2, 2);
    assert_eq!(rgb(&out).dimensions(), (g.width(), g.height()));
    assert!(stdout.contains("palette distance to the brand set"), "{stdout}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("output/acme/samples/final.consistency.json")).unwrap()).unwrap();
    assert_eq!(json["brand_images"], 3);
    assert_eq!(json["images"].as_array().unwrap().len(), 4);
    assert_eq!(json["prompts"].as_array().unwrap().len(), 2);
    let images: Vec<f64> = json["images"].as_array().unwrap().iter().map(|i| i["palette_distance"].as_f64().unwrap()).collect();
    let mean = json["variants"][0]["mean"].as_f64().unwrap();
    assert!((mean - images.iter().sum::<f64>() / 4.0).abs() < 1e-9);
    assert!(images.iter().all(|&x| x > 0.0 && x.is_finite()));
    assert_eq!(json["variants"][0]["variant"], "lora");
    let settings: serde_json::Value = serde_json::from_str(&chunk(&out, "sdtune")).unwrap();
    assert_eq!(settings["kind"], "grid");
    assert_eq!(settings["steps"], 2);
    assert_eq!(settings["seeds"], serde_json::json!([3, 4]));

    // Before/after: the run's grid with the base model beside the run's LoRA.
    sample_ok(d, &["--width", "64", "--height", "64", "--compare", "--out", "before-after.png"]);
    let g = GridGeometry::new(64, 64, 2, 4);
    assert_eq!(rgb(&d.join("before-after.png")).dimensions(), (g.width(), g.height()));
    assert!(d.join("before-after-p2-s4-base.png").is_file() && d.join("before-after-p2-s4-lora1.png").is_file());
}

#[test]
fn bad_input_gets_one_sentence() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    // A PNG without settings.
    RgbImage::new(8, 8).save(d.join("plain.png")).unwrap();
    let err = sample_err(d, &["--from", "plain.png"]);
    assert!(err.contains("plain.png") && err.contains("no generation settings"), "{err}");
    let err = sample_err(d, &["--from", "missing.png"]);
    assert!(err.contains("missing.png") && err.contains("does not exist"), "{err}");
    // No prompt and no sdtune.yaml.
    let err = sample_err(d, &["--model", tiny().to_str().unwrap()]);
    assert!(err.contains("--prompt") && err.contains("sdtune.yaml"), "{err}");
    // --compare without a LoRA.
    let err = sample_err(d, &["--model", tiny().to_str().unwrap(), "--prompt", "x", "--compare"]);
    assert!(err.contains("--compare") && err.contains("--lora"), "{err}");
    // An empty prompts file.
    std::fs::write(d.join("empty.txt"), "# nothing\n\n").unwrap();
    let err = sample_err(d, &["--model", tiny().to_str().unwrap(), "--prompts", "empty.txt"]);
    assert!(err.contains("empty.txt") && err.contains("no prompt"), "{err}");
    // --from with a flag it would ignore.
    let out = sample(d, &["--from", "plain.png", "--steps", "5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"), "{}", String::from_utf8_lossy(&out.stderr));
}
