//! Gradient checkpointing (reentrant, as `torch.utils.checkpoint` with
//! `use_reentrant=True`): a segment's activations are not kept for
//! backward but computed again there, trading about a third more compute
//! for the memory of everything inside the segment.
//!
//! tch has no custom autograd functions, so the node is C++
//! (`src/native/checkpoint.cpp`); this is its safe face.
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::{anyhow, Result};
use tch::Tensor;
use torch_sys::C_tensor;

type RunFn = unsafe extern "C" fn(*mut c_void, *const *mut C_tensor, usize, *mut c_void) -> c_int;
type DropFn = unsafe extern "C" fn(*mut c_void);
type TakeFn = unsafe extern "C" fn(*mut c_void, *mut C_tensor);

extern "C" {
    fn sdtune_checkpoint(
        inputs: *const *mut C_tensor,
        n_inputs: usize,
        params: *const *mut C_tensor,
        n_params: usize,
        closure: *mut c_void,
        run: RunFn,
        drop: DropFn,
        outputs: *mut c_void,
        take: TakeFn,
    ) -> *mut c_char;
    fn sdtune_checkpoint_push_output(sink: *mut c_void, t: *const C_tensor);
    fn sdtune_checkpoint_set_error(sink: *mut c_void, message: *const c_char, len: usize);
    fn sdtune_grad_enabled() -> c_int;
}

/// Whether autograd records operations on this thread now (torch's
/// `is_grad_enabled`): checkpointing only matters then.
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { sdtune_grad_enabled() != 0 }
}

/// Runs `segment` on `inputs` without keeping what it computes inside for
/// backward; backward runs it again on copies of `inputs` and takes the
/// gradients of its outputs with respect to `inputs` and `params`.
///
/// `params` must hold every trainable tensor `segment` uses besides its
/// inputs (extra ones cost nothing): their gradients reach the caller's
/// `autograd.grad` only through this node. `segment` must use no other
/// tensor that needs a gradient, must compute the same thing both times
/// (nothing random), and may run on autograd's thread for the device
/// during backward. An error or panic inside it comes back as an `Err`
/// here (forward) or from the backward call (recompute).
pub fn checkpointed<F>(inputs: &[&Tensor], params: &[Tensor], segment: F) -> Result<Vec<Tensor>>
where
    F: Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + 'static,
{
    let input_ptrs: Vec<*mut C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    let param_ptrs: Vec<*mut C_tensor> = params.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    let closure = Box::into_raw(Box::new(segment)) as *mut c_void;
    let mut outputs: Vec<Tensor> = Vec::new();
    // SAFETY: the pointers are live tch tensors for the call (C++ copies
    // them); `closure` is a `Box<F>` that C++ now owns and frees through
    // `drop_segment::<F>`; `outputs` outlives the call.
    let error = unsafe {
        sdtune_checkpoint(
            input_ptrs.as_ptr(),
            input_ptrs.len(),
            param_ptrs.as_ptr(),
            param_ptrs.len(),
            closure,
            run_segment::<F>,
            drop_segment::<F>,
            &mut outputs as *mut Vec<Tensor> as *mut c_void,
            take_output,
        )
    };
    if error.is_null() {
        return Ok(outputs);
    }
    // SAFETY: a NUL-terminated string from malloc, ours to free.
    let message = unsafe {
        let text = CStr::from_ptr(error).to_string_lossy().into_owned();
        libc::free(error as *mut c_void);
        text
    };
    Err(anyhow!("a checkpointed segment failed: {message}"))
}

/// Called by C++ with borrowed inputs; never unwinds.
unsafe extern "C" fn run_segment<F>(closure: *mut c_void, inputs: *const *mut C_tensor, n: usize, sink: *mut c_void) -> c_int
where
    F: Fn(&[Tensor]) -> Result<Vec<Tensor>>,
{
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let segment = &*(closure as *const F);
        // Shallow copies: the C++ tensors stay C++'s.
        let inputs: Vec<Tensor> = (0..n).map(|i| Tensor::clone_from_ptr(*inputs.add(i))).collect();
        segment(&inputs)
    }));
    let message = match outcome {
        Ok(Ok(outputs)) => {
            for t in &outputs {
                sdtune_checkpoint_push_output(sink, t.as_ptr());
            }
            return 0;
        }
        Ok(Err(e)) => format!("{e:#}"),
        Err(panic) => format!("it panicked: {}", panic_message(panic.as_ref())),
    };
    sdtune_checkpoint_set_error(sink, message.as_ptr() as *const c_char, message.len());
    1
}

unsafe extern "C" fn drop_segment<F>(closure: *mut c_void) {
    // A panicking drop must not unwind into C++; the closure is gone either way.
    let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(closure as *mut F))));
}

unsafe extern "C" fn take_output(outputs: *mut c_void, t: *mut C_tensor) {
    (*(outputs as *mut Vec<Tensor>)).push(Tensor::from_ptr(t));
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "no message".into(),
    }
}
