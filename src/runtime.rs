//! Device and precision choices, and what `sdtune doctor` reports.
use anyhow::{bail, Result};
use tch::{Device, Kind};

/// `--device auto|cpu|cuda|cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    Ok(match spec {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda was asked for but libtorch sees no CUDA device; run `sdtune doctor`, or use --device cpu");
            }
            Device::Cuda(0)
        }
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if (n as i64) < tch::Cuda::device_count() => Device::Cuda(n),
            Some(n) => bail!("--device cuda:{n} does not exist; this machine has {} CUDA device(s)", tch::Cuda::device_count()),
            None => bail!("--device {other:?} is not one of auto, cpu, cuda, cuda:N"),
        },
    })
}

/// Weight precision for the frozen model: `--precision fp32|bf16|fp16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

impl Precision {
    pub fn parse(spec: &str) -> Result<Self> {
        Ok(match spec {
            "fp32" | "float32" | "no" => Precision::Fp32,
            "bf16" | "bfloat16" => Precision::Bf16,
            "fp16" | "float16" | "half" => Precision::Fp16,
            other => bail!("--precision {other:?} is not one of fp32, bf16, fp16"),
        })
    }

    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp16 => Kind::Half,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}

/// Whether `kind` computes on `device` (a tiny matmul tried for real).
pub fn supports(device: Device, kind: Kind) -> bool {
    let attempt = || -> Result<(), tch::TchError> {
        let a = tch::Tensor::f_ones([4, 4], (kind, device))?;
        let b = a.f_matmul(&a)?;
        let _ = b.f_sum(kind)?.f_double_value(&[])?;
        Ok(())
    };
    attempt().is_ok()
}

/// Facts `sdtune doctor` prints.
pub struct Doctor {
    pub libtorch: String,
    pub cuda: bool,
    pub cudnn: bool,
    pub devices: Vec<String>,
    pub bf16_cpu: bool,
    pub bf16_cuda: Option<bool>,
    pub threads: i32,
}

impl Doctor {
    pub fn gather() -> Self {
        let cuda = tch::Cuda::is_available();
        let count = if cuda { tch::Cuda::device_count() } else { 0 };
        let devices = (0..count).map(|i| format!("cuda:{i}")).collect();
        Doctor {
            libtorch: tch_version(),
            cuda,
            cudnn: tch::Cuda::cudnn_is_available(),
            devices,
            bf16_cpu: supports(Device::Cpu, Kind::BFloat16),
            bf16_cuda: cuda.then(|| supports(Device::Cuda(0), Kind::BFloat16)),
            threads: tch::get_num_threads(),
        }
    }
}

/// The libtorch sdtune was linked against, read from the wheel at build time.
pub fn tch_version() -> String {
    option_env!("SDTUNE_LIBTORCH_VERSION").unwrap_or("unknown").to_string()
}

/// Keeps memory glibc's malloc got from the kernel for reuse instead of
/// handing it back after every free. Each training step or denoising step
/// allocates and frees the same activations (gigabytes at SD sizes); by
/// default glibc serves big blocks with fresh `mmap`s and trims the heap
/// top, so every step page-faults its activations in again (a fifth of the
/// CPU time of an SD1.5 LoRA step at 256 px went to the kernel). The peak
/// resident set is unchanged: it is set by the largest step, which the
/// process needs either way. Call once at start-up; elsewhere than glibc it
/// does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_MAX: std::ffi::c_int = -4;
        // SAFETY: mallopt only changes malloc's tuning; -1 disables trimming, 0 disables mmap'd chunks.
        unsafe {
            mallopt(M_TRIM_THRESHOLD, -1);
            mallopt(M_MMAP_MAX, 0);
        }
    }
}
