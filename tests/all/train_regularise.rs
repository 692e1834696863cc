//! Training aids on the tiny SD1 fixture through the CLI: the EMA of the
//! LoRA weights (against a reference average of the per-step states, and
//! across a resume); the validation loss on held-out images.
use crate::train_support;

use std::collections::BTreeMap;
use std::path::Path;

use train_support::{lora_tensors, prepared, run_dir, train};

use sdtune::loaders::tensor_file::TensorFile;
use tch::Tensor;

/// The tensors of a state file whose names start with `prefix`, the prefix dropped.
fn state_tensors(path: &Path, prefix: &str) -> BTreeMap<String, Tensor> {
    let file = TensorFile::open(path).unwrap();
    file.names()
        .into_iter()
        .filter_map(|n| n.strip_prefix(prefix).map(|rest| (rest.to_string(), file.tensor(&n).unwrap())))
        .collect()
}

#[test]
fn ema_equals_a_reference_average_of_the_per_step_weights() {
    let dir = prepared();
    let steps = 5u64;
    let decay = 0.9;
    let out = train(dir.path(), &["--steps", "5", "--save-every", "1", "--keep-last", "10", "--ema", "--ema-decay", "0.9", "--name", "e"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("EMA of the LoRA weights on (decay 0.9)"), "no EMA log line: {stderr}");
    let run = run_dir(dir.path(), "e");

    // diffusers' EMAModel: decay 0 after the first step, then min(decay, (1+s)/(10+s)) with s = step - 1.
    let mut reference: BTreeMap<String, Tensor> = BTreeMap::new();
    for n in 1..=steps {
        let weights = state_tensors(&run.join(format!("state/state-{n:06}.safetensors")), "lora.");
        let s = (n - 1) as f64;
        let d = if n == 1 { 0.0 } else { f64::min(decay, (1.0 + s) / (10.0 + s)) };
        for (name, w) in weights {
            let next = match reference.get(&name) {
                Some(avg) => avg * d + &w * (1.0 - d),
                None => w,
            };
            reference.insert(name, next);
        }
    }
    let last = run.join(format!("state/state-{steps:06}.safetensors"));
    let saved_ema = state_tensors(&last, "ema.lora.");
    let raw = state_tensors(&last, "lora.");
    assert_eq!(saved_ema.len(), reference.len());
    let file = TensorFile::open(&run.join("e.safetensors")).unwrap();
    assert_eq!(file.string_metadata().get("sdtune_ema_decay").map(String::as_str), Some("0.9"), "the LoRA file does not say it holds the EMA");
    let mut moved = 0.0f64;
    for (name, want) in &reference {
        let got = &saved_ema[name];
        let diff = (got - want).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "EMA of {name} is {diff} away from the reference");
        let in_file = file.tensor(name).unwrap();
        assert!((in_file - got).abs().max().double_value(&[]) == 0.0, "the final LoRA file's {name} is not the EMA");
        moved = moved.max((&raw[name] - got).abs().max().double_value(&[]));
    }
    assert!(moved > 1e-6, "the EMA equals the raw weights: the test would not tell them apart");
}

#[test]
fn a_resumed_run_with_ema_ends_bit_identical() {
    let args = ["--save-every", "2", "--ema", "--ema-decay", "0.95", "--name", "r"];
    let straight = prepared();
    let out = train(straight.path(), &[&["--steps", "4"][..], &args].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let resumed = prepared();
    let first = train(resumed.path(), &[&["--steps", "2"][..], &args].concat());
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = train(resumed.path(), &[&["--steps", "4", "--resume"][..], &args].concat());
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));

    let want = lora_tensors(&run_dir(straight.path(), "r").join("r.safetensors"));
    let got = lora_tensors(&run_dir(resumed.path(), "r").join("r.safetensors"));
    assert_eq!(want, got, "the EMA LoRA file differs between the straight and the resumed run");
    let state = "state/state-000004.safetensors";
    let want = lora_tensors(&run_dir(straight.path(), "r").join(state));
    let got = lora_tensors(&run_dir(resumed.path(), "r").join(state));
    assert!(want.iter().any(|(n, _)| n.starts_with("ema.")), "the state holds no EMA");
    assert_eq!(want, got, "the resumable state (weights, EMA, optimizer) differs after a resume");

    let without = train(resumed.path(), &["--steps", "6", "--resume", "--save-every", "2", "--name", "r"]);
    assert!(!without.status.success(), "resuming an EMA run without --ema should be refused");
    assert!(String::from_utf8_lossy(&without.stderr).contains("ema_decay"), "{}", String::from_utf8_lossy(&without.stderr));
}

/// `(step, validation_loss)` of each validation line of a run's metrics.jsonl.
fn validation_lines(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["validation_loss"].as_f64()?)))
        .collect()
}

#[test]
fn validation_loss_is_held_out_deterministic_logged_and_reported() {
    let dir = prepared();
    let args = ["--steps", "2", "--save-every", "1", "--validation-split", "2"];
    let out = train(dir.path(), &[&args[..], &["--name", "v1"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("validation: 2 held out of training"), "{stderr}");
    let again = train(dir.path(), &[&args[..], &["--name", "v2"]].concat());
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));

    let first = validation_lines(&run_dir(dir.path(), "v1"));
    let second = validation_lines(&run_dir(dir.path(), "v2"));
    assert_eq!(first.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 1, 2], "validation at step 0, each save and the end");
    assert_eq!(first, second, "the same weights gave another validation loss");
    assert_ne!(first[0].1, first[2].1, "training did not move the validation loss");
    let report = std::fs::read_to_string(run_dir(dir.path(), "v1").join("report.html")).unwrap();
    assert!(report.contains("<h2>Validation loss</h2>"), "the report has no validation section");
    assert!(report.contains(&format!("<td>{:.5}</td>", first[2].1)), "the report lacks the step-2 figure");
}
