//! Collective communication between the ranks of a job, behind one trait: NCCL on GPUs, a TCP
//! ring on CPUs, and the trivial single-rank group.

pub mod nccl;
pub mod ring;

use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("collective {op} failed: {message}")]
    Failed { op: &'static str, message: String },
    #[error("collective {op} timed out after {seconds} s: a peer is gone or stuck")]
    Timeout { op: &'static str, seconds: u64 },
    /// A peer closed its connection or NCCL reports it gone: it exited or was killed.
    #[error("collective {op} failed: {reason}")]
    PeerLost { op: &'static str, reason: String },
}

/// Collectives over flat fp32 buffers whose length is a multiple of the world size; rank r owns
/// the r-th equal shard.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In place: afterwards shard r of `flat` holds the sum over ranks of shard r.
    fn reduce_scatter_sum(&mut self, flat: &Tensor) -> Result<(), CommError>;
    /// In place: every rank's shard r is replaced by rank r's shard r.
    fn all_gather(&mut self, flat: &Tensor) -> Result<(), CommError>;
    /// In place: every element becomes the sum over ranks.
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<(), CommError>;
    /// Sums a few scalars over ranks.
    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<(), CommError>;
}

/// A group of one: every collective is the identity.
#[derive(Debug, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn reduce_scatter_sum(&mut self, _flat: &Tensor) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather(&mut self, _flat: &Tensor) -> Result<(), CommError> {
        Ok(())
    }
    fn all_reduce_sum(&mut self, _flat: &Tensor) -> Result<(), CommError> {
        Ok(())
    }
    fn all_reduce_scalars(&mut self, _values: &mut [f64]) -> Result<(), CommError> {
        Ok(())
    }
}

/// The elements of a contiguous fp32 CPU tensor as a mutable slice, for the TCP ring.
#[allow(clippy::mut_from_ref)] // the tensor's storage is shared by design; see SAFETY
pub(crate) fn tensor_f32_mut<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a mut [f32], CommError> {
    if t.kind() != Kind::Float || t.device() != Device::Cpu || !t.is_contiguous() {
        return Err(CommError::Failed {
            op,
            message: format!(
                "needs a contiguous fp32 CPU tensor, got {:?} on {:?}",
                t.kind(),
                t.device()
            ),
        });
    }
    // SAFETY: the tensor is contiguous fp32 on the CPU, so data_ptr points at numel initialised
    // f32 values kept alive by `t` for 'a. While the slice lives, the calling training thread
    // is inside this collective and no other code reads or writes the buffer.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel()) })
}
