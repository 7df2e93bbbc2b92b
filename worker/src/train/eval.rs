//! Evaluation on the dev set with its fixed masking: token-weighted masked-LM loss and top-1
//! accuracy of masked-token prediction.

use super::batch::collate;
use crate::masking::MaskedSample;
use crate::model::ElectraForMaskedLM;
use tch::{Device, Kind, Reduction, Tensor};

/// Sums over a set of dev samples (summed across ranks before dividing).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalSums {
    pub loss_sum: f64,
    pub correct: f64,
    pub masked: f64,
}

impl EvalSums {
    pub fn loss(&self) -> f64 {
        if self.masked > 0.0 {
            self.loss_sum / self.masked
        } else {
            f64::NAN
        }
    }

    pub fn accuracy(&self) -> f64 {
        if self.masked > 0.0 {
            self.correct / self.masked
        } else {
            f64::NAN
        }
    }
}

pub fn evaluate(
    model: &ElectraForMaskedLM,
    samples: &[MaskedSample],
    batch_size: usize,
    pad_id: u32,
    device: Device,
) -> EvalSums {
    let mut sums = EvalSums::default();
    tch::no_grad(|| {
        for chunk in samples.chunks(batch_size.max(1)) {
            let batch = collate(chunk, pad_id, device);
            if batch.masked == 0 {
                continue;
            }
            let logits = model.logits_at(&batch.input_ids, &batch.attention_mask, &batch.positions, false);
            let logits = logits.to_kind(Kind::Float);
            sums.loss_sum += logits
                .cross_entropy_loss::<Tensor>(&batch.labels, None, Reduction::Sum, -100, 0.0)
                .double_value(&[]);
            sums.correct += logits
                .argmax(-1, false)
                .eq_tensor(&batch.labels)
                .sum(Kind::Double)
                .double_value(&[]);
            sums.masked += batch.masked as f64;
        }
    });
    sums
}
