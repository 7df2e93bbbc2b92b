//! One work item: the seed's training subset of the fraction (plus, for the augmented condition,
//! the masked LM's copies of those rows with their labels), a classifier fine-tuned on it with
//! early stopping on the dev set, and its best model scored on the test set. What the item
//! leaves in `items/ID/`: `augmented.jsonl` (the copies and their source rows), `run/` (the
//! training log and run files), `test_predictions.jsonl` (one record per test row, with `gold`)
//! and, written last, `result.json`, whose presence marks the item done.

use super::plan::{Condition, Item};
use super::splits::{subset, Splits};
use super::{AugmentEvalError, AugmentEvalJob};
use crate::augment::Augmenter;
use crate::classify::data::Columns;
use crate::classify::data::{LabelledSet, Targets};
use crate::classify::infer;
use crate::classify::train::{train_sets, ClassifyTrainJob, TrainData};
use crate::comm::SingleRank;
use crate::model::{LoadedClassifier, LoadedModel};
use crate::train::checkpoint::latest_complete;
use crate::train::run_files::RunFiles;
use crate::train::TrainJob;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const RESULT_FILE: &str = "result.json";
pub const PREDICTIONS_FILE: &str = "test_predictions.jsonl";
pub const AUGMENTED_FILE: &str = "augmented.jsonl";
/// Sentences augmented between two looks at the stop flag.
const AUGMENT_CHUNK: usize = 256;

/// The test-set scores of an item's best model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestScores {
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Label name → F1, in label order.
    pub per_label_f1: serde_json::Map<String, serde_json::Value>,
}

/// What a finished item records in `result.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    pub fraction: f64,
    pub seed: u64,
    pub condition: Condition,
    /// Original training rows of the subset.
    pub train_rows: usize,
    /// Augmented copies added to them (the augmented condition).
    pub augmented_rows: usize,
    /// Copies the masked LM left unchanged, not added (they would only repeat their row).
    pub unchanged_copies: usize,
    pub dev_rows: usize,
    pub best_dev_macro_f1: Option<f64>,
    pub best_epoch: Option<u32>,
    pub epochs_run: u32,
    pub steps: u64,
    pub early_stopped: bool,
    pub test: TestScores,
    pub augment_s: f64,
    pub train_s: f64,
    pub test_s: f64,
}

/// The directory of `item` under the experiment's output directory.
pub fn item_dir(output_dir: &Path, item: &Item) -> PathBuf {
    output_dir.join("items").join(item.id())
}

/// The item's recorded result, if it finished in an earlier attempt or on another rank.
pub fn read_result(output_dir: &Path, item: &Item) -> Result<Option<ItemResult>, AugmentEvalError> {
    let path = item_dir(output_dir, item).join(RESULT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AugmentEvalError::output(&path, e)),
    };
    let result: ItemResult = serde_json::from_str(&text).map_err(|e| AugmentEvalError::output(&path, e))?;
    if result.id != item.id() {
        return Err(AugmentEvalError::output(
            &path,
            format!("holds the result of {}, not of {}", result.id, item.id()),
        ));
    }
    Ok(Some(result))
}

fn remove_if_present(path: &Path) -> Result<(), AugmentEvalError> {
    kormlm_proto::durable::remove_if_present(path).map_err(|e| AugmentEvalError::output(path, e))
}

/// The masked LM's copies of `base`'s rows, labelled as their rows; copies without an edit are
/// left out. Writes them with their source rows to `augmented.jsonl`. `None`: stopped.
fn augment_rows(
    job: &AugmentEvalJob,
    base: &LabelledSet,
    pool_rows: &[usize],
    seed: u64,
    dir: &Path,
    should_stop: &dyn Fn() -> bool,
) -> Result<Option<(LabelledSet, usize, usize)>, AugmentEvalError> {
    let model = LoadedModel::load(
        job.eval().augment_model.as_deref().unwrap_or_default(),
        None,
        job.device,
    )?;
    let options = crate::augment::options(job.augment(), seed, job.plan.train.max_seq_len as usize);
    let augmenter = Augmenter::new(&model, options, job.device);
    let (mut copies, mut sources, mut unchanged) = (Vec::new(), Vec::new(), 0);
    let mut lines = String::new();
    for start in (0..base.len()).step_by(AUGMENT_CHUNK) {
        if should_stop() {
            return Ok(None);
        }
        let end = (start + AUGMENT_CHUNK).min(base.len());
        let results = augmenter.augment(&base.texts[start..end], start as u64)?;
        for (offset, result) in results.iter().enumerate() {
            let row = start + offset;
            for (variant, edits) in result.variants.iter().zip(&result.edits) {
                if *edits == 0 || *variant == base.texts[row] {
                    unchanged += 1;
                    continue;
                }
                lines.push_str(
                    &json!({"source_row": pool_rows[row], "original": base.texts[row], "augmented": variant, "edits": edits})
                        .to_string(),
                );
                lines.push('\n');
                copies.push(variant.clone());
                sources.push(row);
            }
        }
    }
    let path = dir.join(AUGMENTED_FILE);
    kormlm_proto::durable::write(&path, lines).map_err(|e| AugmentEvalError::output(&path, e.error))?;
    let added = copies.len();
    Ok(Some((base.with_copies(copies, &sources), added, unchanged)))
}

/// The gold label(s) of test row `row` by name.
fn gold(targets: &Targets, names: &[String], row: usize) -> serde_json::Value {
    match targets {
        Targets::Single(ids) => json!(names[ids[row]]),
        Targets::Multi(flags) => json!(names
            .iter()
            .zip(&flags[row])
            .filter(|(_, f)| **f)
            .map(|(n, _)| n)
            .collect::<Vec<_>>()),
    }
}

/// Runs `item`: its classifier training continues from the latest checkpoint an interrupted
/// earlier try left (the augmentation, seeded, is drawn again the same); everything else is
/// written anew. `None`: `should_stop` ended it first (after a checkpoint); nothing is recorded
/// and the item continues on resume.
pub fn run_item(
    job: &AugmentEvalJob,
    splits: &Splits,
    item: &Item,
    should_stop: &dyn Fn() -> bool,
) -> Result<Option<ItemResult>, AugmentEvalError> {
    let dir = item_dir(&job.output_dir(), item);
    std::fs::create_dir_all(&dir).map_err(|e| AugmentEvalError::output(&dir, e))?;
    tracing::info!(item = %item.id(), "work item started");

    let pool_rows = subset(splits.train.len(), item.fraction, item.seed);
    let base = splits.train.select(&pool_rows);
    let started = Instant::now();
    let (train_set, augmented_rows, unchanged_copies) = match item.condition {
        Condition::Original => (base.clone(), 0, 0),
        Condition::Augmented => match augment_rows(job, &base, &pool_rows, item.seed, &dir, should_stop)? {
            Some(augmented) => augmented,
            None => return Ok(None),
        },
    };
    let augment_s = started.elapsed().as_secs_f64();

    let mut train_args = job.plan.train.clone();
    train_args.seed = item.seed;
    train_args.output_dir = Some(dir.join("run").display().to_string());
    train_args.overwrite_output_dir = true;
    let eval = job.eval();
    let run_dir = dir.join("run");
    let run_id = format!("augment-eval/{}", item.id());
    let resume_from = latest_complete(&RunFiles::checkpoint_root_of(&run_dir), &run_id);
    if let Some(checkpoint) = &resume_from {
        tracing::info!(item = %item.id(), checkpoint = %checkpoint.display(), "continuing the run's classifier training");
    }
    let classify = ClassifyTrainJob {
        train: TrainJob {
            args: train_args,
            config: job.plan.config.clone(),
            device: job.device,
            output_dir: run_dir.clone(),
            cache_dir: None,
            resume_from,
            run_id: Some(run_id),
            job_id: None,
            attempt: 0,
        },
        data: TrainData {
            train_file: eval.data.train_file.clone().unwrap_or_default(),
            dev_file: eval
                .data
                .dev_file
                .clone()
                .or_else(|| eval.data.train_file.clone())
                .unwrap_or_default(),
            columns: Columns::of_args(&eval.data)?,
            labels: Some(splits.labels.names.clone()),
        },
    };
    let trained_at = Instant::now();
    let summary = train_sets(
        &classify,
        splits.labels.clone(),
        train_set,
        splits.dev.clone(),
        &mut SingleRank,
        &mut |_| {},
        should_stop,
    )?;
    if summary.stopped_by_request {
        return Ok(None);
    }
    let train_s = trained_at.elapsed().as_secs_f64();

    let tested_at = Instant::now();
    let best = LoadedClassifier::load(&summary.best_model, None, None, job.device, 0)?;
    let ids = infer::tokenize(&best.tokenizer, &splits.test.texts, job.plan.train.max_seq_len as usize)?;
    let evaluation = infer::evaluate(
        &best.model,
        &ids,
        &splits.test.targets,
        job.plan.train.eval_batch_size as usize,
        best.tokenizer.special().pad,
        job.device,
    )?;
    let names = &splits.labels.names;
    let mut lines = String::new();
    for (row, (probabilities, prediction)) in evaluation.probabilities.iter().zip(&evaluation.predictions).enumerate() {
        let mut record = infer::prediction_record(&splits.test.texts[row], &splits.labels, probabilities, prediction);
        record["gold"] = gold(&splits.test.targets, names, row);
        lines.push_str(&record.to_string());
        lines.push('\n');
    }
    let predictions = dir.join(PREDICTIONS_FILE);
    kormlm_proto::durable::write(&predictions, lines).map_err(|e| AugmentEvalError::output(&predictions, e.error))?;
    drop(best);
    if !eval.keep_models {
        for model in [&summary.best_model, &summary.final_model] {
            remove_if_present(Path::new(model))?;
        }
        remove_if_present(&RunFiles::checkpoint_root_of(&run_dir))?;
    }
    let m = &evaluation.metrics;
    let result = ItemResult {
        id: item.id(),
        fraction: item.fraction,
        seed: item.seed,
        condition: item.condition,
        train_rows: base.len(),
        augmented_rows,
        unchanged_copies,
        dev_rows: splits.dev.len(),
        best_dev_macro_f1: summary.best_val_macro_f1,
        best_epoch: summary.best_epoch,
        epochs_run: summary.epochs_run,
        steps: summary.global_steps,
        early_stopped: summary.early_stopped,
        test: TestScores {
            examples: m.examples,
            accuracy: m.accuracy,
            macro_f1: m.macro_f1,
            per_label_f1: m.per_label_by_name(names),
        },
        augment_s,
        train_s,
        test_s: tested_at.elapsed().as_secs_f64(),
    };
    let path = dir.join(RESULT_FILE);
    let text = serde_json::to_string_pretty(&result).map_err(|e| AugmentEvalError::output(&path, e))?;
    kormlm_proto::durable::write(&path, text + "\n").map_err(|e| AugmentEvalError::output(&path, e.error))?;
    tracing::info!(item = %item.id(), test_macro_f1 = m.macro_f1, test_accuracy = m.accuracy, train_rows = base.len(), augmented_rows, "work item finished");
    Ok(Some(result))
}
