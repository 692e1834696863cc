//! `sdtune bench`: how fast sdtune trains, samples and encodes, and how much
//! memory it needs, on models built from a config with random weights (or
//! loaded), so no download is needed. `scripts/bench-vs-diffusers.sh` runs
//! the same configs through diffusers+peft for ratios.
//!
//! One file per kind of benchmark; `measure` holds what they share.
pub mod arch;
pub mod decode;
pub mod encode;
pub mod measure;
pub mod sample;
pub mod train;

use serde_json::{Map, Value};
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

impl Setup {
    /// The first fields of every benchmark's JSON line: what ran, where, at what size.
    pub fn record(&self, bench: &str) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("bench".into(), Value::from(bench));
        out.insert("side".into(), Value::from("sdtune"));
        out.insert("arch".into(), Value::from(self.spec.name()));
        out.insert("device".into(), Value::from(device_name(self.device)));
        out.insert("precision".into(), Value::from(self.precision.name()));
        out.insert("threads".into(), Value::from(tch::get_num_threads()));
        out.insert("resolution".into(), Value::from(self.resolution));
        out.insert("batch_size".into(), Value::from(self.batch_size));
        let kernels = if crate::models::onednn::enabled() { "sdtune" } else { "libtorch" };
        out.insert("kernels".into(), Value::from(kernels));
        out
    }
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}
