//! Dynamic padding, the one input builder of every masked-LM pass (training, evaluation,
//! fill-mask, augmentation): rows of token ids padded to the longest row, the attention mask,
//! and the (row, position) list of the positions to predict, with their labels when known.

use crate::masking::{MaskedSample, IGNORE};
use tch::{Device, Tensor};

/// A batch ready for `ElectraForMaskedLM::logits_at`.
pub struct MaskedBatch {
    /// `[rows, longest row]`, padded with the pad id.
    pub input_ids: Tensor,
    /// `[rows, longest row]`: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[N, 2]` (row, position) of every position to predict, row by row.
    pub positions: Tensor,
    /// `[N]` original ids at those positions (training and evaluation); `[0]` when the rows
    /// carry no labels (inference).
    pub labels: Tensor,
    pub samples: usize,
    /// Real (non-padding) tokens.
    pub tokens: usize,
    /// Positions to predict (N).
    pub masked: usize,
}

/// One inference row: its ids (masks already in place) and the positions to predict.
#[derive(Debug, Clone, Copy)]
pub struct MaskedRow<'a> {
    pub ids: &'a [u32],
    pub masked: &'a [usize],
}

impl MaskedBatch {
    /// Training or evaluation samples: the positions to predict are those with a label.
    pub fn from_samples(samples: &[MaskedSample], pad_id: u32, device: Device) -> Self {
        let mut builder = Builder::new(samples.iter().map(|s| s.input_ids.len()), pad_id);
        for (r, s) in samples.iter().enumerate() {
            builder.row(r, &s.input_ids);
            for (c, &label) in s.labels.iter().enumerate() {
                if label != IGNORE {
                    builder.predict(r, c, Some(label));
                }
            }
        }
        builder.finish(device)
    }

    /// Inference rows, without labels.
    pub fn from_rows(rows: &[MaskedRow<'_>], pad_id: u32, device: Device) -> Self {
        let mut builder = Builder::new(rows.iter().map(|r| r.ids.len()), pad_id);
        for (r, row) in rows.iter().enumerate() {
            builder.row(r, row.ids);
            for &c in row.masked {
                builder.predict(r, c, None);
            }
        }
        builder.finish(device)
    }
}

/// The host-side buffers of a batch, filled row by row.
struct Builder {
    width: usize,
    rows: usize,
    ids: Vec<i64>,
    attention: Vec<i64>,
    positions: Vec<i64>,
    labels: Vec<i64>,
    tokens: usize,
}

impl Builder {
    fn new(lengths: impl ExactSizeIterator<Item = usize>, pad_id: u32) -> Self {
        let rows = lengths.len();
        let width = lengths.max().unwrap_or(0).max(1);
        Self {
            width,
            rows,
            ids: vec![i64::from(pad_id); rows * width],
            attention: vec![0; rows * width],
            positions: Vec::new(),
            labels: Vec::new(),
            tokens: 0,
        }
    }

    fn row(&mut self, r: usize, ids: &[u32]) {
        self.tokens += ids.len();
        let start = r * self.width;
        for (slot, id) in self.ids[start..start + ids.len()].iter_mut().zip(ids) {
            *slot = i64::from(*id);
        }
        self.attention[start..start + ids.len()].fill(1);
    }

    fn predict(&mut self, r: usize, position: usize, label: Option<i64>) {
        self.positions.extend([r as i64, position as i64]);
        if let Some(label) = label {
            self.labels.push(label);
        }
    }

    fn finish(self, device: Device) -> MaskedBatch {
        let shape = [self.rows as i64, self.width as i64];
        MaskedBatch {
            input_ids: to_device(Tensor::from_slice(&self.ids).view(shape), device),
            attention_mask: to_device(Tensor::from_slice(&self.attention).view(shape), device),
            positions: to_device(Tensor::from_slice(&self.positions).view([-1, 2]), device),
            masked: self.positions.len() / 2,
            labels: to_device(Tensor::from_slice(&self.labels), device),
            samples: self.rows,
            tokens: self.tokens,
        }
    }
}

/// A host tensor on `device`: on CUDA copied from page-locked memory without blocking the host
/// (it goes on building the next batch; libtorch's pinned-memory allocator keeps the source until
/// the copy has run), falling back to a plain copy when memory cannot be pinned; elsewhere as is.
fn to_device(host: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cuda(_) => match host.f_pin_memory(device) {
            Ok(pinned) => pinned.to_device_(device, pinned.kind(), true, false),
            Err(e) => {
                tracing::debug!(error = %e, "pinned memory unavailable; copying the batch from pageable memory");
                host.to_device(device)
            }
        },
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_the_longest_sample() {
        let a = MaskedSample {
            input_ids: vec![2, 4, 9, 3],
            labels: vec![IGNORE, 7, IGNORE, IGNORE],
        };
        let b = MaskedSample {
            input_ids: vec![2, 3],
            labels: vec![IGNORE, IGNORE],
        };
        let batch = MaskedBatch::from_samples(&[a, b], 0, Device::Cpu);
        assert_eq!(batch.input_ids.size(), vec![2, 4]);
        assert_eq!(
            Vec::<i64>::try_from(&batch.input_ids.view([-1])).unwrap(),
            vec![2, 4, 9, 3, 2, 3, 0, 0]
        );
        assert_eq!(Vec::<i64>::try_from(&batch.positions.view([-1])).unwrap(), vec![0, 1]);
        assert_eq!((batch.masked, batch.tokens), (1, 6));
    }

    #[test]
    fn inference_rows_have_positions_and_no_labels() {
        let batch = MaskedBatch::from_rows(
            &[
                MaskedRow {
                    ids: &[2, 4, 3],
                    masked: &[1],
                },
                MaskedRow {
                    ids: &[2, 4, 8, 4, 3],
                    masked: &[1, 3],
                },
            ],
            7,
            Device::Cpu,
        );
        assert_eq!(
            Vec::<i64>::try_from(&batch.input_ids.view([-1])).unwrap(),
            vec![2, 4, 3, 7, 7, 2, 4, 8, 4, 3]
        );
        assert_eq!(
            Vec::<i64>::try_from(&batch.attention_mask.view([-1])).unwrap(),
            vec![1, 1, 1, 0, 0, 1, 1, 1, 1, 1]
        );
        assert_eq!(
            Vec::<i64>::try_from(&batch.positions.view([-1])).unwrap(),
            vec![0, 1, 1, 1, 1, 3]
        );
        assert_eq!((batch.masked, batch.tokens, batch.samples), (3, 8, 2));
        assert_eq!(batch.labels.size(), vec![0]);
    }
}
