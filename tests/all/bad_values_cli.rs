//! Values no run can use get one sentence naming the flag or key, the value
//! and the allowed range (exit 1, nothing written); legal but suspicious
//! ones a warning line. Run on the tiny SD1 fixture through the binary.
use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tiny() -> PathBuf {
    common::fixtures().join("tiny-sd1")
}

fn sdtune(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdtune")).current_dir(dir).args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the run failed with exit 1 and one `error:` sentence holding
/// every word of `expect`; returns that sentence.
fn refused(dir: &Path, args: &[&str], expect: &[&str]) -> String {
    let out = sdtune(dir, args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "sdtune {args:?} should be refused with exit 1:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "sdtune {args:?} panicked:\n{err}");
    assert!(!err.contains("unexpected argument"), "sdtune {args:?}: the value never reached its check:\n{err}");
    let last = err.lines().filter(|l| !l.trim().is_empty()).last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: "), "sdtune {args:?}: no error sentence:\n{err}");
    for word in expect {
        assert!(last.contains(word), "sdtune {args:?}: {word:?} missing from {last:?}");
    }
    for rust in ["u64", "usize", "f64", "struct ", "invalid type"] {
        assert!(!last.contains(rust), "sdtune {args:?}: Rust type words in {last:?}");
    }
    last
}

fn sample(dir: &Path, extra: &[&str], expect: &[&str]) -> String {
    let model = tiny().display().to_string();
    let mut args = vec!["sample", "--model", model.as_str(), "--prompt", "a red square", "--device", "cpu", "--steps", "1"];
    args.extend(extra);
    let sentence = refused(dir, &args, expect);
    assert!(!dir.join("sample.png").exists(), "a refused sample wrote an image");
    sentence
}

#[test]
fn sample_values_out_of_range_are_refused_naming_flag_and_range() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    for g in ["-1", "inf", "-inf", "NaN", "1e30", "100.5"] {
        sample(d, &["--guidance", g], &["--guidance", "0 to 100"]);
    }
    sample(d, &["--width", "0"], &["--width 0", "multiple of 8"]);
    sample(d, &["--height", "100"], &["--height 100", "multiple of 8"]);
    sample(d, &["--width", "-64"], &["--width -64", "multiple of 8"]);
    sample(d, &["--batch-size", "0"], &["--batch-size", "1 or more"]);
    sample(d, &["--steps", "0"], &["--steps", "1 or more"]);
    sample(d, &["--count", "0"], &["--count 0"]);
    sample(d, &["--seeds", "1,2,1"], &["--seeds", "seed 1", "more than once"]);
    let missing = d.join("missing.safetensors").display().to_string();
    sample(d, &["--lora", &format!("{missing}:1e9")], &["--lora", "1e9", "-100 to 100"]);
    sample(d, &["--lora", &format!("{missing}:-inf")], &["--lora", "-inf", "-100 to 100"]);
}

#[test]
fn sample_values_the_model_must_judge_are_refused_before_rendering() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    // The fixture's text encoder has 3 layers.
    sample(d, &["--clip-skip", "3"], &["--clip-skip 3", "has 3", "0 to 2"]);
    sample(d, &["--clip-skip", "99"], &["--clip-skip 99", "has 3"]);
    // Refused from the size alone, long before anything that large is allocated.
    sample(d, &["--width", "100000"], &["100000x", "up to 4096"]);
    sample(d, &["--width", "4096", "--height", "4096", "--batch-size", "64", "--count", "64"], &["GiB", "--batch-size"]);
}

#[test]
fn suspicious_sample_values_are_warned_and_rendered() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let model = tiny().display().to_string();
    let out = sdtune(dir.path(), &["sample", "--model", &model, "--prompt", "a red square", "--device", "cpu", "--steps", "1", "--guidance", "40"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.lines().any(|l| l.starts_with("warning:") && l.contains("--guidance 40")), "{err}");
    assert!(dir.path().join("sample.png").is_file());
}

#[test]
fn train_values_out_of_range_are_refused_naming_flag_and_range() {
    // Checked before the cache is opened: no prepared folder needed.
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let train = |extra: &[&str], expect: &[&str]| {
        let mut args = vec!["train", "--device", "cpu"];
        args.extend(extra);
        refused(d, &args, expect)
    };
    for v in ["-0.1", "NaN", "inf", "5"] {
        train(&["--noise-offset", v], &["--noise-offset", "0 to 1"]);
    }
    for v in ["-1", "NaN", "inf"] {
        train(&["--min-snr-gamma", v], &["--min-snr-gamma"]);
    }
    for v in ["inf", "NaN", "0", "-1e-4"] {
        train(&["--lr", v], &["--lr", "above 0"]);
    }
    train(&["--batch-size", "0"], &["--batch-size", "1 or more"]);
    train(&["--grad-accum", "0"], &["--grad-accum", "1 or more"]);
    train(&["--rank", "0"], &["--rank", "1 or more"]);
    train(&["--caption-dropout", "1.5"], &["--caption-dropout"]);
    assert!(!d.join("output").exists(), "a refused run wrote output");
}

#[test]
fn sdtune_yaml_values_are_refused_naming_the_key() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let with_yaml = |yaml: &str, expect: &[&str]| {
        std::fs::write(d.join("sdtune.yaml"), yaml).unwrap();
        refused(d, &["train", "--device", "cpu"], expect)
    };
    with_yaml("train:\n  noise_offset: .nan\n", &["train.noise_offset", "NaN"]);
    with_yaml("train:\n  min_snr_gamma: -5\n", &["train.min_snr_gamma", "-5"]);
    with_yaml("train:\n  lr: .inf\n", &["train.lr", "inf"]);
    with_yaml("train:\n  batch_size: 0\n", &["train.batch_size"]);
    with_yaml("train:\n  sample_guidance: -2\n", &["train.sample_guidance", "0 to 100"]);
    with_yaml("sample:\n  seeds: [3, 3]\n", &["sample.seeds", "seed 3"]);
    with_yaml("data:\n  no_upscale: true\n  allow_upscale: true\n", &["no_upscale", "allow_upscale"]);
    // Wrong kinds of value: the key and the kind wanted, in words.
    with_yaml("train:\n  lr: fast\n", &["train.lr", "expected a number", "\"fast\""]);
    with_yaml("train:\n  steps: -3\n", &["train.steps", "whole number"]);
    with_yaml("train: 5\n", &["train", "section"]);
    with_yaml("train:\n  - steps\n", &["train", "section", "list"]);
    // A byte-order mark is not a second document: the file is read (and its bad value found).
    let mut bom = vec![0xEF, 0xBB, 0xBF];
    bom.extend_from_slice(b"train:\n  grad_accum: 0\n");
    std::fs::write(d.join("sdtune.yaml"), bom).unwrap();
    let sentence = refused(d, &["train", "--device", "cpu"], &["train.grad_accum"]);
    assert!(!sentence.contains("document"), "{sentence}");
}

#[test]
fn contradicting_upscale_flags_are_refused_by_the_parser() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let out = sdtune(dir.path(), &["prepare", "images", "--no-upscale", "--allow-upscale"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--no-upscale") && err.contains("--allow-upscale") && err.contains("cannot be used with"), "{err}");
}

#[test]
fn a_folder_where_a_file_is_wanted_is_called_a_folder() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let folder = d.join("a folder");
    std::fs::create_dir(&folder).unwrap();
    let f = folder.display().to_string();
    for args in [
        vec!["sample", "--from", f.as_str()],
        vec!["train", "--config", f.as_str()],
        vec!["sample", "--model", tiny().to_str().unwrap(), "--prompt", "x", "--prompts", f.as_str()],
        vec!["sample", "--model", tiny().to_str().unwrap(), "--prompt", "x", "--lora", f.as_str()],
    ] {
        let sentence = refused(d, &args, &["folder"]);
        assert!(!sentence.contains("does not exist"), "{sentence}");
    }
    std::fs::create_dir(d.join("sdtune.yaml")).unwrap();
    let sentence = refused(d, &["train"], &["sdtune.yaml", "folder"]);
    assert!(!sentence.contains("does not exist"), "{sentence}");
}

/// A working folder with 2 prepared 64-px images of the tiny model.
fn prepared() -> sdtune::scratch::ScratchDir {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let brand = dir.path().join("brand");
    std::fs::create_dir_all(&brand).unwrap();
    for i in 0..2u32 {
        let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, (100 * i) as u8]));
        img.save(brand.join(format!("p{i}.png"))).unwrap();
        std::fs::write(brand.join(format!("p{i}.txt")), format!("a poster {i}")).unwrap();
    }
    let model = tiny().display().to_string();
    let out = sdtune(dir.path(), &["prepare", "brand", "--device", "cpu", "--resolution", "64", "--min-bucket", "64", "--max-bucket", "64", "--bucket-step", "64", "--min-side", "64", "--model", &model]);
    assert!(out.status.success(), "prepare failed: {}", stderr(&out));
    dir
}

#[test]
fn rank_above_the_layer_width_is_refused_and_a_long_warm_up_warned() {
    let dir = prepared();
    let d = dir.path();
    let base = ["train", "--device", "cpu", "--sample-every", "0", "--save-every", "0", "--steps", "1"];
    let mut args = base.to_vec();
    args.extend(["--rank", "100000", "--name", "wide"]);
    let sentence = refused(d, &args, &["--rank 100000", "narrowest targeted layer", "features", "or less"]);
    assert!(sentence.contains("attn2"), "the layer is named: {sentence}");
    assert!(!d.join("output/wide/wide.safetensors").exists());

    let mut args = base.to_vec();
    args.extend(["--rank", "2", "--alpha", "2", "--warmup-steps", "10", "--lr-schedule", "cosine", "--name", "warm"]);
    let out = sdtune(d, &args);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.lines().any(|l| l.starts_with("warning:") && l.contains("warm-up") && l.contains("10 steps")), "{err}");
    assert!(d.join("output/warm/warm.safetensors").is_file());
}
