//! libtorch's c10d process group (TCPStore rendezvous, Gloo on the CPU,
//! NCCL on CUDA) through sdtune's shim, `src/native/distributed.cpp`; this
//! is its safe face. Built without gloo's headers, every call says what is
//! missing instead.
use std::time::Duration;

use anyhow::Result;
use tch::Tensor;

/// The collective library a group runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors.
    Gloo,
    /// CUDA tensors, one device per process.
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// Where and how a process joins its job.
#[derive(Clone, Debug)]
pub struct JoinSpec {
    pub backend: Backend,
    pub rank: usize,
    pub world_size: usize,
    /// The store's host (MASTER_ADDR) and port (MASTER_PORT).
    pub addr: String,
    pub port: u16,
    /// How long joining and each collective may take.
    pub timeout: Duration,
    /// torchrun's agent serves the store already (TORCHELASTIC_USE_AGENT_STORE).
    pub agent_store: bool,
    /// The CUDA device of an NCCL group (LOCAL_RANK).
    pub cuda_device: usize,
}

/// Why this build cannot make a group, if it cannot.
pub fn missing() -> Option<&'static str> {
    let missing = env!("SDTUNE_DISTRIBUTED_MISSING");
    (!missing.is_empty()).then_some(missing)
}

/// Whether this build can make NCCL groups.
pub fn has_nccl() -> bool {
    imp::has_nccl()
}

/// This process's membership of a job; leaving is dropping it.
pub struct ProcessGroup {
    inner: imp::Group,
    rank: usize,
    world_size: usize,
}

impl ProcessGroup {
    /// Joins the job `spec` describes: returns once every rank has.
    pub fn join(spec: &JoinSpec) -> Result<Self> {
        Ok(ProcessGroup { inner: imp::Group::join(spec)?, rank: spec.rank, world_size: spec.world_size })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Sums `tensor` (contiguous, on this group's device) over all ranks, in place.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        self.inner.all_reduce_sum(tensor)
    }

    /// Replaces `tensor` on every rank by rank `root`'s, in place.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        self.inner.broadcast(tensor, root)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
}

#[cfg(sdtune_gloo)]
mod imp {
    use std::ffi::{c_char, c_int, c_void, CStr, CString};

    use anyhow::{anyhow, bail, Result};
    use tch::Tensor;
    use torch_sys::C_tensor;

    use super::JoinSpec;

    extern "C" {
        fn sdtune_dist_has_nccl() -> c_int;
        fn sdtune_dist_init(
            backend: *const c_char,
            rank: c_int,
            world: c_int,
            addr: *const c_char,
            port: c_int,
            timeout_ms: i64,
            agent_store: c_int,
            cuda_device: c_int,
            error: *mut *mut c_char,
        ) -> *mut c_void;
        fn sdtune_dist_all_reduce_sum(group: *mut c_void, tensor: *mut C_tensor) -> *mut c_char;
        fn sdtune_dist_broadcast(group: *mut c_void, tensor: *mut C_tensor, root: c_int) -> *mut c_char;
        fn sdtune_dist_barrier(group: *mut c_void) -> *mut c_char;
        fn sdtune_dist_shutdown(group: *mut c_void);
    }

    pub fn has_nccl() -> bool {
        // SAFETY: reads a constant.
        unsafe { sdtune_dist_has_nccl() != 0 }
    }

    /// The shim's group; C++ owns what it points to until shutdown.
    pub struct Group(*mut c_void);

    /// A malloc'ed message from the shim, or Ok for NULL.
    fn taken(message: *mut c_char) -> std::result::Result<(), String> {
        if message.is_null() {
            return Ok(());
        }
        // SAFETY: a NUL-terminated string from malloc, ours to free.
        unsafe {
            let text = CStr::from_ptr(message).to_string_lossy().trim().to_string();
            libc::free(message as *mut c_void);
            Err(text)
        }
    }

    impl Group {
        pub fn join(spec: &JoinSpec) -> Result<Self> {
            let backend = CString::new(spec.backend.name())?;
            let Ok(addr) = CString::new(spec.addr.clone()) else { bail!("MASTER_ADDR {:?} holds a NUL byte", spec.addr) };
            let mut error: *mut c_char = std::ptr::null_mut();
            // SAFETY: the strings live through the call; `error` receives a malloc'ed message or stays NULL.
            let group = unsafe {
                sdtune_dist_init(
                    backend.as_ptr(),
                    spec.rank as c_int,
                    spec.world_size as c_int,
                    addr.as_ptr(),
                    spec.port as c_int,
                    spec.timeout.as_millis() as i64,
                    spec.agent_store as c_int,
                    spec.cuda_device as c_int,
                    &mut error,
                )
            };
            match taken(error) {
                Err(message) => Err(anyhow!("{message}")),
                Ok(()) if group.is_null() => Err(anyhow!("c10d returned no process group and no reason")),
                Ok(()) => Ok(Group(group)),
            }
        }

        pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
            // SAFETY: a live group and a live tensor, borrowed for the call.
            taken(unsafe { sdtune_dist_all_reduce_sum(self.0, tensor.as_mut_ptr()) }).map_err(|m| anyhow!("the all-reduce failed: {m}"))
        }

        pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
            // SAFETY: as above.
            taken(unsafe { sdtune_dist_broadcast(self.0, tensor.as_mut_ptr(), root as c_int) }).map_err(|m| anyhow!("the broadcast failed: {m}"))
        }

        pub fn barrier(&self) -> Result<()> {
            // SAFETY: a live group.
            taken(unsafe { sdtune_dist_barrier(self.0) }).map_err(|m| anyhow!("the barrier failed: {m}"))
        }
    }

    impl Drop for Group {
        fn drop(&mut self) {
            // SAFETY: the group is ours and not used again.
            unsafe { sdtune_dist_shutdown(self.0) }
        }
    }
}

#[cfg(not(sdtune_gloo))]
mod imp {
    use anyhow::{anyhow, Result};
    use tch::Tensor;

    use super::JoinSpec;

    pub fn has_nccl() -> bool {
        false
    }

    /// Never made: this build has no c10d shim.
    pub struct Group(std::convert::Infallible);

    impl Group {
        pub fn join(_spec: &JoinSpec) -> Result<Self> {
            Err(anyhow!("{}", super::missing().unwrap_or("this sdtune was built without the c10d shim")))
        }

        pub fn all_reduce_sum(&self, _tensor: &mut Tensor) -> Result<()> {
            match self.0 {}
        }

        pub fn broadcast(&self, _tensor: &mut Tensor, _root: usize) -> Result<()> {
            match self.0 {}
        }

        pub fn barrier(&self) -> Result<()> {
            match self.0 {}
        }
    }
}
