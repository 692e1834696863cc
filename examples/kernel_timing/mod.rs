//! Shared by the `bench_conv` and `bench_linear` examples: per-layer A/B
//! timings of libtorch's kernel against sdtune's, in one process.
use std::time::Instant;

use tch::{Kind, Tensor};

/// The fastest of four timed calls after one warm-up, in milliseconds.
pub fn best_ms(mut f: impl FnMut()) -> f64 {
    f();
    (0..4)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// Best of two alternating rounds of: forward on `x2` (libtorch, sdtune),
/// then forward + backward on `x1` (libtorch, sdtune), in milliseconds.
pub fn ab_row(x2: &Tensor, x1: &Tensor, libtorch: impl Fn(&Tensor) -> Tensor, ours: impl Fn(&Tensor) -> Tensor) -> [f64; 4] {
    let mut row = [f64::INFINITY; 4];
    for _ in 0..2 {
        let times = [
            best_ms(|| drop(libtorch(x2))),
            best_ms(|| drop(ours(x2))),
            best_ms(|| libtorch(x1).sum(Kind::Float).backward()),
            best_ms(|| ours(x1).sum(Kind::Float).backward()),
        ];
        for (best, t) in row.iter_mut().zip(times) {
            *best = best.min(t);
        }
    }
    row
}
