//! Each linear shape of an SD1.5 UNet at 256 px (32x32 latents) and of its
//! CLIP text encoder, through libtorch's `linear` (MKL's sgemm in fp32 on
//! the CPU) and through `sdtune::models::onednn::linear` (oneDNN).
//!
//!     OMP_NUM_THREADS=1 cargo run --release --example bench_linear
//!
//! Forward at batch 2 (sampling with guidance) and forward + backward to the
//! input at batch 1 (LoRA training: the weight is frozen). Best of 4 after a
//! warm-up, the two sides alternating twice. Prints a Markdown table with
//! each side's GFLOP/s.
use sdtune::models::onednn;
use tch::{Device, Kind, Tensor};

mod kernel_timing;

/// (tokens per image, in features, out features, layers of this shape per forward, where).
const SHAPES: [(i64, i64, i64, usize, &str); 18] = [
    (1024, 320, 320, 25, "attn q/k/v/out, 32x32"),
    (77, 768, 320, 10, "attn2 k/v, 32x32"),
    (1024, 320, 2560, 5, "ff proj, 32x32"),
    (1024, 1280, 320, 5, "ff out, 32x32"),
    (256, 640, 640, 25, "attn q/k/v/out, 16x16"),
    (77, 768, 640, 10, "attn2 k/v, 16x16"),
    (256, 640, 5120, 5, "ff proj, 16x16"),
    (256, 2560, 640, 5, "ff out, 16x16"),
    (64, 1280, 1280, 30, "attn q/k/v/out, 8x8"),
    (77, 768, 1280, 12, "attn2 k/v, 8x8"),
    (64, 1280, 10240, 6, "ff proj, 8x8"),
    (64, 5120, 1280, 6, "ff out, 8x8"),
    (1, 1280, 320, 8, "time_emb_proj"),
    (1, 1280, 1280, 10, "time_emb_proj, time embedding"),
    (77, 768, 768, 48, "CLIP attention"),
    (77, 768, 3072, 12, "CLIP fc1"),
    (77, 3072, 768, 12, "CLIP fc2"),
    (1024, 512, 512, 4, "VAE attention, 32x32"),
];

fn main() {
    let opts = (Kind::Float, Device::Cpu);
    println!("| tokens x in -> out | layer | count | fwd b2 libtorch ms | fwd b2 sdtune ms | GFLOP/s libtorch / sdtune | fwd+bwd b1 libtorch ms | fwd+bwd b1 sdtune ms |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut totals = [0.0; 4];
    for (tokens, k, n, count, what) in SHAPES {
        let weight = Tensor::randn([n, k], opts) * 0.02;
        let bias = Tensor::randn([n], opts);
        let x2 = Tensor::randn([2, tokens, k], opts);
        let x1 = Tensor::randn([1, tokens, k], opts).set_requires_grad(true);
        let libtorch = |x: &Tensor| x.linear(&weight, Some(&bias));
        let ours = |x: &Tensor| onednn::linear(x, &weight, Some(&bias));
        let row = kernel_timing::ab_row(&x2, &x1, libtorch, ours);
        for (total, ms) in totals.iter_mut().zip(row) {
            *total += ms * count as f64;
        }
        let gflops = |ms: f64| 2.0 * (2 * tokens * k * n) as f64 / ms / 1e6;
        println!(
            "| {tokens} x {k} -> {n} | {what} | {count} | {:.2} | {:.2} | {:.0} / {:.0} | {:.2} | {:.2} |",
            row[0],
            row[1],
            gflops(row[0]),
            gflops(row[1]),
            row[2],
            row[3]
        );
    }
    println!(
        "| all (x count) | | | {:.0} | {:.0} | | {:.0} | {:.0} |",
        totals[0], totals[1], totals[2], totals[3]
    );
}
