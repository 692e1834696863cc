//! The machine's own dense-matmul rate, probed in a second or two: the
//! ceiling "how close to the limit" is measured against on a CPU, where no
//! datasheet figure fits every machine (threads, turbo, AVX-512, AMX).
use tch::{Device, Kind, Tensor};


/// Best of a few square matmuls in `kind` on `device`, in GFLOP/s.
pub fn matmul_gflops(device: Device, kind: Kind) -> f64 {
    // Big enough for the BLAS to reach its rate, small enough for a second on 2 cores.
    let n: i64 = if device.is_cuda() { 8192 } else { 1536 };
    let a = Tensor::randn([n, n], (Kind::Float, device)).to_kind(kind);
    let b = Tensor::randn([n, n], (Kind::Float, device)).to_kind(kind);
    let flops = 2.0 * (n as f64).powi(3);
    let best = |product: &dyn Fn() -> Tensor| {
        let _ = product();
        sync(device);
        (0..4)
            .map(|_| {
                let start = std::time::Instant::now();
                let _ = product();
                sync(device);
                flops / start.elapsed().as_secs_f64().max(1e-9) / 1e9
            })
            .fold(0.0, f64::max)
    };
    let libtorch = best(&|| a.matmul(&b));
    // The layers' own fp32 product on the CPU (oneDNN) can be the faster kernel.
    if crate::models::onednn::takes(&a, &b) {
        return libtorch.max(best(&|| crate::models::onednn::linear(&a, &b.tr(), None)));
    }
    libtorch
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}
