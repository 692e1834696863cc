//! `sdtune lora resize|merge --model` on LoHa, LoKr and DoRA files: each
//! module becomes a plain LoRA / LoCon pair, by SVD of its exact weight
//! change against the base. At full rank the written file changes the UNet
//! as the original does (and as PEFT's adapter does, the references of
//! lycoris.rs and dora_locon.rs); a merge equals the inputs applied together
//! at their strengths; a low rank is the best approximation of that rank,
//! with the kept energy printed; without `--model` it is one sentence.
use crate::common;
use crate::common::cli::{ok, one_sentence_error, sdtune};
use crate::common::sd1::{model, unet_out};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sdtune::loaders::tensor_file::TensorFile;
use sdtune::lora::format::read_stored;
use sdtune::lora::{self, format};
use sdtune::sample::render;
use tch::{Kind, Tensor};

/// (file under tests/fixtures/lora, reference file, key in it): every LoHa,
/// LoKr and DoRA fixture, kohya and PEFT layouts, with and without Tucker cores.
const CASES: &[(&str, &str, &str)] = &[
    ("lycoris/kohya_loha.safetensors", "lycoris", "loha"),
    ("lycoris/kohya_loha_tucker.safetensors", "lycoris", "loha_tucker"),
    ("lycoris/kohya_lokr.safetensors", "lycoris", "lokr"),
    ("lycoris/kohya_lokr_both_tucker.safetensors", "lycoris", "lokr_both_tucker"),
    ("lycoris/peft_loha/adapter_model.safetensors", "lycoris", "loha"),
    ("lycoris/peft_loha_tucker/adapter_model.safetensors", "lycoris", "loha_tucker"),
    ("lycoris/peft_lokr/adapter_model.safetensors", "lycoris", "lokr"),
    ("lycoris/peft_lokr_both_tucker/adapter_model.safetensors", "lycoris", "lokr_both_tucker"),
    ("dora/peft_dora.safetensors", "dora", "peft_dora"),
    ("dora/sdtune_kohya.safetensors", "dora", "sdtune_diffusers"),
    ("dora/sdtune_diffusers.safetensors", "dora", "sdtune_diffusers"),
];

fn fixture(name: &str) -> String {
    common::fixtures().join("lora").join(name).display().to_string()
}

fn tiny() -> String {
    common::fixtures().join("tiny-sd1").display().to_string()
}

/// A name for `name`'s output in the scratch folder.
fn out_in(dir: &Path, name: &str, what: &str) -> PathBuf {
    dir.join(format!("{}_{what}.safetensors", name.trim_end_matches(".safetensors").replace('/', "_")))
}

/// The tiny model's UNet output with `files` (path, strength) attached, or fused.
fn with(files: &[(&str, f64)], fused: bool) -> Tensor {
    let m = model();
    let layers = render::layers(&m).unwrap();
    for (path, strength) in files {
        let weights = format::read(Path::new(path), &layers).unwrap_or_else(|e| panic!("{path}: {e:#}"));
        if fused {
            lora::fuse(&weights, &layers, *strength, path).unwrap();
        } else {
            lora::attach(&weights, &layers, *strength, path).unwrap();
        }
    }
    unet_out(&m)
}

/// What a written file holds: only plain pairs, no DoRA magnitude, no
/// LyCORIS factors.
fn assert_plain(path: &Path) {
    let stored = read_stored(&TensorFile::open(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    assert!(!stored.modules.is_empty(), "{}: no modules", path.display());
    assert!(stored.lycoris.is_empty(), "{}: LoHa/LoKr modules left", path.display());
    assert!(stored.modules.iter().all(|m| m.dora_scale.is_none()), "{}: a DoRA magnitude left", path.display());
}

/// (min, mean) of "kept energy min X, mean Y" in a command's output.
fn kept_energy(text: &str) -> (f64, f64) {
    let tail = text.split("kept energy min ").nth(1).unwrap_or_else(|| panic!("no kept energy in: {text}"));
    let (min, rest) = tail.split_once(", mean ").unwrap();
    (min.trim().parse().unwrap(), rest.split_whitespace().next().unwrap().parse().unwrap())
}

#[test]
fn full_rank_resize_of_each_kind_keeps_the_unet_output() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let base = unet_out(&model());
    for (name, reference, key) in CASES {
        let out = out_in(tmp.path(), name, "full");
        let text = ok(&sdtune(tmp.path(), &["lora", "resize", &fixture(name), "--model", &tiny(), "--rank", "4096", "--out", out.to_str().unwrap()]));
        assert!(text.contains("made LoRA by SVD"), "{name}: {text}");
        assert_eq!(kept_energy(&text), (1.0, 1.0), "{name}: {text}");
        assert_plain(&out);

        let original = with(&[(&fixture(name), 1.0)], false);
        let effect = common::max_abs_diff(&original, &base);
        assert!(effect > 1e-2, "{name}: the adapter barely changes the UNet ({effect}); the test would not discriminate");
        let resized = out.display().to_string();
        common::assert_close(&format!("{name} at full rank against the original"), &with(&[(&resized, 1.0)], false), &original, 1e-4);
        common::assert_close(&format!("{name} at full rank, fused"), &with(&[(&resized, 1.0)], true), &original, 1e-4);
        let peft = common::read_tensors(&common::reference(&format!("{reference}.safetensors")));
        common::assert_close(&format!("{name} at full rank against PEFT"), &with(&[(&resized, 1.0)], false), &peft[*key], 1e-4);
    }
}

/// A LoHa and a plain kohya LoRA that share modules, merged at 0.7 and 0.4,
/// change the UNet as both fused at those strengths.
#[test]
fn merging_a_loha_with_a_lora_equals_applying_both() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    for (first, second) in [
        ("lycoris/kohya_loha.safetensors", "kohya_a.safetensors"),
        // The other way round the result is in diffusers' layout (the first file's).
        ("peft_a.safetensors", "lycoris/kohya_lokr.safetensors"),
        ("dora/sdtune_kohya.safetensors", "lycoris/peft_loha/adapter_model.safetensors"),
    ] {
        let (a, b) = (fixture(first), fixture(second));
        let out = tmp.path().join("merged.safetensors");
        // --rank at least every module's size: the sum is kept exactly.
        let text = ok(&sdtune(
            tmp.path(),
            &["lora", "merge", &format!("{a}:0.7"), &format!("{b}:0.4"), "--model", &tiny(), "--rank", "4096", "--out", out.to_str().unwrap()],
        ));
        assert!(text.contains("made LoRA by SVD"), "{first} + {second}: {text}");
        assert_eq!(kept_energy(&text).0, 1.0, "{first} + {second}: {text}");
        let shared: usize = text.split(" in more than one file").next().unwrap().rsplit('(').next().unwrap().parse().unwrap();
        assert!(shared > 0, "{first} + {second} share no module; the sum would not be tested: {text}");
        assert_plain(&out);

        let both = with(&[(&a, 0.7), (&b, 0.4)], true);
        let alone = with(&[(&a, 0.7)], true);
        assert!(common::max_abs_diff(&both, &alone) > 1e-2, "{second} at 0.4 barely changes the UNet; the test would not discriminate");
        let merged = out.display().to_string();
        common::assert_close(&format!("{first}:0.7 + {second}:0.4 merged"), &with(&[(&merged, 1.0)], false), &both, 1e-4);
        common::assert_close(&format!("{first}:0.7 + {second}:0.4 merged, fused"), &with(&[(&merged, 1.0)], true), &both, 1e-4);
        std::fs::remove_file(&out).unwrap();
    }
    // Without --rank, a module with a LoHa change gets the inputs' highest
    // rank (4, kohya_a's), not the rank where it is exact: a smaller file,
    // with the energy it drops printed.
    let (loha, lora) = (fixture("lycoris/kohya_loha.safetensors"), fixture("kohya_a.safetensors"));
    let out = tmp.path().join("default.safetensors");
    let text = ok(&sdtune(tmp.path(), &["lora", "merge", &format!("{loha}:0.7"), &format!("{lora}:0.4"), "--model", &tiny(), "--out", out.to_str().unwrap()]));
    assert!(text.contains("rank up to 4;") && kept_energy(&text).0 < 1.0, "{text}");
    assert!(deltas(&out).values().all(|(_, r)| *r <= 4), "{text}");
}

#[test]
fn without_a_model_each_kind_is_one_sentence_and_writes_nothing() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let plain = fixture("kohya_a.safetensors");
    for (name, kind) in [
        ("lycoris/kohya_loha.safetensors", "LoHa"),
        ("lycoris/peft_lokr/adapter_model.safetensors", "LoKr"),
        ("dora/sdtune_kohya.safetensors", "DoRA"),
    ] {
        let file = fixture(name);
        let resize = ["lora", "resize", file.as_str(), "--rank", "4", "--out", "o.safetensors"];
        let merge = ["lora", "merge", plain.as_str(), file.as_str(), "--out", "o.safetensors"];
        for args in [&resize[..], &merge[..]] {
            let err = one_sentence_error(&sdtune(tmp.path(), args));
            assert!(err.contains(name.rsplit('/').next().unwrap()) && err.contains(kind) && err.contains("--model"), "{args:?}: {err}");
            let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
            assert!(left.is_empty(), "{args:?}: something was written");
        }
    }
}

/// Every module's weight delta (alpha / rank * up @ down) as [out, in * k * k]
/// in fp64, by name, with its rank.
fn deltas(path: &Path) -> BTreeMap<String, (Tensor, i64)> {
    read_stored(&TensorFile::open(path).unwrap())
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

/// The squared singular values of `m`, largest first, as the eigenvalues of
/// m m^T (not the SVD under test).
fn squared_singular_values(m: &Tensor) -> Tensor {
    m.matmul(&m.transpose(0, 1)).linalg_eigvalsh("L").clamp_min(0.0).sort(0, true).0
}

fn frobenius(t: &Tensor) -> f64 {
    t.square().sum(Kind::Double).sqrt().double_value(&[])
}

/// At --rank 1 each module is the best rank-1 approximation of the exact
/// change (the full-rank file, exact by the test above; Eckart-Young as in
/// lora_edit.rs), the printed kept energy is below 1 and is that of the
/// modules, and the file is one `sdtune info` reads and `--lora` attaches.
#[test]
fn rank_one_is_the_best_approximation_and_loads() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let base = unet_out(&model());
    for name in ["lycoris/kohya_loha.safetensors", "lycoris/peft_lokr/adapter_model.safetensors", "dora/peft_dora.safetensors"] {
        let (full, small) = (out_in(tmp.path(), name, "full"), out_in(tmp.path(), name, "r1"));
        for (out, rank) in [(&full, "4096"), (&small, "1")] {
            let text = ok(&sdtune(tmp.path(), &["lora", "resize", &fixture(name), "--model", &tiny(), "--rank", rank, "--out", out.to_str().unwrap()]));
            if rank != "1" {
                continue;
            }
            let (min, mean) = kept_energy(&text);
            assert!(min < 1.0 && mean < 1.0 && min > 0.0, "{name}: {text}");

            let (exact, cut) = (deltas(&full), deltas(&small));
            assert_eq!(cut.keys().collect::<Vec<_>>(), exact.keys().collect::<Vec<_>>(), "{name}: other module names");
            let mut energies = Vec::new();
            for (module, (delta, r)) in &cut {
                assert_eq!(*r, 1, "{name}: {module}");
                let want = &exact[module].0;
                let s2 = squared_singular_values(want);
                let all = s2.sum(Kind::Double).double_value(&[]);
                let dropped = all - s2.double_value(&[0]);
                let err = frobenius(&(delta - want));
                assert!((err - dropped.max(0.0).sqrt()).abs() <= 1e-5 * (1.0 + frobenius(want)), "{name}: {module}: error {err}, sqrt(dropped) {}", dropped.sqrt());
                energies.push(1.0 - dropped / all);
            }
            let want_min = energies.iter().copied().fold(f64::INFINITY, f64::min);
            assert!((min - want_min).abs() <= 1e-4, "{name}: printed min {min}, modules' {want_min}");

            let info = ok(&sdtune(tmp.path(), &["info", out.to_str().unwrap()]));
            let line = |key: &str| info.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{name}: no {key} in\n{info}")).to_string();
            assert!(line("format").contains("LoRA") && !["LoHa", "LoKr", "DoRA"].iter().any(|k| line("format").contains(k)), "{name}: {info}");
            assert_eq!(line("rank").split_whitespace().nth(1), Some("1"), "{name}: {info}");
            let attached = with(&[(out.to_str().unwrap(), 1.0)], false);
            assert!(common::max_abs_diff(&attached, &base) > 1e-3, "{name}: the rank-1 file changes nothing");
        }
    }
}
