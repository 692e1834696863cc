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

/// Test hook: pretend this many bytes are free, so a test can meet the
/// memory checks on any machine. Not for users.
const AVAILABLE_MEMORY_ENV: &str = "SDTUNE_TEST_AVAILABLE_MEMORY";

/// Free memory where `device` computes: the CPU's available memory (Linux),
/// the CUDA device's free memory as the driver sees it; unknown elsewhere,
/// where callers apply only their size bounds.
pub fn available_memory(device: Device) -> Option<u64> {
    if let Some(bytes) = std::env::var(AVAILABLE_MEMORY_ENV).ok().and_then(|v| v.parse().ok()) {
        return Some(bytes);
    }
    if let Device::Cuda(index) = device {
        return cuda_mem_get_info(index).map(|(free, _)| free as u64);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// (free, total) bytes of CUDA device `index`, from the driver.
pub fn cuda_mem_get_info(index: usize) -> Option<(usize, usize)> {
    cudart::mem_get_info(index)
}

/// `cudaMemGetInfo` through the CUDA runtime libtorch already loaded, found
/// with `dlopen`, so nothing links against CUDA at build time.
mod cudart {
    use std::ffi::{c_char, c_int, c_void, CString};

    extern "C" {
        fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }
    const RTLD_LAZY: c_int = 1;

    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
    type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
    type GetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;

    fn symbol(name: &str) -> Option<*mut c_void> {
        for lib in ["libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
            let lib = CString::new(lib).ok()?;
            // SAFETY: dlopen/dlsym with valid C strings; a null result is checked.
            let handle = unsafe { dlopen(lib.as_ptr(), RTLD_LAZY) };
            if handle.is_null() {
                continue;
            }
            let sym = CString::new(name).ok()?;
            let f = unsafe { dlsym(handle, sym.as_ptr()) };
            if !f.is_null() {
                return Some(f);
            }
        }
        None
    }

    /// (free, total) bytes of device `index`.
    pub fn mem_get_info(index: usize) -> Option<(usize, usize)> {
        let get_info = symbol("cudaMemGetInfo")?;
        let set_device = symbol("cudaSetDevice")?;
        let get_device = symbol("cudaGetDevice")?;
        // SAFETY: the symbols have these C signatures in every CUDA runtime.
        unsafe {
            let get_info: MemGetInfo = std::mem::transmute(get_info);
            let set_device: SetDevice = std::mem::transmute(set_device);
            let get_device: GetDevice = std::mem::transmute(get_device);
            let mut current: c_int = 0;
            if get_device(&mut current) != 0 {
                return None;
            }
            if current != index as c_int && set_device(index as c_int) != 0 {
                return None;
            }
            let (mut free, mut total) = (0usize, 0usize);
            let rc = get_info(&mut free, &mut total);
            if current != index as c_int {
                set_device(current);
            }
            (rc == 0).then_some((free, total))
        }
    }
}

/// Bytes as GiB with one decimal, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

/// Bytes for messages: "6.4 MiB" under a GiB, else "16.0 GiB".
pub fn bytes(n: u64) -> String {
    if n < 1 << 30 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{} GiB", gib(n))
    }
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
    /// The CPU's matrix instruction sets oneDNN uses, from its flags.
    pub cpu_isa: Vec<&'static str>,
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
            cpu_isa: cpu_isa(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()),
        }
    }
}

/// `--precision auto`: bf16 on CUDA (fp16 where bf16 does not compute);
/// on a CPU, bf16 only where it has native bf16 instructions and a short
/// matmul probe finds bf16 at least 1.3x fp32 there, else fp32. Says why
/// on stderr when it picks bf16 on a CPU.
pub fn auto_precision(device: Device) -> Precision {
    if device.is_cuda() {
        return if supports(device, Kind::BFloat16) { Precision::Bf16 } else { Precision::Fp16 };
    }
    if !native_bf16_cpu() || !supports(device, Kind::BFloat16) {
        return Precision::Fp32;
    }
    let ratio = crate::matmul_probe::matmul_gflops(device, Kind::BFloat16) / crate::matmul_probe::matmul_gflops(device, Kind::Float).max(1e-9);
    if ratio >= 1.3 {
        eprintln!("precision auto: bf16 (a bf16 matmul runs {ratio:.1}x as fast as fp32 on this CPU)");
        Precision::Bf16
    } else {
        Precision::Fp32
    }
}

/// Whether this machine's CPU computes bf16 natively (AVX512-BF16 or AMX).
pub fn native_bf16_cpu() -> bool {
    static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NATIVE.get_or_init(|| has_native_bf16(&cpu_isa(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())))
}

/// Whether instruction sets named as [`cpu_isa`] names them compute bf16 natively.
pub fn has_native_bf16(isa: &[&str]) -> bool {
    isa.iter().any(|f| *f == "avx512_bf16" || *f == "amx_bf16")
}

/// Which of the instruction sets that decide oneDNN's fp32/bf16 speed the
/// first CPU of a `/proc/cpuinfo` text has, in the kernel's flag names.
/// Native bf16 compute needs `avx512_bf16` or `amx_bf16`; without them bf16
/// on the CPU is emulated and slower than fp32.
pub fn cpu_isa(cpuinfo: &str) -> Vec<&'static str> {
    const KNOWN: [&str; 6] = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"];
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    KNOWN.into_iter().filter(|k| flags.contains(k)).collect()
}

#[cfg(test)]
mod cpu_isa_tests {
    #[test]
    fn native_bf16_needs_avx512_bf16_or_amx() {
        assert!(super::has_native_bf16(&["avx2", "amx_bf16"]) && super::has_native_bf16(&["avx512_bf16"]));
        assert!(!super::has_native_bf16(&["avx2", "fma", "avx512f", "amx_tile"]));
    }

    #[test]
    fn reads_the_first_cpus_flags() {
        let text = "processor\t: 0\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_tile\nprocessor\t: 1\nflags\t: sse\n";
        assert_eq!(super::cpu_isa(text), vec!["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]);
        assert!(super::cpu_isa("").is_empty());
    }
}

/// The libtorch sdtune was linked against, read from the wheel at build time.
pub fn tch_version() -> String {
    option_env!("SDTUNE_LIBTORCH_VERSION").unwrap_or("unknown").to_string()
}

/// Keeps memory glibc's malloc got from the kernel for reuse instead of
/// handing it back after every free. Each training or denoising step
/// allocates and frees the same activations; by default glibc trims the
/// heap top and its mmap threshold drifts, so every step page-faults much of
/// its memory in again (sampling SD1.5 at 256 px on the CPU spent a fifth of
/// its time in the kernel). Here blocks under 32 MiB (glibc's largest mmap
/// threshold) always come from the heap, which is never trimmed; bigger ones
/// are still mapped fresh and returned, so the heap does not fragment around
/// them and the peak resident set stays as low as before. Call once at
/// start-up. `SDTUNE_MALLOC=default` in the environment turns it off;
/// elsewhere than glibc it does nothing.
pub fn keep_freed_memory() {
    mallopt_unless_default(&[(M_TRIM_THRESHOLD, -1), (M_MMAP_THRESHOLD, 32 << 20)]);
}

/// Also serves blocks of 32 MiB and more from the heap. For CPU training:
/// a LoRA step's backward allocates many such blocks, the same ones every
/// step, so they are reused without faults and the peak is unchanged (an
/// SD1.5 step at 256 px: 13% less CPU time). Not for sampling, whose UNet
/// and VAE phases want different big blocks: there the heap would fragment.
pub fn keep_freed_big_blocks() {
    mallopt_unless_default(&[(M_TRIM_THRESHOLD, -1), (M_MMAP_MAX, 0)]);
}

const M_TRIM_THRESHOLD: i32 = -1;
const M_MMAP_THRESHOLD: i32 = -3;
const M_MMAP_MAX: i32 = -4;

fn mallopt_unless_default(settings: &[(i32, i32)]) {
    if std::env::var_os("SDTUNE_MALLOC").is_some_and(|v| v == "default") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        for &(param, value) in settings {
            // SAFETY: mallopt only changes malloc's tuning parameters.
            unsafe {
                mallopt(param, value);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = settings;
}
