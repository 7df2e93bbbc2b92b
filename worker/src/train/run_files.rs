//! Everything a run writes into its output directory besides its run file (`ownership`):
//! `params.json`, `training_log.jsonl`, the loss-curve plot, the `best/` and `final/` models,
//! `summary.json`, and the pointer to the best checkpoint. Rank 0 writes them; the other ranks
//! hold a `RunFiles` that writes nothing. Checkpoints are written by every rank under
//! [`RunFiles::checkpoint_root`]. Every file but the log is written durably (temporary name,
//! flush, rename); the log is appended to, one flushed line per record.
//!
//! The log continues across resumes and restarts of the same run, never truncated, with each
//! step recorded once: a run that starts at global step S keeps the records up to S and drops
//! the later ones (work after the checkpoint it resumes from, which it redoes and records
//! again), the summary of an earlier finish and a line cut short by a crash.

use super::checkpoint;
use super::error::TrainError;
use super::plot;
use super::report::TrainSummary;
use super::trainer::TrainableModel;
use kormlm_proto::durable;
use serde_json::{json, Value};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const LOG_FILE: &str = "training_log.jsonl";

pub struct RunFiles {
    dir: PathBuf,
    /// The training log, open on rank 0 only: whether this rank writes.
    log: Option<File>,
}

impl RunFiles {
    /// Rank 0 creates `dir`, writes `params` to `params.json` and opens the training log to
    /// continue a run at global step `start_step` (0: from the beginning); the other ranks touch
    /// nothing.
    pub fn open(dir: &Path, rank: usize, start_step: u64, params: &Value) -> Result<Self, TrainError> {
        let mut files = Self {
            dir: dir.to_path_buf(),
            log: None,
        };
        if rank != 0 {
            return Ok(files);
        }
        std::fs::create_dir_all(dir).map_err(|e| TrainError::output(dir, e))?;
        let params_path = dir.join("params.json");
        durable::write(&params_path, format!("{params:#}\n")).map_err(|e| TrainError::output(&params_path, e.error))?;
        let log_path = files.log_path();
        keep_records_until(&log_path, start_step)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path);
        files.log = Some(log.map_err(|e| TrainError::output(&log_path, e))?);
        Ok(files)
    }

    /// Whether this rank writes the run's files.
    pub fn writes(&self) -> bool {
        self.log.is_some()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// Where every rank writes its part of each checkpoint.
    pub fn checkpoint_root(&self) -> PathBuf {
        Self::checkpoint_root_of(&self.dir)
    }

    /// The checkpoint root of output directory `dir`.
    pub fn checkpoint_root_of(dir: &Path) -> PathBuf {
        dir.join("checkpoints")
    }

    /// The best model so far (HF layout).
    pub fn best_dir(&self) -> PathBuf {
        self.dir.join("best")
    }

    /// The model after the last step (HF layout).
    pub fn final_dir(&self) -> PathBuf {
        self.dir.join("final")
    }

    /// Appends one record to the training log.
    pub fn record(&mut self, value: &Value) -> Result<(), TrainError> {
        if let Some(f) = &mut self.log {
            writeln!(f, "{value}")
                .and_then(|_| f.flush())
                .map_err(|e| TrainError::output(&self.dir.join(LOG_FILE), e))?;
        }
        Ok(())
    }

    /// Draws the loss curve again from the log. A plot that cannot be drawn is not worth
    /// stopping a training run for: it is only warned about.
    pub fn redraw_loss_curve(&self) {
        if !self.writes() {
            return;
        }
        let png = self.dir.join(plot::LOSS_CURVE_FILE);
        if let Err(e) = plot::plot_log(&self.log_path(), &png) {
            tracing::warn!(error = %e, "loss-curve plot not written");
        }
    }

    pub fn save_best(&self, model: &impl TrainableModel) -> Result<(), TrainError> {
        if self.writes() {
            model.save(&self.best_dir())?;
        }
        Ok(())
    }

    pub fn save_final(&self, model: &impl TrainableModel) -> Result<(), TrainError> {
        if self.writes() {
            model.save(&self.final_dir())?;
        }
        Ok(())
    }

    /// Marks checkpoint `dir` as the one holding the best weights, so pruning keeps it.
    pub fn mark_best_checkpoint(&self, dir: &Path) -> Result<(), TrainError> {
        if self.writes() {
            checkpoint::mark_best(&self.checkpoint_root(), dir)?;
        }
        Ok(())
    }

    /// The summary as the log's last record and as `summary.json`.
    pub fn write_summary(&mut self, summary: &TrainSummary) -> Result<(), TrainError> {
        self.write_summary_as(&json!({"type": "summary", "summary": summary}), &json!(summary))
    }

    /// A summary as the log's last `record` and as `summary.json` (`file`).
    pub fn write_summary_as(&mut self, record: &Value, file: &Value) -> Result<(), TrainError> {
        if !self.writes() {
            return Ok(());
        }
        self.record(record)?;
        let path = self.dir.join("summary.json");
        durable::write(&path, format!("{file:#}\n")).map_err(|e| TrainError::output(&path, e.error))
    }

    /// The run's output directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether a log record stays when the run continues at `start_step`.
fn kept(record: &Value, start_step: u64) -> bool {
    record["type"] != "summary" && record["step"].as_u64().is_none_or(|step| step <= start_step)
}

/// Rewrites the log at `path` (durably) without the records after `start_step`, if it has any.
fn keep_records_until(path: &Path, start_step: u64) -> Result<(), TrainError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::output(path, e)),
    };
    let mut keep = String::with_capacity(text.len());
    let mut dropped = 0usize;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(record) if kept(&record, start_step) => {
                keep.push_str(line);
                keep.push('\n');
            }
            _ => dropped += 1,
        }
    }
    if dropped == 0 && text.ends_with('\n') {
        return Ok(());
    }
    tracing::info!(log = %path.display(), dropped, start_step, "training-log records after the resume point dropped; they are redone");
    durable::write(path, keep).map_err(|e| TrainError::output(path, e.error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn rank_zero_starts_the_log_and_a_resumed_run_appends_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut files = RunFiles::open(&out, 0, 0, &json!({"args": {"seed": 1}})).unwrap();
        assert!(files.writes());
        files.record(&json!({"type": "train", "step": 1})).unwrap();
        let params: Value = serde_json::from_str(&std::fs::read_to_string(out.join("params.json")).unwrap()).unwrap();
        assert_eq!(params["args"]["seed"], 1);

        let mut resumed = RunFiles::open(&out, 0, 1, &json!({})).unwrap();
        resumed.record(&json!({"type": "train", "step": 2})).unwrap();
        assert_eq!(lines(&out.join(LOG_FILE)).len(), 2);

        let mut fresh = RunFiles::open(&out, 0, 0, &json!({})).unwrap();
        fresh.record(&json!({"type": "train", "step": 1})).unwrap();
        assert_eq!(lines(&out.join(LOG_FILE)), vec![json!({"type": "train", "step": 1})]);
        assert_eq!(fresh.checkpoint_root(), out.join("checkpoints"));
        assert_eq!(fresh.best_dir(), out.join("best"));
        assert_eq!(fresh.final_dir(), out.join("final"));
    }

    #[test]
    fn a_resume_keeps_the_records_up_to_its_step_once_and_drops_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let log = out.join(LOG_FILE);
        let records = [
            json!({"type": "start", "step": 0}),
            json!({"type": "train", "step": 10}),
            json!({"type": "eval", "epoch": 0, "step": 12}),
            json!({"type": "train", "step": 20}),
            json!({"type": "eval", "epoch": 1, "step": 24}),
            json!({"type": "summary", "summary": {}}),
        ];
        let text: String = records.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(&log, text + "{\"type\": \"train\", \"st").unwrap();
        let mut files = RunFiles::open(out, 0, 12, &json!({})).unwrap();
        assert_eq!(lines(&log), records[..3].to_vec());
        files.record(&json!({"type": "train", "step": 20})).unwrap();
        assert_eq!(lines(&log).len(), 4);
        // Nothing after the resume point: the file is left as it is.
        let before = std::fs::metadata(&log).unwrap().modified().unwrap();
        RunFiles::open(out, 0, 20, &json!({})).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().modified().unwrap(), before);
    }

    #[test]
    fn other_ranks_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut files = RunFiles::open(&out, 1, 0, &json!({})).unwrap();
        assert!(!files.writes());
        files.record(&json!({"type": "train"})).unwrap();
        files.redraw_loss_curve();
        files
            .mark_best_checkpoint(&files.checkpoint_root().join("step-1"))
            .unwrap();
        assert!(!out.exists());
        // Paths are the same on every rank (checkpoints and the summary use them).
        assert_eq!(files.checkpoint_root(), out.join("checkpoints"));
    }
}
