//! `sdtune train` end to end on the tiny SD1 fixture: files, resume after
//! SIGKILL bit for bit, non-finite loss, bad settings.
use crate::train_support;

use train_support::{lora_tensors, prepared, run_dir, sdtune, train, FAST};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sdtune::loaders::tensor_file::TensorFile;

#[test]
fn writes_final_periodic_and_state_files_with_metadata() {
    let dir = prepared();
    let out = train(dir.path(), &["--steps", "4", "--save-every", "2", "--name", "acme", "--sample-every", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = run_dir(dir.path(), "acme");
    for f in ["acme.safetensors", "lora/step-000002.safetensors", "state/state-000004.safetensors", "samples/step-000000.png", "samples/step-000004.png", "metrics.jsonl"] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let file = TensorFile::open(&run.join("acme.safetensors")).unwrap();
    let meta = file.string_metadata();
    assert_eq!(meta["ss_network_module"], "networks.lora");
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    assert_eq!(meta["ss_sd_model_name"], "tiny-sd1", "the base is named, not where it lies on this machine");
    assert_eq!(meta["modelspec.architecture"], "stable-diffusion-v1/lora");
    let names = file.names();
    assert!(names.iter().all(|n| n.starts_with("lora_unet_") && n.contains("_attn2_to_")), "{names:?}");
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for key in ["step", "loss", "lr", "grad_norm", "loss_scale", "seconds"] {
        assert!(first.get(key).is_some(), "metrics line lacks {key}: {first}");
    }
}

#[test]
fn a_killed_run_resumes_bit_identically() {
    let total = "8";
    let straight = prepared();
    let out = train(straight.path(), &["--steps", total, "--save-every", "4", "--name", "r"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = lora_tensors(&run_dir(straight.path(), "r").join("r.safetensors"));

    let killed = prepared();
    let args: Vec<&str> = FAST.iter().copied().chain(["--steps", total, "--save-every", "4", "--name", "r"]).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .current_dir(killed.path())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = run_dir(killed.path(), "r").join("state/state-000004.safetensors");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !state.exists() {
        assert!(Instant::now() < deadline, "no save at step 4 within 300 s");
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    let resumed = train(killed.path(), &["--steps", total, "--save-every", "4", "--name", "r", "--resume"]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let got = lora_tensors(&run_dir(killed.path(), "r").join("r.safetensors"));
    assert_eq!(want.len(), got.len());
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "LoRA tensor {name} differs between the straight and the resumed run");
    }
    let metrics = std::fs::read_to_string(run_dir(killed.path(), "r").join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 8, "metrics.jsonl should hold each step once");
}

#[test]
fn a_diverging_run_stops_with_one_sentence_and_no_nan_is_saved() {
    let dir = prepared();
    let out = train(dir.path(), &["--steps", "40", "--save-every", "1", "--lr", "1e12", "--name", "boom"]);
    assert!(!out.status.success(), "a run with lr 1e12 should not finish");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().filter(|l| !l.trim().is_empty()).last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: ") && !err.contains("panicked"), "{err}");
    assert!(last.contains("loss became") || last.contains("NaN or infinite"), "{last}");
    for entry in std::fs::read_dir(run_dir(dir.path(), "boom").join("lora")).unwrap() {
        let path = entry.unwrap().path();
        let file = TensorFile::open(&path).unwrap();
        for n in file.names() {
            let t = file.tensor(&n).unwrap();
            assert!(t.isfinite().all().int64_value(&[]) == 1, "{} holds non-finite {n}", path.display());
        }
    }
}

#[test]
fn bad_settings_get_one_sentence() {
    let dir = prepared();
    std::fs::write(dir.path().join("sdtune.yaml"), "train:\n  steps: lots\n").unwrap();
    let out = train(dir.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("sdtune.yaml") && err.contains("line 2"), "{err}");

    std::fs::write(dir.path().join("sdtune.yaml"), "train:\n  stpes: 10\n").unwrap();
    let err = String::from_utf8_lossy(&train(dir.path(), &[]).stderr).to_string();
    assert!(err.contains("stpes"), "{err}");

    std::fs::remove_file(dir.path().join("sdtune.yaml")).unwrap();
    let err = String::from_utf8_lossy(&train(dir.path(), &["--targets", "everything", "--steps", "1"]).stderr).to_string();
    assert!(err.contains("everything") && err.contains("cross-attn"), "{err}");

    let empty = sdtune::scratch::ScratchDir::new().unwrap();
    let err = String::from_utf8_lossy(&train(empty.path(), &["--steps", "1"]).stderr).to_string();
    assert!(err.contains("sdtune prepare"), "{err}");
}

#[test]
fn a_training_grid_image_renders_again_bit_for_bit() {
    // The grid of a step without a periodic save still has its LoRA file.
    grid_images_render_again("fp32", &["step-000002-p1-s1.png", "step-000002-p2-s4.png", "step-000000-p1-s2.png"]);
}

/// In bf16 the grid's VAE runs in bf16 too, as `sdtune sample --precision bf16`
/// places it, so the recipe replays it.
#[test]
fn a_bf16_training_grid_image_renders_again_bit_for_bit() {
    grid_images_render_again("bf16", &["step-000002-p1-s1.png"]);
}

fn grid_images_render_again(precision: &str, images: &[&str]) {
    let dir = prepared();
    let fast = FAST.iter().map(|a| if *a == "fp32" { precision } else { a });
    let args: Vec<&str> = fast.chain(["--steps", "2", "--name", "grid", "--sample-every", "2"]).collect();
    let out = sdtune(dir.path(), &args, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = run_dir(dir.path(), "grid");
    // The brand set's palette the grids were measured against is recorded
    // in the run folder (what `sdtune serve` measures served grids against).
    let recorded = sdtune::sample::brand_palette::load(&run.join("brand-palette.json")).unwrap_or_else(|e| panic!("{e:#}"));
    let prepared = sdtune::sample::metrics::Brand::from_prepared(dir.path()).unwrap().expect("prepared");
    // (Training names the folder from where it ran: relative to it.)
    assert!(recorded.source.ends_with("brand (prepared)") && prepared.source.ends_with("brand (prepared)"), "{}", recorded.source);
    assert_eq!((recorded.images, prepared.images), (6, 6));
    for (x, y) in recorded.histogram.weights.iter().zip(&prepared.histogram.weights) {
        assert!((x - y).abs() <= 1e-15, "{x} vs {y}");
    }
    assert!(run.join("lora/step-000002.safetensors").is_file());
    for image in images {
        let original = run.join("samples").join(image);
        assert!(original.is_file(), "the training grid did not write {image}");
        let again = dir.path().join(format!("again-{image}"));
        let args = ["sample", "--device", "cpu", "--from", original.to_str().unwrap(), "--out", again.to_str().unwrap()];
        let out = sdtune(dir.path(), &args, None);
        assert!(out.status.success(), "{image}: {}", String::from_utf8_lossy(&out.stderr));
        let a = image::open(&original).unwrap().to_rgb8();
        let b = image::open(&again).unwrap().to_rgb8();
        assert_eq!(a.dimensions(), b.dimensions());
        assert!(a.as_raw() == b.as_raw(), "{image} rendered again differs from the training grid's image");
    }
}
