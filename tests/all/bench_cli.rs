//! `sdtune bench` on the tiny config: each kind prints its table and one
//! JSON line whose figures are real (positive, finite), and a bad flag gets
//! one sentence.
use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .env("OMP_NUM_THREADS", "1")
        .args(["bench"])
        .args(args)
        .output()
        .unwrap()
}

/// The JSON line of a successful run.
fn figures(args: &[&str]) -> serde_json::Value {
    let out = bench(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "sdtune bench {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON line in:\n{stdout}"));
    serde_json::from_str(line).unwrap()
}

fn positive(v: &serde_json::Value, key: &str) -> f64 {
    let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"));
    assert!(x.is_finite() && x > 0.0, "{key} = {x} in {v}");
    x
}

#[test]
fn each_kind_prints_real_figures() {
    let common = ["--arch", "tiny", "--device", "cpu", "--warmup", "0"];
    let train = figures(&[&["train"], &common[..], &["--steps", "2"]].concat());
    assert_eq!((train["bench"].as_str(), train["side"].as_str(), train["arch"].as_str()), (Some("train"), Some("sdtune"), Some("tiny")));
    positive(&train, "steps_per_s");
    positive(&train, "peak_mem_mb");
    positive(&train, "loss");
    assert_eq!(train["rank"], 16);

    let sample = figures(&[&["sample"], &common[..], &["--steps", "2"]].concat());
    positive(&sample, "s_per_image");
    positive(&sample, "images_per_s");
    assert_eq!(sample["finite"], true);

    let encode = figures(&[&["encode"], &common[..], &["--steps", "1"]].concat());
    positive(&encode, "images_per_s");
    positive(&encode, "captions_per_s");
}

#[test]
fn a_resolution_the_model_cannot_take_is_one_sentence() {
    // fp32 said outright: `auto` on a CPU with AVX512-BF16 says which it picked on stderr.
    let out = bench(&["train", "--arch", "tiny", "--device", "cpu", "--precision", "fp32", "--resolution", "65", "--steps", "1"]);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success());
    assert!(err.starts_with("error: ") && err.lines().count() == 1 && !err.contains("panicked"), "{err}");
}
