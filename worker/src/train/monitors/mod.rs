//! DeepSpeed's monitors (`tensorboard`, `csv_monitor` in the config): the run's scalars with
//! DeepSpeed's tags, on its x axis — global samples, `train_batch_size` per optimizer step, so
//! the first step is at x = `train_batch_size` — written by rank 0 into
//! `output_path/job_name/` of each enabled monitor.
//!
//! Every optimizer step: `Train/Samples/lr` (the optimizer's rate after the scheduler stepped,
//! DeepSpeed's `get_lr()[0]`: the rate of the next step), `Train/Samples/loss_scale` (fp16 only)
//! and `Train/Samples/train_loss` (the step's masked-token mean loss over all ranks, as the
//! training log's `loss` over a one-step window). Every evaluation: `Train/Samples/eval_loss`
//! (the name DeepSpeed's pipeline engine uses) and `Train/Samples/eval_accuracy`.
//!
//! Written through buffers, flushed at every logging step, evaluation and the end of the run
//! (or its stop). A write that fails stops the run with an error naming the file: the user
//! asked for these curves, and the run resumes from its last checkpoint once the disk is fixed.

pub mod csv;
pub mod event_file;

use csv::CsvMonitor;
use event_file::{EventFile, SessionLog, What, SESSION_START};
use kormlm_proto::ds_config::DsConfig;
use std::path::{Path, PathBuf};

pub const LR: &str = "Train/Samples/lr";
pub const LOSS_SCALE: &str = "Train/Samples/loss_scale";
pub const TRAIN_LOSS: &str = "Train/Samples/train_loss";
pub const EVAL_LOSS: &str = "Train/Samples/eval_loss";
pub const EVAL_ACCURACY: &str = "Train/Samples/eval_accuracy";

/// A monitor write that failed, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: writing the {monitor} monitor: {error}")]
pub struct MonitorError {
    pub path: PathBuf,
    pub monitor: &'static str,
    pub error: std::io::Error,
}

/// What an optimizer step reports to the monitors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepScalars {
    /// The optimizer's learning rate after the step (the next step's).
    pub lr: f64,
    /// The fp16 loss scale after the step; `None` without fp16.
    pub loss_scale: Option<f64>,
    /// The step's mean masked-token loss over all ranks.
    pub train_loss: f64,
}

/// The enabled monitors of a run; on ranks other than 0, or with none enabled, nothing.
#[derive(Default)]
pub struct Monitors {
    tensorboard: Option<EventFile>,
    csv: Option<CsvMonitor>,
}

impl Monitors {
    /// Opens the monitors `config` enables, on rank 0 (`leader`). `purge_from`: for a run that
    /// continues one that may have written past its checkpoint (a resume, a restarted attempt),
    /// the x of its first step; TensorBoard is told (`SessionLog` START there, as torch's
    /// `purge_step`) to drop what earlier files hold from that x on.
    pub fn open(config: &DsConfig, leader: bool, purge_from: Option<u64>) -> Result<Self, MonitorError> {
        let mut monitors = Self::default();
        if !leader {
            return Ok(monitors);
        }
        if config.tensorboard.enabled {
            let dir = config.tensorboard.dir();
            let fail = |path: &Path, error| MonitorError {
                path: path.to_path_buf(),
                monitor: "tensorboard",
                error,
            };
            std::fs::create_dir_all(&dir).map_err(|e| fail(&dir, e))?;
            let mut file = EventFile::create(&dir).map_err(|e| fail(&dir, e))?;
            if let Some(x) = purge_from {
                let start = What::SessionLog(SessionLog { status: SESSION_START });
                file.write(x, start).map_err(|e| fail(file.path(), e))?;
            }
            tracing::info!(file = %file.path().display(), "tensorboard monitor");
            monitors.tensorboard = Some(file);
        }
        if config.csv_monitor.enabled {
            let dir = config.csv_monitor.dir();
            std::fs::create_dir_all(&dir).map_err(|error| MonitorError {
                path: dir.clone(),
                monitor: "csv",
                error,
            })?;
            tracing::info!(dir = %dir.display(), "csv monitor");
            monitors.csv = Some(CsvMonitor::new(&dir));
        }
        Ok(monitors)
    }

    /// The scalars of the optimizer step that brought the run to `x` samples.
    pub fn step(&mut self, x: u64, step: StepScalars) -> Result<(), MonitorError> {
        let mut values = vec![(LR, step.lr)];
        if let Some(scale) = step.loss_scale {
            values.push((LOSS_SCALE, scale));
        }
        values.push((TRAIN_LOSS, step.train_loss));
        self.write(x, &values)
    }

    /// The scalars of an evaluation at `x` samples.
    pub fn eval(&mut self, x: u64, loss: f64, accuracy: f64) -> Result<(), MonitorError> {
        self.write(x, &[(EVAL_LOSS, loss), (EVAL_ACCURACY, accuracy)])
    }

    fn write(&mut self, x: u64, values: &[(&str, f64)]) -> Result<(), MonitorError> {
        if let Some(file) = &mut self.tensorboard {
            file.scalars(x, values).map_err(|error| MonitorError {
                path: file.path().to_path_buf(),
                monitor: "tensorboard",
                error,
            })?;
        }
        if let Some(csv) = &mut self.csv {
            for &(tag, value) in values {
                csv.write(tag, value, x).map_err(csv_error)?;
            }
        }
        Ok(())
    }

    /// Writes out what the buffers hold.
    pub fn flush(&mut self) -> Result<(), MonitorError> {
        if let Some(file) = &mut self.tensorboard {
            file.flush().map_err(|error| MonitorError {
                path: file.path().to_path_buf(),
                monitor: "tensorboard",
                error,
            })?;
        }
        if let Some(csv) = &mut self.csv {
            csv.flush().map_err(csv_error)?;
        }
        Ok(())
    }
}

impl From<MonitorError> for super::TrainError {
    fn from(e: MonitorError) -> Self {
        super::TrainError::output(&e.path, format!("writing the {} monitor: {}", e.monitor, e.error))
    }
}

fn csv_error(e: csv::CsvError) -> MonitorError {
    MonitorError {
        path: e.path,
        monitor: "csv",
        error: e.error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, tensorboard: bool, csv: bool) -> DsConfig {
        let json = format!(
            r#"{{"train_batch_size": 4, "tensorboard": {{"enabled": {tensorboard}, "output_path": "{0}", "job_name": "tb"}},
                "csv_monitor": {{"enabled": {csv}, "output_path": "{0}", "job_name": "csv"}}}}"#,
            dir.display()
        );
        DsConfig::parse(&json, "t.json").unwrap().config
    }

    #[test]
    fn only_rank_zero_and_only_enabled_monitors_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut other = Monitors::open(&config(dir.path(), true, true), false, None).unwrap();
        other.eval(4, 1.0, 0.5).unwrap();
        other.flush().unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut csv_only = Monitors::open(&config(dir.path(), false, true), true, None).unwrap();
        csv_only
            .step(
                4,
                StepScalars {
                    lr: 0.5,
                    loss_scale: Some(65536.0),
                    train_loss: 7.0,
                },
            )
            .unwrap();
        csv_only.flush().unwrap();
        assert!(!dir.path().join("tb").exists());
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("csv"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "Train_Samples_loss_scale.csv",
                "Train_Samples_lr.csv",
                "Train_Samples_train_loss.csv"
            ]
        );
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let err = Monitors::open(&config(&blocker, true, false), true, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "{}: writing the tensorboard monitor:",
                blocker.join("tb").display()
            )),
            "{err}"
        );
    }
}
