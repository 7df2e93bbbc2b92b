//! Collating masked samples into a batch padded to its longest sample.

use crate::masking::{MaskedSample, IGNORE};
use tch::{Device, Tensor};

pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// `[N, 2]` (row, position) of every masked token.
    pub positions: Tensor,
    /// `[N]` original ids at those positions.
    pub labels: Tensor,
    pub samples: usize,
    /// Real (non-padding) tokens.
    pub tokens: usize,
    pub masked: usize,
}

pub fn collate(samples: &[MaskedSample], pad_id: u32, device: Device) -> Batch {
    let width = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0).max(1);
    let rows = samples.len();
    let mut ids = vec![i64::from(pad_id); rows * width];
    let mut attention = vec![0i64; rows * width];
    let mut positions = Vec::new();
    let mut labels = Vec::new();
    let mut tokens = 0;
    for (r, s) in samples.iter().enumerate() {
        tokens += s.input_ids.len();
        for (c, id) in s.input_ids.iter().enumerate() {
            ids[r * width + c] = i64::from(*id);
            attention[r * width + c] = 1;
            if s.labels[c] != IGNORE {
                positions.extend([r as i64, c as i64]);
                labels.push(s.labels[c]);
            }
        }
    }
    let shape = [rows as i64, width as i64];
    Batch {
        input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        attention_mask: Tensor::from_slice(&attention).view(shape).to_device(device),
        positions: Tensor::from_slice(&positions).view([-1, 2]).to_device(device),
        masked: labels.len(),
        labels: Tensor::from_slice(&labels).to_device(device),
        samples: rows,
        tokens,
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
        let batch = collate(&[a, b], 0, Device::Cpu);
        assert_eq!(batch.input_ids.size(), vec![2, 4]);
        assert_eq!(
            Vec::<i64>::try_from(&batch.input_ids.view([-1])).unwrap(),
            vec![2, 4, 9, 3, 2, 3, 0, 0]
        );
        assert_eq!(Vec::<i64>::try_from(&batch.positions.view([-1])).unwrap(), vec![0, 1]);
        assert_eq!((batch.masked, batch.tokens), (1, 6));
    }
}
