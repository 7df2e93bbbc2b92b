//! The sequence-classification objective of the training loop: labelled training and dev sets,
//! the classifier loaded for their label space (its head newly initialised from an MLM or
//! discriminator checkpoint), cross-entropy (single-label) or BCE (multi-label) over the
//! examples of a global step, and early stopping on the dev macro-F1. The dev set is scored in
//! parts, one per rank; every rank then holds all probabilities, so the metrics are those of one
//! process.

use super::data::LabelledSet;
use super::infer;
use crate::comm::Collective;
use crate::model::sequence_classification::Labels;
use crate::model::weights::LoadReport;
use crate::model::LoadedClassifier;
use crate::train::mfu;
use crate::train::run_files::RunFiles;
use crate::train::trainer::Trainer;
use crate::train::{Evaluation, Objective, StepWork, TrainError, TrainJob, TrainSummary};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use tch::Device;

/// What a classification training run did (also the log's `summary` record, `summary.json`
/// and the stdout JSON of `worker classify train`).
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
    pub elapsed_s: f64,
}

pub struct Classification {
    labels: Labels,
    train_set: LabelledSet,
    dev_set: LabelledSet,
    /// The files the sets came from, for `params.json`.
    files: (PathBuf, PathBuf),
    train_ids: Vec<Vec<u32>>,
    dev_ids: Vec<Vec<u32>>,
    /// What loading the weights to train reported (the head newly initialised, unused weights).
    pub report: LoadReport,
    /// The run's summary, once it finished.
    pub summary: Option<ClassifySummary>,
}

impl Classification {
    /// Trains on `train_set`, stopping early on `dev_set`, for `labels` (`files` name where the
    /// sets were read).
    pub fn new(labels: Labels, train_set: LabelledSet, dev_set: LabelledSet, files: (PathBuf, PathBuf)) -> Self {
        Self {
            labels,
            train_set,
            dev_set,
            files,
            train_ids: Vec::new(),
            dev_ids: Vec::new(),
            report: LoadReport::default(),
            summary: None,
        }
    }
}

impl Objective for Classification {
    type Model = LoadedClassifier;
    const METRIC: &'static str = "val_macro_f1";
    const HIGHER_IS_BETTER: bool = true;

    fn load(
        &mut self,
        name_or_path: &str,
        revision: Option<&str>,
        device: Device,
        seed: u64,
    ) -> Result<LoadedClassifier, TrainError> {
        let loaded = LoadedClassifier::load(name_or_path, revision, Some(self.labels.clone()), device, seed)?;
        self.report = loaded.report.clone();
        Ok(loaded)
    }

    fn prepare(
        &mut self,
        job: &TrainJob,
        loaded: &LoadedClassifier,
        _leader: bool,
    ) -> Result<Map<String, Value>, TrainError> {
        let max_len = job.args.max_seq_len as usize;
        self.train_ids = infer::tokenize(&loaded.tokenizer, &self.train_set.texts, max_len)?;
        self.dev_ids = infer::tokenize(&loaded.tokenizer, &self.dev_set.texts, max_len)?;
        let mut params = Map::new();
        params.insert("task".into(), json!("classify"));
        params.insert("train_file".into(), json!(self.files.0));
        params.insert("dev_file".into(), json!(self.files.1));
        params.insert("labels".into(), json!(self.labels.names));
        params.insert("problem_type".into(), json!(self.labels.problem_type.as_str()));
        params.insert("train_examples".into(), json!(self.train_set.len()));
        params.insert("dev_examples".into(), json!(self.dev_set.len()));
        Ok(params)
    }

    fn train_len(&self) -> usize {
        self.train_ids.len()
    }

    fn sample_len(&self, index: usize) -> usize {
        self.train_ids[index].len()
    }

    /// Every example's loss is divided by the count of the whole global step (examples, times
    /// labels for multi-label: transformers' mean), so the gradients summed over micro-batches
    /// and ranks are those of the global mean.
    fn backward(
        &self,
        trainer: &mut Trainer<LoadedClassifier>,
        _epoch: u32,
        micro: &[Vec<u32>],
        rank: usize,
        world: usize,
    ) -> Result<StepWork, TrainError> {
        let examples: usize = micro.iter().map(Vec::len).sum();
        let mut work = StepWork {
            divisor: trainer.loaded.model.loss_count(examples) as f64,
            ..Default::default()
        };
        let pad = trainer.loaded.tokenizer.special().pad;
        let config = trainer.loaded.model.config().clone();
        let device = trainer.device;
        for all in micro {
            let rows: Vec<usize> = all[rank * all.len() / world..(rank + 1) * all.len() / world]
                .iter()
                .map(|&r| r as usize)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let ids: Vec<&[u32]> = rows.iter().map(|&r| self.train_ids[r].as_slice()).collect();
            let lengths: Vec<usize> = ids.iter().map(|i| i.len()).collect();
            let (input_ids, attention_mask) = infer::inputs(&ids, pad, device);
            let targets = infer::targets_tensor(&self.train_set.targets, &rows, device);
            work.tokens += lengths.iter().sum::<usize>() as u64;
            work.flops += mfu::train_flops(&config, lengths.iter().copied(), 0);
            work.loss_sum += trainer.backward_loss(work.divisor, |loaded| {
                let logits = loaded.model.forward(&input_ids, &attention_mask, true);
                loaded.model.loss_sum(&logits, &targets)
            });
        }
        Ok(work)
    }

    fn evaluate(
        &self,
        trainer: &Trainer<LoadedClassifier>,
        batch_size: usize,
        comm: &mut dyn Collective,
    ) -> Result<Evaluation, TrainError> {
        let model = &trainer.loaded.model;
        let (rank, world) = (comm.rank(), comm.world_size());
        let n = self.dev_ids.len();
        let part = rank * n / world..(rank + 1) * n / world;
        let rows: Vec<usize> = part.clone().collect();
        let targets = self.dev_set.targets.select(&rows);
        let pad = trainer.loaded.tokenizer.special().pad;
        // In the training precision, as the Hugging Face Trainer evaluates under autocast.
        let scored = crate::autocast::with(trainer.precision, trainer.device, || {
            infer::score(
                model,
                &self.dev_ids[part.clone()],
                Some(&targets),
                batch_size,
                pad,
                trainer.device,
            )
        })?;
        // Every rank's probabilities in place (zeros elsewhere: the sum is exact), and the loss.
        let width = self.labels.len();
        let mut all = vec![0.0; n * width + 1];
        for (i, probabilities) in scored.probabilities.iter().enumerate() {
            for (j, p) in probabilities.iter().enumerate() {
                all[(part.start + i) * width + j] = f64::from(*p);
            }
        }
        all[n * width] = scored.loss_sum.unwrap_or(0.0);
        comm.all_reduce_scalars(&mut all)?;
        let predictions: Vec<infer::Prediction> = all[..n * width]
            .chunks(width.max(1))
            .map(|p| {
                let probabilities: Vec<f32> = p.iter().map(|&v| v as f32).collect();
                infer::predict(self.labels.problem_type, &probabilities)
            })
            .collect();
        let metrics = infer::metrics_of(&self.dev_set.targets, &predictions, width);
        let loss = all[n * width] / model.loss_count(n).max(1) as f64;
        let mut record = Map::new();
        record.insert("val_macro_f1".into(), json!(metrics.macro_f1));
        record.insert(
            "val_per_label_f1".into(),
            Value::Object(metrics.per_label_by_name(&self.labels.names)),
        );
        record.insert("val_examples".into(), json!(metrics.examples));
        Ok(Evaluation {
            loss,
            accuracy: metrics.accuracy,
            metric: metrics.macro_f1,
            record,
        })
    }

    fn write_summary(&mut self, files: &mut RunFiles, run: &TrainSummary) -> Result<(), TrainError> {
        let summary = ClassifySummary {
            epochs_run: run.epochs_run,
            global_steps: run.global_steps,
            labels: self.labels.names.clone(),
            problem_type: self.labels.problem_type.as_str(),
            best_val_macro_f1: run.best_val_loss,
            best_epoch: run.best_epoch,
            early_stopped: run.early_stopped,
            output_dir: files.dir().display().to_string(),
            best_model: files.best_dir().display().to_string(),
            final_model: files.final_dir().display().to_string(),
            newly_initialized: self.report.newly_initialized.clone(),
            unused: self.report.unused.clone(),
            stopped_by_request: run.stopped_by_request,
            elapsed_s: run.elapsed_s,
        };
        let mut record = json!(summary);
        record["type"] = json!("summary");
        files.write_summary_as(&record, &record)?;
        self.summary = Some(summary);
        Ok(())
    }
}
