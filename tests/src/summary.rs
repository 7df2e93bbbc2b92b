//! What a training run reports (`summary.json`, the summary `worker train` prints), checked
//! against itself recomputed.

use serde_json::Value;
use std::path::Path;

/// The run's dev loss after each evaluation (`val_loss_history`).
pub fn val_loss_history(summary: &Value) -> Vec<f64> {
    let history = summary["val_loss_history"]
        .as_array()
        .unwrap_or_else(|| panic!("no val_loss_history in {summary}"));
    history
        .iter()
        .map(|v| v.as_f64().unwrap_or_else(|| panic!("{v} in val_loss_history")))
        .collect()
}

/// The training log's records of one `type` (`train`, `eval`, `checkpoint`, …), in file order.
pub fn logged_records(output_dir: &Path, kind: &str) -> Vec<Value> {
    training_log(output_dir)
        .into_iter()
        .filter(|r| r["type"] == kind)
        .collect()
}

/// The steps of the training log's `train` records, in file order.
pub fn logged_steps(output_dir: &Path) -> Vec<u64> {
    logged_records(output_dir, "train")
        .iter()
        .map(|r| {
            r["step"]
                .as_u64()
                .unwrap_or_else(|| panic!("a train record without a step: {r}"))
        })
        .collect()
}

/// An early-stopped run, recomputed from its history: one evaluation an epoch, the best the
/// history's minimum, reached exactly `patience` evaluations before the last (that many in a
/// row without a lower loss stop it; a tie is not lower).
pub fn assert_early_stopped(summary: &Value, patience: usize) {
    let history = val_loss_history(summary);
    assert_eq!(summary["early_stopped"], true, "{summary}");
    assert_eq!(summary["stop_count"].as_u64(), Some(patience as u64), "{summary}");
    assert_eq!(summary["epochs_run"].as_u64(), Some(history.len() as u64), "{summary}");
    let (argmin, min) = history
        .iter()
        .copied()
        .enumerate()
        .fold((0, f64::INFINITY), |(i, m), (j, v)| if v < m { (j, v) } else { (i, m) });
    assert_eq!(summary["best_val_loss"].as_f64(), Some(min), "{history:?}");
    assert_eq!(argmin + patience + 1, history.len(), "{history:?}");
}

/// The records of `OUTPUT_DIR/training_log.jsonl`.
pub fn training_log(output_dir: &Path) -> Vec<Value> {
    let path = output_dir.join("training_log.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}
