//! Classification metrics as scikit-learn computes them: accuracy (`accuracy_score`; subset
//! accuracy for multi-label), per-label F1 and their unweighted mean, macro-F1
//! (`f1_score(average="macro", labels=range(num_labels), zero_division=0)`: every label of the
//! label space counts, and a label never true nor predicted has F1 0).

use serde::Serialize;

/// Metrics of a set of predictions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// F1 of each label, in label-id order.
    pub per_label_f1: Vec<f64>,
}

impl Metrics {
    /// The per-label F1 scores by label name (`names` in label-id order).
    pub fn per_label_by_name(&self, names: &[String]) -> serde_json::Map<String, serde_json::Value> {
        names
            .iter()
            .zip(&self.per_label_f1)
            .map(|(name, f1)| (name.clone(), serde_json::json!(f1)))
            .collect()
    }
}

/// Per-label counts of true positives, false positives and false negatives.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    tp: u64,
    fp: u64,
    fn_: u64,
}

impl Counts {
    fn add(&mut self, gold: bool, predicted: bool) {
        match (gold, predicted) {
            (true, true) => self.tp += 1,
            (false, true) => self.fp += 1,
            (true, false) => self.fn_ += 1,
            (false, false) => {}
        }
    }

    fn f1(&self) -> f64 {
        let denominator = 2 * self.tp + self.fp + self.fn_;
        if denominator == 0 {
            0.0
        } else {
            2.0 * self.tp as f64 / denominator as f64
        }
    }
}

fn finish(examples: usize, correct: usize, counts: &[Counts]) -> Metrics {
    let per_label_f1: Vec<f64> = counts.iter().map(Counts::f1).collect();
    let macro_f1 = if per_label_f1.is_empty() {
        0.0
    } else {
        per_label_f1.iter().sum::<f64>() / per_label_f1.len() as f64
    };
    Metrics {
        examples,
        accuracy: if examples == 0 {
            f64::NAN
        } else {
            correct as f64 / examples as f64
        },
        macro_f1,
        per_label_f1,
    }
}

/// Single-label predictions (label ids) against gold ids, over `num_labels` labels.
pub fn single_label(gold: &[usize], predicted: &[usize], num_labels: usize) -> Metrics {
    let mut counts = vec![Counts::default(); num_labels];
    let mut correct = 0;
    for (&g, &p) in gold.iter().zip(predicted) {
        correct += usize::from(g == p);
        for (label, c) in counts.iter_mut().enumerate() {
            c.add(g == label, p == label);
        }
    }
    finish(gold.len(), correct, &counts)
}

/// Multi-label predictions (one flag per label) against gold flags.
pub fn multi_label(gold: &[Vec<bool>], predicted: &[Vec<bool>]) -> Metrics {
    let num_labels = gold.first().map_or(0, Vec::len);
    let mut counts = vec![Counts::default(); num_labels];
    let mut correct = 0;
    for (g, p) in gold.iter().zip(predicted) {
        correct += usize::from(g == p);
        for (label, c) in counts.iter_mut().enumerate() {
            c.add(g[label], p[label]);
        }
    }
    finish(gold.len(), correct, &counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_label_counts_every_label() {
        // sklearn: f1_score([0,0,1,1], [0,1,1,1], average="macro", labels=[0,1,2], zero_division=0)
        // = (2/3 + 4/5 + 0) / 3.
        let m = single_label(&[0, 0, 1, 1], &[0, 1, 1, 1], 3);
        assert_eq!(m.accuracy, 0.75);
        assert!((m.macro_f1 - (2.0 / 3.0 + 0.8) / 3.0).abs() < 1e-15);
        assert_eq!(m.per_label_f1[2], 0.0);
    }

    #[test]
    fn multi_label_is_subset_accuracy_and_per_label_f1() {
        let gold = vec![vec![true, false], vec![true, true]];
        let predicted = vec![vec![true, false], vec![false, true]];
        let m = multi_label(&gold, &predicted);
        assert_eq!(m.accuracy, 0.5);
        assert_eq!(m.per_label_f1, vec![2.0 / 3.0, 1.0]);
    }
}
