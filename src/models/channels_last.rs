//! Convolution weights laid out channels-last (NHWC) for bf16 on the CPU.
//!
//! oneDNN's bf16 convolution (AMX / AVX512-BF16) is fastest on NHWC data:
//! with the 3x3 weights stored NHWC once, when the model is built and before
//! its weights are loaded into them (`built::build`), libtorch hands
//! every convolution to oneDNN's channels-last kernel and its output stays
//! NHWC, so group norms, activations, skips and upsampling that follow run
//! on NHWC too, and a transformer's image-to-tokens reshape becomes free
//! (BENCHMARKS.md "Channels-last bf16 convolutions"). In fp32 sdtune's own
//! products (`conv.rs`, `onednn.rs`) are faster and the plain layout stays.
//! The layout changes strides only: every weight keeps its shape, values and
//! names, files are written contiguous (`tensor_file::serialize_tensors`).
use tch::{Device, Kind, Tensor};

use super::layers::{LayerIndex, LayerShape};

/// Whether weights of `kind` on `device` are laid out channels-last.
pub fn wanted(device: Device, kind: Kind) -> bool {
    device == Device::Cpu && kind == Kind::BFloat16 && super::onednn::enabled()
}

/// `t` ([N, C, H, W]) with NHWC strides, the same shape and values.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Whether a 4-D tensor is laid out NHWC (channel stride 1) and is not plain NCHW.
pub fn is_channels_last(t: &Tensor) -> bool {
    if t.dim() != 4 {
        return false;
    }
    let (size, stride) = (t.size(), t.stride());
    stride[1] == 1 && size[1] > 1 && !t.is_contiguous()
}

/// Lays every kxk convolution weight (k > 1) of `layers` out channels-last
/// when [`wanted`] for its device and kind; returns how many. A 1x1 weight
/// has the same strides either way.
pub fn lay_out_convs(layers: &LayerIndex) -> usize {
    let mut changed = 0;
    layers.for_each(|e| {
        let LayerShape::Conv2d { kernel, .. } = e.shape else { return };
        if kernel > 1 && wanted(e.weight.device(), e.weight.kind()) && !is_channels_last(&e.weight) {
            swap_data(&e.weight, &to_channels_last(&e.weight));
            changed += 1;
        }
    });
    changed
}

/// Lays the convolution weights of a model that is about to train out as
/// its training steps run fastest, measured (BENCHMARKS.md "Channels-last
/// bf16 convolutions"): on a CPU with native bf16 (AMX, AVX512-BF16) a step
/// is faster plain, since its backward convolutions are slower on NHWC there;
/// with emulated bf16 NHWC stays faster and stays. `native_bf16` is
/// `runtime::native_bf16_cpu()`. Returns how many changed.
pub fn lay_out_for_training(layers: &LayerIndex, native_bf16: bool) -> usize {
    if native_bf16 {
        lay_out_plain(layers)
    } else {
        0
    }
}

/// Lays every channels-last convolution weight of `layers` back out plain
/// (NCHW), the same values; returns how many.
pub fn lay_out_plain(layers: &LayerIndex) -> usize {
    let mut changed = 0;
    layers.for_each(|e| {
        if is_channels_last(&e.weight) {
            swap_data(&e.weight, &e.weight.contiguous());
            changed += 1;
        }
    });
    changed
}

/// Puts `laid_out` (the same shape and values) under `weight`: set_data swaps
/// the storage under the one tensor every holder shares.
fn swap_data(weight: &Tensor, laid_out: &Tensor) {
    let mut weight = weight.shallow_clone();
    tch::no_grad(|| weight.set_data(laid_out));
    // Per layer, so the model's RSS never holds both layouts of every weight.
    return_freed_memory();
}

/// Hands a plain copy's pages back to the system: glibc's allocator keeps
/// freed blocks for reuse, which would count the weights twice in RSS.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_keeps_shape_and_values() {
        let t = Tensor::arange(2 * 3 * 4 * 5, (Kind::Float, Device::Cpu)).view([2, 3, 4, 5]);
        let nhwc = to_channels_last(&t);
        assert_eq!(nhwc.size(), t.size());
        assert!(nhwc.equal(&t));
        assert!(is_channels_last(&nhwc) && !is_channels_last(&t));
        assert_eq!(nhwc.stride(), vec![60, 1, 15, 3]);
    }
}
