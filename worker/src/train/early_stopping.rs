//! Early stopping on the dev loss, the original project's rule: an evaluation improves when its
//! loss is below the best so far; `max_stop_number` evaluations in a row without improvement
//! stop the training. The state is saved in checkpoints (under the field names of
//! `trainer_state.json`, which are also those of the summary and the progress reports).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// The lowest dev loss so far.
    #[serde(rename = "best_val_loss")]
    pub best: Option<f64>,
    /// The epoch that reached it.
    pub best_epoch: Option<u32>,
    /// Evaluations since the last improvement.
    pub stop_count: u32,
    /// Every evaluation's dev loss, in order.
    #[serde(rename = "val_loss_history")]
    pub history: Vec<f64>,
    /// The patience ran out: training ends.
    #[serde(rename = "early_stopped")]
    pub stopped: bool,
}

/// What one evaluation meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// A new best dev loss (the best model is saved).
    pub improved: bool,
    /// This evaluation used up the patience.
    pub stopped: bool,
}

impl EarlyStopping {
    /// Records epoch `epoch`'s dev loss with a patience of `max_stop_number` evaluations.
    pub fn observe(&mut self, epoch: u32, val_loss: f64, max_stop_number: u32) -> Observation {
        self.observe_with(epoch, val_loss, max_stop_number, |new, best| new < best)
    }

    /// The same rule for a dev metric where higher is better (a classifier's macro-F1): `best`
    /// and `history` then hold that metric.
    pub fn observe_higher(&mut self, epoch: u32, metric: f64, max_stop_number: u32) -> Observation {
        self.observe_with(epoch, metric, max_stop_number, |new, best| new > best)
    }

    fn observe_with(
        &mut self,
        epoch: u32,
        val_loss: f64,
        max_stop_number: u32,
        better: fn(f64, f64) -> bool,
    ) -> Observation {
        self.history.push(val_loss);
        let improved = self.best.is_none_or(|b| better(val_loss, b));
        if improved {
            self.best = Some(val_loss);
            self.best_epoch = Some(epoch);
            self.stop_count = 0;
        } else {
            self.stop_count += 1;
        }
        self.stopped = !improved && self.stop_count >= max_stop_number;
        Observation {
            improved,
            stopped: self.stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_higher_is_better_metric_improves_upwards() {
        let mut e = EarlyStopping::default();
        assert!(e.observe_higher(0, 0.4, 1).improved);
        let o = e.observe_higher(1, 0.3, 1);
        assert_eq!((o.improved, o.stopped), (false, true));
        assert_eq!((e.best, e.best_epoch), (Some(0.4), Some(0)));
    }

    #[test]
    fn the_first_evaluation_improves() {
        let mut e = EarlyStopping::default();
        let o = e.observe(0, 3.0, 2);
        assert_eq!(
            o,
            Observation {
                improved: true,
                stopped: false
            }
        );
        assert_eq!((e.best, e.best_epoch, e.stop_count), (Some(3.0), Some(0), 0));
        assert_eq!(e.history, vec![3.0]);
    }

    #[test]
    fn patience_counts_evaluations_without_a_lower_loss_and_then_stops() {
        let mut e = EarlyStopping::default();
        e.observe(0, 3.0, 2);
        // Equal is not better.
        assert_eq!(
            e.observe(1, 3.0, 2),
            Observation {
                improved: false,
                stopped: false
            }
        );
        assert_eq!(e.stop_count, 1);
        assert_eq!(
            e.observe(2, 3.5, 2),
            Observation {
                improved: false,
                stopped: true
            }
        );
        assert!(e.stopped);
        assert_eq!((e.best, e.best_epoch, e.stop_count), (Some(3.0), Some(0), 2));
        assert_eq!(e.history, vec![3.0, 3.0, 3.5]);
    }

    #[test]
    fn an_improvement_resets_the_count() {
        let mut e = EarlyStopping::default();
        e.observe(0, 3.0, 3);
        e.observe(1, 3.1, 3);
        e.observe(2, 3.2, 3);
        assert_eq!(e.stop_count, 2);
        let o = e.observe(3, 2.5, 3);
        assert!(o.improved && !o.stopped);
        assert_eq!((e.best, e.best_epoch, e.stop_count), (Some(2.5), Some(3), 0));
        e.observe(4, 2.6, 3);
        e.observe(5, 2.7, 3);
        assert!(!e.stopped);
        assert!(e.observe(6, 2.8, 3).stopped);
    }

    #[test]
    fn zero_patience_stops_at_the_first_evaluation_without_improvement() {
        let mut e = EarlyStopping::default();
        assert!(!e.observe(0, 1.0, 0).stopped);
        assert!(e.observe(1, 1.5, 0).stopped);
    }

    #[test]
    fn a_nan_loss_never_improves_on_a_best() {
        let mut e = EarlyStopping::default();
        e.observe(0, 1.0, 5);
        assert!(!e.observe(1, f64::NAN, 5).improved);
        assert_eq!(e.best, Some(1.0));
    }

    #[test]
    fn serialises_under_the_checkpoint_field_names() {
        let e = EarlyStopping {
            best: Some(1.5),
            best_epoch: Some(2),
            stop_count: 1,
            history: vec![2.0, 1.5, 1.7],
            stopped: false,
        };
        let value = serde_json::to_value(&e).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"best_val_loss": 1.5, "best_epoch": 2, "stop_count": 1,
                "val_loss_history": [2.0, 1.5, 1.7], "early_stopped": false})
        );
        assert_eq!(serde_json::from_value::<EarlyStopping>(value).unwrap(), e);
    }
}
