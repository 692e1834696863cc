//! `sdtune lora resize` and `sdtune lora merge`: the written files hold the
//! deltas they should (against the files' own deltas computed here, and
//! against torch.linalg.svd in make_lora_edit_reference.py), load in sdtune,
//! and bad input is one sentence.
use crate::common;
use crate::common::cli::{ok, one_sentence_error, sdtune};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sdtune::loaders::tensor_file::TensorFile;
use sdtune::lora::format::read_stored;
use tch::{Kind, Tensor};

fn fixture(name: &str) -> String {
    common::fixtures().join("lora").join(name).display().to_string()
}

/// Every module's weight delta (alpha / rank * up @ down, flattened to
/// [out, in * k * k]) in fp64, by its name in the file, with its rank.
fn deltas(path: &Path) -> BTreeMap<String, (Tensor, i64)> {
    let file = TensorFile::open(path).unwrap();
    read_stored(&file)
        .unwrap()
        .modules
        .into_iter()
        .map(|m| {
            let (r, out) = (m.down.size()[0], m.up.size()[0]);
            let up = m.up.to_kind(Kind::Double).reshape([out, r]);
            let down = m.down.to_kind(Kind::Double).reshape([r, -1]);
            (m.base, (up.matmul(&down) * (m.alpha / r as f64), r))
        })
        .collect()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

fn frobenius(t: &Tensor) -> f64 {
    t.square().sum(Kind::Double).sqrt().double_value(&[])
}

fn assert_same_deltas(what: &str, got: &BTreeMap<String, (Tensor, i64)>, want: &BTreeMap<String, Tensor>, tol: f64) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}: other module names");
    for (name, (delta, _)) in got {
        let diff = max_abs(&(delta - &want[name]));
        assert!(diff <= tol, "{what}: module {name} differs by {diff}");
    }
}

fn metadata(path: &Path) -> std::collections::HashMap<String, String> {
    TensorFile::open(path).unwrap().string_metadata()
}

#[test]
fn resize_at_or_above_the_rank_keeps_every_delta() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    // ref_sdxl_peft has a lora_alpha per model (8, 2 and 6) in its header, folded into lora_B.
    for file in ["sdtune_kohya.safetensors", "peft_a.safetensors", "lycoris/kohya_locon.safetensors", "ref_sdxl_peft.safetensors"] {
        let want: BTreeMap<String, Tensor> = deltas(Path::new(&fixture(file))).into_iter().map(|(k, (d, _))| (k, d)).collect();
        for rank in ["4", "8"] {
            let out = tmp.path().join(format!("r{rank}.safetensors"));
            ok(&sdtune(tmp.path(), &["lora", "resize", &fixture(file), "--rank", rank, "--out", out.to_str().unwrap()]));
            assert_same_deltas(&format!("{file} at rank {rank}"), &deltas(&out), &want, 1e-5);
        }
    }
}

/// The squared singular values of `m`, largest first, as the eigenvalues of
/// m m^T (no SVD involved, so not the code under test).
fn squared_singular_values(m: &Tensor) -> Tensor {
    m.matmul(&m.transpose(0, 1)).linalg_eigvalsh("L").clamp_min(0.0).sort(0, true).0
}

/// Eckart-Young: a rank-r matrix whose distance to the delta is
/// sqrt(sum of the dropped squared singular values) is a best rank-r
/// approximation (unique when those values are distinct), so this checks
/// optimality without trusting sdtune's own SVD.
#[test]
fn resize_below_the_rank_is_the_best_approximation() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let files = [
        ("sdtune_kohya.safetensors", 2),
        ("peft_a.safetensors", 3),
        ("lycoris/kohya_locon.safetensors", 1),
        ("ref_sdxl_peft.safetensors", 2),
        ("sdtune_sdxl_kohya.safetensors", 1),
    ];
    for (file, rank) in files {
        let before = deltas(Path::new(&fixture(file)));
        let out = tmp.path().join("small.safetensors");
        let text = ok(&sdtune(tmp.path(), &["lora", "resize", &fixture(file), "--rank", &rank.to_string(), "--out", out.to_str().unwrap()]));
        assert!(text.contains("kept energy min"), "{text}");
        let after = deltas(&out);
        assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>(), "{file}: other module names");
        let mut energies = Vec::new();
        for (name, (delta, old_rank)) in &before {
            let (small, new_rank) = &after[name];
            assert_eq!(*new_rank, rank.min(*old_rank), "{file}: {name}");
            let s2 = squared_singular_values(delta);
            let dropped = s2.narrow(0, rank, s2.size()[0] - rank).sum(Kind::Double).double_value(&[]);
            let err = frobenius(&(small - delta));
            assert!((err - dropped.sqrt()).abs() <= 1e-5 * (1.0 + frobenius(delta)), "{file}: {name}: error {err}, sqrt(dropped) {}", dropped.sqrt());
            energies.push(1.0 - dropped / s2.sum(Kind::Double).double_value(&[]));
        }
        let min = energies.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(text.contains(&format!("min {min:.4}")), "{file}: kept energy min {min:.4} not in: {text}");
    }
}

#[test]
fn resize_keeps_the_layout_and_base_metadata_and_records_itself() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let out = tmp.path().join("r2.safetensors");
    ok(&sdtune(tmp.path(), &["lora", "resize", &fixture("sdtune_kohya.safetensors"), "--rank", "2", "--out", out.to_str().unwrap()]));
    let names = |p: &Path| {
        let mut n = TensorFile::open(p).unwrap().names();
        n.sort();
        n
    };
    assert_eq!(names(&out), names(Path::new(&fixture("sdtune_kohya.safetensors"))));
    let m = metadata(&out);
    assert_eq!(m["ss_base_model_version"], "sd_v1");
    assert_eq!(m["modelspec.architecture"], "stable-diffusion-v1/lora");
    assert_eq!(m["ss_network_dim"], "2");
    // kohya's convention: the scale (8 / 4) is kept, alpha = 2 * 2.
    assert_eq!(m["ss_network_alpha"], "4.0");
    assert_eq!(m["sdtune_resized_from"], "sdtune_kohya.safetensors (rank 4)");
    assert!(m["ss_training_comment"].starts_with("dimension is resized from 4 to 2; "), "{}", m["ss_training_comment"]);

    // A PEFT file: alphas are folded into lora_B, so diffusers' per-model alphas go.
    let peft = tmp.path().join("p2.safetensors");
    ok(&sdtune(tmp.path(), &["lora", "resize", &fixture("peft_a.safetensors"), "--rank", "2", "--out", peft.to_str().unwrap()]));
    assert!(names(&peft).iter().all(|n| n.starts_with("unet.") && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))));
    assert!(!metadata(&peft).contains_key("lora_adapter_metadata"));
}

#[test]
fn resized_and_merged_files_sample_in_sdtune() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let d = tmp.path();
    ok(&sdtune(d, &["lora", "resize", &fixture("sdtune_kohya.safetensors"), "--rank", "2", "--out", "r2.safetensors"]));
    ok(&sdtune(d, &["lora", "merge", &fixture("peft_a.safetensors"), &fixture("sdtune_diffusers.safetensors"), "--rank", "3", "--out", "m.safetensors"]));
    // --rank above the sum of the inputs' ranks (4 + 4) adds no zero rows.
    ok(&sdtune(d, &["lora", "merge", &fixture("peft_a.safetensors"), &fixture("sdtune_diffusers.safetensors"), "--rank", "64", "--out", "m64.safetensors"]));
    assert!(deltas(&d.join("m64.safetensors")).values().all(|(_, r)| *r == 8), "ranks above 4 + 4");
    let tiny = common::fixtures().join("tiny-sd1").display().to_string();
    for lora in ["r2.safetensors", "m.safetensors:0.8"] {
        ok(&sdtune(d, &["sample", "--model", &tiny, "--prompt", "a red square", "--lora", lora, "--steps", "2", "--device", "cpu", "--out", "x.png"]));
        assert!(d.join("x.png").is_file(), "{lora}: no image");
        std::fs::remove_file(d.join("x.png")).unwrap();
    }
}

fn merged(dir: &Path, specs: &[String], rank: Option<&str>) -> BTreeMap<String, (Tensor, i64)> {
    let out = dir.join("merged.safetensors");
    let mut args: Vec<&str> = vec!["lora", "merge"];
    args.extend(specs.iter().map(String::as_str));
    args.extend(["--out", out.to_str().unwrap()]);
    if let Some(r) = rank {
        args.extend(["--rank", r]);
    }
    ok(&sdtune(dir, &args));
    deltas(&out)
}

#[test]
fn merging_a_file_with_itself_scales_it() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let a = fixture("kohya_a.safetensors");
    let a_deltas = deltas(Path::new(&a));
    let zero = merged(tmp.path(), &[format!("{a}:1"), format!("{a}:-1")], None);
    assert_eq!(zero.len(), a_deltas.len());
    for (name, (delta, _)) in &zero {
        assert!(max_abs(delta) <= 1e-6, "A - A: module {name} is not zero ({})", max_abs(delta));
    }
    let half: BTreeMap<String, Tensor> = a_deltas.iter().map(|(k, (d, _))| (k.clone(), d.shallow_clone())).collect();
    assert_same_deltas("A/2 + A/2", &merged(tmp.path(), &[format!("{a}:0.5"), format!("{a}:0.5")], None), &half, 1e-5);
}

#[test]
fn merging_two_files_at_full_rank_sums_their_deltas() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let (a, b) = (fixture("kohya_a.safetensors"), fixture("kohya_b.safetensors"));
    let (da, db) = (deltas(Path::new(&a)), deltas(Path::new(&b)));
    let mut want: BTreeMap<String, Tensor> = db.iter().map(|(k, (d, _))| (k.clone(), d * 0.4)).collect();
    for (k, (d, _)) in &da {
        let sum = want.get(k).map(|w| w + d * 0.7).unwrap_or_else(|| d * 0.7);
        want.insert(k.clone(), sum);
    }
    assert!(da.keys().any(|k| !db.contains_key(k)) || db.keys().any(|k| !da.contains_key(k)), "the fixtures should have modules of only one file");
    let got = merged(tmp.path(), &[format!("{a}:0.7"), format!("{b}:0.4")], None);
    // One alpha for the whole file (diffusers' kohya loader reads only one).
    assert_eq!(metadata(&tmp.path().join("merged.safetensors"))["ss_network_alpha"], "6.0");
    assert_same_deltas("0.7 A + 0.4 B", &got, &want, 1e-5);
    // Shared modules get rank 4 + 2; B's own stay at rank 2.
    for (k, (_, r)) in &got {
        assert_eq!(*r, if da.contains_key(k) { 6 } else { 2 }, "{k}");
    }
    // With --rank 1 every module, shared or not, is the best rank-1 approximation of its sum.
    let small = merged(tmp.path(), &[format!("{a}:0.7"), format!("{b}:0.4")], Some("1"));
    for (k, (delta, r)) in &small {
        assert_eq!(*r, 1, "{k}");
        let s2 = squared_singular_values(&want[k]);
        let dropped = s2.narrow(0, 1, s2.size()[0] - 1).sum(Kind::Double).double_value(&[]);
        let err = frobenius(&(delta - &want[k]));
        assert!((err - dropped.sqrt()).abs() <= 1e-5 * (1.0 + frobenius(&want[k])), "{k}: error {err}, sqrt(dropped) {}", dropped.sqrt());
    }
}

#[test]
fn loras_for_different_bases_are_one_sentence_naming_both() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let (sd1, sdxl) = (fixture("sdtune_kohya.safetensors"), fixture("sdtune_sdxl_kohya.safetensors"));
    let err = one_sentence_error(&sdtune(tmp.path(), &["lora", "merge", &sd1, &sdxl, "--out", "m.safetensors"]));
    assert!(err.contains("sdtune_kohya.safetensors") && err.contains("sdtune_sdxl_kohya.safetensors") && err.contains("different base models"), "{err}");
    // Without metadata, by the SDXL module names.
    let bare = tmp.path().join("bare_sdxl.safetensors");
    let tensors: Vec<(String, Tensor)> = common::read_tensors(Path::new(&sdxl)).into_iter().collect();
    sdtune::loaders::tensor_file::write_tensors(&bare, &tensors, None).unwrap();
    let err = one_sentence_error(&sdtune(tmp.path(), &["lora", "merge", &fixture("kohya_a.safetensors"), bare.to_str().unwrap(), "--out", "m.safetensors"]));
    assert!(err.contains("kohya_a.safetensors") && err.contains("bare_sdxl.safetensors") && err.contains("SDXL"), "{err}");
    assert!(!tmp.path().join("m.safetensors").exists());
}

#[test]
fn bad_input_is_one_sentence_and_writes_nothing() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let d = tmp.path();
    let a = fixture("kohya_a.safetensors");
    let (loha, peft) = (fixture("lycoris/kohya_loha.safetensors"), fixture("peft_a.safetensors"));
    let copy: PathBuf = d.join("a.safetensors");
    std::fs::copy(&a, &copy).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["lora", "resize", "missing.safetensors", "--rank", "2", "--out", "o.safetensors"], "does not exist"),
        (vec!["lora", "resize", &a, "--rank", "0", "--out", "o.safetensors"], "--rank 0"),
        (vec!["lora", "resize", "a.safetensors", "--rank", "2", "--out", "./a.safetensors"], "input file itself"),
        (vec!["lora", "merge", &a, "a.safetensors:x", "--out", "o.safetensors"], "not a number"),
        (vec!["lora", "merge", &a, "a.safetensors", "--out", "a.safetensors"], "input file itself"),
        (vec!["lora", "resize", &loha, "--rank", "2", "--out", "o.safetensors"], "LoHa"),
        (vec!["lora", "merge", &a, &peft, "--out", "o.safetensors"], "layout"),
    ];
    for (args, want) in cases {
        let err = one_sentence_error(&sdtune(d, &args));
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // An OUT that cannot be written (its folder is a file): named, and nothing left behind.
    let err = one_sentence_error(&sdtune(d, &["lora", "resize", &a, "--rank", "2", "--out", "a.safetensors/o.safetensors"]));
    assert!(err.contains("--out a.safetensors/o.safetensors cannot be written"), "{err}");
    let mut left: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["a.safetensors"], "something was written");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&a).unwrap(), "the input was touched");
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    common::read_tensors(&common::reference("lora_edit.safetensors"))
}

/// torch.linalg.svd's truncation (make_lora_edit_reference.py) of a kohya
/// SD1 file trained by sdtune.
#[test]
fn resize_matches_torch_svd() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let out = tmp.path().join("r2.safetensors");
    ok(&sdtune(tmp.path(), &["lora", "resize", &fixture("sdtune_kohya.safetensors"), "--rank", "2", "--out", out.to_str().unwrap()]));
    let r = reference();
    let want: BTreeMap<String, Tensor> =
        r.iter().filter_map(|(k, v)| k.strip_prefix("resize_r2.").map(|b| (b.to_string(), v.to_kind(Kind::Double)))).collect();
    assert!(want.values().all(|d| max_abs(d) > 1e-3), "the reference deltas are too small to tell anything apart");
    assert_same_deltas("rank 2 against torch.linalg.svd", &deltas(&out), &want, 1e-5);
}

/// The files in lora/edited/ (written by `sdtune lora resize` / `merge`, as
/// the script's docstring says) change diffusers' UNet (`load_lora_weights`)
/// as they change sdtune's, and are what the commands write today.
#[test]
fn edited_files_load_in_diffusers_as_in_sdtune() {
    use sdtune::lora::kohya_names::KohyaNames;
    use sdtune::lora::{self, format, ModelLayers};
    use sdtune::models::conditioning::Conditioning;
    use sdtune::models::stable_diffusion::{Placement, StableDiffusion};

    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let d = tmp.path();
    ok(&sdtune(d, &["lora", "resize", &fixture("sdtune_kohya.safetensors"), "--rank", "2", "--out", "kohya_r2.safetensors"]));
    let (a, b) = (fixture("kohya_a.safetensors"), fixture("kohya_b.safetensors"));
    ok(&sdtune(d, &["lora", "merge", &format!("{a}:0.7"), &format!("{b}:0.4"), "--out", "kohya_ab_merged.safetensors"]));
    let r = reference();
    let inputs = common::read_tensors(&common::reference("unet_sd1.safetensors"));
    let context = Conditioning::text_only(inputs["encoder_hidden_states"].shallow_clone());
    for name in ["kohya_r2", "kohya_ab_merged"] {
        let committed = common::fixtures().join("lora/edited").join(format!("{name}.safetensors"));
        let fresh: BTreeMap<String, Tensor> = deltas(&d.join(format!("{name}.safetensors"))).into_iter().map(|(k, (t, _))| (k, t)).collect();
        assert_same_deltas(&format!("{name}: committed fixture against today's output"), &deltas(&committed), &fresh, 1e-6);

        let m = StableDiffusion::from_diffusers_folder(&common::fixtures().join("tiny-sd1"), Placement::cpu_f32(), None).unwrap();
        let layers = ModelLayers { unet: &m.unet.layers, text_encoder: Some(&m.text.first().model.layers), text_encoder_2: None, kohya: KohyaNames::Diffusers };
        let weights = format::read(&committed, &layers).unwrap();
        lora::attach(&weights, &layers, 1.0, name).unwrap();
        let ours = tch::no_grad(|| m.unet.model.forward(&inputs["sample"], &inputs["timestep"], &context));
        common::assert_close(name, &ours, &r[&format!("unet.{name}")], 1e-4);
    }
}
