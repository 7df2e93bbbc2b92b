//! `worker classify train`: fine-tunes a sequence classifier in this one process (world size 1)
//! with the masked-LM path's pieces: the DeepSpeed config resolved by `JobPlan` (DeepSpeed's
//! batch rule), the seeded epoch order and step shape (`train::plan`), the `Trainer` (AdamW,
//! clipping, schedules, fp16 loss scaling, autocast), early stopping on the dev macro-F1, and
//! the run files (`params.json`, `training_log.jsonl` with `train`/`eval`/`summary` records,
//! `best/` and `final/` models in Hugging Face layout). No optimizer checkpoints are written.

use super::data::{self, Columns, LabelledSet};
use super::infer;
use super::ClassifyError;
use crate::comm::SingleRank;
use crate::model::sequence_classification::Labels;
use crate::model::LoadedClassifier;
use crate::train::early_stopping::EarlyStopping;
use crate::train::plan::{epoch_order, StepShape};
use crate::train::run_files::{RunFiles, LOG_FILE};
use crate::train::trainer::Trainer;
use kormlm_proto::job_plan::JobPlan;
use kormlm_proto::train_args::TrainArgs;
use kormlm_proto::v1::TaskKind;
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::Device;

/// The labelled files and where their text and labels are.
#[derive(Debug, Clone)]
pub struct TrainData {
    pub train_file: PathBuf,
    pub dev_file: PathBuf,
    pub columns: Columns,
    /// Label names in id order (single-label); default: the training file's values.
    pub labels: Option<Vec<String>>,
}

/// A resolved `worker classify train`.
#[derive(Debug, Clone)]
pub struct ClassifyTrainJob {
    pub plan: JobPlan,
    pub device: Device,
    pub data: TrainData,
    pub output_dir: PathBuf,
}

impl ClassifyTrainJob {
    /// Resolves the DeepSpeed config at `config` for one rank with the same function as a job's,
    /// and checks that the flags are ones classification training honours.
    pub fn new(
        config: &Path,
        device: Device,
        args: &TrainArgs,
        data: TrainData,
        now_unix_s: u64,
    ) -> Result<Self, ClassifyError> {
        check_flags(args)?;
        let plan = JobPlan::resolve_file(config, TaskKind::Train, args.to_map())?;
        for warning in &plan.warnings {
            tracing::warn!("{warning}");
        }
        let output_dir = plan.train.output_dir_or(&crate::train::run_dir_name(now_unix_s));
        Ok(Self {
            plan,
            device,
            data,
            output_dir,
        })
    }
}

/// Refuses the masked-LM training flags classification training does not use.
pub fn check_flags(args: &TrainArgs) -> Result<(), ClassifyError> {
    let defaults = TrainArgs::default();
    for (flag, changed) in [
        ("--data_path", args.data_path != defaults.data_path),
        ("--checkpoint_steps", args.checkpoint_steps != defaults.checkpoint_steps),
        ("--keep_checkpoints", args.keep_checkpoints != defaults.keep_checkpoints),
        ("--group_by_length", args.group_by_length != defaults.group_by_length),
    ] {
        if changed {
            return Err(ClassifyError::Usage(format!(
                "{flag} is a masked-LM training flag that classifier training does not use; the data come from the \
                 labelled files and no optimizer checkpoints are written"
            )));
        }
    }
    Ok(())
}

/// What a classification training run did (also the log's `summary` record and stdout JSON).
#[derive(Debug, Clone, Serialize)]
pub struct ClassifySummary {
    pub epochs_run: u32,
    pub global_steps: u64,
    pub labels: Vec<String>,
    pub problem_type: &'static str,
    pub best_val_macro_f1: Option<f64>,
    pub best_epoch: Option<u32>,
    pub early_stopped: bool,
    pub output_dir: String,
    pub best_model: String,
    pub final_model: String,
    pub newly_initialized: Vec<String>,
    pub unused: Vec<String>,
    /// `should_stop` ended the run before its last step.
    pub stopped_by_request: bool,
}

fn tokenize(loaded: &LoadedClassifier, set: &LabelledSet, max_len: usize) -> Result<Vec<Vec<u32>>, ClassifyError> {
    let texts: Vec<&str> = set.texts.iter().map(String::as_str).collect();
    Ok(loaded.tokenizer.encode_batch(&texts, Some(max_len))?)
}

/// Refuses an output directory that holds another run's log unless `--overwrite_output_dir`
/// (which removes that log and the models).
fn claim_output_dir(dir: &Path, overwrite: bool) -> Result<(), ClassifyError> {
    let log = dir.join(LOG_FILE);
    if !log.exists() {
        return Ok(());
    }
    if !overwrite {
        return Err(ClassifyError::Usage(format!(
            "{} holds the output of another run ({LOG_FILE}); pass --overwrite_output_dir to replace it, or choose \
             another --output_dir",
            dir.display()
        )));
    }
    for name in [LOG_FILE, "params.json", "summary.json", "best", "final"] {
        let path = dir.join(name);
        kormlm_proto::durable::remove_if_present(&path).map_err(|e| ClassifyError::output(&path, e))?;
    }
    Ok(())
}

/// Trains on the job's files; `should_stop` ends the run after the current step (with the final
/// model saved).
pub fn train(job: &ClassifyTrainJob, should_stop: &dyn Fn() -> bool) -> Result<ClassifySummary, ClassifyError> {
    let data = &job.data;
    let labels: Labels = data::label_space(&data.train_file, &data.columns, data.labels.as_deref())?;
    let train_set = data::read_labelled(&data.train_file, &data.columns, &labels)?;
    let dev_set = data::read_labelled(&data.dev_file, &data.columns, &labels)?;
    train_sets(job, &labels, &train_set, &dev_set, should_stop)
}

/// Trains on labelled sets already read (`job.data` names their files in `params.json`).
pub fn train_sets(
    job: &ClassifyTrainJob,
    labels: &Labels,
    train_set: &LabelledSet,
    dev_set: &LabelledSet,
    should_stop: &dyn Fn() -> bool,
) -> Result<ClassifySummary, ClassifyError> {
    let args = &job.plan.train;
    let data = &job.data;
    for set in [train_set, dev_set] {
        if set.is_empty() {
            return Err(ClassifyError::Data {
                path: set.path.display().to_string(),
                message: "no labelled rows".into(),
            });
        }
    }
    claim_output_dir(&job.output_dir, args.overwrite_output_dir)?;
    let loaded = LoadedClassifier::load(
        &args.model_name_or_path,
        args.revision.as_deref(),
        Some(labels.clone()),
        job.device,
        args.seed,
    )?;
    let max_len = args.max_seq_len as usize;
    let train_ids = tokenize(&loaded, train_set, max_len)?;
    let dev_ids = tokenize(&loaded, dev_set, max_len)?;
    let pad = loaded.tokenizer.special().pad;
    let report = loaded.report.clone();

    let batch = job.plan.config.batch;
    let shape = StepShape {
        train_batch_size: batch.train_batch_size as usize,
        micro_batch: batch.train_micro_batch_size_per_gpu as usize,
        accumulation: batch.gradient_accumulation_steps as usize,
        world_size: 1,
    };
    let steps_per_epoch = shape.steps_per_epoch(train_ids.len()) as u64;
    let mut total_steps = steps_per_epoch * u64::from(args.num_train_epochs);
    if args.max_steps >= 0 {
        total_steps = total_steps.min(args.max_steps as u64);
    }
    let mut trainer = Trainer::new(loaded, &job.plan.config, args, total_steps, &SingleRank)
        .map_err(crate::train::TrainError::from)?;

    let params = json!({
        "task": "classify",
        "args": args,
        "config": job.plan.config,
        "train_file": data.train_file,
        "dev_file": data.dev_file,
        "labels": labels.names,
        "problem_type": labels.problem_type.as_str(),
        "train_examples": train_set.len(),
        "dev_examples": dev_set.len(),
    });
    let mut files = RunFiles::open(&job.output_dir, 0, 0, &params)?;
    let started = std::time::Instant::now();
    let mut early = EarlyStopping::default();
    let mut window = (0.0f64, 0usize);
    let mut epochs_run = 0;
    let mut stopped_by_request = false;
    'epochs: for epoch in 0..args.num_train_epochs {
        if trainer.steps >= total_steps {
            break;
        }
        epochs_run = epoch + 1;
        let order = epoch_order(train_ids.len(), args.seed, u64::from(epoch));
        for step in 0..steps_per_epoch as usize {
            let step_rows: usize = (0..shape.accumulation)
                .map(|micro| shape.micro_samples(&order, step, micro).len())
                .sum();
            let divisor = trainer.loaded.model.loss_count(step_rows) as f64;
            let mut loss_sum = 0.0;
            for micro in 0..shape.accumulation {
                let rows: Vec<usize> = shape
                    .micro_samples(&order, step, micro)
                    .into_iter()
                    .map(|r| r as usize)
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let ids: Vec<&[u32]> = rows.iter().map(|&r| train_ids[r].as_slice()).collect();
                let (input_ids, attention_mask) = infer::inputs(&ids, pad, job.device);
                let targets = infer::targets_tensor(&train_set.targets, &rows, job.device);
                loss_sum += trainer.backward_loss(divisor, |loaded| {
                    let logits = loaded.model.forward(&input_ids, &attention_mask, true);
                    loaded.model.loss_sum(&logits, &targets)
                });
            }
            let report = trainer
                .step(&mut SingleRank)
                .map_err(|e| crate::train::TrainError::Step(e.to_string()))?;
            window.0 += loss_sum / divisor * step_rows as f64;
            window.1 += step_rows;
            let global_step = trainer.steps + trainer.skipped_steps;
            if args.logging_steps > 0 && global_step % args.logging_steps == 0 {
                files.record(&json!({
                    "type": "train",
                    "epoch": epoch,
                    "step": global_step,
                    "lr": report.lr,
                    "loss": window.0 / window.1.max(1) as f64,
                    "grad_norm": report.grad_norm,
                    "elapsed_s": started.elapsed().as_secs_f64(),
                    "skipped_steps": trainer.skipped_steps,
                }))?;
                window = (0.0, 0);
            }
            if should_stop() {
                stopped_by_request = true;
            }
            if trainer.steps >= total_steps || stopped_by_request {
                evaluate_and_record(&trainer, &dev_ids, dev_set, job, epoch, &mut early, &mut files, started)?;
                break 'epochs;
            }
        }
        if evaluate_and_record(&trainer, &dev_ids, dev_set, job, epoch, &mut early, &mut files, started)? {
            break;
        }
    }
    let final_dir = files.final_dir();
    trainer.loaded.save(&final_dir)?;
    let summary = ClassifySummary {
        epochs_run,
        global_steps: trainer.steps + trainer.skipped_steps,
        labels: labels.names.clone(),
        problem_type: labels.problem_type.as_str(),
        best_val_macro_f1: early.best,
        best_epoch: early.best_epoch,
        early_stopped: early.stopped,
        output_dir: job.output_dir.display().to_string(),
        best_model: files.best_dir().display().to_string(),
        final_model: final_dir.display().to_string(),
        newly_initialized: report.newly_initialized,
        unused: report.unused,
        stopped_by_request,
    };
    let mut record = serde_json::to_value(&summary).map_err(|e| ClassifyError::output(&job.output_dir, e))?;
    record["type"] = json!("summary");
    record["elapsed_s"] = json!(started.elapsed().as_secs_f64());
    files.record(&record)?;
    let summary_path = job.output_dir.join("summary.json");
    kormlm_proto::durable::write(&summary_path, format!("{record:#}\n"))
        .map_err(|e| ClassifyError::output(&summary_path, e.error))?;
    Ok(summary)
}

/// Evaluates on the dev set, records the `eval` record, saves the best model when the dev
/// macro-F1 improved; returns whether early stopping ends the run.
#[allow(clippy::too_many_arguments)]
fn evaluate_and_record(
    trainer: &Trainer<LoadedClassifier>,
    dev_ids: &[Vec<u32>],
    dev_set: &LabelledSet,
    job: &ClassifyTrainJob,
    epoch: u32,
    early: &mut EarlyStopping,
    files: &mut RunFiles,
    started: std::time::Instant,
) -> Result<bool, ClassifyError> {
    let args = &job.plan.train;
    let model = &trainer.loaded.model;
    let pad = trainer.loaded.tokenizer.special().pad;
    let evaluation = infer::evaluate(
        model,
        dev_ids,
        &dev_set.targets,
        args.eval_batch_size as usize,
        pad,
        job.device,
    )?;
    let m = &evaluation.metrics;
    let observation = early.observe_higher(epoch, m.macro_f1, args.max_stop_number);
    if observation.improved {
        trainer.loaded.save(&files.best_dir())?;
    }
    let per_label: serde_json::Map<String, serde_json::Value> = model
        .labels()
        .names
        .iter()
        .zip(&m.per_label_f1)
        .map(|(name, f1)| (name.clone(), json!(f1)))
        .collect();
    files.record(&json!({
        "type": "eval",
        "epoch": epoch,
        "step": trainer.steps + trainer.skipped_steps,
        "val_loss": evaluation.loss,
        "val_accuracy": m.accuracy,
        "val_macro_f1": m.macro_f1,
        "val_per_label_f1": per_label,
        "val_examples": m.examples,
        "best_val_macro_f1": early.best,
        "improved": observation.improved,
        "stop_count": early.stop_count,
        "max_stop_number": args.max_stop_number,
        "elapsed_s": started.elapsed().as_secs_f64(),
    }))?;
    tracing::info!(epoch, val_loss = evaluation.loss, val_accuracy = m.accuracy, val_macro_f1 = m.macro_f1, best = ?early.best, stop_count = early.stop_count, "evaluation");
    Ok(observation.stopped)
}
