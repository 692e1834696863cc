//! fp32 CPU matrix products through oneDNN instead of MKL.
//!
//! libtorch computes `linear`/`matmul` in fp32 on the CPU with MKL's sgemm,
//! which takes a slower code path on CPUs that are not Intel's: on this
//! project's AMD EPYC VM (AVX-512) it runs at about half oneDNN's rate for
//! every linear shape of SD1.5 (BENCHMARKS.md "oneDNN for the CPU's fp32
//! products"). oneDNN reads the weights as they are stored, so this costs no
//! memory; a weight packed once into oneDNN's blocked layout was measured
//! too and gained 5-8% more on the largest shapes for a second copy of every
//! weight, so it is not used. The two paths differ only in float rounding
//! (about 1e-6 relative); the choice depends on device and precision only,
//! so a run is reproducible.
//!
//! The product is differentiable (`src/native/onednn.cpp`): a frozen
//! weight's layer keeps no activation for backward, as libtorch's does not.
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn sdtune_onednn_available() -> i32;
    fn sdtune_onednn_linear(
        x: *const C_tensor,
        w: *const C_tensor,
        bias: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// Off only for measuring against libtorch's own kernels (`sdtune bench --libtorch-kernels`).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Routes the CPU's fp32 products through oneDNN (the default) or leaves
/// them to libtorch, for A/B measurements in one binary.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether sdtune's kernel choices are on (see [`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether this libtorch has the oneDNN op at all.
fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    // SAFETY: a dispatcher lookup, no arguments.
    *AVAILABLE.get_or_init(|| unsafe { sdtune_onednn_available() != 0 })
}

/// Whether a product of these operands goes to oneDNN.
pub fn takes(x: &Tensor, weight: &Tensor) -> bool {
    enabled()
        && x.device() == Device::Cpu
        && weight.device() == Device::Cpu
        && x.kind() == Kind::Float
        && weight.kind() == Kind::Float
        && available()
}

/// `x [..., K] @ weight [N, K]^T + bias [N]`, through oneDNN when [`takes`]
/// says so and libtorch's `linear` otherwise. Either operand may be a
/// strided view (a transpose costs no copy of the weight).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    if !takes(x, weight) {
        return x.linear(weight, bias);
    }
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let bias_ptr = bias.map_or(std::ptr::null(), |b| b.as_ptr() as *const C_tensor);
    // SAFETY: the tensors are live for the call; on success C++ hands over
    // a new heap tensor that `from_ptr` takes ownership of.
    let error = unsafe { sdtune_onednn_linear(x.as_ptr() as *const C_tensor, weight.as_ptr() as *const C_tensor, bias_ptr, &mut out) };
    if error.is_null() {
        // SAFETY: see above.
        return unsafe { Tensor::from_ptr(out) };
    }
    // SAFETY: a NUL-terminated string from malloc, ours to free.
    let message = unsafe {
        let text = CStr::from_ptr(error).to_string_lossy().into_owned();
        libc::free(error as *mut c_void);
        text
    };
    // Infallible like tch's own operations: a shape mismatch is a bug here.
    panic!("oneDNN linear of {:?} by {:?}: {message}", x.size(), weight.size());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b.abs().max().double_value(&[]);
        (a - b).abs().max().double_value(&[]) / scale
    }

    #[test]
    fn agrees_with_libtorch_forward_and_all_gradients() {
        tch::manual_seed(0);
        let opts = (Kind::Float, Device::Cpu);
        for (batch, tokens, k, n, with_bias) in [(2, 77, 64, 48, true), (1, 5, 32, 80, false), (3, 1, 16, 8, true)] {
            let x = Tensor::randn([batch, tokens, k], opts);
            let w = Tensor::randn([n, k], opts) * 0.1;
            let b = Tensor::randn([n], opts);
            let grad_out = Tensor::randn([batch, tokens, n], opts);
            let run = |ours: bool| {
                let (x, w, b) = (x.detach().set_requires_grad(true), w.detach().set_requires_grad(true), b.detach().set_requires_grad(true));
                let bias = with_bias.then_some(&b);
                let y = if ours { linear(&x, &w, bias) } else { x.linear(&w, bias) };
                (&y * &grad_out).sum(Kind::Float).backward();
                (y.detach(), x.grad(), w.grad(), with_bias.then(|| b.grad()))
            };
            assert!(takes(&x, &w), "the test needs the oneDNN path");
            let (ours, theirs) = (run(true), run(false));
            assert!(max_rel_diff(&ours.0, &theirs.0) < 1e-5, "forward");
            assert!(max_rel_diff(&ours.1, &theirs.1) < 1e-5, "input gradient");
            assert!(max_rel_diff(&ours.2, &theirs.2) < 1e-5, "weight gradient");
            if let (Some(a), Some(b)) = (ours.3, theirs.3) {
                assert!(max_rel_diff(&a, &b) < 1e-5, "bias gradient");
            }
        }
    }

    #[test]
    fn frozen_weight_gives_input_gradient_only() {
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([4, 8], opts).set_requires_grad(true);
        let w = Tensor::randn([3, 8], opts);
        linear(&x, &w, None).sum(Kind::Float).backward();
        let want = w.sum_dim_intlist([0i64].as_slice(), false, Kind::Float).expand([4, 8], false);
        assert!(max_rel_diff(&x.grad(), &want) < 1e-6);
        assert!(!w.grad().defined());
    }

    #[test]
    fn strided_operands_and_no_grad() {
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([6, 10], opts);
        let w = Tensor::randn([10, 7], opts); // used transposed: [7, 10] view
        let _guard = tch::no_grad_guard();
        let ours = linear(&x.t_copy().tr(), &w.tr(), None);
        assert!(max_rel_diff(&ours, &x.matmul(&w)) < 1e-5);
    }
}
