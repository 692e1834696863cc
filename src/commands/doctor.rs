//! `sdtune doctor`: what libtorch sdtune runs on and what it can use.
use anyhow::Result;

use crate::runtime::Doctor;

pub fn run() -> Result<()> {
    let d = Doctor::gather();
    println!("sdtune     {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch   {}", d.libtorch);
    println!("threads    {}", d.threads);
    println!("bf16 cpu   {}", yes_no(d.bf16_cpu));
    let native_bf16 = crate::runtime::has_native_bf16(&d.cpu_isa);
    let isa = if d.cpu_isa.is_empty() { "none of avx2, avx512, amx".to_string() } else { d.cpu_isa.join(" ") };
    println!("cpu isa    {isa} (bf16 {})", if native_bf16 { "native" } else { "emulated: expect fp32 to be faster (BENCHMARKS.md)" });
    if d.cuda {
        println!("cuda       yes ({})", d.devices.join(", "));
        println!("cudnn      {}", yes_no(d.cudnn));
        println!("bf16 cuda  {}", yes_no(d.bf16_cuda.unwrap_or(false)));
    } else {
        println!("cuda       no (training and sampling run on the CPU)");
    }
    match crate::train::c10d::missing() {
        None => println!("--nproc    gloo yes, nccl {}", yes_no(crate::train::c10d::has_nccl())),
        Some(_) => println!("--nproc    no (built without gloo's headers; scripts/bootstrap.sh installs libgloo-dev)"),
    }
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
