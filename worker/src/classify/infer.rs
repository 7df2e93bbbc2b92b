//! Batched classifier inputs and inference: padded batches of token ids, the target tensor of a
//! set of rows, probabilities (softmax or a sigmoid per label), the predicted labels (argmax, or
//! every label with probability ≥ 0.5) and the evaluation of a labelled set.

use super::data::Targets;
use super::metrics::{self, Metrics};
use crate::batch::{MaskedBatch, MaskedRow};
use crate::model::sequence_classification::{ElectraForSequenceClassification, ProblemType};
use crate::tokenizer::{MlmTokenizer, TokenizerError};
use tch::{Device, Kind, Tensor};

/// Token ids of every text, truncated to `max_len` ([CLS] and [SEP] included).
pub fn tokenize(tokenizer: &MlmTokenizer, texts: &[String], max_len: usize) -> Result<Vec<Vec<u32>>, TokenizerError> {
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    tokenizer.encode_batch(&texts, Some(max_len))
}

/// `input_ids` and `attention_mask` of the rows `ids`, padded to the longest.
pub fn inputs(ids: &[&[u32]], pad_id: u32, device: Device) -> (Tensor, Tensor) {
    let rows: Vec<MaskedRow<'_>> = ids.iter().map(|ids| MaskedRow { ids, masked: &[] }).collect();
    let batch = MaskedBatch::from_rows(&rows, pad_id, device);
    (batch.input_ids, batch.attention_mask)
}

/// The targets of `rows`: label ids `[N]` (int64) or flags `[N, num_labels]` (f32).
pub fn targets_tensor(targets: &Targets, rows: &[usize], device: Device) -> Tensor {
    match targets {
        Targets::Single(ids) => Tensor::from_slice(&rows.iter().map(|&r| ids[r] as i64).collect::<Vec<_>>()).to(device),
        Targets::Multi(flags) => {
            let width = flags.first().map_or(0, Vec::len) as i64;
            let values: Vec<f32> = rows
                .iter()
                .flat_map(|&r| flags[r].iter().map(|&f| f32::from(u8::from(f))))
                .collect();
            Tensor::from_slice(&values).view([rows.len() as i64, width]).to(device)
        }
    }
}

/// What a model says about a set of texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Per text, the probability of each label.
    pub probabilities: Vec<Vec<f32>>,
    /// The summed loss against the targets, when given.
    pub loss_sum: Option<f64>,
}

/// Probabilities of every text of `ids` (and the loss against `targets`), in batches of
/// `batch_size`, without dropout.
pub fn score(
    model: &ElectraForSequenceClassification,
    ids: &[Vec<u32>],
    targets: Option<&Targets>,
    batch_size: usize,
    pad_id: u32,
    device: Device,
) -> Result<Scored, tch::TchError> {
    let multi = model.labels().problem_type == ProblemType::MultiLabel;
    let mut probabilities = Vec::with_capacity(ids.len());
    let mut loss_sum = 0.0;
    tch::no_grad(|| -> Result<(), tch::TchError> {
        let rows: Vec<usize> = (0..ids.len()).collect();
        for chunk in rows.chunks(batch_size.max(1)) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&r| ids[r].as_slice()).collect();
            let (input_ids, attention_mask) = inputs(&batch, pad_id, device);
            let logits = model
                .forward(&input_ids, &attention_mask, false)
                .f_to_kind(Kind::Float)?;
            if let Some(targets) = targets {
                loss_sum += model
                    .loss_sum(&logits, &targets_tensor(targets, chunk, device))
                    .f_double_value(&[])?;
            }
            let probs = if multi {
                logits.f_sigmoid()?
            } else {
                logits.f_softmax(-1, Kind::Float)?
            };
            let width = probs.size()[1] as usize;
            let flat = Vec::<f32>::try_from(&probs.to_device(Device::Cpu).flatten(0, -1))?;
            probabilities.extend(flat.chunks(width.max(1)).map(<[f32]>::to_vec));
        }
        Ok(())
    })?;
    Ok(Scored {
        probabilities,
        loss_sum: targets.map(|_| loss_sum),
    })
}

/// A predicted label id (single-label) or the predicted flags (multi-label).
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    Single(usize),
    Multi(Vec<bool>),
}

/// The prediction from one text's probabilities: the most likely label (the first on a tie, as
/// `argmax`), or every label with probability ≥ 0.5 (logit ≥ 0).
pub fn predict(problem_type: ProblemType, probabilities: &[f32]) -> Prediction {
    match problem_type {
        ProblemType::SingleLabel => {
            let mut best = 0;
            for (i, p) in probabilities.iter().enumerate() {
                if *p > probabilities[best] {
                    best = i;
                }
            }
            Prediction::Single(best)
        }
        ProblemType::MultiLabel => Prediction::Multi(probabilities.iter().map(|p| *p >= 0.5).collect()),
    }
}

/// Metrics of `predictions` against `targets`.
pub fn metrics_of(targets: &Targets, predictions: &[Prediction], num_labels: usize) -> Metrics {
    match targets {
        Targets::Single(gold) => {
            let predicted: Vec<usize> = predictions
                .iter()
                .map(|p| match p {
                    Prediction::Single(id) => *id,
                    Prediction::Multi(_) => usize::MAX,
                })
                .collect();
            metrics::single_label(gold, &predicted, num_labels)
        }
        Targets::Multi(gold) => {
            let predicted: Vec<Vec<bool>> = predictions
                .iter()
                .map(|p| match p {
                    Prediction::Multi(flags) => flags.clone(),
                    Prediction::Single(_) => vec![false; num_labels],
                })
                .collect();
            metrics::multi_label(gold, &predicted)
        }
    }
}

/// An evaluation: metrics and the mean loss (transformers' mean: per text, or per text and label).
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub metrics: Metrics,
    pub loss: f64,
    pub predictions: Vec<Prediction>,
    pub probabilities: Vec<Vec<f32>>,
}

/// Evaluates `model` on tokenised texts `ids` with their `targets`.
pub fn evaluate(
    model: &ElectraForSequenceClassification,
    ids: &[Vec<u32>],
    targets: &Targets,
    batch_size: usize,
    pad_id: u32,
    device: Device,
) -> Result<Evaluation, tch::TchError> {
    let scored = score(model, ids, Some(targets), batch_size, pad_id, device)?;
    let problem_type = model.labels().problem_type;
    let predictions: Vec<Prediction> = scored.probabilities.iter().map(|p| predict(problem_type, p)).collect();
    let metrics = metrics_of(targets, &predictions, model.labels().len());
    let count = model.loss_count(ids.len()).max(1);
    Ok(Evaluation {
        metrics,
        loss: scored.loss_sum.unwrap_or(f64::NAN) / count as f64,
        predictions,
        probabilities: scored.probabilities,
    })
}

/// One text's prediction as a JSON record: `text`, `label` (single-label) or `labels`
/// (multi-label) by name, and the `probabilities` of every label.
pub fn prediction_record(
    text: &str,
    labels: &crate::model::sequence_classification::Labels,
    probabilities: &[f32],
    prediction: &Prediction,
) -> serde_json::Value {
    use serde_json::{json, Value};
    let probs: serde_json::Map<String, Value> = labels
        .names
        .iter()
        .zip(probabilities)
        .map(|(n, p)| (n.clone(), json!(p)))
        .collect();
    match prediction {
        Prediction::Single(id) => json!({"text": text, "label": labels.names[*id], "probabilities": probs}),
        Prediction::Multi(flags) => {
            let chosen: Vec<&String> = labels
                .names
                .iter()
                .zip(flags)
                .filter(|(_, f)| **f)
                .map(|(n, _)| n)
                .collect();
            json!({"text": text, "labels": chosen, "probabilities": probs})
        }
    }
}
