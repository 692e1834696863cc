//! How a 2-D convolution is computed: libtorch's choice, except where one
//! matrix product per image is measurably faster on the CPU.
//!
//! libtorch hands every fp32 CPU convolution with a 3x3 kernel to oneDNN's
//! convolution and 1x1 kernels on one thread to an im2col + MKL sgemm path.
//! For SD's deep blocks (1280-2560 input channels on 8x8 or 4x4 latent maps)
//! oneDNN's convolution is 2-5x slower than one GEMM over the unfolded input
//! patches, and MKL's sgemm on this project's AMD CPU is about half as fast as
//! oneDNN's (see [`super::onednn`]), so both are computed here as
//! `weight [O, C*k*k] @ patches [C*k*k, positions]`, one oneDNN product per
//! image (BENCHMARKS.md "Convolutions on the CPU"). Elsewhere libtorch's
//! convolution is as fast or faster and is kept. The paths differ only in
//! float rounding (about 1e-6 relative). The choice depends on the layer's
//! shape alone, never on the batch size or a timing, so a run is
//! reproducible.
use tch::{Kind, Tensor};

use super::onednn;

/// Input channels from which the GEMM path is taken on small maps.
const GEMM_MIN_IN_CHANNELS: i64 = 1280;
/// Output maps of at most this many positions (8x8) count as small.
const GEMM_MAX_OUTPUT_POSITIONS: i64 = 64;

/// `conv2d` with square stride and padding, dilation 1, one group.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, stride: i64, padding: i64) -> Tensor {
    if gemm_is_faster(x, weight, stride, padding) {
        conv2d_as_gemm(x, weight, bias, stride, padding)
    } else {
        x.conv2d(weight, Some(bias), [stride, stride], [padding, padding], [1, 1], 1)
    }
}

fn gemm_is_faster(x: &Tensor, weight: &Tensor, stride: i64, padding: i64) -> bool {
    if x.dim() != 4 || weight.dim() != 4 || x.kind() != Kind::Float || !onednn::takes(x, weight) {
        return false;
    }
    let (size, kernel) = (x.size(), weight.size());
    let (in_channels, height, width) = (size[1], size[2], size[3]);
    let (kh, kw) = (kernel[2], kernel[3]);
    if kh == 1 && kw == 1 {
        // A 1x1 kernel is a product already; libtorch's own path for it is MKL's.
        return stride == 1 && padding == 0;
    }
    let positions = output_len(height, kh, stride, padding) * output_len(width, kw, stride, padding);
    in_channels >= GEMM_MIN_IN_CHANNELS && positions <= GEMM_MAX_OUTPUT_POSITIONS
}

fn output_len(input: i64, kernel: i64, stride: i64, padding: i64) -> i64 {
    (input + 2 * padding - kernel) / stride + 1
}

/// The convolution as `weight[O, C*kh*kw] @ patches[b][C*kh*kw, positions]`
/// for each image b, so the product lands in [O, positions] (NCHW) with no
/// transpose; oneDNN reads the patches through a transposed view.
fn conv2d_as_gemm(x: &Tensor, weight: &Tensor, bias: &Tensor, stride: i64, padding: i64) -> Tensor {
    let size = x.size();
    let (batch, height, width) = (size[0], size[2], size[3]);
    let kernel = weight.size();
    let (out_channels, kh, kw) = (kernel[0], kernel[2], kernel[3]);
    let patches = if kh == 1 && kw == 1 {
        x.reshape([batch, size[1], height * width])
    } else {
        x.im2col([kh, kw], [1, 1], [padding, padding], [stride, stride])
    };
    let weight = weight.reshape([out_channels, -1]);
    let per_image: Vec<Tensor> = (0..batch).map(|b| onednn::linear(&weight, &patches.get(b).tr(), None)).collect();
    let y = Tensor::stack(&per_image, 0) + bias.reshape([1, out_channels, 1]);
    let out_h = output_len(height, kh, stride, padding);
    let out_w = output_len(width, kw, stride, padding);
    y.reshape([batch, out_channels, out_h, out_w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn opts() -> (Kind, Device) {
        (Kind::Float, Device::Cpu)
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b.abs().max().double_value(&[]);
        (a - b).abs().max().double_value(&[]) / scale
    }

    #[test]
    fn gemm_path_only_for_wide_inputs_on_small_maps() {
        let case = |cin: i64, side: i64, kernel: i64, stride: i64| {
            let x = Tensor::zeros([2, cin, side, side], opts());
            let w = Tensor::zeros([8, cin, kernel, kernel], opts());
            gemm_is_faster(&x, &w, stride, kernel / 2)
        };
        assert!(case(1280, 8, 3, 1));
        assert!(case(2560, 4, 3, 1));
        assert!(case(1280, 16, 3, 2), "a stride-2 conv to 8x8 counts its output");
        assert!(!case(1280, 16, 3, 1), "16x16 output stays with oneDNN");
        assert!(!case(640, 8, 3, 1), "640 channels stay with oneDNN");
        assert!(case(2560, 8, 1, 1), "1x1 kernels are products at any size");
        assert!(case(320, 32, 1, 1));
        let bf16 = (Kind::BFloat16, Device::Cpu);
        let (x, w) = (Tensor::zeros([1, 1280, 8, 8], bf16), Tensor::zeros([8, 1280, 3, 3], bf16));
        assert!(!gemm_is_faster(&x, &w, 1, 1), "only fp32 is rerouted");
    }

    #[test]
    fn gemm_path_matches_libtorch_forward_and_backward() {
        tch::manual_seed(0);
        for (cin, side, kernel, stride, padding) in
            [(1280, 8, 3, 1, 1), (1280, 8, 3, 2, 1), (1920, 5, 3, 1, 1), (1280, 4, 3, 2, 0), (320, 6, 1, 1, 0), (64, 3, 1, 1, 0)]
        {
            let weight = Tensor::randn([16, cin, kernel, kernel], opts()) * 0.02;
            let bias = Tensor::randn([16], opts());
            let x = Tensor::randn([2, cin, side, side], opts());
            let ours_in = x.detach().set_requires_grad(true);
            let ours = conv2d_as_gemm(&ours_in, &weight, &bias, stride, padding);
            let theirs_in = x.detach().set_requires_grad(true);
            let theirs = theirs_in.conv2d(&weight, Some(&bias), [stride, stride], [padding, padding], [1, 1], 1);
            assert_eq!(ours.size(), theirs.size());
            assert!(max_rel_diff(&ours, &theirs) < 1e-5, "forward {cin}@{side} s{stride} p{padding}");
            let grad_out = Tensor::randn(theirs.size(), opts());
            (ours * &grad_out).sum(Kind::Float).backward();
            (theirs * &grad_out).sum(Kind::Float).backward();
            assert!(max_rel_diff(&ours_in.grad(), &theirs_in.grad()) < 1e-5, "input gradient {cin}@{side}");
        }
    }
}
