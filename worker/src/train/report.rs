//! What a run tells the outside: live progress (for progress bars and heartbeats) and the
//! summary of a finished run.

use super::early_stopping::EarlyStopping;
use kormlm_proto::v1::{EarlyStopState, Progress};
use serde::Serialize;

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
    /// Model-FLOPs utilisation against the measured matmul peak of the precision in use.
    pub mfu: f64,
    pub loss_scale: f64,
    pub skipped_steps: u64,
    pub optimizer_state_bytes: u64,
    /// The newest complete checkpoint and its global step.
    pub checkpoint: Option<(String, u64)>,
    /// The checkpoint holding the best weights so far.
    pub best_checkpoint: Option<(String, u64)>,
}

impl ProgressEvent {
    /// Takes the early-stopping fields from the run's state.
    pub fn set_early_stopping(&mut self, early: &EarlyStopping) {
        self.best_val_loss = early.best;
        self.stop_count = early.stop_count;
        self.early_stopped = early.stopped;
        self.val_loss_history = early.history.clone();
    }

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
                mfu: self.mfu,
                loss_scale: self.loss_scale,
                skipped_steps: self.skipped_steps,
            },
            EarlyStopState {
                best_val_loss: self.best_val_loss,
                stop_count: self.stop_count,
                // The coordinator fills in the patience from the job's arguments.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_carries_the_early_stopping_state() {
        let mut early = EarlyStopping::default();
        early.observe(0, 2.0, 1);
        early.observe(1, 2.5, 1);
        let mut event = ProgressEvent {
            global_step: 7,
            ..Default::default()
        };
        event.set_early_stopping(&early);
        let (progress, state) = event.to_proto();
        assert_eq!(progress.global_step, 7);
        assert_eq!(
            state,
            EarlyStopState {
                best_val_loss: Some(2.0),
                stop_count: 1,
                max_stop_number: 0,
                early_stopped: true,
                val_loss_history: vec![2.0, 2.5],
            }
        );
    }
}
