//! The demo end to end, shortened: the example brand set prepared on the
//! built-in tiny model (no --model, as a newcomer runs it), a short LoRA,
//! then base and LoRA sampled on the same prompts and seeds. The LoRA's
//! images must be at least 40% closer to the brand set's palette than the
//! base model's.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs sdtune in `dir` with its own cache for the built-in model.
fn sdtune(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .current_dir(dir)
        .env("SDTUNE_CACHE_DIR", dir.join("model-cache"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sdtune {} failed:\n{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[derive(serde::Deserialize)]
struct Figures {
    variants: Vec<Variant>,
}

#[derive(serde::Deserialize)]
struct Variant {
    variant: String,
    mean: f64,
}

#[test]

fn a_short_lora_moves_samples_to_the_brand_palette() {
    let started = Instant::now();
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let dir = tmp.path();
    std::fs::copy(repo().join("configs/demo.yaml"), dir.join("sdtune.yaml")).unwrap();
    let brand = repo().join("datasets/example-brand");

    let out = sdtune(dir, &["prepare", brand.to_str().unwrap(), "--device", "cpu"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("built-in tiny model"), "prepare did not say it uses the built-in model: {said}");
    sdtune(dir, &["train", "--device", "cpu", "--steps", "200", "--sample-every", "0", "--save-every", "0"]);
    let lora = dir.join("output/tidewave/tidewave.safetensors");
    assert!(lora.is_file());
    assert!(dir.join("output/tidewave/report.html").is_file(), "train writes the report");

    let grid = dir.join("grid.png");
    sdtune(dir, &[
        "sample", "--device", "cpu", "--prompt", "tidewave style, a circle", "--prompt", "tidewave style, a star",
        "--seeds", "1,2,3", "--steps", "20", "--guidance", "5", "--lora", lora.to_str().unwrap(), "--compare",
        "--brand", brand.to_str().unwrap(), "--out", grid.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(dir.join("grid.consistency.json")).unwrap();
    let figures: Figures = serde_json::from_str(&text).unwrap();
    let mean = |base: bool| {
        let v = figures.variants.iter().find(|v| (v.variant == "base") == base);
        v.unwrap_or_else(|| panic!("no {} variant in {text}", if base { "base" } else { "LoRA" })).mean
    };
    let (base, tuned) = (mean(true), mean(false));
    eprintln!(
        "palette distance to the brand set: base {base:.2}, LoRA {tuned:.2} ({:+.0}%), in {:.0} s",
        100.0 * (tuned - base) / base,
        started.elapsed().as_secs_f64()
    );
    assert!(tuned <= 0.6 * base, "the LoRA's palette distance {tuned:.2} is not 40% below the base model's {base:.2}");
}
