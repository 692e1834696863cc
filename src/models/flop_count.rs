//! Model FLOPs counted as the layers run: every linear, convolution and
//! attention product, with the rules of torch's `FlopCounterMode` (2 per
//! multiply-add; element-wise work, norms and activations not counted), so
//! a figure from `sdtune bench` and one from diffusers measure the same work.
//! Off unless a benchmark turns it on for a closure: then each layer adds its
//! count to the calling thread's total (the layers' Rust code runs on the
//! caller's thread; torch's own worker threads run no layer code), which
//! costs a thread-local check per layer call.
use std::cell::Cell;

use tch::Tensor;

thread_local! {
    static TOTAL: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The FLOPs the layers did on this thread while `f` ran.
pub fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let outer = TOTAL.with(|t| t.replace(Some(0)));
    let out = f();
    let flops = TOTAL.with(|t| t.replace(outer)).unwrap_or(0);
    // A counted closure inside another counts for both.
    if let Some(outer) = outer {
        TOTAL.with(|t| t.set(Some(outer + flops)));
    }
    (out, flops)
}

fn add(flops: u64) {
    TOTAL.with(|t| {
        if let Some(n) = t.get() {
            t.set(Some(n + flops));
        }
    });
}

fn counting() -> bool {
    TOTAL.with(|t| t.get().is_some())
}

/// `x W^T` with `weight` [out, in]: 2 * rows * in * out.
pub fn linear(x: &Tensor, weight: &Tensor) {
    if counting() {
        let out_features = weight.size().first().copied().unwrap_or(0);
        add(2 * x.numel() as u64 * out_features.max(0) as u64);
    }
}

/// A convolution producing `y` with `weight` [out, in / groups, kh, kw]:
/// 2 * output elements * (in / groups) * kh * kw.
pub fn conv(y: &Tensor, weight: &Tensor) {
    if counting() {
        let per_output: i64 = weight.size().iter().skip(1).product();
        add(2 * y.numel() as u64 * per_output.max(0) as u64);
    }
}

/// `softmax(q k^T) v` with q [.., Lq, d], k [.., Lk, d], v [.., Lk, dv]:
/// 2 * batch * heads * Lq * Lk * (d + dv).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) {
    if counting() {
        let (qs, ks, vs) = (q.size(), k.size(), v.size());
        let (Some(&lk), Some(&dv)) = (ks.get(ks.len().wrapping_sub(2)), vs.last()) else { return };
        add(2 * q.numel() as u64 * lk as u64 + 2 * (q.numel() as u64 / qs.last().copied().unwrap_or(1).max(1) as u64) * lk as u64 * dv as u64);
    }
}
