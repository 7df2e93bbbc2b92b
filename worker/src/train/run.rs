//! The training loop, as setup → epochs → finish, over an [`Objective`] (the masked LM, or a
//! sequence classifier). Setup resolves the checkpoint to resume from, loads the model and the
//! objective's data and builds the trainer and the run's files.
//! Each epoch runs its optimizer steps over the global sample order (training-log records,
//! periodic checkpoints, a stop request agreed on by all ranks), then evaluates on the dev set,
//! applies early stopping, saves the best model and checkpoints. Finish saves the final model
//! and the summary. The same loop runs in one process (`worker train`) and on every rank of a
//! job.
//!
//! A resumed run continues exactly as the uninterrupted one on the same world size: the
//! checkpoint carries, besides weights and optimizer state, every rank's random-generator
//! states (dropout) and the training-log window, restored as the last act of setup.

use super::checkpoint::{self, LogWindow, RngResume, RngStateFile, TrainerState};
use super::early_stopping::EarlyStopping;
use super::error::TrainError;
use super::job::TrainJob;
use super::masked_lm::MaskedLm;
use super::mfu;
use super::monitors::{Monitors, StepScalars};
use super::objective::Objective;
use super::ownership::{self, Claim, RunIdentity};
use super::plan::{epoch_order, group_by_length, StepShape};
use super::report::{ProgressEvent, TrainSummary};
use super::run_files::RunFiles;
use super::trainer::{StepReport, Trainer};
use crate::comm::{all_reduce_scalars_within, deadlines, Collective};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Runs the whole masked-LM training. `on_progress` hears of every logged step and evaluation;
/// `should_stop` is polled after every optimizer step (a kill request).
pub fn train(
    job: &TrainJob,
    comm: &mut dyn Collective,
    on_progress: &mut dyn FnMut(&ProgressEvent),
    should_stop: &dyn Fn() -> bool,
) -> Result<TrainSummary, TrainError> {
    run(job, &mut MaskedLm::default(), comm, on_progress, should_stop)
}

/// Runs the whole training of `objective` (see [`train`]).
pub fn run<O: Objective>(
    job: &TrainJob,
    objective: &mut O,
    comm: &mut dyn Collective,
    on_progress: &mut dyn FnMut(&ProgressEvent),
    should_stop: &dyn Fn() -> bool,
) -> Result<TrainSummary, TrainError> {
    let mut run = Run::setup(job, objective, comm, on_progress, should_stop)?;
    run.epochs()?;
    run.finish()
}

/// A loss sum and the count it is the sum over (masked tokens, or examples).
#[derive(Debug, Clone, Copy, Default)]
struct LossSum {
    sum: f64,
    masked: f64,
}

impl LossSum {
    fn add(&mut self, loss: f64, masked: f64) {
        self.sum += loss;
        self.masked += masked;
    }

    fn mean(&self) -> Option<f64> {
        (self.masked > 0.0).then(|| self.sum / self.masked)
    }
}

/// What the steps since the last `train` log record did, over all ranks.
struct Window {
    loss: LossSum,
    samples: u64,
    tokens: u64,
    /// Model FLOPs done (see `mfu::train_flops`).
    flops: f64,
    since: Instant,
    /// The global step of the last `train` record.
    last_logged_step: u64,
}

impl Window {
    /// An empty window after a record at `last_logged_step`.
    fn new(last_logged_step: u64) -> Self {
        Self {
            loss: LossSum::default(),
            samples: 0,
            tokens: 0,
            flops: 0.0,
            since: Instant::now(),
            last_logged_step,
        }
    }

    /// The window a checkpoint saved.
    fn restore(saved: &LogWindow) -> Self {
        let elapsed = Duration::try_from_secs_f64(saved.elapsed_s).unwrap_or_default();
        Self {
            loss: LossSum {
                sum: saved.loss_sum,
                masked: saved.masked,
            },
            samples: saved.samples,
            tokens: saved.tokens,
            flops: saved.flops,
            since: Instant::now().checked_sub(elapsed).unwrap_or_else(Instant::now),
            last_logged_step: saved.last_logged_step,
        }
    }

    fn save(&self) -> LogWindow {
        LogWindow {
            loss_sum: self.loss.sum,
            masked: self.loss.masked,
            samples: self.samples,
            tokens: self.tokens,
            flops: self.flops,
            elapsed_s: self.since.elapsed().as_secs_f64(),
            last_logged_step: self.last_logged_step,
        }
    }
}

/// How an optimizer step ended.
enum StepEnd {
    Next,
    /// The run's last step: the epoch ends (and is evaluated) here.
    LastStep,
    /// The ranks agreed to stop (a kill request).
    StopRequested,
}

/// A training run between setup and finish.
struct Run<'a, O: Objective> {
    job: &'a TrainJob,
    objective: &'a mut O,
    comm: &'a mut dyn Collective,
    on_progress: &'a mut dyn FnMut(&ProgressEvent),
    should_stop: &'a dyn Fn() -> bool,
    started: Instant,
    /// Rank 0, which logs the run's milestones.
    leader: bool,
    /// The run and attempt its checkpoints name.
    run_id: String,
    attempt: u32,
    files: RunFiles,
    /// TensorBoard / CSV monitors of the DeepSpeed config (rank 0).
    monitors: Monitors,
    trainer: Trainer<O::Model>,
    shape: StepShape,
    steps_per_epoch: usize,
    total_steps: u64,
    /// The first epoch to run, and the first step of it not yet taken (a resumed run).
    start_epoch: u32,
    resume_step: usize,
    early: EarlyStopping,
    /// The training loss of the epoch so far, over all ranks.
    epoch_loss: LossSum,
    window: Window,
    progress: ProgressEvent,
    epochs_run: u32,
    stopped_by_request: bool,
    bar: Option<indicatif::ProgressBar>,
    /// This device's measured matmul peak (FLOP/s) in the training precision, for the MFU.
    peak_flops: f64,
    /// How long the ranks wait for rank 0's (and each rank's) writes at a saving barrier.
    saving_timeout: Duration,
}

impl<'a, O: Objective> Run<'a, O> {
    fn setup(
        job: &'a TrainJob,
        objective: &'a mut O,
        comm: &'a mut dyn Collective,
        on_progress: &'a mut dyn FnMut(&ProgressEvent),
        should_stop: &'a dyn Fn() -> bool,
    ) -> Result<Self, TrainError> {
        let started = Instant::now();
        let args = &job.args;
        let saving_timeout = deadlines::saving_timeout()?;
        crate::autocast::apply_tf32(args.tf32, job.device)?;
        let (rank, world) = (comm.rank(), comm.world_size());
        let leader = rank == 0;
        let resume = resume_point(job.resume_from.as_deref(), job.run_id.as_deref())?;
        let resumed_state = resume.as_ref().map(|(_, state)| state);
        let run_id = job
            .run_id
            .clone()
            .or_else(|| resumed_state.and_then(|s| s.run_id.clone()))
            .unwrap_or_else(ownership::new_run_id);
        let attempt = match job.attempt {
            0 => resumed_state.map_or(1, |s| s.attempt + 1),
            n => n,
        };
        let start_step = resumed_state.map_or(0, TrainerState::global_step);
        if leader {
            claim_output_dir(job, &run_id, resume.as_ref(), start_step)?;
        }
        let loaded = match &resume {
            Some((dir, _)) => {
                let model = dir.join("model");
                objective
                    .load(model.to_str().unwrap_or_default(), None, job.device, args.seed)
                    .map_err(|e| TrainError::unreadable(dir, e))?
            }
            None => objective.load(
                &args.model_name_or_path,
                args.revision.as_deref(),
                job.device,
                args.seed,
            )?,
        };
        let data_params = objective.prepare(job, &loaded, leader)?;

        let batch = job.config.batch;
        let shape = StepShape {
            train_batch_size: batch.train_batch_size as usize,
            micro_batch: batch.train_micro_batch_size_per_gpu as usize,
            accumulation: batch.gradient_accumulation_steps as usize,
            world_size: world,
        };
        let steps_per_epoch = shape.steps_per_epoch(objective.train_len());
        let mut total_steps = steps_per_epoch as u64 * u64::from(args.num_train_epochs);
        if args.max_steps > 0 {
            total_steps = total_steps.min(args.max_steps as u64);
        }
        tch::manual_seed(args.seed as i64);
        let mut trainer = Trainer::new(loaded, &job.config, args, total_steps, &*comm)?;
        if let Some((dir, state)) = &resume {
            checkpoint::restore_optimizer(&mut trainer, dir, state).map_err(|e| TrainError::unreadable(dir, e))?;
            if leader {
                tracing::info!(checkpoint = %dir.display(), epoch = state.epoch, step = state.next_step, run_id, attempt, "resuming");
            }
        }
        let peak_flops = mfu::measure_peak(trainer.precision, job.device, Duration::from_millis(300));
        let mut params = json!({"args": args, "config": job.config});
        params.as_object_mut().expect("params is an object").extend(data_params);
        let mut files = RunFiles::open(&job.output_dir, rank, start_step, &params)?;
        files.record(&json!({
            "type": "start",
            "step": start_step,
            "epoch": resumed_state.map_or(0, |s| s.epoch),
            "run_id": run_id,
            "attempt": attempt,
            "world_size": world,
            "checkpoint": resume.as_ref().map(|(dir, _)| dir.display().to_string()),
            "precision": trainer.precision.name(),
            "peak_gflops": peak_flops / 1e9,
        }))?;

        // A run that continues an earlier attempt has TensorBoard drop what that attempt wrote
        // after the checkpoint (or all it wrote, restarted without one).
        let continues = resume.is_some() || attempt > 1;
        let first_x = (start_step + 1) * u64::from(batch.train_batch_size);
        let monitors = Monitors::open(&job.config.config, leader, continues.then_some(first_x))?;

        let early = resumed_state.map_or_else(EarlyStopping::default, |s| s.early_stopping.clone());
        let (start_epoch, resume_step) = resumed_state.map_or((0, 0), |s| (s.epoch, s.next_step as usize));
        let epoch_loss = resumed_state.map_or_else(LossSum::default, |s| LossSum {
            sum: s.epoch_loss_sum,
            masked: s.epoch_masked,
        });
        let window = resumed_state.map_or_else(|| Window::new(0), |s| Window::restore(&s.log_window));
        let mut progress = ProgressEvent {
            total_steps,
            optimizer_state_bytes: trainer.optimizer_state_bytes(),
            global_step: trainer.steps + trainer.skipped_steps,
            ..Default::default()
        };
        progress.set_early_stopping(&early);
        // Last, so nothing of the setup draws from the restored generators.
        if let Some((dir, state)) = &resume {
            let restored = checkpoint::restore_rng(dir, state, rank, world, job.device)
                .map_err(|e| TrainError::unreadable(dir, e))?;
            if leader {
                match restored {
                    RngResume::Restored => {}
                    RngResume::WorldSizeChanged => tracing::info!(
                        saved = state.world_size,
                        now = world,
                        "the world size changed: data order and masking continue as before, dropout draws do not"
                    ),
                    RngResume::NotSaved => tracing::warn!(
                        checkpoint = %dir.display(),
                        "the checkpoint has no random-generator states (an older kormlm wrote it): dropout after the \
                         resume differs from an uninterrupted run"
                    ),
                }
            }
        }
        let show_bar = leader && std::io::IsTerminal::is_terminal(&std::io::stderr());
        Ok(Self {
            job,
            objective,
            comm,
            on_progress,
            should_stop,
            started,
            leader,
            run_id,
            attempt,
            files,
            monitors,
            trainer,
            shape,
            steps_per_epoch,
            total_steps,
            start_epoch,
            resume_step,
            early,
            epoch_loss,
            window,
            progress,
            epochs_run: 0,
            stopped_by_request: false,
            bar: show_bar.then(|| progress_bar(total_steps)),
            peak_flops,
            saving_timeout,
        })
    }

    /// Epochs until the last one, the step limit, early stopping or a stop request.
    fn epochs(&mut self) -> Result<(), TrainError> {
        for epoch in self.start_epoch..self.job.args.num_train_epochs {
            if self.early.stopped || !self.epoch(epoch)? {
                break;
            }
        }
        Ok(())
    }

    /// One epoch: its steps, then (unless a stop request came mid-epoch) the evaluation and the
    /// epoch's checkpoint. Returns whether another epoch may follow.
    fn epoch(&mut self, epoch: u32) -> Result<bool, TrainError> {
        self.epochs_run = epoch + 1;
        self.progress.epoch = epoch;
        let mut order = epoch_order(self.objective.train_len(), self.job.args.seed, u64::from(epoch));
        if self.job.args.group_by_length {
            let objective = &*self.objective;
            order = group_by_length(order, self.shape.train_batch_size, |i| objective.sample_len(i as usize));
        }
        let first_step = std::mem::take(&mut self.resume_step);
        if first_step == 0 {
            self.epoch_loss = LossSum::default();
        }
        for step in first_step..self.steps_per_epoch {
            match self.step(epoch, &order, step)? {
                StepEnd::Next => {}
                StepEnd::LastStep => break,
                StepEnd::StopRequested => {
                    self.stopped_by_request = true;
                    if step + 1 < self.steps_per_epoch {
                        return Ok(false);
                    }
                    // At the last step of an epoch the regular epoch end (evaluation, checkpoint) runs.
                    break;
                }
            }
        }
        self.end_epoch(epoch)?;
        if self.stopped_by_request {
            return Ok(false);
        }
        if self.early.stopped {
            if self.leader {
                tracing::info!(epoch, stop_count = self.early.stop_count, "EARLY STOPPED");
            }
            return Ok(false);
        }
        Ok(self.progress.global_step < self.total_steps)
    }

    /// One optimizer step: this rank's micro-batches forward and backward, the exchange and
    /// update, the training-log record when due, then the stop agreement, with a checkpoint
    /// when stopping or when one is due mid-epoch.
    fn step(&mut self, epoch: u32, order: &[u32], step: usize) -> Result<StepEnd, TrainError> {
        let job = self.job;
        let args = &job.args;
        let micro: Vec<Vec<u32>> = (0..self.shape.accumulation)
            .map(|m| self.shape.micro_samples(order, step, m))
            .collect();
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let work = self.objective.backward(&mut self.trainer, epoch, &micro, rank, world)?;
        if work.divisor == 0.0 {
            tracing::warn!(
                epoch,
                step,
                "nothing of this step counts towards the loss (no token masked); step skipped"
            );
            return Ok(StepEnd::Next);
        }
        let report = self.trainer.step(&mut *self.comm)?;
        let mut sums = [work.loss_sum, work.tokens as f64, work.flops];
        self.comm.all_reduce_scalars(&mut sums)?;
        self.window.loss.add(sums[0], work.divisor);
        self.window.samples += micro.iter().map(Vec::len).sum::<usize>() as u64;
        self.window.tokens += sums[1] as u64;
        self.window.flops += sums[2];
        self.epoch_loss.add(sums[0], work.divisor);

        let progress = &mut self.progress;
        progress.global_step = self.trainer.steps + self.trainer.skipped_steps;
        progress.samples_in_epoch = ((step + 1) * self.shape.train_batch_size).min(self.objective.train_len()) as u64;
        progress.learning_rate = report.lr;
        progress.skipped_steps = self.trainer.skipped_steps;
        progress.loss_scale = self.trainer.scaler.as_ref().map_or(0.0, |s| s.cur_scale);
        let global_step = progress.global_step;
        self.monitors.step(
            self.samples_at(global_step),
            StepScalars {
                lr: self.trainer.schedule.lr(self.trainer.steps),
                loss_scale: self.trainer.scaler.as_ref().map(|s| s.cur_scale),
                train_loss: sums[0] / work.divisor,
            },
        )?;
        let last_step = global_step >= self.total_steps;
        let end_of_epoch = step + 1 == self.steps_per_epoch;
        let log_now =
            (args.logging_steps > 0 && global_step.is_multiple_of(args.logging_steps)) || end_of_epoch || last_step;
        if log_now {
            self.monitors.flush()?;
            if self.window.loss.masked > 0.0 {
                self.log_train(epoch, &report)?;
            }
        }
        if let Some(bar) = &self.bar {
            bar.set_position(global_step);
        }
        if last_step {
            return Ok(StepEnd::LastStep);
        }
        let stop = self.agree_on_stop()?;
        let periodic = args.checkpoint_steps > 0 && global_step.is_multiple_of(args.checkpoint_steps);
        if (stop || periodic) && !end_of_epoch {
            self.save_checkpoint(epoch, step as u64 + 1, self.epoch_loss)?;
            (self.on_progress)(&self.progress);
        }
        Ok(if stop { StepEnd::StopRequested } else { StepEnd::Next })
    }

    /// The `train` log record and progress report of the window since the last one.
    fn log_train(&mut self, epoch: u32, report: &StepReport) -> Result<(), TrainError> {
        let elapsed = self.window.since.elapsed().as_secs_f64().max(1e-9);
        let progress = &mut self.progress;
        progress.train_loss = Some(self.window.loss.sum / self.window.loss.masked);
        progress.samples_per_s = self.window.samples as f64 / elapsed;
        progress.tokens_per_s = self.window.tokens as f64 / elapsed;
        progress.mfu = mfu::utilisation(self.window.flops, elapsed, self.peak_flops, self.comm.world_size());
        self.files.record(&json!({
            "type": "train",
            "epoch": epoch,
            "step": progress.global_step,
            "lr": report.lr,
            "loss": progress.train_loss,
            "grad_norm": report.grad_norm,
            "samples_per_s": progress.samples_per_s,
            "tokens_per_s": progress.tokens_per_s,
            "mfu": progress.mfu,
            "elapsed_s": self.started.elapsed().as_secs_f64(),
            "skipped_steps": self.trainer.skipped_steps,
        }))?;
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "epoch {epoch} loss {:.4} {:.1} samples/s",
                progress.train_loss.unwrap_or(f64::NAN),
                progress.samples_per_s
            ));
        }
        (self.on_progress)(&self.progress);
        self.window = Window::new(self.progress.global_step);
        Ok(())
    }

    /// The monitors' x after `global_step` optimizer steps: DeepSpeed's global samples.
    fn samples_at(&self, global_step: u64) -> u64 {
        global_step * u64::from(self.job.config.batch.train_batch_size)
    }

    /// Every rank must leave at the same step, so a stop request is agreed on.
    fn agree_on_stop(&mut self) -> Result<bool, TrainError> {
        let mut stop = [f64::from(u8::from((self.should_stop)()))];
        self.comm.all_reduce_scalars(&mut stop)?;
        Ok(stop[0] > 0.0)
    }

    /// Waits, up to the saving deadline rather than the collective one, for rank 0 to write
    /// `dir`; when that failed, every rank fails with it (no peer is left waiting in the next
    /// collective for a rank that has gone).
    fn agree_saved(&mut self, dir: &Path, saved: Result<(), TrainError>) -> Result<(), TrainError> {
        let mut failed = [f64::from(u8::from(saved.is_err()))];
        all_reduce_scalars_within(&mut *self.comm, &mut failed, self.saving_timeout)?;
        saved?;
        if failed[0] > 0.0 {
            return Err(TrainError::output(
                dir,
                "rank 0 could not write it (see rank 0's error)",
            ));
        }
        Ok(())
    }

    /// Evaluation on the dev set, early stopping (and the best model), the `eval` log record,
    /// the plot and the epoch's checkpoint.
    fn end_epoch(&mut self, epoch: u32) -> Result<(), TrainError> {
        let job = self.job;
        let args = &job.args;
        let evaluation = self
            .objective
            .evaluate(&self.trainer, args.eval_batch_size as usize, &mut *self.comm)?;
        let (val_loss, val_accuracy) = (evaluation.loss, evaluation.accuracy);
        let observation = if O::HIGHER_IS_BETTER {
            self.early
                .observe_higher(epoch, evaluation.metric, args.max_stop_number)
        } else {
            self.early.observe(epoch, evaluation.metric, args.max_stop_number)
        };
        if observation.improved {
            let saved = self.files.save_best(&self.trainer.loaded);
            self.agree_saved(&self.files.best_dir(), saved)?;
        }
        self.monitors
            .eval(self.samples_at(self.progress.global_step), val_loss, val_accuracy)?;
        self.monitors.flush()?;
        self.progress.val_loss = Some(val_loss);
        self.progress.val_accuracy = Some(val_accuracy);
        self.progress.set_early_stopping(&self.early);
        let mut record = json!({
            "type": "eval",
            "epoch": epoch,
            "step": self.progress.global_step,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        });
        let fields = record.as_object_mut().expect("the record is an object");
        fields.extend(evaluation.record);
        fields.extend([
            ("train_loss".to_string(), json!(self.epoch_loss.mean())),
            (format!("best_{}", O::METRIC), json!(self.early.best)),
            ("improved".to_string(), json!(observation.improved)),
            ("stop_count".to_string(), json!(self.early.stop_count)),
            ("max_stop_number".to_string(), json!(args.max_stop_number)),
            ("elapsed_s".to_string(), json!(self.started.elapsed().as_secs_f64())),
        ]);
        self.files.record(&record)?;
        if self.leader {
            tracing::info!(epoch, val_loss, val_accuracy, metric = O::METRIC, value = evaluation.metric, best = ?self.early.best, stop_count = self.early.stop_count, "evaluation");
        }
        self.files.redraw_loss_curve();
        let dir = self.save_checkpoint(epoch + 1, 0, LossSum::default())?;
        if observation.improved {
            self.files.mark_best_checkpoint(&dir)?;
            self.progress.best_checkpoint = self.progress.checkpoint.clone();
        }
        (self.on_progress)(&self.progress);
        Ok(())
    }

    /// Everything besides tensors needed to continue at step `next_step` of epoch `epoch`,
    /// where that epoch's training loss so far is `epoch_loss`.
    fn trainer_state(&self, epoch: u32, next_step: u64, epoch_loss: LossSum) -> TrainerState {
        let world = self.comm.world_size();
        TrainerState {
            version: checkpoint::STATE_VERSION,
            run_id: Some(self.run_id.clone()),
            attempt: self.attempt,
            created_unix_ms: kormlm_proto::now_ms(),
            epoch,
            next_step,
            steps: self.trainer.steps,
            skipped_steps: self.trainer.skipped_steps,
            scaler: self.trainer.scaler.clone(),
            early_stopping: self.early.clone(),
            epoch_loss_sum: epoch_loss.sum,
            epoch_masked: epoch_loss.masked,
            log_window: self.window.save(),
            world_size: world,
            partitions: self.trainer.partition.saved_ranges(),
            rng_states: (0..world)
                .map(|rank| RngStateFile {
                    rank,
                    file: checkpoint::rng_file(rank),
                })
                .collect(),
            numel: self.trainer.flat.numel,
            seed: self.job.args.seed,
        }
    }

    /// Writes a checkpoint (collectively) to continue from step `next_step` of epoch `epoch`;
    /// the progress report and a `checkpoint` log record name it.
    fn save_checkpoint(&mut self, epoch: u32, next_step: u64, epoch_loss: LossSum) -> Result<PathBuf, TrainError> {
        let state = self.trainer_state(epoch, next_step, epoch_loss);
        let root = self.files.checkpoint_root();
        let dir = checkpoint::save(
            &self.trainer,
            &state,
            &mut *self.comm,
            &root,
            self.job.args.keep_checkpoints,
            self.saving_timeout,
        )?;
        self.progress.checkpoint = Some((dir.display().to_string(), self.progress.global_step));
        // The log lists the run's complete checkpoints (what `worker train --resume_from` takes).
        self.files.record(&json!({
            "type": "checkpoint",
            "step": self.progress.global_step,
            "path": dir.display().to_string(),
        }))?;
        Ok(dir)
    }

    /// The final model and the summary.
    fn finish(mut self) -> Result<TrainSummary, TrainError> {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.monitors.flush()?;
        self.files.save_final(&self.trainer.loaded)?;
        let early = &self.early;
        let summary = TrainSummary {
            epochs_run: self.epochs_run,
            global_steps: self.progress.global_step,
            best_val_loss: early.best,
            best_epoch: early.best_epoch,
            early_stopped: early.stopped,
            stop_count: early.stop_count,
            val_loss_history: early.history.clone(),
            best_model_dir: early.best.map(|_| self.files.best_dir().display().to_string()),
            final_model_dir: self.files.final_dir().display().to_string(),
            stopped_by_request: self.stopped_by_request,
            elapsed_s: self.started.elapsed().as_secs_f64(),
        };
        self.objective.write_summary(&mut self.files, &summary)?;
        Ok(summary)
    }
}

/// The checkpoint to continue from and its state. One that cannot be read, or that another run
/// wrote, is [`TrainError::UnreadableCheckpoint`]: no rank falls back on its own (a job's
/// coordinator assigns the previous one); the message names the previous complete checkpoint.
fn resume_point(requested: Option<&Path>, run_id: Option<&str>) -> Result<Option<(PathBuf, TrainerState)>, TrainError> {
    let Some(dir) = requested else {
        return Ok(None);
    };
    let unreadable = |message: String| {
        let hint = match checkpoint::previous_complete(dir) {
            Some(previous) => format!("; the previous complete checkpoint is {}", previous.display()),
            None => String::new(),
        };
        TrainError::unreadable(dir, message + &hint)
    };
    let state = checkpoint::read_state(dir).map_err(|e| unreadable(e.to_string()))?;
    if let (Some(mine), Some(theirs)) = (run_id, state.run_id.as_deref()) {
        if mine != theirs {
            return Err(unreadable(format!(
                "it was written by run {theirs}, this is run {mine}"
            )));
        }
    }
    Ok(Some((dir.to_path_buf(), state)))
}

/// Rank 0, before anything else is written: makes the output directory this run's (refusing
/// another run's unless `--overwrite_output_dir`) and removes what a crash or a lost attempt
/// left among its checkpoints.
fn claim_output_dir(
    job: &TrainJob,
    run_id: &str,
    resume: Option<&(PathBuf, TrainerState)>,
    start_step: u64,
) -> Result<(), TrainError> {
    let me = RunIdentity::new(run_id.to_string(), job.job_id.clone());
    let dir = &job.output_dir;
    let claim = ownership::claim(
        dir,
        &me,
        resume.map(|(d, s)| (d.as_path(), s)),
        job.args.overwrite_output_dir,
    )?;
    match claim {
        Claim::New | Claim::Own => {}
        Claim::Adopted => {
            tracing::warn!(dir = %dir.display(), run_id, "continuing a run of an older kormlm in its directory")
        }
        Claim::Overwrote(other) => {
            tracing::warn!(dir = %dir.display(), "--overwrite_output_dir: removed the files of {other}")
        }
    }
    let cleaned = checkpoint::clean_for_start(&RunFiles::checkpoint_root_of(dir), run_id, start_step)?;
    for path in &cleaned.temporary {
        tracing::info!(path = %path.display(), "removed the temporary directory of an interrupted checkpoint");
    }
    for path in &cleaned.superseded {
        tracing::info!(path = %path.display(), start_step, "removed a checkpoint of this run past the resume point");
    }
    Ok(())
}

fn progress_bar(total_steps: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total_steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}<{eta_precise}]")
            .expect("a valid template"),
    );
    bar
}
