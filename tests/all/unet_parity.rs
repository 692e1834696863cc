//! The UNet against diffusers' `UNet2DConditionModel` on the tiny SD1
//! (conv projections, one head count) and SD2 (linear projections, per-block
//! heads, upcast attention) fixtures, plus what no fixture shows: bf16
//! weights with fp32 inputs, per-sample timesteps, odd latent sizes and the
//! names LoRA attaches to.
use crate::common;

use sdtune::models::conditioning::Conditioning;
use sdtune::models::config::UNetConfig;
use sdtune::models::layers::WeightInit;
use sdtune::loaders::weights::build_and_load;
use sdtune::models::built::{build, Built};
use sdtune::models::unet::UNet2DConditionModel;
use tch::{Device, Kind, Tensor};

/// fp32 against diffusers' fp32 output.
const PARITY_TOL: f64 = 1e-4;

fn load(model: &str, kind: Kind) -> Built<UNet2DConditionModel> {
    let dir = common::fixtures().join(model).join("unet");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap_or_else(|e| panic!("{e:#}"));
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    build_and_load(&[weights], Device::Cpu, kind, |vb| UNet2DConditionModel::new(vb, &cfg))
        .unwrap_or_else(|e| panic!("{model}: {e:#}"))
}

/// Inputs and diffusers' output of one reference file.
struct Reference {
    sample: Tensor,
    timestep: Tensor,
    context: Tensor,
    output: Tensor,
}

fn reference(name: &str) -> Reference {
    let mut t = common::read_tensors(&common::reference(name));
    let mut take = |key: &str| t.remove(key).unwrap_or_else(|| panic!("{name} has no tensor {key}"));
    Reference {
        sample: take("sample"),
        timestep: take("timestep"),
        context: take("encoder_hidden_states"),
        output: take("output"),
    }
}

fn run(unet: &UNet2DConditionModel, sample: &Tensor, timestep: &Tensor, context: &Tensor) -> Tensor {
    tch::no_grad(|| unet.forward(sample, timestep, &Conditioning::text_only(context.shallow_clone())))
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().to_kind(Kind::Double).double_value(&[])
}

fn assert_matches_diffusers(model: &str, reference_file: &str) {
    let unet = load(model, Kind::Float);
    let r = reference(reference_file);
    let out = run(&unet.model, &r.sample, &r.timestep, &r.context);
    assert_eq!(out.kind(), Kind::Float);
    common::assert_close(&format!("{model} UNet output"), &out, &r.output, PARITY_TOL);
}

#[test]
fn sd1_matches_diffusers() {
    let _rng = crate::common::torch_rng();
    assert_matches_diffusers("tiny-sd1", "unet_sd1.safetensors");
}

#[test]
fn sd2_matches_diffusers() {
    let _rng = crate::common::torch_rng();
    assert_matches_diffusers("tiny-sd2", "unet_sd2.safetensors");
}

/// LoRA training feeds fp32 latents to bf16 weights: the forward casts in,
/// returns fp32, and stays within bf16's few significant bits of fp32
/// (measured: 2.2% of the output's max for SD1, see the printed numbers).
#[test]
fn bf16_weights_take_fp32_inputs() {
    let _rng = crate::common::torch_rng();
    for (model, reference_file) in
        [("tiny-sd1", "unet_sd1.safetensors"), ("tiny-sd2", "unet_sd2.safetensors")]
    {
        let unet = load(model, Kind::BFloat16);
        let r = reference(reference_file);
        let out = run(&unet.model, &r.sample, &r.timestep, &r.context);
        assert_eq!(out.kind(), Kind::Float, "the output comes back in the sample's kind");
        let err = common::max_abs_diff(&out, &r.output);
        let scale = max_abs(&r.output);
        eprintln!("{model} bf16 vs diffusers fp32: max abs diff {err:e}, output max abs {scale:e}");
        assert!(
            err < 0.05 * scale,
            "{model}: bf16 output is {err:e} off the fp32 reference (scale {scale:e})"
        );
    }
}

/// Sample i's prediction depends on timestep i only; one value serves the
/// whole batch.
#[test]
fn each_sample_gets_its_own_timestep() {
    let _rng = crate::common::torch_rng();
    let unet = load("tiny-sd1", Kind::Float);
    let r = reference("unet_sd1.safetensors");
    let forward = |t: &[i64]| run(&unet.model, &r.sample, &Tensor::from_slice(t), &r.context);
    let mixed = forward(&[10, 980]);
    let early = forward(&[10, 10]);
    let late = forward(&[980, 980]);
    common::assert_close("sample 0 at t=10", &mixed.get(0), &early.get(0), 1e-6);
    common::assert_close("sample 1 at t=980", &mixed.get(1), &late.get(1), 1e-6);
    let moved = common::max_abs_diff(&mixed.get(1), &early.get(1));
    assert!(moved > 1e-3, "sample 1 ignored its timestep (changed by {moved:e})");

    let scalar = run(&unet.model, &r.sample, &Tensor::from(10i64), &r.context);
    common::assert_close("0-d timestep broadcast", &scalar, &early, 1e-6);
    let as_float = run(&unet.model, &r.sample, &Tensor::from_slice(&[10f32, 980.]), &r.context);
    common::assert_close("float timesteps", &as_float, &mixed, 1e-6);
}

/// A small SD2-style UNet with three levels (two upsamplers), random weights.
fn tiny_random_config() -> UNetConfig {
    serde_json::from_value(serde_json::json!({
        "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
        "cross_attention_dim": 32, "attention_head_dim": [2, 4, 4],
        "use_linear_projection": true, "upcast_attention": true
    }))
    .expect("valid config")
}

/// Sides not divisible by 4 are rounded up on the way down; the up path
/// must come back to the skips' sizes, as diffusers' `upsample_size` does.
#[test]
fn odd_latent_sizes_come_back_at_their_size() {
    let _rng = crate::common::torch_rng();
    let cfg = tiny_random_config();
    let context = Tensor::randn([1, 77, 32], (Kind::Float, Device::Cpu));
    for kind in [Kind::Float, Kind::BFloat16] {
        let unet = build(Device::Cpu, kind, WeightInit::Random, |vb| UNet2DConditionModel::new(vb, &cfg))
            .unwrap_or_else(|e| panic!("{e:#}"));
        for (h, w) in [(9, 7), (10, 6), (8, 8)] {
            let sample = Tensor::randn([1, 4, h, w], (Kind::Float, Device::Cpu));
            let out = run(&unet.model, &sample, &Tensor::from(500i64), &context);
            assert_eq!(out.size(), [1, 4, h, w], "{kind:?}");
            assert_eq!(out.kind(), Kind::Float);
            assert!(out.isfinite().all().int64_value(&[]) == 1, "{kind:?} output is not finite");
        }
    }
}

/// A config the weights cannot follow is an error naming the tensor, not a panic.
#[test]
fn indivisible_group_norm_is_an_error() {
    let _rng = crate::common::torch_rng();
    let mut cfg = tiny_random_config();
    cfg.norm_num_groups = 5;
    let err = build(Device::Cpu, Kind::Float, WeightInit::Zeros, |vb| UNet2DConditionModel::new(vb, &cfg))
        .err()
        .expect("32 channels do not split into 5 groups");
    let message = format!("{err:#}");
    assert!(message.contains("down_blocks.0.resnets.0.norm1"), "{message}");
}

/// LoRA attaches to the cross-attention projections by diffusers name:
/// SD1.5 has 16 transformer blocks, so 64 of them.
#[test]
fn sd15_registers_every_cross_attention_projection() {
    let _rng = crate::common::torch_rng();
    let cfg = UNetConfig::sd15();
    let built =
        build(Device::Cpu, Kind::BFloat16, WeightInit::Random, |vb| UNet2DConditionModel::new(vb, &cfg))
            .unwrap_or_else(|e| panic!("{e:#}"));
    let names = built.layers.names();
    let suffixes = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"];
    let cross: Vec<&String> = names.iter().filter(|n| suffixes.iter().any(|s| n.ends_with(s))).collect();
    assert_eq!(cross.len(), 64, "{cross:?}");
    assert!(names.iter().any(|n| n == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"));
    assert!(names.iter().any(|n| n == "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"));
    assert!(names.iter().any(|n| n == "up_blocks.3.attentions.2.proj_out"));
    let params: i64 = built.vs.variables().values().map(|v| v.numel() as i64).sum();
    assert_eq!(params, 859_520_964, "SD1.5's UNet has 859,520,964 parameters");
}
