//! sdtune's layer FLOP counter against torch's FlopCounterMode over the same
//! forwards in diffusers/transformers (scripts/fixtures/make_flop_reference.py):
//! the figures `sdtune bench` divides by time.
use crate::common;

use sdtune::models::conditioning::Conditioning;
use sdtune::models::flop_count::counted;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use tch::{Device, Kind, Tensor};

fn reference(case: &str) -> u64 {
    let text = std::fs::read_to_string(common::reference("flop_counts.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all[case]["flops"].as_u64().unwrap_or_else(|| panic!("no {case} in flop_counts.json"))
}

fn model(name: &str) -> StableDiffusion {
    StableDiffusion::from_diffusers_folder(&common::fixtures().join(name), Placement::cpu_f32(), None).unwrap()
}

fn zeros(shape: &[i64]) -> Tensor {
    Tensor::zeros(shape, (Kind::Float, Device::Cpu))
}

fn unet_flops(m: &StableDiffusion, batch: i64, h: i64, w: i64, conditioning: Conditioning) -> u64 {
    let sample = zeros(&[batch, m.unet_config.in_channels, h, w]);
    let t = Tensor::full([batch], 10.0, (Kind::Float, Device::Cpu));
    counted(|| tch::no_grad(|| m.unet.model.forward(&sample, &t, &conditioning))).1
}

#[test]
fn sd1_forwards_count_what_flop_counter_mode_counts() {
    let m = model("tiny-sd1");
    let width = m.text.hidden_size();
    for (batch, h, w) in [(1, 8, 8), (2, 16, 12)] {
        let got = unet_flops(&m, batch, h, w, Conditioning::text_only(zeros(&[batch, 77, width])));
        assert_eq!(got, reference(&format!("sd1_unet_{batch}x{h}x{w}")), "UNet {batch}x{h}x{w}");
    }
    let ids = Tensor::zeros([2, 77], (Kind::Int64, Device::Cpu));
    let (_, text) = counted(|| tch::no_grad(|| m.text.first().model.model.forward(&ids)));
    assert_eq!(text, reference("sd1_text_2x77"), "text encoder");
    let (_, decode) = counted(|| tch::no_grad(|| m.vae.model.decode(&zeros(&[1, 4, 8, 8]))));
    assert_eq!(decode, reference("sd1_vae_decode_1x8x8"), "VAE decode");
    let (_, encode) = counted(|| tch::no_grad(|| m.vae.model.encode(&zeros(&[1, 3, 64, 48])).mean));
    assert_eq!(encode, reference("sd1_vae_encode_1x64x48"), "VAE encode");
}

#[test]
fn sdxl_forwards_count_what_flop_counter_mode_counts() {
    let m = model("tiny-sdxl");
    let pooled = m.text.pooled_size().unwrap();
    let conditioning = Conditioning { text: zeros(&[1, 77, m.text.hidden_size()]), pooled: Some(zeros(&[1, pooled])), time_ids: Some(zeros(&[1, 6])) };
    assert_eq!(unet_flops(&m, 1, 8, 8, conditioning), reference("sdxl_unet_1x8x8"), "SDXL UNet");
    let ids = Tensor::zeros([1, 77], (Kind::Int64, Device::Cpu));
    // With its projection, as CLIPTextModelWithProjection runs.
    let (_, text_2) = counted(|| tch::no_grad(|| m.text.encoders[1].model.model.f_encode_sdxl(&ids, 0).unwrap()));
    assert_eq!(text_2, reference("sdxl_text_2_1x77"), "second text encoder");
}

#[test]
fn nothing_is_counted_outside_a_counted_closure() {
    let m = model("tiny-sd1");
    let _ = tch::no_grad(|| m.vae.model.decode(&zeros(&[1, 4, 8, 8])));
    let (_, none) = counted(|| ());
    assert_eq!(none, 0);
}
