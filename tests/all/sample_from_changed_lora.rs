//! `sample --from IMAGE.png` renders what the image was made with, or says
//! why not: a recorded LoRA whose file changed since is refused, naming the
//! file and both hashes; `--lora FILE` renders with the file as it is now.
use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use sdtune::loaders::tensor_file::write_tensors;

fn sdtune(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdtune")).current_dir(dir).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

#[test]
fn a_changed_lora_is_refused_with_both_hashes() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let fixture = common::fixtures().join("lora/kohya_a.safetensors");
    let lora = d.join("brand.safetensors");
    std::fs::copy(&fixture, &lora).unwrap();
    let tiny = common::fixtures().join("tiny-sd1").display().to_string();
    let spec = format!("{}:0.8", lora.display());
    ok(&sdtune(d, &["sample", "--model", &tiny, "--prompt", "a red square", "--lora", &spec, "--steps", "2", "--device", "cpu", "--out", "first.png"]));
    let before = sdtune::sample::settings::lora_hash(&lora).unwrap();

    // Unchanged: renders again.
    ok(&sdtune(d, &["sample", "--from", "first.png", "--device", "cpu"]));
    assert!(d.join("first-again.png").is_file());
    std::fs::remove_file(d.join("first-again.png")).unwrap();

    // The same file name, other weights (e.g. retrained since).
    let mut tensors: Vec<(String, tch::Tensor)> = common::read_tensors(&fixture)
        .into_iter()
        .map(|(n, t)| if n.ends_with("lora_up.weight") { (n, t * 2.0) } else { (n, t) })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    write_tensors(&lora, &tensors, None).unwrap();
    let after = sdtune::sample::settings::lora_hash(&lora).unwrap();
    assert_ne!(before, after);

    let out = sdtune(d, &["sample", "--from", "first.png", "--device", "cpu"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "a changed LoRA should be refused:\n{err}");
    let last = err.lines().filter(|l| !l.trim().is_empty()).last().unwrap_or_default();
    assert!(last.starts_with("error: ") && last.contains("brand.safetensors"), "{last}");
    assert!(last.contains(&before) && last.contains(&after), "both hashes should be named: {last}");
    assert!(last.contains("--lora"), "the way to render anyway should be named: {last}");
    assert!(!d.join("first-again.png").exists(), "nothing is rendered from a changed LoRA");

    // Asked for explicitly: renders with the file as it is now, and records its new hash.
    ok(&sdtune(d, &["sample", "--from", "first.png", "--lora", &spec, "--device", "cpu"]));
    let again = d.join("first-again.png");
    assert!(again.is_file());
    let texts = sdtune::sample::image_out::read_png_text(&again).unwrap();
    assert!(texts.iter().any(|(k, v)| k == "sdtune" && v.contains(&after)), "the new image records the new hash");
}
