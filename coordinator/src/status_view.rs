//! How a job status is shown: the `--json` form (snake_case fields, states as names) and the
//! human table.

use kormlm_proto::v1::{CheckpointRef, FailureKind, JobState, JobStatus, TaskKind, WorkerInfo, WorkerState};
use serde_json::{json, Value};

fn job_state(status: &JobStatus) -> &'static str {
    JobState::try_from(status.state)
        .unwrap_or(JobState::Unspecified)
        .as_str_name()
}

fn worker_state(worker: &WorkerInfo) -> &'static str {
    match WorkerState::try_from(worker.state).unwrap_or(WorkerState::Unspecified) {
        WorkerState::Unspecified => "UNSPECIFIED",
        WorkerState::Alive => "ALIVE",
        WorkerState::Lost => "LOST",
        WorkerState::Exited => "EXITED",
        WorkerState::WorkerFailed => "FAILED",
    }
}

/// The kind of a worker's failure by its wire name; empty when it has none.
fn failure_kind(worker: &WorkerInfo) -> &'static str {
    match FailureKind::try_from(worker.failure_kind) {
        Ok(FailureKind::Unspecified) | Err(_) => "",
        Ok(kind) => kind.as_str_name(),
    }
}

fn checkpoint(c: &Option<CheckpointRef>) -> Value {
    match c {
        None => Value::Null,
        Some(c) => json!({
            "tag": c.tag,
            "path": c.path,
            "global_step": c.global_step,
            "world_size": c.world_size,
            "val_loss": c.val_loss,
            "created_unix_ms": c.created_unix_ms,
            "run_id": c.run_id,
            "attempt": c.attempt,
        }),
    }
}

/// The machine-readable status (`coordinator status --json`).
pub fn to_json(status: &JobStatus) -> Value {
    let progress = status.progress.unwrap_or_default();
    let early = status.early_stop.clone().unwrap_or_default();
    let batch = status.batch.unwrap_or_default();
    let task = TaskKind::try_from(status.task).unwrap_or(TaskKind::Unspecified);
    let workers: Vec<Value> = status.workers.iter().map(worker_json).collect();
    let mut view = json!({
        "job_id": status.job_id,
        "run_id": status.run_id,
        "state": job_state(status),
        "task": match task {
            TaskKind::Augment => "AUGMENT",
            TaskKind::AugmentEval => "AUGMENT_EVAL",
            TaskKind::Classify => "CLASSIFY",
            _ => "TRAIN",
        },
        "message": status.message,
        "world_size": status.world_size,
        "train_batch_size": batch.train_batch_size,
        "train_micro_batch_size_per_gpu": batch.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": batch.gradient_accumulation_steps,
        "epoch": progress.epoch,
        "global_step": progress.global_step,
        "total_steps": progress.total_steps,
        "samples_in_epoch": progress.samples_in_epoch,
        "train_loss": progress.train_loss,
        "val_loss": progress.val_loss,
        "val_accuracy": progress.val_accuracy,
        "learning_rate": progress.learning_rate,
        "samples_per_s": progress.samples_per_s,
        "tokens_per_s": progress.tokens_per_s,
        "mfu": progress.mfu,
        "loss_scale": progress.loss_scale,
        "skipped_steps": progress.skipped_steps,
        "early_stopping_metric": early_stopping_metric(task),
        "stop_count": early.stop_count,
        "max_stop_number": early.max_stop_number,
        "early_stopped": early.early_stopped,
        "latest_checkpoint": checkpoint(&status.latest_checkpoint),
        "best_checkpoint": checkpoint(&status.best_checkpoint),
        "checkpoints": status.checkpoints.iter().map(|c| checkpoint(&Some(c.clone()))).collect::<Vec<_>>(),
        "restarts": status.restarts,
        "max_restarts": status.max_restarts,
        "automatic_restarts": status.automatic_restarts,
        "shrinks": status.shrinks,
        "created_unix_ms": status.created_unix_ms,
        "started_unix_ms": status.started_unix_ms,
        "ended_unix_ms": status.ended_unix_ms,
        "output_dir": status.output_dir,
        "workers": workers,
    });
    // The best value and the history of the metric early stopping watches, named after it.
    let metric = early_stopping_metric(task);
    view[format!("best_{metric}")] = json!(early.best_val_loss);
    view[format!("{metric}_history")] = json!(early.val_loss_history);
    view
}

/// What early stopping watches: a classifier job's dev macro-F1, else the dev loss (the
/// `EarlyStopState` fields named after the loss carry it).
fn early_stopping_metric(task: TaskKind) -> &'static str {
    match task {
        TaskKind::Classify => "val_macro_f1",
        _ => "val_loss",
    }
}

fn worker_json(w: &WorkerInfo) -> Value {
    json!({
    "rank": w.rank,
    "local_rank": w.local_rank,
    "host": w.host,
    "pid": w.pid,
    "devices": w.devices,
    "state": worker_state(w),
    "last_heartbeat_ms": w.last_heartbeat_ms,
    "optimizer_state_bytes": w.optimizer_state_bytes,
    "incarnation": w.incarnation,
    "reason": w.reason,
    "failure_kind": failure_kind(w),
    })
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
}

/// The human-readable status (`coordinator status`).
pub fn to_table(status: &JobStatus, now_ms: i64) -> String {
    let progress = status.progress.unwrap_or_default();
    let early = status.early_stop.clone().unwrap_or_default();
    let mut out = String::new();
    out.push_str(&format!(
        "job         {}  {}  (run {}, world size {})\n",
        status.job_id,
        job_state(status),
        status.run_id,
        status.world_size
    ));
    if !status.message.is_empty() {
        out.push_str(&format!("message     {}\n", status.message));
    }
    let units = match TaskKind::try_from(status.task) {
        Ok(TaskKind::Augment) => Some("chunks"),
        Ok(TaskKind::AugmentEval) => Some("classifier runs"),
        _ => None,
    };
    match units {
        // Augmentation and the experiment report rank 0's share, not training steps.
        Some(units) => out.push_str(&format!(
            "progress    rank 0: {} of {} {units} done\n",
            progress.global_step, progress.total_steps
        )),
        None => out.push_str(&format!(
            "progress    epoch {}  step {}/{}  train_loss {}  val_loss {}  {:.1} samples/s  {:.0} tokens/s  MFU {:.1}%\n",
            progress.epoch,
            progress.global_step,
            progress.total_steps,
            opt(progress.train_loss),
            opt(progress.val_loss),
            progress.samples_per_s,
            progress.tokens_per_s,
            progress.mfu * 100.0
        )),
    }
    out.push_str(&format!(
        "early stop  best_{} {}  stop_count {}/{}{}\n",
        early_stopping_metric(TaskKind::try_from(status.task).unwrap_or(TaskKind::Unspecified)),
        opt(early.best_val_loss),
        early.stop_count,
        early.max_stop_number,
        if early.early_stopped { "  (early stopped)" } else { "" }
    ));
    if let Some(c) = &status.latest_checkpoint {
        out.push_str(&format!("checkpoint  latest {} ({})\n", c.tag, c.path));
    }
    if let Some(c) = &status.best_checkpoint {
        out.push_str(&format!("checkpoint  best   {} ({})\n", c.tag, c.path));
    }
    if status.restarts > 0 || status.shrinks > 0 {
        out.push_str(&format!(
            "restarts    {} ({} automatic of {}), shrinks {}\n",
            status.restarts, status.automatic_restarts, status.max_restarts, status.shrinks
        ));
    }
    out.push_str(&format!(
        "{:>4}  {:<8}  {:<16}  {:>8}  {:<10}  {:>12}  {:>14}\n",
        "rank", "state", "host", "pid", "devices", "heartbeat", "optim bytes"
    ));
    for w in &status.workers {
        let age = if w.last_heartbeat_ms > 0 {
            format!("{:.1}s ago", (now_ms - w.last_heartbeat_ms).max(0) as f64 / 1000.0)
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "{:>4}  {:<8}  {:<16}  {:>8}  {:<10}  {:>12}  {:>14}{}\n",
            w.rank,
            worker_state(w),
            w.host,
            w.pid,
            w.devices.join(","),
            age,
            w.optimizer_state_bytes,
            if w.reason.is_empty() {
                String::new()
            } else {
                format!("  ({})", w.reason)
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_fields() {
        let status = JobStatus {
            job_id: "job-3".into(),
            run_id: "5eed/job-3".into(),
            state: JobState::Running as i32,
            shrinks: 1,
            restarts: 1,
            checkpoints: vec![CheckpointRef {
                tag: "step-4".into(),
                run_id: "5eed/job-3".into(),
                attempt: 1,
                ..Default::default()
            }],
            workers: vec![WorkerInfo {
                rank: 1,
                state: WorkerState::Lost as i32,
                pid: 9,
                devices: vec!["cpu".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = to_json(&status);
        for key in [
            "job_id",
            "state",
            "epoch",
            "global_step",
            "total_steps",
            "train_loss",
            "val_loss",
            "best_val_loss",
            "stop_count",
            "max_stop_number",
            "early_stopped",
            "latest_checkpoint",
            "best_checkpoint",
            "samples_per_s",
            "tokens_per_s",
            "mfu",
            "workers",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["state"], "RUNNING");
        assert_eq!(
            (v["run_id"].as_str(), v["shrinks"].as_u64()),
            (Some("5eed/job-3"), Some(1))
        );
        assert_eq!(v["checkpoints"][0]["tag"], "step-4");
        assert_eq!(v["checkpoints"][0]["run_id"], "5eed/job-3");
        let table = to_table(&status, 0);
        assert!(
            table.contains("(run 5eed/job-3, world size 0)") && table.contains("shrinks 1"),
            "{table}"
        );
        let w = &v["workers"][0];
        for key in [
            "rank",
            "host",
            "pid",
            "devices",
            "state",
            "last_heartbeat_ms",
            "optimizer_state_bytes",
        ] {
            assert!(w.get(key).is_some(), "missing workers[].{key}");
        }
        assert_eq!(w["state"], "LOST");
        assert_eq!(w["failure_kind"], "");
        assert!(to_table(&status, 0).contains("LOST"));
        let failed = JobStatus {
            workers: vec![WorkerInfo {
                state: WorkerState::WorkerFailed as i32,
                failure_kind: FailureKind::BadInput as i32,
                ..Default::default()
            }],
            ..status
        };
        assert_eq!(to_json(&failed)["workers"][0]["failure_kind"], "BAD_INPUT");
    }

    #[test]
    fn an_experiments_progress_counts_classifier_runs() {
        let status = JobStatus {
            task: TaskKind::AugmentEval as i32,
            progress: Some(kormlm_proto::v1::Progress {
                global_step: 3,
                total_steps: 5,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(to_json(&status)["task"], "AUGMENT_EVAL");
        let table = to_table(&status, 0);
        assert!(table.contains("rank 0: 3 of 5 classifier runs done"), "{table}");
        assert!(!table.contains("samples/s"), "{table}");
    }

    #[test]
    fn a_classifier_jobs_early_stopping_is_shown_as_the_macro_f1_it_watches() {
        let status = JobStatus {
            task: TaskKind::Classify as i32,
            early_stop: Some(kormlm_proto::v1::EarlyStopState {
                best_val_loss: Some(0.75),
                val_loss_history: vec![0.5, 0.75],
                max_stop_number: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = to_json(&status);
        assert_eq!(v["task"], "CLASSIFY");
        assert_eq!(v["early_stopping_metric"], "val_macro_f1");
        assert_eq!(
            (&v["best_val_macro_f1"], &v["val_macro_f1_history"]),
            (&json!(0.75), &json!([0.5, 0.75]))
        );
        assert!(v.get("best_val_loss").is_none(), "{v}");
        assert!(to_table(&status, 0).contains("best_val_macro_f1 0.7500"));
        let training = JobStatus {
            task: TaskKind::Train as i32,
            ..status
        };
        assert_eq!(to_json(&training)["best_val_loss"], json!(0.75));
        assert_eq!(to_json(&training)["early_stopping_metric"], "val_loss");
    }
}
