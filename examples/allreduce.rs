//! The time of the one all-reduce a data-parallel training step makes: the
//! flat fp32 LoRA gradient (plus the loss) summed over the processes, over
//! c10d's Gloo on the CPU (NCCL with `--cuda`, one GPU per process).
//!
//!     cargo run --release --example allreduce -- [--nproc 2] [--iters 50] [--cuda]
//!
//! Starts `--nproc` copies of itself on 127.0.0.1 and prints, for each
//! gradient size, the median and best seconds per all-reduce on rank 0.
//! Sizes: rank-16 LoRA on the cross-attention projections (sdtune's
//! default targets), 16 x (6 C + 2 D) per transformer block of width C and
//! cross-attention width D: SD1.5 16 blocks (5 of 320, 5 of 640, 6 of 1280,
//! D 768) = 1,591,296; SDXL base 70 blocks (10 of 640, 60 of 1280, D 2048)
//! = 12,574,720, as `sdtune bench train --arch sdxl` reports.
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sdtune::train::c10d::{Backend, JoinSpec, ProcessGroup};
use tch::{Device, Kind, Tensor};

const SIZES: [(&str, i64); 2] = [("SD1.5 rank 16", 1_591_296), ("SDXL rank 16", 12_574_720)];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| -> Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => args.get(i + 1).context("a flag without its value")?.parse().context("not a number"),
            None => Ok(default),
        }
    };
    let (nproc, iters, cuda) = (flag("--nproc", 2)?, flag("--iters", 50)?, args.iter().any(|a| a == "--cuda"));
    if let Some(missing) = sdtune::train::c10d::missing() {
        bail!("{missing}");
    }
    match std::env::var("RANK") {
        Ok(rank) => rank_main(rank.parse()?, nproc, iters, cuda),
        Err(_) => launch(nproc),
    }
}

fn launch(nproc: usize) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for rank in 0..nproc {
        let child = Command::new(&exe).args(std::env::args().skip(1)).env("RANK", rank.to_string()).env("MASTER_PORT", port.to_string()).spawn()?;
        children.push(child);
    }
    for mut child in children {
        if !child.wait()?.success() {
            bail!("a rank failed");
        }
    }
    Ok(())
}

fn rank_main(rank: usize, nproc: usize, iters: usize, cuda: bool) -> Result<()> {
    let port: u16 = std::env::var("MASTER_PORT")?.parse()?;
    let (backend, device) = if cuda { (Backend::Nccl, Device::Cuda(rank)) } else { (Backend::Gloo, Device::Cpu) };
    let spec = JoinSpec {
        backend,
        rank,
        world_size: nproc,
        addr: "127.0.0.1".into(),
        port,
        timeout: Duration::from_secs(60),
        agent_store: false,
        cuda_device: rank,
    };
    let group = ProcessGroup::join(&spec)?;
    for (name, numel) in SIZES {
        let mut buffer = Tensor::ones([numel + 1], (Kind::Float, device));
        for _ in 0..5 {
            group.all_reduce_sum(&mut buffer)?;
        }
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            group.barrier()?;
            let began = Instant::now();
            group.all_reduce_sum(&mut buffer)?;
            if cuda {
                tch::Cuda::synchronize(rank as i64);
            }
            times.push(began.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        if rank == 0 {
            let mb = (numel + 1) as f64 * 4.0 / 1e6;
            println!(
                "{name}: {numel} floats ({mb:.1} MB), {nproc} processes over {}: median {:.2} ms, best {:.2} ms per all-reduce",
                backend.name(),
                times[times.len() / 2] * 1e3,
                times[0] * 1e3
            );
        }
    }
    Ok(())
}
