//! Checkpoints: full weights in Hugging Face layout (rank 0), each rank's optimizer partition
//! and random-generator states, and the trainer state. Every rank writes its part into a
//! temporary directory (`.step-N.tmp`); a barrier carries each rank's success, and only when
//! every rank's part is on disk does rank 0 add the weights and state, flush and rename the
//! directory — a second barrier tells every rank whether that worked. So a `step-N` directory
//! that exists is complete, and a checkpoint any rank failed to write is reported by none.
//! Resuming re-partitions the optimizer state for any world size.
//!
//! There is no `latest` pointer: the coordinator registers each checkpoint from the progress
//! reports (the training log lists them too), and the resume point is always named explicitly.
//! A checkpoint names its run and attempt; pruning and clean-up only touch the run's own.
//! Pruning never deletes a checkpoint the coordinator may still hold as the latest: only those
//! older than one that was committed [`PRUNE_GRACE_MS`] ago (and so has been reported since).

use super::early_stopping::EarlyStopping;
use super::rng_state::{RngError, RngStates};
use super::trainer::{TrainableModel, Trainer};
use crate::comm::{all_reduce_scalars_within, Collective};
use crate::model::ModelError;
use crate::optim::loss_scale::DynamicLossScaler;
pub use crate::optim::partition::PartitionRange;
use kormlm_proto::durable;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::{Kind, Tensor};

pub const STATE_FILE: &str = "trainer_state.json";
/// Version 2 added the run id and attempt, the logging window and the generator states.
pub const STATE_VERSION: u32 = 2;
/// The oldest state this worker still reads (its missing fields take their defaults).
pub const OLDEST_READABLE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {message}")]
    Io { path: String, message: String },
    #[error("checkpoint {path} is incomplete or damaged: {message}")]
    Invalid { path: String, message: String },
    /// Some rank could not write its part (or rank 0 could not commit it): no rank reports the
    /// checkpoint, the previous one stays the latest.
    #[error("checkpoint {path} not written: {} failed: {message}", rank_list(ranks))]
    NotWritten {
        path: String,
        ranks: Vec<usize>,
        message: String,
    },
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
}

fn rank_list(ranks: &[usize]) -> String {
    let names: Vec<String> = ranks.iter().map(usize::to_string).collect();
    format!("rank{} {}", if ranks.len() == 1 { "" } else { "s" }, names.join(", "))
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

/// The training-log window at a checkpoint: what the steps since the last `train` record did
/// (over all ranks), so the first record after a resume covers the same steps with the same
/// numbers as in an uninterrupted run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LogWindow {
    pub loss_sum: f64,
    pub masked: f64,
    pub samples: u64,
    pub tokens: u64,
    /// Seconds the window had run (for the throughput of that first record).
    pub elapsed_s: f64,
    /// The global step of the last `train` record (0: none yet).
    pub last_logged_step: u64,
    /// Model FLOPs of the window's steps (see `mfu`).
    #[serde(default)]
    pub flops: f64,
}

impl LogWindow {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A rank's generator-state file, as listed in the trainer state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngStateFile {
    pub rank: usize,
    pub file: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

/// How long after its commit a checkpoint counts as registered by the coordinator (progress
/// reports carry it within a heartbeat interval, a second or so): only checkpoints older than
/// one committed this long ago are pruned.
pub const PRUNE_GRACE_MS: i64 = 60_000;

/// Everything besides tensors needed to continue exactly where a run stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub version: u32,
    /// The run that wrote the checkpoint (`kormlm_run.json`) and its attempt (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
    /// When rank 0 committed it (Unix ms; version 2).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub created_unix_ms: i64,
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
    /// The training-log window (version 2).
    #[serde(default, skip_serializing_if = "LogWindow::is_default")]
    pub log_window: LogWindow,
    pub world_size: usize,
    /// The optimizer ranges saved, one file each (`Partition::saved_ranges`).
    pub partitions: Vec<PartitionRange>,
    /// Every rank's random-generator states (version 2), one file each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rng_states: Vec<RngStateFile>,
    /// Real (unpadded) parameter elements, to check the model matches.
    pub numel: i64,
    pub seed: u64,
}

impl TrainerState {
    /// The global step the checkpoint was taken at.
    pub fn global_step(&self) -> u64 {
        self.steps + self.skipped_steps
    }
}

fn optim_file(rank: usize) -> String {
    format!("optim-rank{rank}.safetensors")
}

/// The generator-state file of `rank`.
pub fn rng_file(rank: usize) -> String {
    format!("rng-rank{rank}.safetensors")
}

/// The directory name of the checkpoint at `step`.
fn tag(step: u64) -> String {
    format!("step-{step}")
}

/// The temporary directory the checkpoint at `step` is written into.
fn temp_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!(".{}.tmp", tag(step)))
}

fn write_state(path: &Path, state: &TrainerState) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(state).expect("state serialises");
    durable::write(path, text).map_err(|e| io(path, e.error))
}

/// This rank's part: its optimizer partition and generator states, flushed to disk.
fn write_part<M: TrainableModel>(trainer: &Trainer<M>, tmp: &Path, rank: usize) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(tmp).map_err(|e| io(tmp, e))?;
    let path = tmp.join(optim_file(rank));
    let tensors = [
        ("exp_avg".to_string(), trainer.optimizer.exp_avg.shallow_clone()),
        ("exp_avg_sq".to_string(), trainer.optimizer.exp_avg_sq.shallow_clone()),
    ];
    crate::model::weights::write_safetensors(&tensors, &path).map_err(|e| match e {
        ModelError::Io { message, .. } => io(&path, message),
        other => io(&path, other),
    })?;
    let path = tmp.join(rng_file(rank));
    let rng = RngStates::capture(trainer.device).map_err(|e| io(&path, e))?;
    rng.write(&path).map_err(|e| match e {
        RngError::File { message, .. } => io(&path, message),
        other => io(&path, other),
    })
}

/// Rank 0 completes the checkpoint: the weights and the state, flushed, renamed into place.
fn commit<M: TrainableModel>(
    trainer: &Trainer<M>,
    state: &TrainerState,
    tmp: &Path,
    final_dir: &Path,
) -> Result<(), CheckpointError> {
    trainer.loaded.save(&tmp.join("model")).map_err(|e| io(tmp, e))?;
    write_state(&tmp.join(STATE_FILE), state)?;
    durable::sync_dir(tmp).map_err(|e| io(tmp, e))?;
    durable::rename(tmp, final_dir).map_err(|e| io(final_dir, e.error))?;
    // The checkpoints directory itself may be new.
    if let Some(parent) = final_dir.parent().and_then(Path::parent) {
        durable::sync_dir(parent).map_err(|e| io(parent, e))?;
    }
    Ok(())
}

/// The ranks whose flag is set in a barrier's sums.
fn flagged(sums: &[f64]) -> Vec<usize> {
    sums.iter()
        .enumerate()
        .filter(|(_, v)| **v > 0.0)
        .map(|(r, _)| r)
        .collect()
}

/// Writes a checkpoint collectively; returns its directory (on every rank). When any rank
/// fails, every rank returns [`CheckpointError::NotWritten`] naming the failed ranks, and no
/// `step-N` directory appears. Its barriers wait up to `saving` for the ranks that write (see
/// [`crate::comm::deadlines::saving_timeout`]).
pub fn save<M: TrainableModel>(
    trainer: &Trainer<M>,
    state: &TrainerState,
    comm: &mut dyn Collective,
    root: &Path,
    keep: usize,
    saving: Duration,
) -> Result<PathBuf, CheckpointError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let step = state.global_step();
    let final_dir = root.join(tag(step));
    let tmp = temp_dir(root, step);
    // Every rank looks before the first barrier, so they all agree (the rename comes after it).
    let exists = final_dir.join(STATE_FILE).is_file();
    let part = if exists {
        Ok(())
    } else {
        write_part(trainer, &tmp, rank)
    };
    let not_written = |ranks: Vec<usize>, own: Option<&CheckpointError>| CheckpointError::NotWritten {
        path: final_dir.display().to_string(),
        message: match own {
            Some(e) => e.to_string(),
            None => format!(
                "{} could not write {} part (see {} error); the previous checkpoint stays the latest",
                rank_list(&ranks),
                if ranks.len() == 1 { "its" } else { "their" },
                if ranks.len() == 1 { "its" } else { "their" }
            ),
        },
        ranks,
    };
    // Barrier 1: every rank's part is on disk, or the ranks that failed are known to all.
    let mut failed = vec![0.0; world];
    failed[rank] = f64::from(u8::from(part.is_err()));
    all_reduce_scalars_within(comm, &mut failed, saving)?;
    let failed = flagged(&failed);
    if !failed.is_empty() {
        if rank == 0 {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        return Err(not_written(failed, part.as_ref().err()));
    }
    // Barrier 2: rank 0's commit.
    let committed = if rank == 0 && !exists {
        commit(trainer, state, &tmp, &final_dir)
    } else {
        Ok(())
    };
    let mut failed = [f64::from(u8::from(committed.is_err()))];
    all_reduce_scalars_within(comm, &mut failed, saving)?;
    if failed[0] > 0.0 {
        if rank == 0 {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        return Err(not_written(vec![0], committed.as_ref().err()));
    }
    if rank == 0 {
        prune(root, keep, state.run_id.as_deref(), step, kormlm_proto::now_ms());
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

/// The trainer state of `dir` without checking its files (for pruning and clean-up).
fn peek_state(dir: &Path) -> Option<TrainerState> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The `step-N` directories of run `run_id` under `root`, oldest first. Checkpoints of other
/// runs (or without a run id, written before version 2) are never counted.
fn own_step_dirs(root: &Path, run_id: Option<&str>) -> Vec<(u64, PathBuf)> {
    let Some(run_id) = run_id else {
        return Vec::new();
    };
    step_dirs(root)
        .into_iter()
        .filter(|(_, dir)| peek_state(dir).is_some_and(|s| s.run_id.as_deref() == Some(run_id)))
        .collect()
}

/// Deletes all but the newest `keep` checkpoints of run `run_id`, never the one at `current`,
/// the best one (named in `best`), nor any not older than a checkpoint committed
/// [`PRUNE_GRACE_MS`] before `now_ms` (the coordinator may not have registered a newer one yet).
fn prune(root: &Path, keep: usize, run_id: Option<&str>, current: u64, now_ms: i64) {
    let best = std::fs::read_to_string(root.join("best")).ok();
    let tags = own_step_dirs(root, run_id);
    let settled = tags
        .iter()
        .rposition(|(_, dir)| peek_state(dir).is_some_and(|s| s.created_unix_ms <= now_ms - PRUNE_GRACE_MS))
        .unwrap_or(0);
    let cut = tags.len().saturating_sub(keep.max(1)).min(settled);
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

/// What [`clean_for_start`] removed.
#[derive(Debug, Default, PartialEq)]
pub struct Cleaned {
    /// `.step-N.tmp` directories of a crashed write.
    pub temporary: Vec<PathBuf>,
    /// Checkpoints of this run after the resume point (from an attempt whose later work is
    /// lost and will be redone).
    pub superseded: Vec<PathBuf>,
}

/// Before a run (re)starts at global step `start_step` (rank 0, before any rank writes): removes
/// the temporary directories of crashed checkpoint writes, the `latest` pointer file of older
/// versions, and this run's checkpoints after `start_step` (a new attempt would otherwise find
/// and keep them next to the ones it writes). Other runs' checkpoints are left alone.
pub fn clean_for_start(root: &Path, run_id: &str, start_step: u64) -> Result<Cleaned, CheckpointError> {
    let mut cleaned = Cleaned::default();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(cleaned);
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(".step-") && name.ends_with(".tmp") {
            std::fs::remove_dir_all(entry.path()).map_err(|e| io(&entry.path(), e))?;
            cleaned.temporary.push(entry.path());
        }
    }
    let latest = root.join("latest");
    if latest.is_file() {
        std::fs::remove_file(&latest).map_err(|e| io(&latest, e))?;
    }
    for (step, dir) in own_step_dirs(root, Some(run_id)) {
        if step > start_step {
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
            cleaned.superseded.push(dir);
        }
    }
    Ok(cleaned)
}

/// The newest complete checkpoint of run `run_id` under `root`, if any (a standalone run that
/// continues by itself, as an experiment's classifier runs do).
pub fn latest_complete(root: &Path, run_id: &str) -> Option<PathBuf> {
    own_step_dirs(root, Some(run_id))
        .into_iter()
        .rev()
        .map(|(_, dir)| dir)
        .find(|dir| read_state(dir).is_ok())
}

/// The newest complete checkpoint of the same run as `dir` before it (for the message when
/// `dir` cannot be read).
pub fn previous_complete(dir: &Path) -> Option<PathBuf> {
    let root = dir.parent()?;
    let name = dir.file_name()?.to_string_lossy().to_string();
    let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
    let run_id = peek_state(dir).and_then(|s| s.run_id);
    step_dirs(root)
        .into_iter()
        .rev()
        .filter(|(s, _)| *s < step)
        .find_map(|(_, candidate)| {
            let state = read_state(&candidate).ok()?;
            (run_id.is_none() || state.run_id == run_id).then_some(candidate)
        })
}

/// Marks `dir` (a checkpoint under `root`) as the best one, so pruning keeps it.
pub fn mark_best(root: &Path, dir: &Path) -> Result<(), CheckpointError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let path = root.join("best");
    durable::write(&path, name).map_err(|e| io(&path, e.error))
}

/// Reads and checks a checkpoint's trainer state and that every file it lists is readable.
pub fn read_state(dir: &Path) -> Result<TrainerState, CheckpointError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| invalid(dir, format!("{STATE_FILE}: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| invalid(dir, format!("{STATE_FILE}: {e}")))?;
    if !(OLDEST_READABLE_VERSION..=STATE_VERSION).contains(&state.version) {
        return Err(invalid(
            dir,
            format!(
                "state version {}, this worker reads versions {OLDEST_READABLE_VERSION} to {STATE_VERSION}",
                state.version
            ),
        ));
    }
    let mut files: Vec<PathBuf> = state.partitions.iter().map(|p| dir.join(optim_file(p.rank))).collect();
    files.extend(state.rng_states.iter().map(|r| dir.join(&r.file)));
    files.push(dir.join("model").join(crate::model::weights::SAFETENSORS));
    for file in files {
        let bytes = std::fs::read(&file).map_err(|e| invalid(dir, format!("{}: {e}", file.display())))?;
        safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| invalid(dir, format!("{} is damaged: {e}", file.display())))?;
    }
    Ok(state)
}

/// How a rank's generators were set on resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RngResume {
    /// To the states this rank saved: dropout continues as in an uninterrupted run.
    Restored,
    /// The world size changed: each rank draws other samples anyway; the generators keep the
    /// run's seed.
    WorldSizeChanged,
    /// The checkpoint predates version 2 and has no generator states.
    NotSaved,
}

/// Restores rank `rank`'s generator states from the checkpoint (same world size only).
pub fn restore_rng(
    dir: &Path,
    state: &TrainerState,
    rank: usize,
    world: usize,
    device: tch::Device,
) -> Result<RngResume, CheckpointError> {
    if state.world_size != world {
        return Ok(RngResume::WorldSizeChanged);
    }
    let Some(entry) = state.rng_states.iter().find(|r| r.rank == rank) else {
        return Ok(RngResume::NotSaved);
    };
    let path = dir.join(&entry.file);
    let states = RngStates::read(&path).map_err(|e| invalid(dir, e.to_string()))?;
    states
        .restore(device)
        .map_err(|e| invalid(dir, format!("{}: {e}", path.display())))?;
    Ok(RngResume::Restored)
}

/// Loads the optimizer moments for this rank's range from all saved partitions (any world size).
pub fn restore_optimizer<M: TrainableModel>(
    trainer: &mut Trainer<M>,
    dir: &Path,
    state: &TrainerState,
) -> Result<(), CheckpointError> {
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
        assert_eq!(state.version, 1);
        // What version 2 added takes its defaults: no run, no window, no generator states.
        assert_eq!((state.run_id.as_deref(), state.attempt), (None, 0));
        assert_eq!(state.log_window, LogWindow::default());
        assert!(state.rng_states.is_empty());
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

    fn state_v2(run_id: &str, steps: u64) -> TrainerState {
        let mut state: TrainerState = serde_json::from_str(WRITTEN_BY_VERSION_1).unwrap();
        state.version = STATE_VERSION;
        state.run_id = Some(run_id.to_string());
        state.attempt = 2;
        state.steps = steps;
        state.skipped_steps = 0;
        state.log_window = LogWindow {
            loss_sum: 12.5,
            masked: 40.0,
            samples: 48,
            tokens: 700,
            elapsed_s: 0.25,
            last_logged_step: 160,
            flops: 3.5e12,
        };
        state.rng_states = (0..2)
            .map(|rank| RngStateFile {
                rank,
                file: rng_file(rank),
            })
            .collect();
        state
    }

    #[test]
    fn a_version_2_state_keeps_run_window_and_generator_files() {
        let state = state_v2("run-a", 163);
        let value = serde_json::to_value(&state).unwrap();
        assert_eq!(value["run_id"], "run-a");
        assert_eq!(value["attempt"], 2);
        assert_eq!(value["log_window"]["last_logged_step"], 160);
        assert_eq!(value["rng_states"][1]["file"], "rng-rank1.safetensors");
        let back: TrainerState = serde_json::from_value(value).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.global_step(), 163);
    }

    #[test]
    fn every_float_of_a_state_reads_back_bit_for_bit() {
        // A resumed run logs the same losses as the uninterrupted one only if the window's sums
        // and the early-stopping losses come back exactly (a parser that is off by one ulp on a
        // few of these values once made a resumed loss differ in its last digit).
        let dir = tempfile::tempdir().unwrap();
        let mut state = state_v2("run-a", 46);
        let mut bits = 0x9E37_79B9_7F4A_7C15_u64;
        for _ in 0..5_000 {
            bits ^= bits << 13;
            bits ^= bits >> 7;
            bits ^= bits << 17;
            // Losses and sums of a few thousand tokens: 1 to 2^13, every mantissa.
            let value = f64::from_bits((1023_u64 + bits % 13) << 52 | (bits >> 12));
            state.log_window.loss_sum = value;
            state.early_stopping.best = Some(value / 3.0);
            let path = dir.path().join(STATE_FILE);
            write_state(&path, &state).unwrap();
            let back: TrainerState = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert_eq!(back.log_window.loss_sum.to_bits(), value.to_bits(), "{value:e}");
            assert_eq!(back.early_stopping.best, state.early_stopping.best);
        }
    }

    #[test]
    fn a_newer_state_version_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = state_v2("run-a", 5);
        state.version = STATE_VERSION + 1;
        std::fs::write(dir.path().join(STATE_FILE), serde_json::to_string(&state).unwrap()).unwrap();
        let err = read_state(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "state version {}, this worker reads versions 1 to 2",
                STATE_VERSION + 1
            )),
            "{err}"
        );
    }

    /// A checkpoint directory with only its state file (enough for pruning and clean-up).
    fn fake_checkpoint(root: &Path, run_id: Option<&str>, step: u64) -> PathBuf {
        let dir = root.join(format!("step-{step}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut state = state_v2(run_id.unwrap_or(""), step);
        state.run_id = run_id.map(str::to_string);
        std::fs::write(dir.join(STATE_FILE), serde_json::to_string(&state).unwrap()).unwrap();
        dir
    }

    fn names(root: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_best_of_its_own_run_and_never_touches_another_run() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for step in [10, 20, 30, 40, 50] {
            fake_checkpoint(root, Some("mine"), step);
        }
        fake_checkpoint(root, Some("theirs"), 5);
        fake_checkpoint(root, None, 7);
        std::fs::write(root.join("best"), "step-20").unwrap();
        prune(root, 2, Some("mine"), 50, PRUNE_GRACE_MS * 10);
        assert_eq!(
            names(root),
            vec!["best", "step-20", "step-40", "step-5", "step-50", "step-7"]
        );
    }

    #[test]
    fn only_a_complete_checkpoint_of_the_run_is_continued_from() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(latest_complete(root, "mine"), None);
        // State files alone: their optimizer, generator and model files are missing.
        fake_checkpoint(root, Some("mine"), 10);
        fake_checkpoint(root, Some("theirs"), 20);
        assert_eq!(latest_complete(root, "mine"), None);
        assert_eq!(latest_complete(root, "nobody"), None);
    }

    #[test]
    fn pruning_keeps_what_the_coordinator_may_still_hold_as_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Committed at t = 10 s, 20 s, … 50 s.
        for (i, step) in [10, 20, 30, 40, 50].into_iter().enumerate() {
            let dir = fake_checkpoint(root, Some("mine"), step);
            let mut state = trainer_state_of(&dir);
            state.created_unix_ms = 10_000 * (i as i64 + 1);
            std::fs::write(dir.join(STATE_FILE), serde_json::to_string(&state).unwrap()).unwrap();
        }
        // At t = 85 s, step-20 (20 s) is the newest committed a grace period ago: the coordinator
        // has registered it or a newer one, so only what is older than it may go.
        prune(root, 2, Some("mine"), 50, 85_000);
        assert_eq!(names(root), vec!["step-20", "step-30", "step-40", "step-50"]);
        // Later, the newest two remain.
        prune(root, 2, Some("mine"), 50, 200_000);
        assert_eq!(names(root), vec!["step-40", "step-50"]);
    }

    fn trainer_state_of(dir: &Path) -> TrainerState {
        serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE)).unwrap()).unwrap()
    }

    #[test]
    fn a_start_removes_crash_leftovers_and_its_own_later_checkpoints_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for step in [10, 20, 30] {
            fake_checkpoint(root, Some("mine"), step);
        }
        fake_checkpoint(root, Some("theirs"), 40);
        std::fs::create_dir_all(root.join(".step-35.tmp")).unwrap();
        std::fs::write(root.join(".step-35.tmp/optim-rank1.safetensors"), "half").unwrap();
        std::fs::write(root.join("latest"), "step-30").unwrap();
        let cleaned = clean_for_start(root, "mine", 20).unwrap();
        assert_eq!(cleaned.temporary, vec![root.join(".step-35.tmp")]);
        assert_eq!(cleaned.superseded, vec![root.join("step-30")]);
        assert_eq!(names(root), vec!["step-10", "step-20", "step-40"]);
        // Nothing to do in a directory that does not exist yet.
        assert_eq!(
            clean_for_start(&root.join("none"), "mine", 0).unwrap(),
            Cleaned::default()
        );
    }
}
