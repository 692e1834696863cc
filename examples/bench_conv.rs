//! Each convolution shape of an SD1.5 UNet at 256 px (32x32 latents)
//! through libtorch's own choice (oneDNN's convolution for 3x3 kernels, an
//! MKL GEMM for 1x1 on one thread) and through `sdtune::models::conv::conv2d`,
//! which computes some as one oneDNN product per image.
//!
//!     OMP_NUM_THREADS=1 cargo run --release --example bench_conv
//!
//! Forward at batch 2 (sampling with guidance) and forward + backward to the
//! input at batch 1 (LoRA training: the weight is frozen). Best of 4 after a
//! warm-up, the two sides alternating twice. Prints a Markdown table for
//! BENCHMARKS.md.
use sdtune::models::conv;
use tch::{Device, Kind, Tensor};

mod kernel_timing;

/// (input channels, output channels, kernel, input side, stride, layers of this shape in the UNet).
const SHAPES: [(i64, i64, i64, i64, i64, usize); 31] = [
    (320, 320, 3, 32, 1, 7),
    (320, 320, 3, 32, 2, 1),
    (960, 320, 3, 32, 1, 1),
    (640, 320, 3, 32, 1, 2),
    (640, 640, 3, 32, 1, 1),
    (320, 640, 3, 16, 1, 1),
    (640, 640, 3, 16, 1, 6),
    (640, 640, 3, 16, 2, 1),
    (960, 640, 3, 16, 1, 1),
    (1280, 640, 3, 16, 1, 1),
    (1920, 640, 3, 16, 1, 1),
    (1280, 1280, 3, 16, 1, 1),
    (640, 1280, 3, 8, 1, 1),
    (1280, 1280, 3, 8, 1, 7),
    (1280, 1280, 3, 8, 2, 1),
    (1920, 1280, 3, 8, 1, 1),
    (2560, 1280, 3, 8, 1, 2),
    (1280, 1280, 3, 4, 1, 11),
    (2560, 1280, 3, 4, 1, 3),
    (4, 320, 3, 32, 1, 1),
    (320, 4, 3, 32, 1, 1),
    (320, 320, 1, 32, 1, 10),
    (640, 640, 1, 16, 1, 10),
    (1280, 1280, 1, 8, 1, 12),
    (320, 640, 1, 16, 1, 1),
    (640, 1280, 1, 8, 1, 1),
    (2560, 1280, 1, 4, 1, 3),
    (2560, 1280, 1, 8, 1, 2),
    (1920, 1280, 1, 8, 1, 1),
    (1920, 640, 1, 16, 1, 1),
    (640, 320, 1, 32, 1, 2),
];

fn main() {
    let opts = (Kind::Float, Device::Cpu);
    println!("| in -> out | kernel | map | stride | layers | fwd b2 libtorch ms | fwd b2 sdtune ms | fwd+bwd b1 libtorch ms | fwd+bwd b1 sdtune ms |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut totals = [0.0; 4];
    for (cin, cout, kernel, side, stride, layers) in SHAPES {
        let weight = Tensor::randn([cout, cin, kernel, kernel], opts) * 0.01;
        let bias = Tensor::randn([cout], opts);
        let pad = kernel / 2;
        let x2 = Tensor::randn([2, cin, side, side], opts);
        let x1 = Tensor::randn([1, cin, side, side], opts).set_requires_grad(true);
        let libtorch = |x: &Tensor| x.conv2d(&weight, Some(&bias), [stride, stride], [pad, pad], [1, 1], 1);
        let ours = |x: &Tensor| conv::conv2d(x, &weight, &bias, stride, pad);
        let row = kernel_timing::ab_row(&x2, &x1, libtorch, ours);
        for (total, ms) in totals.iter_mut().zip(row) {
            *total += ms * layers as f64;
        }
        println!(
            "| {cin} -> {cout} | {kernel}x{kernel} | {side}x{side} | {stride} | {layers} | {:.1} | {:.1} | {:.1} | {:.1} |",
            row[0], row[1], row[2], row[3]
        );
    }
    println!(
        "| all convolutions (x layers) | | | | | {:.0} | {:.0} | {:.0} | {:.0} |",
        totals[0], totals[1], totals[2], totals[3]
    );
}
