//! `worker fill-mask`: the transformers fill-mask pipeline's output for each input line,
//! computed in length-sorted batches with the vocabulary projection run only at masked positions.

use crate::autocast::{Precision, PrecisionError, Region};
use crate::batch::{MaskedBatch, MaskedRow};
use crate::model::{masked_lm, LoadedModel};
use crate::tokenizer::TokenizerError;
use serde_json::{json, Value};
use tch::{Device, Tensor};

#[derive(Debug, Clone)]
pub struct FillMaskOptions {
    pub top_k: usize,
    /// Restrict predictions to these tokens (as the pipeline's `targets`).
    pub targets: Option<Vec<String>>,
    pub batch_size: usize,
    /// The model's compute precision (`--dtype`).
    pub precision: Precision,
}

#[derive(Debug, thiserror::Error)]
pub enum FillMaskError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("--targets: none of the targets is in the vocabulary or tokenizes to anything")]
    NoTargets,
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Precision(#[from] PrecisionError),
}

/// Target ids like the pipeline's `get_target_ids`: exact vocabulary entries, else the first
/// piece of the tokenized target (with a warning); duplicates removed.
fn target_ids(model: &LoadedModel, targets: &[String]) -> Result<Vec<i64>, FillMaskError> {
    let tokenizer = &model.tokenizer;
    let mut ids = Vec::new();
    for target in targets {
        let id = match tokenizer.token_to_id(target) {
            Some(id) => Some(id),
            None => {
                let pieces = tokenizer.encode_plain(target)?;
                match pieces.get_ids().first() {
                    Some(first) => {
                        tracing::warn!(
                            target = %target,
                            replacement = %tokenizer.id_to_token(*first).unwrap_or_default(),
                            "target is not in the vocabulary; using its first word piece"
                        );
                        Some(*first)
                    }
                    None => {
                        tracing::warn!(target = %target, "target tokenizes to nothing; ignored");
                        None
                    }
                }
            }
        };
        if let Some(id) = id {
            if !ids.contains(&i64::from(id)) {
                ids.push(i64::from(id));
            }
        }
    }
    if ids.is_empty() {
        return Err(FillMaskError::NoTargets);
    }
    Ok(ids)
}

/// One prepared input line.
struct Prepared {
    ids: Vec<u32>,
    masks: Vec<usize>,
}

/// Fills the masks of every line; the result for a line is the pipeline's JSON, or
/// `{"error": …}` for a line that cannot be processed.
pub fn fill_mask(
    model: &LoadedModel,
    lines: &[String],
    options: &FillMaskOptions,
    device: Device,
) -> Result<Vec<Value>, FillMaskError> {
    let tokenizer = &model.tokenizer;
    let mask_id = tokenizer.special().mask;
    let max_positions = model.model.config().max_position_embeddings as usize;
    let targets = options.targets.as_deref().map(|t| target_ids(model, t)).transpose()?;
    let top_k = match &targets {
        Some(t) => options.top_k.min(t.len()),
        None => options.top_k,
    };
    let texts: Vec<&str> = lines.iter().map(String::as_str).collect();
    let encoded = tokenizer.encode_batch(&texts, None)?;
    let mut results: Vec<Option<Value>> = vec![None; lines.len()];
    let mut prepared: Vec<(usize, Prepared)> = Vec::new();
    for (i, ids) in encoded.into_iter().enumerate() {
        let masks: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| **id == mask_id)
            .map(|(p, _)| p)
            .collect();
        if masks.is_empty() {
            results[i] = Some(json!({
                "error": format!("No mask_token ({}) found on the input", tokenizer.mask_token())
            }));
        } else if ids.len() > max_positions {
            results[i] = Some(json!({
                "error": format!(
                    "the input has {} tokens; the model accepts at most {max_positions}",
                    ids.len()
                )
            }));
        } else {
            prepared.push((i, Prepared { ids, masks }));
        }
    }
    prepared.sort_by_key(|(_, p)| p.ids.len());
    let target_tensor = targets.as_ref().map(|t| Tensor::from_slice(t).to_device(device));
    let pad = tokenizer.special().pad;
    crate::autocast::check(options.precision, device, "--dtype bf16", "--dtype fp32")?;
    // One region for all batches: each weight is cast to bf16 once per call, not per batch.
    let _region = Region::enter(options.precision, device);
    for batch in prepared.chunks(options.batch_size.max(1)) {
        let rows: Vec<MaskedRow<'_>> = batch
            .iter()
            .map(|(_, p)| MaskedRow {
                ids: &p.ids,
                masked: &p.masks,
            })
            .collect();
        let inputs = MaskedBatch::from_rows(&rows, pad, device);
        let candidates = masked_lm::top_k(&model.model, &inputs, top_k, target_tensor.as_ref())?;
        let mut cursor = 0;
        for (line, p) in batch {
            let single = p.masks.len() == 1;
            let mut per_mask = Vec::with_capacity(p.masks.len());
            for &m in &p.masks {
                let mut predictions = Vec::with_capacity(top_k);
                for &(score, id) in &candidates[cursor] {
                    let mut tokens = p.ids.clone();
                    tokens[m] = id;
                    predictions.push(json!({
                        "score": f64::from(score),
                        "token": id,
                        "token_str": tokenizer.decode(&[id], false)?,
                        "sequence": tokenizer.decode(&tokens, single)?,
                    }));
                }
                cursor += 1;
                per_mask.push(Value::Array(predictions));
            }
            results[*line] = Some(if single {
                per_mask.pop().expect("one mask")
            } else {
                Value::Array(per_mask)
            });
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every line has a result"))
        .collect())
}
