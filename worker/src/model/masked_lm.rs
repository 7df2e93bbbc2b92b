//! The masked-LM inference path over a `MaskedBatch`: the top-k candidates at the positions to
//! predict (fill-mask, augmentation) and the loss and top-1 accuracy against their labels
//! (dev-set evaluation, the augmentation report).

use super::ElectraForMaskedLM;
use crate::batch::MaskedBatch;
use crate::masking::MaskedSample;
use tch::{Device, Kind, Reduction, Tensor};

/// The best `k` `(probability, id)` of one predicted position, best first.
pub type Candidates = Vec<(f32, u32)>;

/// Softmax over the vocabulary at every position of `batch.positions`, then the `k` most likely
/// tokens, per position in the batch's order. With `targets` (ids `[T]` on the batch's device)
/// the choice is among those tokens only, with their probabilities over the whole vocabulary,
/// as the fill-mask pipeline's `targets`; `k` must not exceed `T`.
pub fn top_k(
    model: &ElectraForMaskedLM,
    batch: &MaskedBatch,
    k: usize,
    targets: Option<&Tensor>,
) -> Result<Vec<Candidates>, tch::TchError> {
    let k = k as i64;
    let (probs, ids) = tch::no_grad(|| -> Result<(Vec<f32>, Vec<i64>), tch::TchError> {
        let logits = model.logits_at(&batch.input_ids, &batch.attention_mask, &batch.positions, false);
        let probs = logits.f_softmax(-1, Kind::Float)?;
        let (values, indices) = match targets {
            Some(t) => {
                let (v, i) = probs.f_index_select(1, t)?.f_topk(k, -1, true, true)?;
                (v, t.f_index_select(0, &i.flatten(0, -1))?.view_as(&i))
            }
            None => probs.f_topk(k, -1, true, true)?,
        };
        Ok((
            Vec::<f32>::try_from(&values.to_device(Device::Cpu).flatten(0, -1))?,
            Vec::<i64>::try_from(&indices.to_device(Device::Cpu).flatten(0, -1))?,
        ))
    })?;
    let k = k as usize;
    Ok((0..batch.masked)
        .map(|n| (n * k..(n + 1) * k).map(|j| (probs[j], ids[j] as u32)).collect())
        .collect())
}

/// Sums over a set of labelled samples (summed across ranks before dividing).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalSums {
    pub loss_sum: f64,
    pub correct: f64,
    pub masked: f64,
}

impl EvalSums {
    /// Mean cross-entropy per masked token.
    pub fn loss(&self) -> f64 {
        if self.masked > 0.0 {
            self.loss_sum / self.masked
        } else {
            f64::NAN
        }
    }

    /// Top-1 accuracy of the masked tokens.
    pub fn accuracy(&self) -> f64 {
        if self.masked > 0.0 {
            self.correct / self.masked
        } else {
            f64::NAN
        }
    }
}

/// Masked-LM cross-entropy (summed over masked tokens) and top-1 hits of `samples`, in batches
/// of `batch_size`, without dropout.
pub fn try_evaluate(
    model: &ElectraForMaskedLM,
    samples: &[MaskedSample],
    batch_size: usize,
    pad_id: u32,
    device: Device,
) -> Result<EvalSums, tch::TchError> {
    let mut sums = EvalSums::default();
    tch::no_grad(|| {
        for chunk in samples.chunks(batch_size.max(1)) {
            let batch = MaskedBatch::from_samples(chunk, pad_id, device);
            if batch.masked == 0 {
                continue;
            }
            let logits = model.logits_at(&batch.input_ids, &batch.attention_mask, &batch.positions, false);
            let logits = logits.f_to_kind(Kind::Float)?;
            sums.loss_sum += logits
                .f_cross_entropy_loss::<Tensor>(&batch.labels, None, Reduction::Sum, -100, 0.0)?
                .f_double_value(&[])?;
            sums.correct += logits
                .f_argmax(-1, false)?
                .f_eq_tensor(&batch.labels)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?;
            sums.masked += batch.masked as f64;
        }
        Ok(sums)
    })
}

/// `try_evaluate` for the training loop, where a libtorch failure ends the process as any other
/// libtorch call there does.
pub fn evaluate(
    model: &ElectraForMaskedLM,
    samples: &[MaskedSample],
    batch_size: usize,
    pad_id: u32,
    device: Device,
) -> EvalSums {
    try_evaluate(model, samples, batch_size, pad_id, device).unwrap_or_else(|e| panic!("evaluation: libtorch: {e}"))
}
