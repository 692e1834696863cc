//! A LoRA file a model cannot use correctly is refused at read, by `sdtune
//! info` and `sdtune sample` alike, in one sentence naming the file: ranks
//! of down and up that disagree, an alpha that is not one finite number,
//! tensors holding NaN or infinity.
use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sdtune::loaders::tensor_file::write_tensors;
use tch::Tensor;

const MODULE: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";

fn kohya_fixture() -> HashMap<String, Tensor> {
    common::read_tensors(&common::fixtures().join("lora/kohya_a.safetensors"))
}

/// The kohya fixture with `change` applied, written to `dir/name.safetensors`.
fn damaged(dir: &Path, name: &str, change: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut tensors = kohya_fixture();
    change(&mut tensors);
    let mut list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    let path = dir.join(format!("{name}.safetensors"));
    write_tensors(&path, &list, None).unwrap();
    path
}

fn sdtune(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdtune")).current_dir(dir).args(args).output().unwrap()
}

/// Asserts one error sentence naming `file` and holding `words`.
fn assert_refused(out: &Output, file: &Path, words: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{} should be refused:\n{err}", file.display());
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    let last = err.lines().filter(|l| !l.trim().is_empty()).last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: ") && last.contains(&file.display().to_string()), "{last}");
    for w in words.iter() {
        assert!(last.contains(w), "{w:?} missing from {last:?}");
    }
    last
}

#[test]
fn damaged_lora_files_are_refused_by_info_and_sample_alike() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let d = dir.path();
    let down = format!("{MODULE}.lora_down.weight");
    let up = format!("{MODULE}.lora_up.weight");
    let alpha = format!("{MODULE}.alpha");
    let cases: Vec<(PathBuf, Vec<&str>)> = vec![
        (damaged(d, "ranks", |t| {
            let narrowed = t[&up].narrow(1, 0, 3).contiguous();
            t.insert(up.clone(), narrowed);
        }), vec!["rank 4", "rank 3"]),
        (damaged(d, "alpha-vector", |t| {
            t.insert(alpha.clone(), Tensor::from_slice(&[4.0f32, 4.0]));
        }), vec!["alpha", "one number"]),
        (damaged(d, "alpha-nan", |t| {
            t.insert(alpha.clone(), Tensor::from(f32::NAN));
        }), vec!["alpha", "finite"]),
        (damaged(d, "down-nan", |t| {
            let bad = t[&down].copy();
            let _ = bad.get(0).get(0).fill_(f64::NAN);
            t.insert(down.clone(), bad);
        }), vec!["NaN or infinite", &down]),
        (damaged(d, "up-inf", |t| {
            let bad = t[&up].copy();
            let _ = bad.get(1).get(2).fill_(f64::INFINITY);
            t.insert(up.clone(), bad);
        }), vec!["NaN or infinite", &up]),
        (damaged(d, "down-1d", |t| {
            let flat = t[&down].reshape([-1]);
            t.insert(down.clone(), flat);
        }), vec!["not LoRA shapes"]),
    ];
    let tiny = common::fixtures().join("tiny-sd1").display().to_string();
    for (file, words) in &cases {
        let path = file.display().to_string();
        let info = assert_refused(&sdtune(d, &["info", &path]), file, words);
        let sample = sdtune(d, &["sample", "--model", &tiny, "--lora", &path, "--prompt", "x", "--steps", "1", "--device", "cpu"]);
        let sampled = assert_refused(&sample, file, words);
        assert_eq!(info, sampled, "info and sample should give the same sentence");
    }
    assert!(!d.join("sample.png").exists(), "a refused LoRA still rendered");
    // The undamaged file passes both.
    let good = damaged(d, "good", |_| {});
    let out = sdtune(d, &["info", &good.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
