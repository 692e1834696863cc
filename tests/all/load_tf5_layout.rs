//! Diffusers folders saved with transformers 5 (text encoder without the
//! `text_model.` prefix, tokenizer as `tokenizer.json` only) load and sample
//! as the classic ones do. `tests/fixtures/tiny-sd1-tf5` is `tiny-sd1`
//! converted and saved by diffusers 0.42.1 + transformers 5.24.0
//! (scripts/fixtures/make_tf5_fixture.py), untouched.
use crate::common;
use crate::model_support;

use common::{assert_close, read_tensors, reference};
use model_support::*;
use sdtune::loaders::file_kind::{classify, text_encoder_layout, FileKind, TextEncoderLayout};
use sdtune::loaders::model_files::ModelFiles;
use sdtune::loaders::tensor_file::{write_tensors, TensorFile};
use tch::{Device, Kind};

const TF5: &str = "tiny-sd1-tf5";
const CLASSIC: &str = "tiny-sd1";

fn text_encoder_names(model: &str) -> Vec<String> {
    TensorFile::open(&fixture(model).join("text_encoder/model.safetensors")).unwrap().names()
}

#[test]
fn the_fixtures_hold_one_layout_each() {
    let tf5 = text_encoder_names(TF5);
    assert!(tf5.iter().all(|n| !n.starts_with("text_model.")), "{:?}", &tf5[..3]);
    assert_eq!(text_encoder_layout(&tf5), Some(TextEncoderLayout::Unprefixed));
    assert_eq!(text_encoder_layout(&text_encoder_names(CLASSIC)), Some(TextEncoderLayout::Prefixed));
    for model in [TF5, CLASSIC] {
        assert_eq!(classify(&text_encoder_names(model)), FileKind::Component("text encoder"), "{model}");
    }
}

#[test]
fn text_encoder_loads_to_the_classic_weights_and_hidden_states() {
    let load = |model: &str| {
        ModelFiles::folder(&fixture(model), None)
            .and_then(|f| f.load_text_stack(Device::Cpu, Kind::Float))
            .unwrap_or_else(|e| panic!("{model}: {e:#}"))
    };
    let (tf5, classic) = (load(TF5), load(CLASSIC));
    let (tf5, classic) = (tf5.first(), classic.first());
    assert_same_weights("text encoder", &tf5.model.vs, &classic.model.vs, None);
    // Built by the same names, so LoRA finds the same layers in both.
    assert_eq!(tf5.model.layers.names(), classic.model.layers.names());
    let expected = read_tensors(&reference("text_encoder_sd1.safetensors"));
    let ids = &expected["input_ids"];
    let (a, b) = tch::no_grad(|| (tf5.model.model.forward(ids), classic.model.model.forward(ids)));
    assert!(a.last_hidden_state.equal(&b.last_hidden_state), "last hidden states differ");
    assert!(a.penultimate_hidden_state.equal(&b.penultimate_hidden_state), "penultimate hidden states differ");
    assert_close("tf5 last_hidden_state vs transformers", &a.last_hidden_state, &expected["last_hidden_state"], 1e-4);
    // transformers 5's tokenizer.json gives the classic folder's ids.
    let (t5, tc) = (tf5.tokenizer().unwrap(), classic.tokenizer().unwrap());
    for prompt in ["a photo of a cat", "A RED car, by the sea!!", "ünïcödé and emoji 🐱"] {
        assert_eq!(t5.encode(prompt).ids, tc.encode(prompt).ids, "{prompt}");
    }
}

#[test]
fn sample_gives_the_classic_image() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let mut images = Vec::new();
    for model in [TF5, CLASSIC] {
        let out = dir.path().join(format!("{model}.png"));
        let res = run(sdtune(cache.path())
            .args(["sample", "--device", "cpu", "--prompt", "a red car by the sea", "--seed", "7"])
            .args(["--steps", "4", "--width", "64", "--height", "64", "--model"])
            .arg(fixture(model))
            .arg("--out")
            .arg(&out));
        stdout_ok(&res);
        assert!(!String::from_utf8_lossy(&res.stderr).contains("warning"), "{model}: unexpected warning");
        images.push(pixels(&out));
    }
    assert!(images[0] == images[1], "the transformers 5 folder's image differs from the classic folder's");
}

#[test]
fn info_reads_both_layouts() {
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let tf5 = stdout_ok(&run(sdtune(cache.path()).arg("info").arg(fixture(TF5))));
    let classic = stdout_ok(&run(sdtune(cache.path()).arg("info").arg(fixture(CLASSIC))));
    assert!(tf5.contains("no text_model. prefix"), "{tf5}");
    assert!(!classic.contains("prefix"), "{classic}");
    let params = |out: &str| out.lines().find(|l| l.starts_with("parameters")).map(str::to_string);
    assert_eq!(params(&tf5), params(&classic));
    // The weights file alone is named for what it is.
    let file = fixture(TF5).join("text_encoder/model.safetensors");
    let line = one_line_error(&run(sdtune(cache.path()).arg("info").arg(&file)));
    assert!(line.contains("diffusers text encoder") && line.contains(&file.display().to_string()), "{line}");
}

#[test]
fn a_text_encoder_of_neither_layout_fails_in_one_sentence_naming_the_file() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let model = dir.path().join("model");
    for entry in walk(&fixture(TF5)) {
        let rel = entry.strip_prefix(fixture(TF5)).unwrap();
        std::fs::create_dir_all(model.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(&entry, model.join(rel)).unwrap();
    }
    // A wrapper's prefix no transformers version writes.
    let file = model.join("text_encoder/model.safetensors");
    let src = TensorFile::open(&file).unwrap();
    let renamed: Vec<(String, tch::Tensor)> =
        src.names().into_iter().map(|n| (format!("clip.{n}"), src.tensor(&n).unwrap())).collect();
    drop(src);
    write_tensors(&file, &renamed, None).unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let sample = run(sdtune(cache.path())
        .args(["sample", "--device", "cpu", "--prompt", "x", "--steps", "2", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(dir.path().join("x.png")));
    let info = run(sdtune(cache.path()).arg("info").arg(&model));
    for res in [sample, info] {
        let line = one_line_error(&res);
        assert!(line.contains(&file.display().to_string()) && line.contains("not a CLIP text encoder"), "{line}");
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
