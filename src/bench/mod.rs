//! `sdtune bench`: how fast sdtune trains, samples and encodes, and how much
//! memory it needs, on models built from a config with random weights (or
//! loaded), so no download is needed. `scripts/bench-vs-diffusers.sh` runs
//! the same configs through diffusers+peft for ratios.
//!
//! One file per kind of benchmark; `measure` holds what they share.
pub mod arch;
pub mod encode;
pub mod measure;
pub mod sample;
pub mod train;

use tch::Device;

use crate::runtime::Precision;

/// What every benchmark needs: the model, where it runs and at what size.
#[derive(Clone, Debug)]
pub struct Setup {
    pub spec: arch::ModelSpec,
    pub device: Device,
    pub precision: Precision,
    pub resolution: i64,
    pub batch_size: usize,
    /// The device's peak dense TFLOP/s in `precision`, for model FLOP utilisation.
    pub peak_tflops: Option<f64>,
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}
