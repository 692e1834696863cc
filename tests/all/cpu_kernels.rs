//! sdtune's own CPU kernel choices (oneDNN products for linears, 1x1 and
//! deep 3x3 convolutions; `src/models/onednn.rs`, `src/models/conv.rs`)
//! against libtorch's plain path on every SD1 layer shape that takes them:
//! the SD1.5 UNet, VAE and CLIP ViT-L text encoder at 256 px, forward and the
//! gradient to the input (LoRA training: the weights are frozen), within 1e-5
//! of the output's scale. The 3x3 shapes not listed stay with libtorch's own
//! convolution and so are the plain path.
use sdtune::models::{conv, onednn};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-5;

fn opts() -> (Kind, Device) {
    (Kind::Float, Device::Cpu)
}

fn rel_diff(ours: &Tensor, plain: &Tensor) -> f64 {
    let scale = plain.abs().max().double_value(&[]).max(1e-30);
    (ours - plain).abs().max().double_value(&[]) / scale
}

/// Forward and input gradient of `ours` against `plain` on `x`.
fn compare(what: &str, x: &Tensor, ours: impl Fn(&Tensor) -> Tensor, plain: impl Fn(&Tensor) -> Tensor) {
    let (a, b) = (x.detach().set_requires_grad(true), x.detach().set_requires_grad(true));
    let (ya, yb) = (ours(&a), plain(&b));
    assert_eq!(ya.size(), yb.size(), "{what}: output shape");
    let forward = rel_diff(&ya, &yb);
    assert!(forward < TOLERANCE, "{what}: forward differs by {forward:e} of its scale");
    let grad_out = Tensor::randn(yb.size(), opts());
    (&ya * &grad_out).sum(Kind::Float).backward();
    (&yb * &grad_out).sum(Kind::Float).backward();
    let backward = rel_diff(&a.grad(), &b.grad());
    assert!(backward < TOLERANCE, "{what}: input gradient differs by {backward:e} of its scale");
}

#[test]
fn every_sd1_linear_shape_agrees_with_libtorch() {
    let _rng = crate::common::torch_rng();
    tch::manual_seed(0);
    // (tokens, in, out): UNet attention, cross-attention k/v, GEGLU and its
    // output at each level; time embedding; CLIP; VAE mid-block attention.
    let shapes: [(i64, i64, i64); 20] = [
        (1024, 320, 320),
        (77, 768, 320),
        (1024, 320, 2560),
        (1024, 1280, 320),
        (256, 640, 640),
        (77, 768, 640),
        (256, 640, 5120),
        (256, 2560, 640),
        (64, 1280, 1280),
        (77, 768, 1280),
        (64, 1280, 10240),
        (64, 5120, 1280),
        (1, 320, 1280),
        (1, 1280, 1280),
        (1, 1280, 320),
        (1, 1280, 640),
        (77, 768, 768),
        (77, 768, 3072),
        (77, 3072, 768),
        (1024, 512, 512),
    ];
    for (tokens, k, n) in shapes {
        let weight = Tensor::randn([n, k], opts()) / (k as f64).sqrt();
        let bias = Tensor::randn([n], opts());
        let x = Tensor::randn([1, tokens, k], opts());
        assert!(onednn::takes(&x, &weight), "fp32 CPU linears take oneDNN");
        compare(
            &format!("linear {tokens} x {k} -> {n}"),
            &x,
            |x| onednn::linear(x, &weight, Some(&bias)),
            |x| x.linear(&weight, Some(&bias)),
        );
    }
}

#[test]
fn every_sd1_convolution_sdtune_computes_agrees_with_libtorch() {
    let _rng = crate::common::torch_rng();
    tch::manual_seed(1);
    // (in, out, kernel, input side, stride): the UNet's deep 3x3 convs on 8x8
    // and 4x4 maps, every 1x1 (transformer projections, resnet shortcuts) of
    // the UNet and of the VAE (shortcuts, quant_conv, post_quant_conv).
    let shapes: [(i64, i64, i64, i64, i64); 30] = [
        (1280, 1280, 3, 8, 1),
        (1280, 1280, 3, 16, 2),
        (1920, 1280, 3, 8, 1),
        (2560, 1280, 3, 8, 1),
        (1280, 1280, 3, 4, 1),
        (1280, 1280, 3, 8, 2),
        (2560, 1280, 3, 4, 1),
        (320, 320, 1, 32, 1),
        (640, 640, 1, 16, 1),
        (1280, 1280, 1, 8, 1),
        (320, 640, 1, 16, 1),
        (640, 1280, 1, 8, 1),
        (2560, 1280, 1, 4, 1),
        (2560, 1280, 1, 8, 1),
        (1920, 1280, 1, 8, 1),
        (1920, 640, 1, 16, 1),
        (1280, 640, 1, 16, 1),
        (960, 640, 1, 16, 1),
        (960, 320, 1, 32, 1),
        (640, 320, 1, 32, 1),
        (128, 256, 1, 128, 1),
        (256, 512, 1, 64, 1),
        (512, 256, 1, 128, 1),
        (256, 128, 1, 256, 1),
        (8, 8, 1, 32, 1),
        (4, 4, 1, 32, 1),
        (1280, 1280, 3, 4, 2),
        (2560, 1280, 3, 8, 2),
        (1280, 640, 1, 8, 1),
        (512, 512, 1, 32, 1),
    ];
    for (cin, cout, kernel, side, stride) in shapes {
        let pad = kernel / 2;
        let weight = Tensor::randn([cout, cin, kernel, kernel], opts()) / ((cin * kernel * kernel) as f64).sqrt();
        let bias = Tensor::randn([cout], opts());
        let x = Tensor::randn([1, cin, side, side], opts());
        compare(
            &format!("conv {cin} -> {cout} {kernel}x{kernel} on {side}x{side} stride {stride}"),
            &x,
            |x| conv::conv2d(x, &weight, &bias, stride, pad),
            |x| x.conv2d(&weight, Some(&bias), [stride, stride], [pad, pad], [1, 1], 1),
        );
    }
}

#[test]
fn batch_of_two_and_guidance_shapes_agree() {
    let _rng = crate::common::torch_rng();
    // Sampling with guidance runs the UNet at batch 2: the per-image products must stack in order.
    tch::manual_seed(2);
    let weight = Tensor::randn([64, 1280, 3, 3], opts()) * 0.01;
    let bias = Tensor::randn([64], opts());
    let x = Tensor::randn([2, 1280, 8, 8], opts());
    let ours = tch::no_grad(|| conv::conv2d(&x, &weight, &bias, 1, 1));
    let plain = x.conv2d(&weight, Some(&bias), [1, 1], [1, 1], [1, 1], 1);
    assert!(rel_diff(&ours, &plain) < TOLERANCE);
    let one = tch::no_grad(|| conv::conv2d(&x.narrow(0, 1, 1), &weight, &bias, 1, 1));
    assert!(rel_diff(&ours.narrow(0, 1, 1), &one) < TOLERANCE, "image 2 of the batch is image 2");
}

/// bf16 on the CPU lays every kxk convolution weight out channels-last
/// (`src/models/channels_last.rs`): on every 3x3 shape of the SD1.5 UNet and
/// VAE at 256 px, the convolution with the channels-last weight (and the
/// channels-last output it makes as the next layer's input) agrees with the
/// plain-layout one, forward and input gradient, as [`assert_bf16_agrees`] says.
#[test]
fn every_sd1_3x3_convolution_agrees_in_bf16_with_channels_last_weights() {
    use sdtune::models::channels_last;
    let _rng = crate::common::torch_rng();
    tch::manual_seed(2);
    // (in, out, input side, stride): the UNet's 3x3 convs at 256 px (32x32 latents), then the VAE's.
    let shapes: [(i64, i64, i64, i64); 31] = [
        (4, 320, 32, 1),
        (320, 320, 32, 1),
        (320, 320, 32, 2),
        (320, 640, 16, 1),
        (640, 640, 16, 1),
        (640, 640, 16, 2),
        (640, 1280, 8, 1),
        (1280, 1280, 8, 1),
        (1280, 1280, 8, 2),
        (1280, 1280, 4, 1),
        (2560, 1280, 4, 1),
        (2560, 1280, 8, 1),
        (1920, 1280, 8, 1),
        (1920, 640, 16, 1),
        (1280, 640, 16, 1),
        (960, 640, 16, 1),
        (960, 320, 32, 1),
        (640, 320, 32, 1),
        (1280, 1280, 16, 1),
        (320, 4, 32, 1),
        (3, 128, 256, 1),
        (128, 128, 256, 1),
        (128, 256, 128, 1),
        (256, 256, 128, 1),
        (256, 512, 64, 1),
        (512, 512, 64, 1),
        (512, 512, 32, 1),
        (512, 8, 32, 1),
        (4, 512, 32, 1),
        (512, 256, 256, 1),
        (128, 3, 256, 1),
    ];
    let bf16 = (Kind::BFloat16, Device::Cpu);
    // Emulated bf16 (AVX2) runs these at a few GFLOP/s: the same channel
    // counts on a quarter of the side keep the test to seconds there.
    let native = sdtune::runtime::native_bf16_cpu();
    for (cin, cout, side, stride) in shapes {
        let side = if native { side } else { (side / 4).max(4) };
        let weight = (Tensor::randn([cout, cin, 3, 3], opts()) / ((cin * 9) as f64).sqrt()).to_kind(Kind::BFloat16);
        let nhwc = channels_last::to_channels_last(&weight);
        assert!(channels_last::is_channels_last(&nhwc), "{cin} -> {cout}: the weight was not laid out channels-last");
        let bias = Tensor::randn([cout], bf16);
        let x = Tensor::randn([1, cin, side, side], bf16);
        let what = format!("bf16 conv {cin} -> {cout} 3x3 on {side}x{side} stride {stride}");
        let (a, b) = (x.detach().set_requires_grad(true), x.detach().set_requires_grad(true));
        let ya = conv::conv2d(&a, &nhwc, &bias, stride, 1);
        let yb = b.conv2d(&weight, Some(&bias), [stride, stride], [1, 1], [1, 1], 1);
        assert!(channels_last::is_channels_last(&ya), "{what}: the output is not channels-last");
        let grad_out = Tensor::randn(yb.size(), bf16);
        (&ya * &grad_out).sum(Kind::Float).backward();
        (&yb * &grad_out).sum(Kind::Float).backward();
        // Only emulated bf16 is judged against fp32 (see `assert_bf16_agrees`).
        let fp32 = (!native).then(|| fp32_convolution(&x, &weight, &bias, stride, &grad_out));
        assert_bf16_agrees(&format!("{what}: forward"), (&ya, &yb), fp32.as_ref().map(|(y, _)| y));
        assert_bf16_agrees(&format!("{what}: input gradient"), (&a.grad(), &b.grad()), fp32.as_ref().map(|(_, g)| g));
    }
}

/// The fp32 convolution of the same bf16 values, what both layouts round
/// from: its output and its input gradient for `grad_out`.
fn fp32_convolution(x: &Tensor, weight: &Tensor, bias: &Tensor, stride: i64, grad_out: &Tensor) -> (Tensor, Tensor) {
    let f = x.to_kind(Kind::Float).set_requires_grad(true);
    let y = f.conv2d(&weight.to_kind(Kind::Float), Some(&bias.to_kind(Kind::Float)), [stride, stride], [1, 1], [1, 1], 1);
    (&y * grad_out.to_kind(Kind::Float)).sum(Kind::Float).backward();
    (y, f.grad())
}

/// The bf16 results of the channels-last and the plain convolution: within
/// 1e-5 of their scale where the CPU computes bf16 natively (bit-identical
/// there, measured on AMX). Where bf16 is emulated (AVX2) the two layouts go
/// to different oneDNN kernels whose sums round to bf16 apart (up to 1.5e-2
/// of the scale, measured): there each must be as close to the fp32 result
/// as bf16 allows, two bf16 steps (2^-6) of the largest value. `fp32` is
/// that result where bf16 is emulated, None where it is native.
fn assert_bf16_agrees(what: &str, (ours, plain): (&Tensor, &Tensor), fp32: Option<&Tensor>) {
    let (ours, plain) = (ours.to_kind(Kind::Float), plain.to_kind(Kind::Float));
    let relative = rel_diff(&ours, &plain);
    let Some(fp32) = fp32 else {
        assert!(relative < TOLERANCE, "{what} differs by {relative:e} of its scale");
        return;
    };
    let (ours_error, plain_error) = (rel_diff(&ours, fp32), rel_diff(&plain, fp32));
    let bound = 2f64.powi(-6);
    assert!(
        ours_error <= bound && plain_error <= bound,
        "{what}: channels-last is {ours_error:e} of the scale from fp32, plain {plain_error:e} (they differ by {relative:e})"
    );
}

/// A model loaded in bf16 on the CPU has every kxk convolution weight of its
/// UNet and VAE channels-last, with the values of the file; in fp32 none is.
#[test]
fn a_bf16_cpu_model_has_channels_last_convolutions_and_an_fp32_one_plain() {
    use sdtune::models::channels_last;
    use sdtune::models::layers::LayerShape;
    use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
    let folder = crate::common::fixtures().join("tiny-sd1");
    let bf16 = Placement { device: Device::Cpu, kind: Kind::BFloat16, vae_kind: Kind::BFloat16 };
    let (ours, plain) = (StableDiffusion::from_diffusers_folder(&folder, bf16, None).unwrap(), StableDiffusion::from_diffusers_folder(&folder, Placement::cpu_f32(), None).unwrap());
    for (part, a, b) in [("unet", &ours.unet.layers, &plain.unet.layers), ("vae", &ours.vae.layers, &plain.vae.layers)] {
        let mut convs = 0;
        a.for_each(|e| {
            let LayerShape::Conv2d { kernel: 3, .. } = e.shape else { return };
            convs += 1;
            assert!(channels_last::is_channels_last(&e.weight), "{part} {}: not channels-last in bf16", e.name);
            b.with(&e.name, |p| {
                assert!(!channels_last::is_channels_last(&p.weight), "{part} {}: channels-last in fp32", e.name);
                assert!(e.weight.to_kind(Kind::Float).equal(&p.weight.to_kind(Kind::BFloat16).to_kind(Kind::Float)), "{part} {}: the values moved", e.name);
            });
        });
        assert!(convs >= 10, "{part}: only {convs} 3x3 convolutions");
    }
}

/// Before training, a bf16 CPU UNet is laid out as its steps run fastest:
/// channels-last stays where bf16 is emulated, plain where the CPU has it
/// natively (BENCHMARKS.md), with the same values.
#[test]
fn a_bf16_unet_that_trains_is_plain_only_on_a_cpu_with_native_bf16() {
    use sdtune::models::channels_last;
    use sdtune::models::layers::LayerShape;
    use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
    let folder = crate::common::fixtures().join("tiny-sd1");
    let bf16 = Placement { device: Device::Cpu, kind: Kind::BFloat16, vae_kind: Kind::BFloat16 };
    let model = StableDiffusion::from_diffusers_folder(&folder, bf16, None).unwrap();
    // Copies: a shallow clone shares the tensor whose data the layout swaps.
    let before: Vec<(String, Tensor)> = conv3x3(&model.unet.layers).into_iter().map(|(n, w)| (n, w.copy())).collect();
    assert!(before.len() >= 10 && before.iter().all(|(_, w)| channels_last::is_channels_last(w)));
    assert_eq!(channels_last::lay_out_for_training(&model.unet.layers, false), 0, "emulated bf16 keeps channels-last");
    assert!(conv3x3(&model.unet.layers).iter().all(|(_, w)| channels_last::is_channels_last(w)));
    assert_eq!(channels_last::lay_out_for_training(&model.unet.layers, true), before.len(), "native bf16 trains plain");
    for ((name, old), (_, new)) in before.iter().zip(conv3x3(&model.unet.layers)) {
        assert!(new.is_contiguous() && !channels_last::is_channels_last(&new), "{name}: still channels-last");
        assert!(new.equal(old), "{name}: the values moved");
    }
    assert_eq!(channels_last::lay_out_plain(&model.unet.layers), 0, "plain twice changes nothing");

    fn conv3x3(layers: &sdtune::models::layers::LayerIndex) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        layers.for_each(|e| {
            if let LayerShape::Conv2d { kernel: 3, .. } = e.shape {
                out.push((e.name.clone(), e.weight.shallow_clone()));
            }
        });
        out
    }
}
