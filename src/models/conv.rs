//! How a 2-D convolution is computed: libtorch's choice, except for wide
//! inputs on small maps on the CPU.
//!
//! libtorch hands every fp32 CPU convolution with a 3x3 kernel to oneDNN.
//! For SD's deep blocks (1280-2560 input channels on 8x8 or 4x4 latent maps)
//! oneDNN is 2-4x slower than one GEMM over the unfolded input patches
//! (im2col, what PyTorch does without oneDNN), forward and backward; over an
//! SD1.5 UNet at 256 px that made guided sampling about 10% faster, training
//! no measurably so (BENCHMARKS.md "Convolutions on the CPU"). Elsewhere
//! oneDNN wins and is kept. The two differ only in float rounding (about 1e-6
//! relative). The choice depends on the layer's shape alone, never on the
//! batch size or a timing, so a run is reproducible.
use tch::{Device, Kind, Tensor};

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
    if x.device() != Device::Cpu || x.kind() != Kind::Float || weight.kind() != Kind::Float || x.dim() != 4 {
        return false;
    }
    let (size, kernel) = (x.size(), weight.size());
    let (in_channels, height, width) = (size[1], size[2], size[3]);
    let (kh, kw) = (kernel[2], kernel[3]);
    if kh == 1 && kw == 1 {
        // 1x1 kernels already skip oneDNN on one thread, and gain nothing here.
        return false;
    }
    let positions = output_len(height, kh, stride, padding) * output_len(width, kw, stride, padding);
    in_channels >= GEMM_MIN_IN_CHANNELS && positions <= GEMM_MAX_OUTPUT_POSITIONS
}

fn output_len(input: i64, kernel: i64, stride: i64, padding: i64) -> i64 {
    (input + 2 * padding - kernel) / stride + 1
}

/// The convolution as `weight[O, C*kh*kw] @ patches[B, C*kh*kw, positions]`.
fn conv2d_as_gemm(x: &Tensor, weight: &Tensor, bias: &Tensor, stride: i64, padding: i64) -> Tensor {
    let size = x.size();
    let (batch, height, width) = (size[0], size[2], size[3]);
    let kernel = weight.size();
    let (out_channels, kh, kw) = (kernel[0], kernel[2], kernel[3]);
    let patches = x.im2col([kh, kw], [1, 1], [padding, padding], [stride, stride]);
    let y = weight.reshape([out_channels, -1]).matmul(&patches) + bias.reshape([1, out_channels, 1]);
    let out_h = output_len(height, kh, stride, padding);
    let out_w = output_len(width, kw, stride, padding);
    y.reshape([batch, out_channels, out_h, out_w])
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(!case(2560, 8, 1, 1), "1x1 kernels are left to libtorch");
        let bf16 = (Kind::BFloat16, Device::Cpu);
        let (x, w) = (Tensor::zeros([1, 1280, 8, 8], bf16), Tensor::zeros([8, 1280, 3, 3], bf16));
        assert!(!gemm_is_faster(&x, &w, 1, 1), "only fp32 is rerouted");
    }

    #[test]
    fn gemm_path_matches_libtorch_forward_and_backward() {
        tch::manual_seed(0);
        for (cin, side, stride, padding) in [(1280, 8, 1, 1), (1280, 8, 2, 1), (1920, 5, 1, 1), (1280, 4, 2, 0)] {
            let weight = Tensor::randn([16, cin, 3, 3], opts()) * 0.02;
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
