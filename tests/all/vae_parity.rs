//! AutoencoderKL against diffusers' outputs saved by the fixture generator
//! (tests/fixtures/reference), in both attention namings.
use crate::common;

use std::path::{Path, PathBuf};

use common::{assert_close, fixtures, max_abs_diff, read_tensors, reference};
use sdtune::models::config::VaeConfig;
use sdtune::loaders::weights::build_and_load;
use sdtune::models::built::Built;
use sdtune::loaders::tensor_file::write_tensors;
use sdtune::loaders::folder::{self, legacy_vae_name, vae_weight_name};
use sdtune::models::vae::AutoencoderKL;
use tch::{Device, Kind, Tensor};

/// fp32 against fp32: only summation order differs.
const TOL: f64 = 1e-4;

fn vae_dir(model: &str) -> PathBuf {
    fixtures().join(model).join("vae")
}

fn config(model: &str) -> VaeConfig {
    VaeConfig::from_file(&vae_dir(model).join("config.json")).unwrap_or_else(|e| panic!("{e:#}"))
}

fn weights(model: &str) -> PathBuf {
    vae_dir(model).join("diffusion_pytorch_model.safetensors")
}

fn check_parity(vae: &AutoencoderKL, reference_file: &str) {
    let expected = read_tensors(&reference(reference_file));
    let dist = tch::no_grad(|| vae.encode(&expected["image"]));
    assert_close("latent_mean", &dist.mean, &expected["latent_mean"], TOL);
    assert_close("latent_logvar", &dist.logvar, &expected["latent_logvar"], TOL);
    let decoded = tch::no_grad(|| vae.decode(&expected["latents"]));
    assert_close("decoded", &decoded, &expected["decoded"], TOL);
}

#[test]
fn sd1_vae_matches_diffusers() {
    let cfg = config("tiny-sd1");
    let built = build_and_load(&[weights("tiny-sd1")], Device::Cpu, Kind::Float, |vb| AutoencoderKL::new(vb, &cfg))
        .unwrap_or_else(|e| panic!("{e:#}"));
    check_parity(&built.model, "vae_sd1.safetensors");
}

#[test]
fn sd2_vae_matches_diffusers_through_the_renaming_loader() {
    let cfg = config("tiny-sd2");
    let built = folder::load_vae(&[weights("tiny-sd2")], Device::Cpu, Kind::Float, &cfg)
        .unwrap_or_else(|e| panic!("{e:#}"));
    check_parity(&built.model, "vae_sd2.safetensors");
}

/// The tiny VAE's tensors with the mid-block attention renamed to the
/// legacy `query/key/value/proj_attn`, written to `dir`.
fn write_legacy_copy(dir: &Path) -> PathBuf {
    let renamed: Vec<(String, Tensor)> = read_tensors(&weights("tiny-sd1"))
        .into_iter()
        .map(|(name, t)| (to_legacy(&name), t))
        .collect();
    assert!(renamed.iter().any(|(n, _)| n.contains(".proj_attn.")), "the tiny VAE has no mid-block attention");
    let path = dir.join("diffusion_pytorch_model.safetensors");
    write_tensors(&path, &renamed, None).unwrap();
    path
}

fn to_legacy(name: &str) -> String {
    if !name.contains(".mid_block.attentions.") {
        return name.to_string();
    }
    name.replace(".to_q.", ".query.")
        .replace(".to_k.", ".key.")
        .replace(".to_v.", ".value.")
        .replace(".to_out.0.", ".proj_attn.")
}

fn load_vae(file: PathBuf, cfg: &VaeConfig) -> Built<AutoencoderKL> {
    folder::load_vae(&[file], Device::Cpu, Kind::Float, cfg).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn legacy_attention_names_load_and_decode_the_same() {
    let cfg = config("tiny-sd1");
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let legacy = load_vae(write_legacy_copy(tmp.path()), &cfg);
    let current = load_vae(weights("tiny-sd1"), &cfg);

    let expected = read_tensors(&reference("vae_sd1.safetensors"));
    let from_legacy = tch::no_grad(|| legacy.model.decode(&expected["latents"]));
    let from_current = tch::no_grad(|| current.model.decode(&expected["latents"]));
    assert_eq!(max_abs_diff(&from_legacy, &from_current), 0.0, "legacy-named weights decode differently");
    assert_close("decoded (legacy names)", &from_legacy, &expected["decoded"], TOL);
}

#[test]
fn legacy_names_need_the_renaming_loader() {
    // Plain build_and_load knows only the current names, and says which tensor is missing.
    let cfg = config("tiny-sd1");
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let file = write_legacy_copy(tmp.path());
    let err = build_and_load(&[file], Device::Cpu, Kind::Float, |vb| AutoencoderKL::new(vb, &cfg))
        .err()
        .expect("legacy names without renaming must not load");
    assert!(format!("{err:#}").contains("mid_block.attentions.0"), "{err:#}");
}

/// bf16 weights against the fp32 reference. bf16 rounds each value by up
/// to 2^-9 of itself; through the tiny VAE's dozen convs and norms the
/// measured max error is 0.032 (latent_mean, |x| <= 2.2) and 0.028
/// (decoded, |x| <= 1.3); 0.1 leaves headroom yet catches a wrong layer.
const BF16_TOL: f64 = 0.1;

#[test]
fn half_precision_weights_take_and_return_fp32() {
    let cfg = config("tiny-sd1");
    let built = build_and_load(&[weights("tiny-sd1")], Device::Cpu, Kind::BFloat16, |vb| AutoencoderKL::new(vb, &cfg))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let expected = read_tensors(&reference("vae_sd1.safetensors"));
    let dist = tch::no_grad(|| built.model.encode(&expected["image"]));
    let decoded = tch::no_grad(|| built.model.decode(&expected["latents"]));
    for (name, t) in [("latent_mean", &dist.mean), ("decoded", &decoded)] {
        assert_eq!(t.kind(), Kind::Float, "{name} is not in the input's kind");
        let finite = t.isfinite().all().int64_value(&[]) == 1;
        assert!(finite, "{name} has non-finite values with bf16 weights");
        let d = max_abs_diff(t, &expected[name]);
        eprintln!("bf16 {name}: max abs diff {d:e}");
        assert!(d <= BF16_TOL, "bf16 {name}: max abs diff {d:e} > {BF16_TOL:e}");
    }
}

#[test]
fn legacy_attention_names_map_to_current_ones() {
    let cases = [
        ("encoder.mid_block.attentions.0.query.weight", "encoder.mid_block.attentions.0.to_q.weight"),
        ("decoder.mid_block.attentions.0.key.bias", "decoder.mid_block.attentions.0.to_k.bias"),
        ("decoder.mid_block.attentions.0.value.weight", "decoder.mid_block.attentions.0.to_v.weight"),
        ("encoder.mid_block.attentions.0.proj_attn.bias", "encoder.mid_block.attentions.0.to_out.0.bias"),
    ];
    for (legacy, current) in cases {
        assert_eq!(legacy_vae_name(legacy).as_deref(), Some(current));
        assert_eq!(vae_weight_name(legacy).as_deref(), Some(current));
    }
}

#[test]
fn other_names_are_kept() {
    for name in [
        "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "decoder.up_blocks.0.resnets.0.conv1.weight",
        "quant_conv.weight",
    ] {
        assert_eq!(legacy_vae_name(name), None, "{name}");
        assert_eq!(vae_weight_name(name).as_deref(), Some(name));
    }
}
