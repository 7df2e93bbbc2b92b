//! Training batches are built by `crate::batch`; these names stay for the training loop until
//! it calls `MaskedBatch::from_samples` itself.

use crate::masking::MaskedSample;
use tch::Device;

pub use crate::batch::MaskedBatch as Batch;

/// `MaskedBatch::from_samples`.
pub fn collate(samples: &[MaskedSample], pad_id: u32, device: Device) -> Batch {
    Batch::from_samples(samples, pad_id, device)
}
