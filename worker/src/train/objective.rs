//! What a training run optimises, the part of the loop that differs between the masked LM
//! (`train::masked_lm`) and a sequence classifier (`classify::objective`): the model it loads,
//! the data it steps over, the loss of a step's samples and the dev-set evaluation that early
//! stopping watches. Everything else — the DeepSpeed batch rule, ZeRO-2 over the ranks,
//! schedules, checkpoints, resume, the stop agreement, logs, monitors, progress — is the one
//! loop of `train::run`.

use super::job::TrainJob;
use super::report::TrainSummary;
use super::run_files::RunFiles;
use super::trainer::{TrainableModel, Trainer};
use super::TrainError;
use crate::comm::Collective;
use serde_json::{Map, Value};
use tch::Device;

/// One optimizer step's forward and backward on this rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepWork {
    /// What the losses of the whole global step (all ranks) are divided by: its masked tokens,
    /// or its examples (times labels, multi-label). 0: nothing to learn from, the step is skipped.
    pub divisor: f64,
    /// This rank's summed loss, tokens and model FLOPs.
    pub loss_sum: f64,
    pub tokens: u64,
    pub flops: f64,
}

/// A dev-set evaluation over all ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The mean dev loss and the accuracy (of masked tokens, or of examples).
    pub loss: f64,
    pub accuracy: f64,
    /// The value of the early-stopping metric ([`Objective::METRIC`]).
    pub metric: f64,
    /// Further fields of the `eval` log record.
    pub record: Map<String, Value>,
}

pub trait Objective {
    type Model: TrainableModel;
    /// The early-stopping metric as the `eval` record names it (`best_<METRIC>` is the best so far).
    const METRIC: &'static str;
    /// Whether a higher metric is better (macro-F1) or a lower one (loss).
    const HIGHER_IS_BETTER: bool;

    /// The weights to train: `name_or_path` is `--model_name_or_path`, or a checkpoint's `model`
    /// directory when resuming.
    fn load(
        &mut self,
        name_or_path: &str,
        revision: Option<&str>,
        device: Device,
        seed: u64,
    ) -> Result<Self::Model, TrainError>;

    /// Reads and tokenises the data with `model`'s tokenizer; returns what `params.json` records
    /// of them beside the flags and the config.
    fn prepare(&mut self, job: &TrainJob, model: &Self::Model, leader: bool) -> Result<Map<String, Value>, TrainError>;

    /// Training samples (what the epoch order permutes).
    fn train_len(&self) -> usize;

    /// Tokens of training sample `index` (for `--group_by_length`).
    fn sample_len(&self, index: usize) -> usize;

    /// Forward and backward of rank `rank` of `world`'s share of one optimizer step of epoch
    /// `epoch`: `micro` holds every rank's samples of each micro-step, in order.
    fn backward(
        &self,
        trainer: &mut Trainer<Self::Model>,
        epoch: u32,
        micro: &[Vec<u32>],
        rank: usize,
        world: usize,
    ) -> Result<StepWork, TrainError>;

    /// Evaluates on the dev set, each rank a contiguous part, combined over `comm`.
    fn evaluate(
        &self,
        trainer: &Trainer<Self::Model>,
        batch_size: usize,
        comm: &mut dyn Collective,
    ) -> Result<Evaluation, TrainError>;

    /// Writes the run's summary (the log's last record and `summary.json`; rank 0).
    fn write_summary(&mut self, files: &mut RunFiles, summary: &TrainSummary) -> Result<(), TrainError> {
        files.write_summary(summary)
    }
}
