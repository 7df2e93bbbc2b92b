//! MLM data augmentation: mask some tokens of a sentence, let the model propose replacements,
//! keep the ones that pass the original project's filters (corrected), decode.
//!
//! Per sentence and variant: every non-special token of the window is masked with probability
//! `mlm_prob` (at least one; a sentence without a maskable token passes through unchanged and is
//! counted as skipped); one forward pass; for each mask, the top-`k` candidates of the softmax.
//! The best candidate is taken when its probability reaches `threshold`; otherwise the first
//! candidate that differs from the original token, has the same token type (letters vs. not,
//! word start vs. `##` continuation) and repeats neither its left neighbour (as already filled)
//! nor its right neighbour (as in the original); failing all, the original token stays. A line
//! longer than the model window keeps its tail unchanged.

pub mod io;
pub mod parts;
pub mod report;

use crate::autocast::{Precision, PrecisionError};
use crate::batch::{MaskedBatch, MaskedRow};
use crate::corpus::{CorpusError, Format};
use crate::masking::SplitMix64;
use crate::model::masked_lm::{self, Candidates};
use crate::model::LoadedModel;
use crate::tokenizer::TokenizerError;
use serde::Serialize;
use std::path::PathBuf;
use tch::Device;

#[derive(Debug, Clone)]
pub struct AugmentOptions {
    pub mlm_prob: f64,
    pub k: usize,
    pub threshold: f64,
    pub num_augmentations: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub max_seq_len: usize,
    /// Retry an unchanged sentence with a new mask and a threshold lower by 0.05, this often.
    pub require_change_retries: usize,
    /// The model's compute precision (`--dtype`).
    pub precision: Precision,
}

#[derive(Debug, thiserror::Error)]
pub enum AugmentError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("output: {}: {error}", path.display())]
    Output { path: PathBuf, error: std::io::Error },
    /// A flag the run cannot do without; `purpose` says what it gives.
    #[error("{flag} is required: {purpose}")]
    MissingFlag { flag: &'static str, purpose: &'static str },
    #[error("{flag} {value:?}: accepted: {accepted}")]
    InvalidFlag {
        flag: &'static str,
        value: String,
        accepted: &'static str,
    },
    /// The input file cannot be read as the format says.
    #[error(transparent)]
    Input(#[from] CorpusError),
    /// The model named for the parts manifest cannot be found.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The parts directory's manifest cannot be read or written.
    #[error(transparent)]
    Parts(#[from] kormlm_proto::augment_parts::PartsError),
    #[error(transparent)]
    Precision(#[from] PrecisionError),
}

/// The result for one sentence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Augmented {
    pub variants: Vec<String>,
    /// Tokens replaced, per variant.
    pub edits: Vec<usize>,
    /// No maskable token: passed through.
    pub skipped: bool,
}

/// One sentence prepared for masking.
struct Prepared {
    /// Window ids with [CLS]/[SEP].
    ids: Vec<u32>,
    /// Text after the window, kept as is (with its leading separator).
    tail: String,
    maskable: Vec<usize>,
}

/// Python `str.isalpha()` of a token without its `##` prefix.
fn is_alpha(token: &str) -> bool {
    let t = token.strip_prefix("##").unwrap_or(token);
    !t.is_empty() && t.chars().all(char::is_alphabetic)
}

fn same_token_type(original: &str, candidate: &str) -> bool {
    original.starts_with("##") == candidate.starts_with("##") && is_alpha(original) == is_alpha(candidate)
}

pub struct Augmenter<'a> {
    model: &'a LoadedModel,
    options: AugmentOptions,
    device: Device,
}

impl<'a> Augmenter<'a> {
    pub fn new(model: &'a LoadedModel, options: AugmentOptions, device: Device) -> Self {
        Self { model, options, device }
    }

    fn prepare(&self, text: &str) -> Result<Prepared, AugmentError> {
        let tokenizer = &self.model.tokenizer;
        let special = tokenizer.special();
        let window = self.options.max_seq_len.saturating_sub(2).max(1);
        let plain = tokenizer.encode_plain(text)?;
        let all = plain.get_ids();
        let (body, tail) = if all.len() > window {
            let cut = plain.get_offsets()[window].0;
            let head_end = plain.get_offsets()[window - 1].1;
            (&all[..window], text[head_end.min(cut)..].to_string())
        } else {
            (all, String::new())
        };
        let mut ids = Vec::with_capacity(body.len() + 2);
        ids.push(special.cls);
        ids.extend_from_slice(body);
        ids.push(special.sep);
        let maskable = (1..ids.len() - 1).filter(|p| !special.contains(ids[*p])).collect();
        Ok(Prepared { ids, tail, maskable })
    }

    /// Chooses the positions to mask for one draw.
    fn draw(&self, prepared: &Prepared, rng: &mut SplitMix64) -> Vec<usize> {
        let mut masked: Vec<usize> = prepared
            .maskable
            .iter()
            .copied()
            .filter(|_| rng.next_f64() < self.options.mlm_prob)
            .collect();
        if masked.is_empty() && !prepared.maskable.is_empty() {
            masked.push(prepared.maskable[rng.below(prepared.maskable.len() as u64) as usize]);
        }
        masked
    }

    /// Top-k (probability, id) per masked position, for a batch of masked inputs.
    fn predict(&self, inputs: &[(Vec<u32>, Vec<usize>)]) -> Result<Vec<Vec<Candidates>>, AugmentError> {
        let rows: Vec<MaskedRow<'_>> = inputs.iter().map(|(ids, masked)| MaskedRow { ids, masked }).collect();
        let batch = MaskedBatch::from_rows(&rows, self.model.tokenizer.special().pad, self.device);
        let mut candidates = masked_lm::top_k(&self.model.model, &batch, self.options.k.max(1), None)?.into_iter();
        Ok(inputs
            .iter()
            .map(|(_, masked)| candidates.by_ref().take(masked.len()).collect())
            .collect())
    }

    /// Fills the masks of one sentence from its candidates; returns the new ids and the edits.
    fn fill(&self, original: &[u32], masked: &[usize], candidates: &[Candidates], threshold: f64) -> (Vec<u32>, usize) {
        let tokenizer = &self.model.tokenizer;
        let token = |id: u32| tokenizer.id_to_token(id).unwrap_or_default();
        let mut ids = original.to_vec();
        let mut edits = 0;
        for (&pos, cands) in masked.iter().zip(candidates) {
            let orig = original[pos];
            let orig_str = token(orig);
            let choice = match cands.first() {
                Some(&(p, id)) if f64::from(p) >= threshold => id,
                _ => cands
                    .iter()
                    .map(|&(_, id)| id)
                    .find(|&id| {
                        let s = token(id);
                        s != orig_str
                            && !tokenizer.special().contains(id)
                            && same_token_type(&orig_str, &s)
                            && id != ids[pos - 1]
                            && original.get(pos + 1).is_none_or(|&right| id != right)
                    })
                    .unwrap_or(orig),
            };
            if choice != orig {
                edits += 1;
            }
            ids[pos] = choice;
        }
        (ids, edits)
    }

    /// Augments a batch of sentences; `first_index` numbers them for the seed.
    pub fn augment(&self, texts: &[String], first_index: u64) -> Result<Vec<Augmented>, AugmentError> {
        crate::autocast::check(self.options.precision, self.device, "--dtype bf16", "--dtype fp32")?;
        // One region for the whole call: each weight is cast to bf16 once, not per batch.
        let _region = crate::autocast::Region::enter(self.options.precision, self.device);
        let prepared: Vec<Prepared> = texts.iter().map(|t| self.prepare(t)).collect::<Result<_, _>>()?;
        let mut results: Vec<Augmented> = prepared
            .iter()
            .map(|p| Augmented {
                variants: Vec::new(),
                edits: Vec::new(),
                skipped: p.maskable.is_empty(),
            })
            .collect();
        let n = self.options.num_augmentations.max(1);
        // Draws per variant: one, plus the --require_change retries, plus one more to make a
        // second or later variant differ from the earlier ones.
        let attempts = 1 + self.options.require_change_retries + usize::from(n > 1);
        for variant in 0..n {
            // Each sentence gets draws until its variant is new (or attempts run out).
            let mut pending: Vec<usize> = (0..texts.len()).filter(|i| !results[*i].skipped).collect();
            let mut chosen: Vec<Option<(String, usize)>> = vec![None; texts.len()];
            for attempt in 0..attempts {
                if pending.is_empty() {
                    break;
                }
                let threshold = (self.options.threshold - 0.05 * attempt as f64).max(0.0);
                // Similar lengths share a batch (less padding); the order is fixed, so results are too.
                pending.sort_by_key(|&i| (prepared[i].ids.len(), i));
                let mut draws = Vec::with_capacity(pending.len());
                for &i in &pending {
                    let mut rng = SplitMix64::for_sample(
                        self.options.seed,
                        (variant as u64) << 16 | attempt as u64,
                        first_index + i as u64,
                    );
                    draws.push((prepared[i].ids.clone(), self.draw(&prepared[i], &mut rng)));
                }
                let mut still = Vec::new();
                for (chunk_start, chunk) in draws
                    .chunks(self.options.batch_size.max(1))
                    .enumerate()
                    .map(|(c, ch)| (c * self.options.batch_size.max(1), ch))
                {
                    let masked_inputs: Vec<(Vec<u32>, Vec<usize>)> = chunk
                        .iter()
                        .map(|(ids, masked)| {
                            let mut m = ids.clone();
                            for &p in masked {
                                m[p] = self.model.tokenizer.special().mask;
                            }
                            (m, masked.clone())
                        })
                        .collect();
                    let predictions = self.predict(&masked_inputs)?;
                    for (j, ((ids, masked), candidates)) in chunk.iter().zip(&predictions).enumerate() {
                        let i = pending[chunk_start + j];
                        let (new_ids, edits) = self.fill(ids, masked, candidates, threshold);
                        let mut text = self.model.tokenizer.decode(&new_ids, true)?;
                        text.push_str(&prepared[i].tail);
                        let original = &texts[i];
                        let unchanged = text == *original && self.options.require_change_retries > 0;
                        let duplicate = unchanged || results[i].variants.contains(&text);
                        if chosen[i].is_none() || !duplicate {
                            chosen[i] = Some((text, edits));
                        }
                        if duplicate {
                            still.push(i);
                        }
                    }
                }
                pending = still;
            }
            for (i, c) in chosen.into_iter().enumerate() {
                match c {
                    Some((text, edits)) => {
                        results[i].variants.push(text);
                        results[i].edits.push(edits);
                    }
                    None => {
                        results[i].variants.push(texts[i].clone());
                        results[i].edits.push(0);
                    }
                }
            }
        }
        Ok(results)
    }
}

/// What an augmentation run needs, from the shared options: the input table, the output
/// format, and the algorithm's options.
pub fn setup(
    args: &kormlm_proto::augment_args::AugmentArgs,
    seed: u64,
    max_seq_len: usize,
) -> Result<(io::Table, io::OutputFormat, PathBuf, AugmentOptions), AugmentError> {
    let input = args.input.clone().ok_or(AugmentError::MissingFlag {
        flag: "--input",
        purpose: "the file to augment",
    })?;
    let output = args.output.clone().ok_or(AugmentError::MissingFlag {
        flag: "--output",
        purpose: "where the augmented rows go",
    })?;
    let format = match args.format.as_deref() {
        None => Format::infer(&input),
        Some(name) => serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|_| {
            AugmentError::InvalidFlag {
                flag: "--format",
                value: name.to_string(),
                accepted: "text, csv, tsv, nsmc, khs, khs-unlabeled, unsmile",
            }
        })?,
    };
    let output_format = match args
        .output_format
        .as_deref()
        .or_else(|| output.extension().and_then(|e| e.to_str()))
    {
        Some("jsonl") | Some("json") => io::OutputFormat::Jsonl,
        Some("csv") | None => io::OutputFormat::Csv,
        Some(other) => {
            return Err(AugmentError::InvalidFlag {
                flag: "--output_format",
                value: other.to_string(),
                accepted: "csv, jsonl",
            })
        }
    };
    let table = io::read_table(&input, format, args.column.as_deref())?;
    Ok((table, output_format, output, options(args, seed, max_seq_len)))
}

/// The algorithm's options from the shared flags, the seed and the model window.
pub fn options(args: &kormlm_proto::augment_args::AugmentArgs, seed: u64, max_seq_len: usize) -> AugmentOptions {
    AugmentOptions {
        mlm_prob: args.mlm_prob,
        k: args.k,
        threshold: args.threshold,
        num_augmentations: args.num_augmentations.max(1),
        seed,
        batch_size: args.batch_size.max(1),
        max_seq_len: max_seq_len.max(3),
        require_change_retries: if args.require_change { 3 } else { 0 },
        precision: args.dtype.into(),
    }
}

/// Totals for the summary line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AugmentSummary {
    pub sentences: usize,
    pub variants: usize,
    pub changed: usize,
    pub unchanged: usize,
    pub skipped: usize,
    pub changed_percent: f64,
    pub mean_tokens_changed: f64,
}

impl AugmentSummary {
    pub fn add(&mut self, original: &str, result: &Augmented) {
        self.sentences += 1;
        if result.skipped {
            self.skipped += 1;
        }
        for (v, e) in result.variants.iter().zip(&result.edits) {
            self.variants += 1;
            if v != original {
                self.changed += 1;
            } else {
                self.unchanged += 1;
            }
            self.mean_tokens_changed += *e as f64;
        }
    }

    pub fn finish(mut self) -> Self {
        if self.variants > 0 {
            self.changed_percent = 100.0 * self.changed as f64 / self.variants as f64;
            self.mean_tokens_changed /= self.variants as f64;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_types() {
        assert!(same_token_type("영화", "드라마"));
        assert!(!same_token_type("영화", "##화"));
        assert!(!same_token_type("영화", "!"));
        assert!(same_token_type("##는", "##은"));
        assert!(same_token_type("123", "!"));
        assert!(!is_alpha("[UNK]"));
    }

    #[test]
    fn setup_errors_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.txt");
        std::fs::write(&input, "한 줄\n").unwrap();
        let args =
            |input: Option<&std::path::Path>, output: Option<&str>, format: Option<&str>, out_format: Option<&str>| {
                let defaults = std::collections::BTreeMap::new();
                kormlm_proto::augment_args::AugmentArgs {
                    input: input.map(|p| p.to_path_buf()),
                    output: output.map(PathBuf::from),
                    format: format.map(str::to_string),
                    output_format: out_format.map(str::to_string),
                    ..kormlm_proto::augment_args::AugmentArgs::from_map(&defaults).unwrap()
                }
            };
        let err = |a| setup(&a, 1, 128).err().unwrap().to_string();
        assert_eq!(
            err(args(None, Some("o.csv"), None, None)),
            "--input is required: the file to augment"
        );
        assert_eq!(
            err(args(Some(&input), None, None, None)),
            "--output is required: where the augmented rows go"
        );
        assert_eq!(
            err(args(Some(&input), Some("o.csv"), Some("xml"), None)),
            "--format \"xml\": accepted: text, csv, tsv, nsmc, khs, khs-unlabeled, unsmile"
        );
        assert_eq!(
            err(args(Some(&input), Some("o.parquet"), None, None)),
            "--output_format \"parquet\": accepted: csv, jsonl"
        );
        let (table, format, _, options) = setup(&args(Some(&input), Some("o.jsonl"), None, None), 1, 2).unwrap();
        assert_eq!(
            (table.rows.len(), format, options.max_seq_len),
            (1, io::OutputFormat::Jsonl, 3)
        );
    }
}
