//! The CLIP text encoder against transformers' `CLIPTextModel` outputs
//! saved by the fixture generator (tests/fixtures/reference).
use crate::common;

use std::path::PathBuf;

use common::{assert_close, fixtures, max_abs_diff, read_tensors, reference};
use sdtune::models::clip::ClipTextModel;
use sdtune::models::config::ClipTextConfig;
use sdtune::models::layers::WeightInit;
use sdtune::loaders::weights::build_and_load;
use sdtune::models::built::{build, Built};
use tch::{Device, Kind, Tensor};

/// fp32 against fp32: only summation order differs.
const TOL: f64 = 1e-4;

fn text_encoder_dir(model: &str) -> PathBuf {
    fixtures().join(model).join("text_encoder")
}

fn load(model: &str, kind: Kind) -> (Built<ClipTextModel>, ClipTextConfig) {
    let dir = text_encoder_dir(model);
    let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap_or_else(|e| panic!("{e:#}"));
    let files = [dir.join("model.safetensors")];
    let built = build_and_load(&files, Device::Cpu, kind, |vb| ClipTextModel::new(vb, &cfg))
        .unwrap_or_else(|e| panic!("{e:#}"));
    (built, cfg)
}

fn check_parity(model: &str, reference_file: &str) {
    let expected = read_tensors(&reference(reference_file));
    let (built, _) = load(model, Kind::Float);
    let ids = &expected["input_ids"];
    let out = tch::no_grad(|| built.model.forward(ids));
    assert_close("last_hidden_state", &out.last_hidden_state, &expected["last_hidden_state"], TOL);
    assert_close("penultimate_hidden_state", &out.penultimate_hidden_state, &expected["penultimate_hidden_state"], TOL);
    assert_close("pooled_output", &out.pooled_output, &expected["pooled_output"], TOL);

    // encode's clip skip picks the same hidden states.
    let skip0 = tch::no_grad(|| built.model.encode(ids, 0));
    let skip1 = tch::no_grad(|| built.model.encode(ids, 1));
    assert_close("encode(clip_skip 0)", &skip0, &expected["last_hidden_state"], TOL);
    assert_close("encode(clip_skip 1)", &skip1, &expected["penultimate_hidden_state"], TOL);
}

#[test]
fn sd1_text_encoder_matches_transformers() {
    let _rng = crate::common::torch_rng();
    check_parity("tiny-sd1", "text_encoder_sd1.safetensors");
}

#[test]
fn sd2_text_encoder_matches_transformers() {
    let _rng = crate::common::torch_rng();
    check_parity("tiny-sd2", "text_encoder_sd2.safetensors");
}

#[test]
fn shorter_ids_use_the_first_positions() {
    let _rng = crate::common::torch_rng();
    let expected = read_tensors(&reference("text_encoder_sd1.safetensors"));
    let (built, _) = load("tiny-sd1", Kind::Float);
    // Causal attention: the first 10 tokens never see the rest.
    let ids = expected["input_ids"].narrow(1, 0, 10);
    let out = tch::no_grad(|| built.model.encode(&ids, 0));
    let want = expected["last_hidden_state"].narrow(1, 0, 10);
    assert_close("last_hidden_state[:, :10]", &out, &want, TOL);
}

/// bf16 keeps 8 significant bits: each rounding moves a value by up to
/// 2^-9 of itself, about 0.007 at the |x| <= 4 of these layer-normed
/// outputs, and every matmul, norm and residual of the layers rounds again.
/// Measured on the tiny fixtures (3 layers, hidden 32): at most 0.046
/// (sd1 last_hidden_state) and 0.041 (sd2 penultimate); 0.1 leaves 2x
/// headroom for other CPUs' summation orders while still catching a wrong
/// activation or a missed cast, which move outputs by O(1).
const BF16_TOL: f64 = 0.1;

#[test]
fn bf16_text_encoder_runs_close_to_fp32() {
    let _rng = crate::common::torch_rng();
    for (model, file) in [("tiny-sd1", "text_encoder_sd1.safetensors"), ("tiny-sd2", "text_encoder_sd2.safetensors")] {
        let expected = read_tensors(&reference(file));
        let (built, _) = load(model, Kind::BFloat16);
        let out = tch::no_grad(|| built.model.forward(&expected["input_ids"]));
        for (name, got) in [
            ("last_hidden_state", &out.last_hidden_state),
            ("penultimate_hidden_state", &out.penultimate_hidden_state),
            ("pooled_output", &out.pooled_output),
        ] {
            assert_eq!(got.kind(), Kind::BFloat16, "{model} {name} is not in the weights' kind");
            let finite = got.to_kind(Kind::Float).isfinite().all().int64_value(&[]) == 1;
            assert!(finite, "{model} {name} has non-finite values in bf16");
            let scale = expected[name].abs().max().double_value(&[]);
            let d = max_abs_diff(got, &expected[name]);
            eprintln!("{model} bf16 {name}: max abs diff {d:e} (max |fp32| {scale:.3})");
            assert!(d <= BF16_TOL, "{model} bf16 {name}: max abs diff {d:e} > {BF16_TOL:e}");
        }
    }
}

fn tiny_config(hidden_act: &str, eos_token_id: i64) -> ClipTextConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 100, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_act": hidden_act,
        "eos_token_id": eos_token_id
    }))
    .unwrap()
}

#[test]
fn unknown_activation_is_an_error() {
    let _rng = crate::common::torch_rng();
    let cfg = tiny_config("relu", 99);
    let err = build(Device::Cpu, Kind::Float, WeightInit::Zeros, |vb| ClipTextModel::new(vb, &cfg))
        .err()
        .expect("relu must be rejected");
    assert!(format!("{err:#}").contains("relu"), "{err:#}");
}

#[test]
fn pooled_output_is_taken_at_the_first_eos() {
    let _rng = crate::common::torch_rng();
    let cfg = tiny_config("gelu", 99);
    let built = build(Device::Cpu, Kind::Float, WeightInit::Random, |vb| ClipTextModel::new(vb, &cfg)).unwrap();
    // EOS (99) at 2 then padding with EOS: the first one is pooled.
    let ids = Tensor::from_slice(&[5i64, 7, 99, 99, 99, 3, 99, 99, 0, 0]).view([2, 5]);
    let out = tch::no_grad(|| built.model.forward(&ids));
    let want = Tensor::stack(
        &[out.last_hidden_state.get(0).get(2), out.last_hidden_state.get(1).get(1)],
        0,
    );
    assert_eq!(max_abs_diff(&out.pooled_output, &want), 0.0);

    // clip skip beyond the layer count is refused, not clamped.
    assert!(built.model.f_encode(&ids, 3).is_err());
    assert_eq!(built.model.f_encode(&ids, 2).unwrap().size(), vec![2, 5, 8]);
}

#[test]
fn legacy_eos_id_pools_at_the_largest_id() {
    let _rng = crate::common::torch_rng();
    // Configs saved before transformers knew the EOS id say 2; transformers
    // then pools at argmax(ids), CLIP's EOS being the largest id.
    let cfg = tiny_config("quick_gelu", 2);
    let built = build(Device::Cpu, Kind::Float, WeightInit::Random, |vb| ClipTextModel::new(vb, &cfg)).unwrap();
    let ids = Tensor::from_slice(&[5i64, 2, 98, 7, 0]).view([1, 5]);
    let out = tch::no_grad(|| built.model.forward(&ids));
    let want = out.last_hidden_state.get(0).get(2).unsqueeze(0);
    assert_eq!(max_abs_diff(&out.pooled_output, &want), 0.0);
}
