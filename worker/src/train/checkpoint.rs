//! Checkpoints: full weights in Hugging Face layout (rank 0), each rank's optimizer partition,
//! and the trainer state. Every rank writes into a temporary directory; after a barrier rank 0
//! adds the weights and state and renames the directory, so a checkpoint directory that exists
//! is complete. Resuming re-partitions the optimizer state for any world size.

use super::early_stopping::EarlyStopping;
use super::trainer::Trainer;
use crate::comm::Collective;
use crate::optim::loss_scale::DynamicLossScaler;
pub use crate::optim::partition::PartitionRange;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const STATE_FILE: &str = "trainer_state.json";
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {message}")]
    Io { path: String, message: String },
    #[error("checkpoint {path} is incomplete or damaged: {message}")]
    Invalid { path: String, message: String },
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
}

fn io(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Everything besides tensors needed to continue exactly where a run stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub version: u32,
    /// Epoch to continue in, and the first step of it not yet taken.
    pub epoch: u32,
    pub next_step: u64,
    /// Optimizer steps taken (the scheduler iteration and AdamW's step count).
    pub steps: u64,
    pub skipped_steps: u64,
    pub scaler: Option<DynamicLossScaler>,
    /// Saved as top-level fields: `best_val_loss`, `best_epoch`, `stop_count`,
    /// `val_loss_history`, `early_stopped`.
    #[serde(flatten)]
    pub early_stopping: EarlyStopping,
    /// Masked-token loss sum and count of the epoch so far, so a resumed epoch reports the
    /// same mean training loss as an uninterrupted one.
    #[serde(default)]
    pub epoch_loss_sum: f64,
    #[serde(default)]
    pub epoch_masked: f64,
    pub world_size: usize,
    /// The optimizer ranges saved, one file each (`Partition::saved_ranges`).
    pub partitions: Vec<PartitionRange>,
    /// Real (unpadded) parameter elements, to check the model matches.
    pub numel: i64,
    pub seed: u64,
}

fn optim_file(rank: usize) -> String {
    format!("optim-rank{rank}.safetensors")
}

fn write_atomically(path: &Path, text: &str) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Writes a checkpoint collectively; returns its directory (on every rank).
pub fn save(
    trainer: &Trainer,
    state: &TrainerState,
    comm: &mut dyn Collective,
    root: &Path,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    let tag = format!("step-{}", state.steps + state.skipped_steps);
    let final_dir = root.join(&tag);
    let tmp = root.join(format!(".{tag}.tmp"));
    let exists = final_dir.join(STATE_FILE).is_file();
    if !exists {
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let path = tmp.join(optim_file(comm.rank()));
        let tensors = [
            (
                "exp_avg".to_string(),
                trainer.optimizer.exp_avg.to_device(tch::Device::Cpu),
            ),
            (
                "exp_avg_sq".to_string(),
                trainer.optimizer.exp_avg_sq.to_device(tch::Device::Cpu),
            ),
        ];
        crate::model::weights::write_safetensors(&tensors, &path).map_err(|e| io(&path, e))?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(&path, e))?;
    }
    // Barrier: every rank's partition is on disk before rank 0 commits.
    let mut done = [1.0];
    comm.all_reduce_scalars(&mut done)?;
    if comm.rank() == 0 && !exists {
        if (done[0] as usize) != comm.world_size() {
            return Err(invalid(&tmp, "not every rank confirmed its optimizer partition"));
        }
        trainer.loaded.save(&tmp.join("model")).map_err(|e| io(&tmp, e))?;
        let text = serde_json::to_string_pretty(state).expect("state serialises");
        write_atomically(&tmp.join(STATE_FILE), &text)?;
        std::fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
        write_atomically(&root.join("latest"), &tag)?;
        prune(root, keep, state);
    }
    Ok(final_dir)
}

/// The `step-N` checkpoint directories under `root`, oldest first.
fn step_dirs(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut dirs: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("step-")
                .and_then(|n| n.parse().ok())
                .map(|n| (n, e.path()))
        })
        .collect();
    dirs.sort();
    dirs
}

/// Deletes all but the newest `keep` checkpoints, never the best one (named in `best`).
fn prune(root: &Path, keep: usize, state: &TrainerState) {
    let best = std::fs::read_to_string(root.join("best")).ok();
    let tags = step_dirs(root);
    let current = state.steps + state.skipped_steps;
    let cut = tags.len().saturating_sub(keep.max(1));
    for (step, path) in &tags[..cut] {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if *step == current || best.as_deref().map(str::trim) == Some(name.as_str()) {
            continue;
        }
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Marks `dir` (a checkpoint under `root`) as the best one, so pruning keeps it.
pub fn mark_best(root: &Path, dir: &Path) -> Result<(), CheckpointError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    write_atomically(&root.join("best"), &name)
}

/// Reads and checks a checkpoint's trainer state.
pub fn read_state(dir: &Path) -> Result<TrainerState, CheckpointError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| invalid(dir, format!("{STATE_FILE}: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| invalid(dir, format!("{STATE_FILE}: {e}")))?;
    if state.version != STATE_VERSION {
        return Err(invalid(
            dir,
            format!("state version {}, this worker reads {STATE_VERSION}", state.version),
        ));
    }
    let mut files: Vec<PathBuf> = state.partitions.iter().map(|p| dir.join(optim_file(p.rank))).collect();
    files.push(dir.join("model").join(crate::model::weights::SAFETENSORS));
    for file in files {
        let bytes = std::fs::read(&file).map_err(|e| invalid(dir, format!("{}: {e}", file.display())))?;
        safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| invalid(dir, format!("{} is damaged: {e}", file.display())))?;
    }
    Ok(state)
}

/// Loads the optimizer moments for this rank's range from all saved partitions (any world size).
pub fn restore_optimizer(trainer: &mut Trainer, dir: &Path, state: &TrainerState) -> Result<(), CheckpointError> {
    if state.numel != trainer.flat.numel {
        return Err(invalid(
            dir,
            format!(
                "it holds {} parameters, the model has {}",
                state.numel, trainer.flat.numel
            ),
        ));
    }
    let padded = trainer.flat.padded_numel();
    let full_m = Tensor::zeros(
        [padded.max(state.partitions.iter().map(|p| p.start + p.len).max().unwrap_or(0))],
        (Kind::Float, tch::Device::Cpu),
    );
    let full_v = full_m.zeros_like();
    for p in &state.partitions {
        let path = dir.join(optim_file(p.rank));
        let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .map_err(|e| invalid(dir, format!("{}: {e}", path.display())))?
            .into_iter()
            .collect();
        for (name, full) in [("exp_avg", &full_m), ("exp_avg_sq", &full_v)] {
            let t = tensors
                .get(name)
                .ok_or_else(|| invalid(dir, format!("{} lacks {name}", path.display())))?;
            if t.size() != [p.len] {
                return Err(invalid(
                    dir,
                    format!(
                        "{}: {name} has shape {:?}, expected [{}]",
                        path.display(),
                        t.size(),
                        p.len
                    ),
                ));
            }
            full.narrow(0, p.start, p.len).copy_(t);
        }
    }
    let PartitionRange { start, len, .. } = trainer.partition.local();
    let device = trainer.device;
    trainer.optimizer.exp_avg = full_m.narrow(0, start, len).to_device(device).contiguous();
    trainer.optimizer.exp_avg_sq = full_v.narrow(0, start, len).to_device(device).contiguous();
    trainer.optimizer.step = state.steps;
    trainer.steps = state.steps;
    trainer.skipped_steps = state.skipped_steps;
    if let (Some(s), Some(saved)) = (trainer.scaler.as_mut(), state.scaler.clone()) {
        *s = saved;
    }
    Ok(())
}

/// The newest complete checkpoint under `root` (by the `latest` pointer, falling back to the
/// newest `step-N` directory whose state reads), skipping damaged ones with a warning.
pub fn latest_complete(root: &Path) -> Option<PathBuf> {
    let candidates = step_dirs(root);
    for (_, dir) in candidates.into_iter().rev() {
        match read_state(&dir) {
            Ok(_) => return Some(dir),
            Err(e) => tracing::warn!(error = %e, "skipping a damaged checkpoint"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `trainer_state.json` as the worker before the early-stopping refactor wrote it (field
    /// order included), with an fp16 scaler and a sharded optimizer.
    const WRITTEN_BY_VERSION_1: &str = r#"{
  "version": 1,
  "epoch": 5,
  "next_step": 21,
  "steps": 161,
  "skipped_steps": 2,
  "scaler": {
    "cur_scale": 32768.0,
    "cur_iter": 163,
    "last_overflow_iter": 40,
    "scale_factor": 2.0,
    "scale_window": 1000,
    "min_scale": 1.0,
    "delayed_shift": 2,
    "cur_hysteresis": 2,
    "consecutive_hysteresis": false,
    "dynamic": true
  },
  "best_val_loss": 7.619363017465877,
  "best_epoch": 4,
  "stop_count": 0,
  "val_loss_history": [
    8.078054844647989,
    7.848363415948276,
    7.711827069863506,
    7.678083047099497,
    7.619363017465877
  ],
  "epoch_loss_sum": 6103.6337966918945,
  "epoch_masked": 851.0,
  "early_stopped": false,
  "world_size": 2,
  "partitions": [
    {
      "rank": 0,
      "start": 0,
      "len": 109888
    },
    {
      "rank": 1,
      "start": 109888,
      "len": 109888
    }
  ],
  "numel": 219712,
  "seed": 3
}"#;

    #[test]
    fn a_state_written_before_early_stopping_had_its_own_type_still_reads() {
        let state: TrainerState = serde_json::from_str(WRITTEN_BY_VERSION_1).unwrap();
        assert_eq!(state.version, STATE_VERSION);
        assert_eq!(
            (state.epoch, state.next_step, state.steps, state.skipped_steps),
            (5, 21, 161, 2)
        );
        assert_eq!(state.scaler.as_ref().map(|s| s.cur_scale), Some(32768.0));
        assert_eq!(
            state.early_stopping,
            EarlyStopping {
                best: Some(7.619363017465877),
                best_epoch: Some(4),
                stop_count: 0,
                history: vec![
                    8.078054844647989,
                    7.848363415948276,
                    7.711827069863506,
                    7.678083047099497,
                    7.619363017465877
                ],
                stopped: false,
            }
        );
        assert_eq!((state.epoch_loss_sum, state.epoch_masked), (6103.6337966918945, 851.0));
        assert_eq!(state.partitions[1].start, 109888);
        assert_eq!((state.world_size, state.numel, state.seed), (2, 219712, 3));
        // Written again, it holds the same fields and values.
        let old: serde_json::Value = serde_json::from_str(WRITTEN_BY_VERSION_1).unwrap();
        let new = serde_json::to_value(&state).unwrap();
        assert_eq!(new, old);
    }

    #[test]
    fn the_epoch_loss_defaults_to_zero_in_older_states() {
        let mut old: serde_json::Value = serde_json::from_str(WRITTEN_BY_VERSION_1).unwrap();
        let fields = old.as_object_mut().unwrap();
        fields.remove("epoch_loss_sum");
        fields.remove("epoch_masked");
        let state: TrainerState = serde_json::from_value(old).unwrap();
        assert_eq!((state.epoch_loss_sum, state.epoch_masked), (0.0, 0.0));
        assert_eq!(state.early_stopping.best_epoch, Some(4));
    }
}
