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
