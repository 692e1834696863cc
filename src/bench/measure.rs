//! What every benchmark measures the same way: wall time with the device
//! drained, peak memory, model FLOP utilisation, and how results print.
use std::time::Instant;

use serde_json::{Map, Value};
use tch::Device;

/// Waits until `device` has finished all queued work (no-op on the CPU).
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// How long something took: wall-clock seconds and the CPU seconds this
/// process spent (user + system, all threads). On a machine shared with
/// other work the CPU seconds are the steadier figure.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub wall: f64,
    pub cpu: Option<f64>,
}

/// Times `f`, with the device drained before and after.
pub fn timed<T>(device: Device, f: impl FnOnce() -> T) -> (T, Timing) {
    sync(device);
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let out = f();
    sync(device);
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (cpu0, cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    (out, Timing { wall, cpu })
}

/// User + system CPU seconds of this process so far (`/proc/self/stat`,
/// in clock ticks of 1/100 s).
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// A `/proc/PID/status` field in MiB (`VmHWM`: peak resident set, `VmRSS`: now).
fn proc_status_mb(pid: &str, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Peak resident set size of this process so far, in MiB (Linux `VmHWM`).
pub fn peak_rss_mb() -> Option<f64> {
    proc_status_mb("self", "VmHWM:")
}

/// Peak resident set size of another process (a server a test started), in MiB.
pub fn peak_rss_mb_of(pid: u32) -> Option<f64> {
    proc_status_mb(&pid.to_string(), "VmHWM:")
}

/// Resident set size now, in MiB.
pub fn rss_mb() -> Option<f64> {
    proc_status_mb("self", "VmRSS:")
}

/// Device memory in use on a CUDA device, in MiB, as the driver sees it
/// (`cudaMemGetInfo`: total - free). libtorch's C API, and so tch, does not
/// expose the caching allocator's statistics (`torch.cuda.max_memory_allocated`);
/// but the caching allocator keeps what it reserved until told otherwise, so
/// the growth of this figure over a run is the allocator's reserved peak, an
/// upper bound of its allocated peak.
pub fn cuda_used_mb(device: Device) -> Option<f64> {
    let Device::Cuda(index) = device else { return None };
    crate::runtime::cuda_mem_get_info(index).map(|(free, total)| (total - free) as f64 / (1024.0 * 1024.0))
}

/// Tracks peak memory over a benchmark: peak RSS on the CPU; on CUDA, the
/// device memory in use above what it was at `start` (after the CUDA
/// context existed, before the model was built).
pub struct MemoryMeter {
    device: Device,
    cuda_baseline_mb: Option<f64>,
    cuda_peak_mb: f64,
}

impl MemoryMeter {
    pub fn start(device: Device) -> Self {
        if device.is_cuda() {
            // Creates the CUDA context, so its own memory is not counted.
            let _ = tch::Tensor::zeros([1], (tch::Kind::Float, device));
            sync(device);
        }
        MemoryMeter { device, cuda_baseline_mb: cuda_used_mb(device), cuda_peak_mb: 0.0 }
    }

    /// Records the device memory now (call after each timed round).
    pub fn sample(&mut self) {
        if let (Some(base), Some(now)) = (self.cuda_baseline_mb, cuda_used_mb(self.device)) {
            self.cuda_peak_mb = self.cuda_peak_mb.max(now - base);
        }
    }

    /// The fields the report shows: `peak_mem_mb` and what it is.
    pub fn report(&mut self, out: &mut Map<String, Value>) {
        self.sample();
        let rss = peak_rss_mb();
        out.insert("peak_rss_mb".into(), num(rss));
        if self.device.is_cuda() {
            let cuda = self.cuda_baseline_mb.map(|_| self.cuda_peak_mb);
            out.insert("peak_mem_mb".into(), num(cuda));
            out.insert(
                "peak_mem_kind".into(),
                Value::from(if cuda.is_some() {
                    "cuda reserved (cudaMemGetInfo growth; upper bound of max_memory_allocated)"
                } else {
                    "unavailable (libcudart not found)"
                }),
            );
        } else {
            out.insert("peak_mem_mb".into(), num(rss));
            out.insert("peak_mem_kind".into(), Value::from("cpu peak RSS (VmHWM)"));
        }
    }
}

/// A JSON number rounded to 4 significant decimals, or null.
pub fn num(v: Option<f64>) -> Value {
    match v {
        Some(x) if x.is_finite() => {
            let rounded = if x.abs() >= 100.0 { (x * 10.0).round() / 10.0 } else { (x * 1e4).round() / 1e4 };
            Value::from(rounded)
        }
        _ => Value::Null,
    }
}

/// Model FLOP utilisation: the model FLOPs done per second over the
/// device's peak.
pub fn mfu(tflop_per_second: Option<f64>, peak_tflops: Option<f64>) -> Option<f64> {
    match (tflop_per_second, peak_tflops) {
        (Some(t), Some(p)) if p > 0.0 => Some(t / p),
        _ => None,
    }
}

/// The FLOP-rate fields of every benchmark: the achieved model GFLOP/s,
/// the probed matmul peak and their ratio, and the MFU against the given
/// datasheet peak (`--peak-tflops`, 790 on CUDA), when there is one.
pub fn insert_flop_rate(out: &mut Map<String, Value>, model_flops: f64, seconds: f64, probed_peak_gflops: f64, peak_tflops: Option<f64>) {
    let achieved = model_flops / seconds.max(1e-12) / 1e9;
    out.insert("achieved_gflops".into(), num(Some(achieved)));
    out.insert("probed_peak_gflops".into(), num(Some(probed_peak_gflops)));
    out.insert("fraction_of_probed_peak".into(), num((probed_peak_gflops > 0.0).then(|| achieved / probed_peak_gflops)));
    out.insert("mfu".into(), num(mfu(Some(achieved / 1e3), peak_tflops)));
}

/// Prints `fields` as a two-column table on stderr and as one JSON line on stdout.
pub fn print(title: &str, fields: &Map<String, Value>) {
    let width = fields.keys().map(String::len).max().unwrap_or(0);
    eprintln!("{title}");
    for (key, value) in fields {
        let shown = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        eprintln!("  {key:<width$}  {shown}");
    }
    println!("{}", Value::Object(fields.clone()));
}
