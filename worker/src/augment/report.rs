//! A quality report for choosing `threshold` and `mlm_prob`: the model's masked-token top-1
//! accuracy on a dev set, and for each setting of a grid, the share of sentences changed and the
//! distribution of the number of tokens replaced.

use super::{AugmentError, AugmentOptions, Augmenter};
use crate::masking::{MaskedSample, IGNORE};
use crate::model::{masked_lm, LoadedModel};
use serde::Serialize;
use tch::Device;

#[derive(Debug, Clone, Serialize)]
pub struct GridPoint {
    pub mlm_prob: f64,
    pub threshold: f64,
    /// Sentences with at least one token replaced.
    pub changed_share: f64,
    pub mean_tokens_changed: f64,
    /// Sentences with 0, 1, 2, 3 and 4 or more replaced tokens.
    pub edits_histogram: [usize; 5],
}

#[derive(Debug, Clone, Serialize)]
pub struct QualityReport {
    pub sentences: usize,
    pub masked_tokens: usize,
    pub masked_token_top1_accuracy: f64,
    pub grid: Vec<GridPoint>,
}

/// Top-1 accuracy of predicting tokens replaced by `[MASK]` (15 % of the maskable tokens,
/// seeded), over `texts`.
fn top1_accuracy(
    model: &LoadedModel,
    texts: &[String],
    max_len: usize,
    seed: u64,
    precision: crate::autocast::Precision,
    device: Device,
) -> Result<(f64, usize), AugmentError> {
    let tokenizer = &model.tokenizer;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = tokenizer.encode_batch(&refs, Some(max_len))?;
    let special = tokenizer.special();
    let samples: Vec<MaskedSample> = ids
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let mut rng = crate::masking::SplitMix64::for_sample(seed, 0, i as u64);
            let mut input_ids = row.clone();
            let mut labels = vec![IGNORE; row.len()];
            for (p, &id) in row.iter().enumerate() {
                if rng.next_f64() < 0.15 && !special.contains(id) {
                    labels[p] = i64::from(id);
                    input_ids[p] = special.mask;
                }
            }
            MaskedSample { input_ids, labels }
        })
        .collect();
    crate::autocast::check(precision, device, "--dtype bf16", "--dtype fp32")?;
    let sums = crate::autocast::with(precision, device, || {
        masked_lm::try_evaluate(&model.model, &samples, 32, special.pad, device)
    })?;
    Ok((sums.accuracy(), sums.masked as usize))
}

pub fn quality_report(
    model: &LoadedModel,
    texts: &[String],
    base: &AugmentOptions,
    mlm_probs: &[f64],
    thresholds: &[f64],
    device: Device,
) -> Result<QualityReport, AugmentError> {
    let (accuracy, masked) = top1_accuracy(model, texts, base.max_seq_len, base.seed, base.precision, device)?;
    let mut grid = Vec::new();
    for &mlm_prob in mlm_probs {
        for &threshold in thresholds {
            let options = AugmentOptions {
                mlm_prob,
                threshold,
                num_augmentations: 1,
                require_change_retries: 0,
                ..base.clone()
            };
            let augmenter = Augmenter::new(model, options, device);
            let results = augmenter.augment(texts, 0)?;
            let mut histogram = [0usize; 5];
            let (mut changed, mut edits) = (0usize, 0usize);
            for r in &results {
                let e = r.edits.first().copied().unwrap_or(0);
                histogram[e.min(4)] += 1;
                edits += e;
                if e > 0 {
                    changed += 1;
                }
            }
            let n = texts.len().max(1) as f64;
            grid.push(GridPoint {
                mlm_prob,
                threshold,
                changed_share: changed as f64 / n,
                mean_tokens_changed: edits as f64 / n,
                edits_histogram: histogram,
            });
        }
    }
    Ok(QualityReport {
        sentences: texts.len(),
        masked_tokens: masked,
        masked_token_top1_accuracy: accuracy,
        grid,
    })
}
