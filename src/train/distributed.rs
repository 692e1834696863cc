//! Data-parallel training as one process of a job: where the job is (from
//! torchrun's environment variables, which `sdtune train --nproc`, torchrun,
//! SLURM wrappers or another node set), joining it over c10d, and the
//! [`GradientSync`] that sums each step's flat gradient and loss over the
//! processes and divides them by the world size.
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind, Tensor};

use super::c10d::{Backend, JoinSpec, ProcessGroup};
use super::sync::GradientSync;

/// A process's place in a job, as torchrun describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// `TORCHELASTIC_USE_AGENT_STORE=True`: torchrun's agent serves the store.
    pub agent_store: bool,
}

/// The variables that place a process in a job.
pub const JOB_VARS: [&str; 7] =
    ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"];

impl JobEnv {
    /// The job this process belongs to, when `RANK` or `WORLD_SIZE` is set.
    pub fn from_env() -> Result<Option<JobEnv>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`Self::from_env`], reading variables through `var`.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Option<JobEnv>> {
        if var("RANK").is_none() && var("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let number = |name: &str, default: Option<usize>| -> Result<usize> {
            match (var(name), default) {
                (Some(text), _) => text
                    .trim()
                    .parse()
                    .map_err(|_| anyhow!("{name}={text:?} is not a whole number; torchrun sets it to this process's place in the job")),
                (None, Some(d)) => Ok(d),
                (None, None) => bail!("RANK or WORLD_SIZE is set but {name} is not; set all of RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun does), or none to train alone"),
            }
        };
        let rank = number("RANK", None)?;
        let world_size = number("WORLD_SIZE", None)?;
        if world_size == 0 || rank >= world_size {
            bail!("RANK={rank} is not below WORLD_SIZE={world_size}; each process of a job of N has a RANK from 0 to N-1");
        }
        let local_rank = number("LOCAL_RANK", Some(rank))?;
        let local_world_size = number("LOCAL_WORLD_SIZE", Some(world_size))?;
        let Some(master_addr) = var("MASTER_ADDR").filter(|a| !a.trim().is_empty()) else {
            bail!("RANK is set but MASTER_ADDR is not; set it to the host of rank 0 (torchrun does)");
        };
        let port = number("MASTER_PORT", None)?;
        let Ok(master_port) = u16::try_from(port) else { bail!("MASTER_PORT={port} is not a port (1 to 65535)") };
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True" || v == "1");
        Ok(Some(JobEnv { rank, local_rank, world_size, local_world_size, master_addr: master_addr.trim().into(), master_port, agent_store }))
    }

    /// The device this process trains on: CUDA device LOCAL_RANK when the
    /// run asked for CUDA, else the CPU.
    pub fn device(&self, wanted: Device) -> Device {
        match wanted {
            Device::Cuda(_) => Device::Cuda(self.local_rank),
            other => other,
        }
    }
}

/// A process of a data-parallel job: its gradients go through c10d.
pub struct DataParallel {
    group: ProcessGroup,
    /// Where the exchanged tensors live (the group's device).
    device: Device,
}

impl DataParallel {
    /// Joins the job `env` describes, with NCCL on CUDA and Gloo on the CPU;
    /// waits for every rank up to `timeout`.
    pub fn join(env: &JobEnv, device: Device, timeout: Duration) -> Result<Self> {
        if let Some(missing) = super::c10d::missing() {
            bail!("{missing}");
        }
        let backend = if device.is_cuda() { Backend::Nccl } else { Backend::Gloo };
        let spec = JoinSpec {
            backend,
            rank: env.rank,
            world_size: env.world_size,
            addr: env.master_addr.clone(),
            port: env.master_port,
            timeout,
            agent_store: env.agent_store,
            cuda_device: env.local_rank,
        };
        let group = ProcessGroup::join(&spec).map_err(|e| {
            let why = e.to_string();
            let why = why.lines().next().unwrap_or("").trim_end_matches('.');
            anyhow!(
                "rank {} of {} could not join the job at {}:{} within {} s ({why}); check MASTER_ADDR and MASTER_PORT and that rank 0 is running",
                env.rank,
                env.world_size,
                env.master_addr,
                env.master_port,
                timeout.as_secs_f64()
            )
        })?;
        Ok(DataParallel { group, device })
    }

    /// The job's process group, e.g. for benchmarks of its collectives.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }
}

impl GradientSync for DataParallel {
    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn world_size(&self) -> usize {
        self.group.world_size()
    }

    /// One all-reduce of the flat gradient with the loss appended, divided
    /// by the world size: every rank ends with the same numbers, so every
    /// rank makes the same finite-check and skip decision after it.
    fn average(&mut self, grad: &mut Tensor, loss: &mut Tensor) -> Result<()> {
        let n = grad.numel() as i64;
        // The loss is one value, or two with prior preservation (total, class).
        let losses = loss.numel() as i64;
        let mut packed = Tensor::cat(&[grad.reshape([-1]), loss.to_kind(Kind::Float).reshape([-1])], 0);
        self.group.all_reduce_sum(&mut packed)?;
        packed /= self.group.world_size() as f64;
        *grad = packed.narrow(0, 0, n);
        *loss = packed.narrow(0, n, losses).reshape(loss.size());
        Ok(())
    }

    fn share_from_main(&mut self, tensors: &[Tensor]) -> Result<()> {
        for t in tensors {
            // The detached view writes the parameter's own storage, outside autograd.
            let mut data = t.detach();
            self.group.broadcast(&mut data, 0)?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.group.barrier()
    }

    fn any(&mut self, flag: bool) -> Result<bool> {
        let mut votes = Tensor::from_slice(&[flag as i32 as f32]).to_device(self.device);
        self.group.all_reduce_sum(&mut votes)?;
        Ok(votes.double_value(&[0]) > 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<JobEnv>> {
        let vars: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        JobEnv::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn torchrun_variables_place_the_process() {
        assert_eq!(env(&[]).unwrap(), None, "no variables: training alone");
        let job = env(&[
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((job.rank, job.local_rank, job.world_size, job.local_world_size), (3, 1, 4, 2));
        assert_eq!((job.master_addr.as_str(), job.master_port, job.agent_store), ("10.0.0.1", 29500, true));
        assert_eq!(job.device(Device::Cuda(0)), Device::Cuda(1));
        assert_eq!(job.device(Device::Cpu), Device::Cpu);
    }

    #[test]
    fn a_half_set_job_is_one_sentence() {
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap_err().to_string();
        assert!(e.contains("below WORLD_SIZE"), "{e}");
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")]).unwrap_err().to_string();
        assert!(e.contains("not a port"), "{e}");
    }
}
