//! The training loop: epochs of optimizer steps over the global sample order, logging,
//! evaluation every epoch, early stopping on dev loss, and the best model saved in Hugging Face
//! layout. The same loop runs in one process (`worker train`) and on every rank of a job.

use super::batch::collate;
use super::checkpoint::{self, CheckpointError, TrainerState};
use super::eval::{evaluate, EvalSums};
use super::plan::{epoch_order, StepShape};
use super::plot;
use super::trainer::{StepError, Trainer};
use crate::comm::{Collective, CommError};
use crate::corpus::{CorpusError, CorpusSpec};
use crate::dataset::{tokenize_cached, DatasetError, TokenizedSet};
use crate::masking::{MaskedSample, Masker, DEV_EPOCH};
use crate::model::{LoadedModel, ModelError};
use kormlm_proto::ds_config::ResolvedConfig;
use kormlm_proto::train_args::TrainArgs;
use kormlm_proto::v1::{EarlyStopState, Progress};
use serde::Serialize;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{path}: {message}")]
    Output { path: String, message: String },
    #[error("training: {0}")]
    Step(String),
    #[error("the training set is empty after reading {0}")]
    EmptyCorpus(String),
}

/// A collective that fails inside a step is a communication failure like any other.
impl From<StepError> for TrainError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Comm(e) => TrainError::Comm(e),
            StepError::LossScale(e) => TrainError::Step(e.to_string()),
        }
    }
}

fn out_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Output {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// What a run is told to do.
pub struct TrainJob {
    pub args: TrainArgs,
    pub config: ResolvedConfig,
    pub device: Device,
    /// Where the log, the best model and the summary go (written by rank 0).
    pub output_dir: PathBuf,
    /// Tokenised corpora are cached here.
    pub cache_dir: Option<PathBuf>,
    /// A checkpoint directory to continue from.
    pub resume_from: Option<PathBuf>,
}

/// Live progress, for progress bars and heartbeats.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgressEvent {
    pub epoch: u32,
    pub global_step: u64,
    pub total_steps: u64,
    pub samples_in_epoch: u64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub stop_count: u32,
    pub early_stopped: bool,
    pub val_loss_history: Vec<f64>,
    pub learning_rate: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    pub loss_scale: f64,
    pub skipped_steps: u64,
    pub optimizer_state_bytes: u64,
    /// The newest complete checkpoint and its global step.
    pub checkpoint: Option<(String, u64)>,
    /// The checkpoint holding the best weights so far.
    pub best_checkpoint: Option<(String, u64)>,
}

impl ProgressEvent {
    /// The progress and early-stopping messages a heartbeat carries.
    pub fn to_proto(&self) -> (Progress, EarlyStopState) {
        (
            Progress {
                epoch: self.epoch,
                global_step: self.global_step,
                total_steps: self.total_steps,
                samples_in_epoch: self.samples_in_epoch,
                train_loss: self.train_loss,
                val_loss: self.val_loss,
                val_accuracy: self.val_accuracy,
                learning_rate: self.learning_rate,
                samples_per_s: self.samples_per_s,
                tokens_per_s: self.tokens_per_s,
                loss_scale: self.loss_scale,
                skipped_steps: self.skipped_steps,
            },
            EarlyStopState {
                best_val_loss: self.best_val_loss,
                stop_count: self.stop_count,
                max_stop_number: 0,
                early_stopped: self.early_stopped,
                val_loss_history: self.val_loss_history.clone(),
            },
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub epochs_run: u32,
    pub global_steps: u64,
    pub best_val_loss: Option<f64>,
    pub best_epoch: Option<u32>,
    pub early_stopped: bool,
    pub stop_count: u32,
    pub val_loss_history: Vec<f64>,
    pub best_model_dir: Option<String>,
    /// The weights after the last step (HF layout).
    pub final_model_dir: String,
    pub stopped_by_request: bool,
    pub elapsed_s: f64,
}

/// Appends JSON records to `training_log.jsonl` (rank 0 only).
struct Log {
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl Log {
    fn record(&mut self, value: serde_json::Value) -> Result<(), TrainError> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{value}")
                .and_then(|_| f.flush())
                .map_err(|e| out_err(&self.path, e))?;
        }
        Ok(())
    }
}

/// Rank 0 sums the dev-set parts of all ranks: rank r evaluates `[r·n/W, (r+1)·n/W)`.
fn distributed_eval(
    trainer: &Trainer,
    dev: &[MaskedSample],
    args: &TrainArgs,
    comm: &mut dyn Collective,
) -> Result<EvalSums, TrainError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let part = &dev[rank * dev.len() / world..(rank + 1) * dev.len() / world];
    let pad = trainer.loaded.tokenizer.special().pad;
    let local = evaluate(
        &trainer.loaded.model,
        part,
        args.eval_batch_size as usize,
        pad,
        trainer.device,
    );
    let mut sums = [local.loss_sum, local.correct, local.masked];
    comm.all_reduce_scalars(&mut sums)?;
    Ok(EvalSums {
        loss_sum: sums[0],
        correct: sums[1],
        masked: sums[2],
    })
}

/// Runs the whole training. `on_progress` hears of every logged step and evaluation;
/// `should_stop` is polled after every optimizer step (a kill request).
pub fn train(
    job: &TrainJob,
    comm: &mut dyn Collective,
    on_progress: &mut dyn FnMut(&ProgressEvent),
    should_stop: &dyn Fn() -> bool,
) -> Result<TrainSummary, TrainError> {
    let started = Instant::now();
    let args = &job.args;
    let (rank, world) = (comm.rank(), comm.world_size());
    let leader = rank == 0;
    let resume = match &job.resume_from {
        None => None,
        Some(dir) => Some(match checkpoint::read_state(dir) {
            Ok(state) => (dir.clone(), state),
            Err(e) => {
                let root = dir.parent().unwrap_or(Path::new("."));
                let fallback = checkpoint::latest_complete(root).ok_or(e)?;
                tracing::warn!(requested = %dir.display(), using = %fallback.display(), "checkpoint unreadable; using the newest complete one");
                let state = checkpoint::read_state(&fallback)?;
                (fallback, state)
            }
        }),
    };
    let loaded = match &resume {
        Some((dir, _)) => LoadedModel::load(dir.join("model").to_str().unwrap_or_default(), None, job.device)?,
        None => LoadedModel::load(&args.model_name_or_path, args.revision.as_deref(), job.device)?,
    };
    let spec = CorpusSpec::from_data_path(&args.data_path)?;
    let corpus = spec.load()?;
    if corpus.train.is_empty() {
        return Err(TrainError::EmptyCorpus(args.data_path.clone()));
    }
    if leader {
        tracing::info!(
            train = corpus.report.train_sentences,
            dev = corpus.report.dev_sentences,
            duplicates = corpus.report.duplicates_removed,
            "corpus loaded"
        );
    }
    let max_len = args.max_seq_len as usize;
    let cache = job.cache_dir.as_deref();
    let train_set: TokenizedSet = tokenize_cached(&corpus.train, &loaded.tokenizer, max_len, cache)?;
    let dev_set: TokenizedSet = tokenize_cached(&corpus.dev, &loaded.tokenizer, max_len, cache)?;
    let masker = Masker {
        special: loaded.tokenizer.special(),
        vocab_size: loaded.tokenizer.vocab_size() as u32,
        probability: 0.15,
        seed: args.seed,
    };
    let dev: Vec<MaskedSample> = (0..dev_set.len())
        .map(|i| masker.mask(dev_set.get(i), DEV_EPOCH, i as u64))
        .collect();

    let batch = job.config.batch;
    let shape = StepShape {
        train_batch_size: batch.train_batch_size as usize,
        micro_batch: batch.train_micro_batch_size_per_gpu as usize,
        accumulation: batch.gradient_accumulation_steps as usize,
        world_size: world,
    };
    let steps_per_epoch = shape.steps_per_epoch(train_set.len()) as u64;
    let mut total_steps = steps_per_epoch * u64::from(args.num_train_epochs);
    if args.max_steps > 0 {
        total_steps = total_steps.min(args.max_steps as u64);
    }
    tch::manual_seed(args.seed as i64);
    let mut trainer = Trainer::new(loaded, &job.config, args, total_steps, &*comm);
    if let Some((dir, state)) = &resume {
        checkpoint::restore_optimizer(&mut trainer, dir, state)?;
        if leader {
            tracing::info!(checkpoint = %dir.display(), epoch = state.epoch, step = state.next_step, "resuming");
        }
    }
    let optimizer_state_bytes = trainer.optimizer_state_bytes();
    let checkpoint_root = job.output_dir.join("checkpoints");

    let log_path = job.output_dir.join("training_log.jsonl");
    let mut log = Log {
        file: None,
        path: log_path.clone(),
    };
    let best_dir = job.output_dir.join("best");
    if leader {
        std::fs::create_dir_all(&job.output_dir).map_err(|e| out_err(&job.output_dir, e))?;
        let params = json!({"args": args, "config": job.config, "corpus": corpus.report});
        let params_path = job.output_dir.join("params.json");
        std::fs::write(&params_path, format!("{params:#}\n")).map_err(|e| out_err(&params_path, e))?;
        let file = if resume.is_some() {
            std::fs::OpenOptions::new().create(true).append(true).open(&log_path)
        } else {
            std::fs::File::create(&log_path)
        };
        log.file = Some(file.map_err(|e| out_err(&log_path, e))?);
    }

    let pad = trainer.loaded.tokenizer.special().pad;
    let mut progress = ProgressEvent {
        total_steps,
        optimizer_state_bytes,
        ..Default::default()
    };
    let mut best: Option<f64> = resume.as_ref().and_then(|(_, s)| s.best_val_loss);
    let mut best_epoch = resume.as_ref().and_then(|(_, s)| s.best_epoch);
    let mut stop_count = resume.as_ref().map_or(0, |(_, s)| s.stop_count);
    let mut history = resume
        .as_ref()
        .map_or_else(Vec::new, |(_, s)| s.val_loss_history.clone());
    let mut early_stopped = resume.as_ref().is_some_and(|(_, s)| s.early_stopped);
    let (start_epoch, mut start_step) = resume.as_ref().map_or((0, 0), |(_, s)| (s.epoch, s.next_step));
    // (loss sum, masked tokens) of the current epoch, over all ranks.
    let mut epoch_loss = resume
        .as_ref()
        .map_or((0.0, 0.0), |(_, s)| (s.epoch_loss_sum, s.epoch_masked));
    progress.global_step = trainer.steps + trainer.skipped_steps;
    progress.best_val_loss = best;
    progress.stop_count = stop_count;
    progress.val_loss_history = history.clone();
    progress.early_stopped = early_stopped;
    let state_at = |trainer: &Trainer,
                    epoch: u32,
                    next_step: u64,
                    best: Option<f64>,
                    best_epoch: Option<u32>,
                    stop_count: u32,
                    history: &[f64],
                    epoch_loss: (f64, f64),
                    early_stopped: bool| TrainerState {
        version: 1,
        epoch,
        next_step,
        steps: trainer.steps,
        skipped_steps: trainer.skipped_steps,
        scaler: trainer.scaler.clone(),
        best_val_loss: best,
        best_epoch,
        stop_count,
        val_loss_history: history.to_vec(),
        epoch_loss_sum: epoch_loss.0,
        epoch_masked: epoch_loss.1,
        early_stopped,
        world_size: world,
        partitions: trainer.partition.saved_ranges(),
        numel: trainer.flat.numel,
        seed: args.seed,
    };
    let (mut window_loss, mut window_masked, mut window_samples, mut window_tokens) = (0.0, 0.0, 0u64, 0u64);
    let mut window_start = Instant::now();
    let mut epochs_run = 0;
    let mut stopped_by_request = false;
    let show_bar = leader && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = show_bar.then(|| {
        let b = indicatif::ProgressBar::new(total_steps);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}<{eta_precise}]",
            )
            .expect("a valid template"),
        );
        b
    });

    'epochs: for epoch in start_epoch..args.num_train_epochs {
        if early_stopped {
            break;
        }
        epochs_run = epoch + 1;
        progress.epoch = epoch;
        let order = epoch_order(train_set.len(), args.seed, u64::from(epoch));
        let first_step = std::mem::take(&mut start_step) as usize;
        if first_step == 0 {
            epoch_loss = (0.0, 0.0);
        }
        for step in first_step..steps_per_epoch as usize {
            // Masked-token count of the whole global step, so every micro-batch on every rank
            // divides by the same number (masking is deterministic, so no communication).
            let mut step_masked = 0usize;
            let mut micro_sets = Vec::with_capacity(shape.accumulation);
            for micro in 0..shape.accumulation {
                let all = shape.micro_samples(&order, step, micro);
                let from = rank * all.len() / world;
                let to = (rank + 1) * all.len() / world;
                let mut mine = Vec::with_capacity(to - from);
                for (k, &i) in all.iter().enumerate() {
                    let sample = masker.mask(train_set.get(i as usize), u64::from(epoch), u64::from(i));
                    step_masked += sample.masked_count();
                    if (from..to).contains(&k) {
                        mine.push(sample);
                    }
                }
                micro_sets.push(mine);
            }
            let global_samples: u64 = (0..shape.accumulation)
                .map(|m| shape.micro_samples(&order, step, m).len() as u64)
                .sum();
            if step_masked == 0 {
                tracing::warn!(epoch, step, "no token of this step was masked; step skipped");
                continue;
            }
            let mut loss_sum = 0.0;
            let mut tokens = 0u64;
            for samples in &micro_sets {
                if samples.is_empty() {
                    continue;
                }
                let batch = collate(samples, pad, job.device);
                tokens += batch.tokens as u64;
                loss_sum += trainer.backward(&batch, step_masked as f64);
            }
            let report = trainer.step(comm)?;
            let mut sums = [loss_sum, tokens as f64];
            comm.all_reduce_scalars(&mut sums)?;
            window_loss += sums[0];
            window_masked += step_masked as f64;
            epoch_loss.0 += sums[0];
            epoch_loss.1 += step_masked as f64;
            window_samples += global_samples;
            window_tokens += sums[1] as u64;
            progress.global_step = trainer.steps + trainer.skipped_steps;
            progress.samples_in_epoch = ((step + 1) * shape.train_batch_size).min(train_set.len()) as u64;
            progress.learning_rate = report.lr;
            progress.skipped_steps = trainer.skipped_steps;
            progress.loss_scale = trainer.scaler.as_ref().map_or(0.0, |s| s.cur_scale);
            let last_step = progress.global_step >= total_steps;
            let log_now = (args.logging_steps > 0 && progress.global_step.is_multiple_of(args.logging_steps))
                || step as u64 + 1 == steps_per_epoch
                || last_step;
            if log_now && window_masked > 0.0 {
                let elapsed = window_start.elapsed().as_secs_f64().max(1e-9);
                progress.train_loss = Some(window_loss / window_masked);
                progress.samples_per_s = window_samples as f64 / elapsed;
                progress.tokens_per_s = window_tokens as f64 / elapsed;
                log.record(json!({
                    "type": "train",
                    "epoch": epoch,
                    "step": progress.global_step,
                    "lr": report.lr,
                    "loss": progress.train_loss,
                    "grad_norm": report.grad_norm,
                    "samples_per_s": progress.samples_per_s,
                    "tokens_per_s": progress.tokens_per_s,
                    "elapsed_s": started.elapsed().as_secs_f64(),
                    "skipped_steps": trainer.skipped_steps,
                }))?;
                if let Some(bar) = &bar {
                    bar.set_message(format!(
                        "epoch {epoch} loss {:.4} {:.1} samples/s",
                        progress.train_loss.unwrap_or(f64::NAN),
                        progress.samples_per_s
                    ));
                }
                on_progress(&progress);
                (window_loss, window_masked, window_samples, window_tokens) = (0.0, 0.0, 0, 0);
                window_start = Instant::now();
            }
            if let Some(bar) = &bar {
                bar.set_position(progress.global_step);
            }
            if last_step {
                break;
            }
            // Every rank must leave at the same step, so the stop request is agreed on.
            let mut stop = [f64::from(u8::from(should_stop()))];
            comm.all_reduce_scalars(&mut stop)?;
            let periodic = args.checkpoint_steps > 0 && progress.global_step.is_multiple_of(args.checkpoint_steps);
            if (stop[0] > 0.0 || periodic) && step + 1 < steps_per_epoch as usize {
                let state = state_at(
                    &trainer,
                    epoch,
                    step as u64 + 1,
                    best,
                    best_epoch,
                    stop_count,
                    &history,
                    epoch_loss,
                    false,
                );
                let dir = checkpoint::save(&trainer, &state, comm, &checkpoint_root, args.keep_checkpoints)?;
                progress.checkpoint = Some((dir.display().to_string(), progress.global_step));
                on_progress(&progress);
            }
            if stop[0] > 0.0 {
                stopped_by_request = true;
                if step + 1 < steps_per_epoch as usize {
                    break 'epochs;
                }
                // At the last step of an epoch the regular epoch end (evaluation, checkpoint) runs.
                break;
            }
        }

        let sums = distributed_eval(&trainer, &dev, args, comm)?;
        let val_loss = sums.loss();
        history.push(val_loss);
        let improved = best.is_none_or(|b| val_loss < b);
        if improved {
            best = Some(val_loss);
            best_epoch = Some(epoch);
            stop_count = 0;
            if leader {
                trainer.loaded.save(&best_dir)?;
            }
        } else {
            stop_count += 1;
        }
        early_stopped = !improved && stop_count >= args.max_stop_number;
        progress.val_loss = Some(val_loss);
        progress.val_accuracy = Some(sums.accuracy());
        progress.best_val_loss = best;
        progress.stop_count = stop_count;
        progress.early_stopped = early_stopped;
        progress.val_loss_history = history.clone();
        log.record(json!({
            "type": "eval",
            "epoch": epoch,
            "step": progress.global_step,
            "val_loss": val_loss,
            "val_accuracy": sums.accuracy(),
            "train_loss": (epoch_loss.1 > 0.0).then(|| epoch_loss.0 / epoch_loss.1),
            "best_val_loss": best,
            "improved": improved,
            "stop_count": stop_count,
            "max_stop_number": args.max_stop_number,
            "elapsed_s": started.elapsed().as_secs_f64(),
        }))?;
        if leader {
            tracing::info!(epoch, val_loss, val_accuracy = sums.accuracy(), best = ?best, stop_count, "evaluation");
            // A plot that cannot be drawn is not worth stopping a training run for.
            let png = job.output_dir.join(plot::LOSS_CURVE_FILE);
            if let Err(e) = plot::plot_log(&log_path, &png) {
                tracing::warn!(error = %e, "loss-curve plot not written");
            }
        }
        let state = state_at(
            &trainer,
            epoch + 1,
            0,
            best,
            best_epoch,
            stop_count,
            &history,
            (0.0, 0.0),
            early_stopped,
        );
        let dir = checkpoint::save(&trainer, &state, comm, &checkpoint_root, args.keep_checkpoints)?;
        progress.checkpoint = Some((dir.display().to_string(), progress.global_step));
        if improved {
            if leader {
                checkpoint::mark_best(&checkpoint_root, &dir)?;
            }
            progress.best_checkpoint = progress.checkpoint.clone();
        }
        on_progress(&progress);
        if stopped_by_request {
            break;
        }
        if early_stopped {
            if leader {
                tracing::info!(epoch, stop_count, "EARLY STOPPED");
            }
            break;
        }
        if progress.global_step >= total_steps {
            break;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let final_dir = job.output_dir.join("final");
    if leader {
        trainer.loaded.save(&final_dir)?;
    }
    let summary = TrainSummary {
        epochs_run,
        global_steps: progress.global_step,
        best_val_loss: best,
        best_epoch,
        early_stopped,
        stop_count,
        val_loss_history: history,
        best_model_dir: best.map(|_| best_dir.display().to_string()),
        final_model_dir: final_dir.display().to_string(),
        stopped_by_request,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    if leader {
        log.record(json!({"type": "summary", "summary": &summary}))?;
        let path = job.output_dir.join("summary.json");
        std::fs::write(&path, format!("{:#}\n", json!(summary))).map_err(|e| out_err(&path, e))?;
    }
    Ok(summary)
}
