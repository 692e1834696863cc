//! Text-encoder LoRA trained by sdtune (`--train-text-encoder`): the files
//! it wrote (tests/fixtures/lora/text_encoder/, SD1 and SD2 with the MLP in
//! kohya's layout, attention-only in diffusers', SDXL's two encoders in both) change
//! the text conditioning exactly as diffusers' `load_lora_weights` makes them
//! change it (make_te_lora_cases.py; for SDXL each encoder's part of the
//! joined states moves), and a run that trains the encoder resumes bit for
//! bit, also with `--shuffle-captions`. LoHa, LoKr and DoRA made by peft on
//! the text encoder (make_te_adapter_cases.py), in peft's layout and kohya's,
//! change its states as peft's adapters do, attached and fused, and `sdtune
//! sample` with them (alone, and stacked with a UNet LoKr) renders diffusers'
//! image with peft's (make_te_adapter_samples.py). LoHa and LoKr on both of
//! SDXL's encoders (make_sdxl_te_adapter_cases.py) match peft's too.
use crate::common;
use crate::train_support;

use std::path::PathBuf;

use sdtune::loaders::tensor_file::TensorFile;
use sdtune::lora::{self, format, Component};
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use sdtune::sample::render;
use train_support::{lora_tensors, prepared, run_dir, train};

/// The prompt make_te_lora_cases.py encodes.
const PROMPT: &str = "an orange acme poster with a blue circle 3";

fn lora_file(stem: &str) -> PathBuf {
    common::fixtures().join("lora/text_encoder").join(format!("{stem}.safetensors"))
}

#[test]
fn sdtune_trained_text_encoder_lora_changes_the_conditioning_as_diffusers_does() {
    let r = common::read_tensors(&common::reference("text_encoder_lora.safetensors"));
    for (model, stems) in [("sd1", ["sd1_kohya", "sd1_diffusers"]), ("sd2", ["sd2_kohya", "sd2_diffusers"]), ("sdxl", ["sdxl_kohya", "sdxl_diffusers"])] {
        for stem in stems {
            let m = StableDiffusion::from_diffusers_folder(&common::fixtures().join(format!("tiny-{model}")), Placement::cpu_f32(), None)
                .unwrap();
            let layers = render::layers(&m).unwrap();
            let weights = format::read(&lora_file(stem), &layers).unwrap_or_else(|e| panic!("{e:#}"));
            let encoders: &[Component] =
                if model == "sdxl" { &[Component::TextEncoder, Component::TextEncoder2] } else { &[Component::TextEncoder] };
            for &c in encoders {
                assert!(weights.modules.iter().any(|x| x.component == c), "{stem}: no {} modules", c.name());
            }
            if stem == "sd1_kohya" || stem == "sd2_kohya" {
                assert!(weights.modules.iter().any(|x| x.layer.ends_with(".mlp.fc1")), "{stem}: --targets transformer trained no fc1");
            }
            lora::attach(&weights, &layers, 1.0, stem).unwrap();
            let ours = tch::no_grad(|| m.text.encode(&[PROMPT], 0)).unwrap().conditioning;
            // SDXL joins the two encoders' states along the width: each part must move.
            let mut start = 0;
            for (e, &c) in m.text.encoders.iter().zip(encoders) {
                let width = e.config.hidden_size;
                let part = |t: &tch::Tensor| t.narrow(2, start, width);
                let effect = common::max_abs_diff(&part(&ours.text), &part(&r[&format!("{model}.base.text")]));
                assert!(effect > 1e-2, "{stem}: the {} states barely move ({effect})", c.name());
                start += width;
            }
            assert_eq!(start, ours.text.size()[2], "{stem}: the text states are the encoders' joined");
            let mut outputs = vec![("text", ours.text)];
            if let Some(pooled) = ours.pooled {
                outputs.push(("pooled", pooled));
            }
            assert_eq!(outputs.len(), if model == "sdxl" { 2 } else { 1 });
            for (what, got) in outputs {
                let key = format!("{stem}.{what}");
                common::assert_close(&key, &got, &r[&key], 1e-4);
                let effect = common::max_abs_diff(&got, &r[&format!("{model}.base.{what}")]);
                assert!(effect > 1e-2, "{key}: the LoRA barely changes it ({effect}); the test would not discriminate");
            }
        }
    }
}

/// (file under tests/fixtures/lora/te_adapters, reference case).
const ADAPTER_CASES: &[(&str, &str)] = &[
    ("kohya_loha.safetensors", "loha"),
    ("peft_loha/adapter_model.safetensors", "loha"),
    ("kohya_lokr.safetensors", "lokr"),
    ("peft_lokr/adapter_model.safetensors", "lokr"),
    ("kohya_dora.safetensors", "dora"),
    ("peft_dora/adapter_model.safetensors", "dora"),
];

fn te_adapter(name: &str) -> PathBuf {
    common::fixtures().join("lora/te_adapters").join(name)
}

/// The states make_te_adapter_cases.py stores: clip skip 0 (`last`) and 1 (`penultimate`).
fn te_states(m: &StableDiffusion) -> [(&'static str, tch::Tensor); 2] {
    let at = |skip| tch::no_grad(|| m.text.encode(&[PROMPT], skip)).unwrap().conditioning.text;
    [("last", at(0)), ("penultimate", at(1))]
}

#[test]
fn peft_loha_lokr_and_dora_on_the_text_encoder_load_as_peft_applies_them() {
    let r = common::read_tensors(&common::reference("te_adapters.safetensors"));
    let tiny = common::fixtures().join("tiny-sd1");
    let m = StableDiffusion::from_diffusers_folder(&tiny, Placement::cpu_f32(), None).unwrap();
    for (what, got) in te_states(&m) {
        common::assert_close(&format!("base {what}"), &got, &r[&format!("base.{what}")], 1e-4);
    }
    for (name, case) in ADAPTER_CASES {
        let layers = render::layers(&m).unwrap();
        let weights = format::read(&te_adapter(name), &layers).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let components: Vec<Component> = weights.modules.iter().map(|x| x.component).chain(weights.lycoris.iter().map(|x| x.component)).collect();
        assert!(components.len() >= 12 && components.iter().all(|&c| c == Component::TextEncoder), "{name}: {} modules, not all the text encoder's", components.len());
        if *case == "dora" {
            assert!(weights.modules.iter().all(|x| x.dora_scale.is_some()), "{name}: a module lost its DoRA magnitude");
        }
        if *case == "lokr" {
            assert!(weights.lycoris.iter().any(|x| x.layer.ends_with(".mlp.fc1")), "{name}: no fc1 module");
        }
        lora::attach(&weights, &layers, 1.0, name).unwrap();
        for (what, got) in te_states(&m) {
            let key = format!("{case}.{what}");
            common::assert_close(&format!("{name} {what}"), &got, &r[&key], 1e-4);
            let effect = common::max_abs_diff(&got, &r[&format!("base.{what}")]);
            assert!(effect > 1e-2, "{name}: the {what} state barely moves ({effect})");
        }
        m.text.first().model.layers.for_each(|e| e.adapters.clear());
        let fused = StableDiffusion::from_diffusers_folder(&tiny, Placement::cpu_f32(), None).unwrap();
        let fused_layers = render::layers(&fused).unwrap();
        lora::fuse(&weights, &fused_layers, 1.0, name).unwrap();
        for (what, got) in te_states(&fused) {
            common::assert_close(&format!("fused {name} {what}"), &got, &r[&format!("{case}.{what}")], 1e-4);
        }
    }
}

/// A LoHa module moved onto a text-encoder layer of another shape (q_proj's
/// factors under fc2's name) is one sentence naming the layer and the file.
#[test]
fn a_text_encoder_module_that_does_not_fit_its_layer_is_one_sentence() {
    let m = StableDiffusion::from_diffusers_folder(&common::fixtures().join("tiny-sd1"), Placement::cpu_f32(), None).unwrap();
    let q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.";
    let tensors: Vec<(String, tch::Tensor)> = common::read_tensors(&te_adapter("kohya_loha.safetensors"))
        .into_iter()
        .map(|(k, t)| (k.replace(q, "lora_te_text_model_encoder_layers_0_mlp_fc2."), t))
        .collect();
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let path = dir.path().join("moved.safetensors");
    sdtune::loaders::tensor_file::write_tensors(&path, &tensors, None).unwrap();
    let err = format!("{:#}", format::read(&path, &render::layers(&m).unwrap()).err().expect("must fail"));
    assert!(err.contains("moved.safetensors") && err.contains("text_model.encoder.layers.0.mlp.fc2") && !err.contains('\n'), "{err}");
}

#[test]
fn a_run_training_the_text_encoder_resumes_bit_identically() {
    let dir = prepared();
    let te = ["--train-text-encoder", "--text-encoder-lr", "5e-4", "--caption-dropout", "0.3"];
    let args = |name: &'static str, steps: &'static str| -> Vec<&'static str> {
        te.iter().copied().chain(["--steps", steps, "--save-every", "1", "--name", name]).collect()
    };
    let out = train(dir.path(), &args("straight", "2"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = run_dir(dir.path(), "straight").join("straight.safetensors");
    let want = lora_tensors(&file);
    let te_modules: Vec<&String> = want.iter().map(|(n, _)| n).filter(|n| n.starts_with("lora_te_text_model_encoder_layers_")).collect();
    assert_eq!(te_modules.len(), 3 * 4 * 3, "q/k/v/out_proj of 3 layers, each down, up and alpha: {te_modules:?}");
    let meta = TensorFile::open(&file).unwrap().string_metadata();
    assert_eq!(meta["ss_text_encoder_lr"], "0.0005");
    assert_eq!(meta["ss_network_train_unet_only"], "false");
    let up = TensorFile::open(&file).unwrap().tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight").unwrap();
    assert!(up.abs().max().double_value(&[]) > 0.0, "the text encoder's LoRA never moved");

    let out = train(dir.path(), &args("resumed", "1"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let unet_only = train(dir.path(), &["--steps", "2", "--save-every", "1", "--name", "resumed", "--resume"]);
    let err = String::from_utf8_lossy(&unet_only.stderr);
    assert!(!unet_only.status.success() && err.contains("text_encoder"), "a text-encoder run resumed without it: {err}");
    let mut resume = args("resumed", "2");
    resume.push("--resume");
    let out = train(dir.path(), &resume);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = lora_tensors(&run_dir(dir.path(), "resumed").join("resumed.safetensors"));
    assert_eq!(want.len(), got.len());
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "LoRA tensor {name} differs between the straight and the resumed run");
    }
}

/// Tag captions for the shuffle tests: items 0 and 1 of one bucket.
struct TagCaptions;

const TAGS: [&str; 2] = ["acme, poster, blue circle, orange ground, flat", "acme, mug, white, studio light"];

impl sdtune::train::data::TrainingData for TagCaptions {
    fn buckets(&self) -> Vec<Vec<usize>> {
        vec![vec![0, 1]]
    }
    fn sample(&self, _index: usize, _flip: bool) -> anyhow::Result<sdtune::train::data::TrainSample> {
        anyhow::bail!("the shuffle test reads captions only")
    }
    fn has_flips(&self) -> bool {
        false
    }
    fn empty_caption(&self) -> anyhow::Result<sdtune::models::conditioning::Conditioning> {
        anyhow::bail!("the shuffle test reads captions only")
    }
    fn caption(&self, index: usize) -> anyhow::Result<String> {
        Ok(TAGS[index].to_string())
    }
}

/// With `--shuffle-captions`, the trained encoder reads sample `global`'s
/// shuffled caption: the step's conditioning is the encoding of exactly
/// the caption `shuffled_caption(caption, keep, seed, global)` gives.
#[test]
fn the_trained_encoder_reads_each_samples_shuffled_caption() {
    use sdtune::train::shuffle::shuffled_caption;
    use sdtune::train::text_encoder::{CaptionDraw, CaptionShuffle, TextEncoderTraining};
    let m = StableDiffusion::from_diffusers_folder(&common::fixtures().join("tiny-sd1"), Placement::cpu_f32(), None).unwrap();
    let (keep_tokens, seed) = (1, 42);
    let training = TextEncoderTraining::new(&m.text, &TagCaptions, Some(CaptionShuffle { keep_tokens, seed })).unwrap();
    let plain = TextEncoderTraining::new(&m.text, &TagCaptions, None).unwrap();
    let mut reordered = 0;
    for global in 0..8u64 {
        let draws = [Some(CaptionDraw { item: 0, global }), None, Some(CaptionDraw { item: 1, global: global + 100 })];
        let got = tch::no_grad(|| training.encode(&draws)).unwrap();
        let captions = [shuffled_caption(TAGS[0], keep_tokens, seed, global), String::new(), shuffled_caption(TAGS[1], keep_tokens, seed, global + 100)];
        assert!(captions[0].starts_with("acme, ") && captions[2].starts_with("acme, "), "the kept tag moved: {captions:?}");
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let want = tch::no_grad(|| m.text.encode(&refs, 0)).unwrap().conditioning;
        common::assert_close(&format!("sample {global}"), &got.text, &want.text, 1e-6);
        assert_eq!(training.caption_of(CaptionDraw { item: 0, global }).unwrap(), captions[0]);
        if captions[0] != TAGS[0] {
            reordered += 1;
            let unshuffled = tch::no_grad(|| plain.encode(&draws)).unwrap();
            assert!(common::max_abs_diff(&unshuffled.text, &got.text) > 1e-3, "sample {global}: a reordered caption encoded as the original");
        }
    }
    assert!(reordered >= 4, "only {reordered} of 8 samples drew another order of 5 tags");
}

/// A training folder of the 6 posters whose captions are comma-separated tags.
fn prepared_with_tags() -> sdtune::scratch::ScratchDir {
    let dir = prepared();
    let brand = dir.path().join("brand");
    for i in 0..6 {
        std::fs::write(brand.join(format!("poster{i}.txt")), format!("acme, poster {i}, blue circle, orange ground, flat, print")).unwrap();
    }
    let out = train_support::sdtune(dir.path(), &["prepare", "brand", "--device", "cpu"], None);
    assert!(out.status.success(), "prepare failed: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// `--shuffle-captions` with `--train-text-encoder`: the shuffle changes
/// what the encoder's LoRA learns, and a resumed run draws the same orders
/// (they follow the seed and each sample's index), bit for bit.
#[test]
fn shuffled_captions_train_the_text_encoder_and_resume_bit_identically() {
    let dir = prepared_with_tags();
    let te = ["--train-text-encoder", "--text-encoder-lr", "5e-3", "--precision", "fp32", "--save-every", "1"];
    let run = |name: &'static str, steps: &'static str, extra: &[&'static str]| {
        let args: Vec<&str> = te.iter().copied().chain(["--steps", steps, "--name", name]).chain(extra.iter().copied()).collect();
        let out = train(dir.path(), &args);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        run_dir(dir.path(), name).join(format!("{name}.safetensors"))
    };
    let shuffle = ["--shuffle-captions", "--keep-tokens", "1"];
    let straight = lora_tensors(&run("shuffled", "2", &shuffle));
    let plain = lora_tensors(&run("plain", "2", &[]));
    let te_differs = straight
        .iter()
        .zip(&plain)
        .any(|((name, a), (_, b))| name.starts_with("lora_te_") && name.contains("lora_up") && a != b);
    assert!(te_differs, "shuffled captions left the text encoder's LoRA as the unshuffled run's");
    run("resumed", "1", &shuffle);
    let resumed: Vec<&str> = shuffle.iter().copied().chain(["--resume"]).collect();
    let got = lora_tensors(&run("resumed", "2", &resumed));
    assert_eq!(straight.len(), got.len());
    for ((name, a), (_, b)) in straight.iter().zip(&got) {
        assert!(a == b, "LoRA tensor {name} differs between the straight and the resumed shuffled run");
    }
}

/// `sdtune sample` of tiny-sd1 on the CPU, rendered as make_lora_cases.py's
/// `ddim_image` (prompt, negative prompt, seed 7, 10 DDIM steps, guidance 7.5, 64x64),
/// with `loras` (each `FILE[:STRENGTH]`); the PNG as [64, 64, 3] pixels of 0-255.
fn sample_ddim(loras: &[String], fuse: bool, out: &std::path::Path) -> tch::Tensor {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sdtune"));
    cmd.args(["sample", "--device", "cpu", "--model"])
        .arg(common::fixtures().join("tiny-sd1"))
        .args(["--prompt", "product shot of a blue ceramic mug on a wooden table", "--negative-prompt", "blurry"])
        .args(["--seed", "7", "--steps", "10", "--guidance", "7.5", "--width", "64", "--height", "64", "--scheduler", "ddim"]);
    for lora in loras {
        cmd.arg("--lora").arg(lora);
    }
    if fuse {
        cmd.arg("--fuse");
    }
    let run = cmd.arg("--out").arg(out).output().unwrap();
    assert!(run.status.success(), "{loras:?}: {}", String::from_utf8_lossy(&run.stderr));
    let image = common::read_rgb(out);
    tch::Tensor::from_slice(image.as_raw()).view([64, 64, 3]).to_kind(tch::Kind::Double)
}

/// `sdtune sample` with each text-encoder LoHa, LoKr and DoRA file (kohya's
/// layout and peft's), and with a mixed stack (the kohya LoHa at 0.7 on the
/// text encoder plus lycoris/kohya_lokr on the UNet at 0.6), attached and
/// `--fuse`d, renders what diffusers' pipeline renders with peft's adapters
/// (make_te_adapter_samples.py): every pixel within 1/255.
#[test]
fn sample_with_text_encoder_adapters_matches_diffusers_with_peft() {
    let r = common::read_tensors(&common::reference("te_adapter_samples.safetensors"));
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let path = |p: PathBuf| p.display().to_string();
    let mut cases: Vec<(String, Vec<String>, String)> =
        ADAPTER_CASES.iter().map(|(name, case)| (name.to_string(), vec![path(te_adapter(name))], format!("{case}_image"))).collect();
    let unet_lokr = path(common::fixtures().join("lora/lycoris/kohya_lokr.safetensors"));
    let te_loha = path(te_adapter("kohya_loha.safetensors"));
    cases.push(("mixed".into(), vec![format!("{te_loha}:0.7"), format!("{unet_lokr}:0.6")], "te_loha07_unet_lokr06_image".into()));
    let base = sample_ddim(&[], false, &dir.path().join("base.png"));
    for (what, loras, key) in &cases {
        let theirs = &r[key] * 255.0;
        for fuse in [false, true] {
            let label = format!("{what}{}", if fuse { " fused" } else { "" });
            let out = dir.path().join(format!("{}.png", label.replace(['/', ' ', '.'], "_")));
            let ours = sample_ddim(loras, fuse, &out);
            let gap = (&ours - &theirs).abs();
            let (max, mean) = (gap.max().double_value(&[]), gap.mean(tch::Kind::Double).double_value(&[]));
            eprintln!("{label}: pixel diff max {max:.3}, mean {mean:.4} of 255");
            assert!(max <= 1.0, "{label}: a pixel is {max:.3}/255 from diffusers' with peft's adapters (mean {mean:.4})");
            let effect = (&ours - &base).abs().mean(tch::Kind::Double).double_value(&[]);
            assert!(effect > 2.0, "{label}: the image is within {effect:.2}/255 of the base model's; the test would not discriminate");
        }
    }
}

/// (file under tests/fixtures/lora/te_adapters_sdxl, reference case).
const SDXL_ADAPTER_CASES: &[(&str, &str)] = &[
    ("kohya_loha.safetensors", "loha"),
    ("peft_loha/adapter_model.safetensors", "loha"),
    ("kohya_lokr.safetensors", "lokr"),
    ("peft_lokr/adapter_model.safetensors", "lokr"),
    ("kohya_dora.safetensors", "dora"),
    ("peft_dora/adapter_model.safetensors", "dora"),
];

/// LoHa, LoKr and DoRA made by peft on both of SDXL's text encoders
/// (make_sdxl_te_adapter_cases.py; kohya's `lora_te1_`/`lora_te2_` and peft's
/// `text_encoder.`/`text_encoder_2.` names) change the joined text states and
/// the pooled output as peft's adapters change diffusers' `encode_prompt`,
/// attached and fused.
#[test]
fn peft_loha_lokr_and_dora_on_both_sdxl_text_encoders_load_as_peft_applies_them() {
    let r = common::read_tensors(&common::reference("sdxl/te_adapters.safetensors"));
    let tiny = common::fixtures().join("tiny-sdxl");
    let conditioning = |m: &StableDiffusion| {
        let c = tch::no_grad(|| m.text.encode(&[PROMPT], 0)).unwrap().conditioning;
        [("text", c.text), ("pooled", c.pooled.expect("SDXL pools the prompt"))]
    };
    let m = StableDiffusion::from_diffusers_folder(&tiny, Placement::cpu_f32(), None).unwrap();
    for (what, got) in conditioning(&m) {
        common::assert_close(&format!("base {what}"), &got, &r[&format!("base.{what}")], 1e-4);
    }
    for (name, case) in SDXL_ADAPTER_CASES {
        let path = common::fixtures().join("lora/te_adapters_sdxl").join(name);
        let layers = render::layers(&m).unwrap();
        let weights = format::read(&path, &layers).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        for c in [Component::TextEncoder, Component::TextEncoder2] {
            let dora = weights.modules.iter().filter(|x| x.component == c && x.dora_scale.is_some()).count();
            let n = weights.lycoris.iter().filter(|x| x.component == c).count() + dora;
            assert!(n >= 12, "{name}: {n} {} modules", c.name());
        }
        let plain = weights.modules.iter().any(|x| x.dora_scale.is_none());
        assert!(!plain, "{name}: a DoRA module was read without its magnitude");
        let on_unet = weights.modules.iter().any(|x| x.component == Component::Unet) || weights.lycoris.iter().any(|x| x.component == Component::Unet);
        assert!(!on_unet, "{name}: modules off the text encoders");
        lora::attach(&weights, &layers, 1.0, name).unwrap();
        let attached = conditioning(&m);
        // Each encoder's half of the joined states must move, so a file read onto one encoder only fails.
        let width = attached[0].1.size()[2] / 2;
        for (half, start) in [("text_encoder", 0), ("text_encoder_2", width)] {
            let part = |t: &tch::Tensor| t.narrow(2, start, width);
            let effect = common::max_abs_diff(&part(&attached[0].1), &part(&r["base.text"]));
            assert!(effect > 1e-2, "{name}: the {half} states barely move ({effect})");
        }
        for (what, got) in attached {
            common::assert_close(&format!("{name} {what}"), &got, &r[&format!("{case}.{what}")], 1e-4);
        }
        for e in &m.text.encoders {
            e.model.layers.for_each(|l| l.adapters.clear());
        }
        let fused = StableDiffusion::from_diffusers_folder(&tiny, Placement::cpu_f32(), None).unwrap();
        lora::fuse(&weights, &render::layers(&fused).unwrap(), 1.0, name).unwrap();
        for (what, got) in conditioning(&fused) {
            common::assert_close(&format!("fused {name} {what}"), &got, &r[&format!("{case}.{what}")], 1e-4);
        }
    }
}

/// `sdtune sample` of SDXL with each text-encoder LoHa, LoKr and DoRA file on both
/// encoders (kohya's `lora_te1_`/`lora_te2_` layout and peft's), and a mixed stack
/// (the kohya LoHa at 0.7 plus sdtune's SDXL LoCon on the UNet at 0.6), attached and
/// `--fuse`d, renders what StableDiffusionXLPipeline renders with peft's adapters
/// (make_sdxl_te_adapter_samples.py): every pixel within 1/255.
#[test]
fn sdxl_sample_with_text_encoder_adapters_matches_diffusers_with_peft() {
    let r = common::read_tensors(&common::reference("sdxl/te_adapter_samples.safetensors"));
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let file = |name: &str| common::fixtures().join("lora/te_adapters_sdxl").join(name).display().to_string();
    let mut cases: Vec<(String, Vec<String>, String)> =
        SDXL_ADAPTER_CASES.iter().map(|(name, case)| (name.to_string(), vec![file(name)], format!("{case}_image"))).collect();
    let unet_locon = common::fixtures().join("lora/sdxl_adapters/sdtune_locon_kohya.safetensors").display().to_string();
    cases.push(("mixed".into(), vec![format!("{}:0.7", file("kohya_loha.safetensors")), format!("{unet_locon}:0.6")], "te_loha07_unet_locon06_image".into()));
    let base = common::sdxl::render_with(&[], false, &dir.path().join("base.png"));
    let gap = (&base - &r["base_image"] * 255.0).abs().max().double_value(&[]);
    assert!(gap <= 1.0, "the base render is {gap:.3}/255 from diffusers'");
    for (what, loras, key) in &cases {
        let theirs = &r[key] * 255.0;
        for fuse in [false, true] {
            let label = format!("{what}{}", if fuse { " fused" } else { "" });
            let out = dir.path().join(format!("{}.png", label.replace(['/', ' ', '.'], "_")));
            let ours = common::sdxl::render_with(loras, fuse, &out);
            let gap = (&ours - &theirs).abs();
            let (max, mean) = (gap.max().double_value(&[]), gap.mean(tch::Kind::Double).double_value(&[]));
            eprintln!("{label}: pixel diff max {max:.3}, mean {mean:.4} of 255");
            assert!(max <= 1.0, "{label}: a pixel is {max:.3}/255 from diffusers' with peft's adapters (mean {mean:.4})");
            let effect = (&ours - &base).abs().mean(tch::Kind::Double).double_value(&[]);
            assert!(effect > 2.0, "{label}: the image is within {effect:.2}/255 of the base model's; the test would not discriminate");
        }
    }
}
