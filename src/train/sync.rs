//! The seam between computing a step's gradients and applying them: where
//! data-parallel processes would average their adapter gradients (one flat
//! buffer per optimizer step), and which process is the main one that
//! alone writes files. A single process syncs nothing.
use anyhow::Result;
use tch::Tensor;

/// This process's place in a training job and the gradient exchange.
pub trait GradientSync {
    /// 0 for the main process.
    fn rank(&self) -> usize;
    /// Processes in the job (1 for a single process).
    fn world_size(&self) -> usize;
    /// Replaces `grad` (the flat fp32 adapter gradient, loss-scaled) and
    /// `loss` (this process's mean loss) by their means over all processes.
    fn average(&mut self, grad: &mut Tensor, loss: &mut Tensor) -> Result<()>;
    /// Gives every process the main process's `tensors` (the trained
    /// weights at the start), in place.
    fn share_from_main(&mut self, _tensors: &[Tensor]) -> Result<()> {
        Ok(())
    }
    /// Returns once every process has called it: the others wait here
    /// while the main one writes files.
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    /// Whether `flag` is true on any process (a stop one of them was asked
    /// for), the same answer on all.
    fn any(&mut self, flag: bool) -> Result<bool> {
        Ok(flag)
    }
    /// The one process whose side effects (files, grids, logs, metrics) happen.
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
}

/// Training in one process: nothing to exchange.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl GradientSync for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn average(&mut self, _grad: &mut Tensor, _loss: &mut Tensor) -> Result<()> {
        Ok(())
    }
}
