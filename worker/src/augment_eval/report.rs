//! The experiment's report, from the items' results and saved test predictions: per training
//! fraction and condition the mean ± standard deviation (over the seeds, ddof 1) of test
//! macro-F1 and accuracy and the training cost; the difference augmented − original, paired by
//! seed, with a paired bootstrap confidence interval (the same resampled test rows for both
//! conditions of every seed; the seeds' mean difference per resample; percentiles as numpy's
//! default). Written as `report.json`, `report.md` and `report.png`.

use super::item::{item_dir, ItemResult, PREDICTIONS_FILE};
use super::plan::{Condition, Item};
use super::splits::Splits;
use super::AugmentEvalError;
use crate::classify::data::Targets;
use crate::classify::infer::{metrics_of, Prediction};
use crate::masking::SplitMix64;
use crate::model::sequence_classification::ProblemType;
use serde::Serialize;
use std::path::Path;

pub const REPORT_JSON: &str = "report.json";
pub const REPORT_MD: &str = "report.md";
pub const REPORT_PNG: &str = "report.png";
/// Two-sided level of the bootstrap interval.
pub const CONFIDENCE: f64 = 0.95;

/// Mean and sample standard deviation (ddof 1; none for a single value).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: Option<f64>,
}

impl MeanStd {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std =
            (values.len() > 1).then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
        Self { mean, std }
    }
}

/// One condition at one fraction, over the seeds.
#[derive(Debug, Clone, Serialize)]
pub struct ConditionReport {
    pub runs: usize,
    pub macro_f1: MeanStd,
    pub accuracy: MeanStd,
    /// Per seed, in seed order.
    pub macro_f1_per_seed: Vec<f64>,
    pub accuracy_per_seed: Vec<f64>,
    /// Rows trained on (original rows plus copies), mean over the seeds.
    pub train_rows: f64,
    pub augmented_rows: f64,
    pub steps: f64,
    pub epochs: f64,
    /// Seconds per run: augmenting, training (with dev evaluations), scoring the test set.
    pub augment_s: f64,
    pub train_s: f64,
    pub test_s: f64,
}

/// augmented − original for one metric.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    /// Mean over the seeds of the paired differences (= the difference of the means).
    pub mean: f64,
    pub per_seed: Vec<f64>,
    /// The paired bootstrap interval at `CONFIDENCE`.
    pub ci_low: f64,
    pub ci_high: f64,
    /// Share of bootstrap resamples in which augmentation did not help (difference ≤ 0).
    pub resamples_not_better: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FractionReport {
    pub fraction: f64,
    pub original: ConditionReport,
    pub augmented: ConditionReport,
    pub difference_macro_f1: Difference,
    pub difference_accuracy: Difference,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub labels: Vec<String>,
    pub problem_type: &'static str,
    pub seeds: Vec<u64>,
    pub train_pool_rows: usize,
    pub dev_rows: usize,
    pub dev_split_off: bool,
    pub test_rows: usize,
    pub bootstrap_samples: u32,
    pub confidence: f64,
    pub fractions: Vec<FractionReport>,
    /// Every run's result, in plan order.
    pub runs: Vec<ItemResult>,
}

/// Numpy's default (linear) percentile of sorted `values`, `q` in [0, 1].
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let (below, above) = (position.floor() as usize, position.ceil() as usize);
    sorted[below] + (sorted[above] - sorted[below]) * (position - below as f64)
}

/// An item's saved test predictions.
fn read_predictions(dir: &Path, item: &Item, splits: &Splits) -> Result<Vec<Prediction>, AugmentEvalError> {
    let path = item_dir(dir, item).join(PREDICTIONS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| AugmentEvalError::output(&path, e))?;
    let names = &splits.labels.names;
    let id = |name: &serde_json::Value, line: usize| {
        name.as_str()
            .and_then(|n| names.iter().position(|m| m == n))
            .ok_or_else(|| {
                AugmentEvalError::output(&path, format!("line {line}: label {name} is not one of {names:?}"))
            })
    };
    let mut predictions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let record: serde_json::Value =
            serde_json::from_str(line).map_err(|e| AugmentEvalError::output(&path, format!("line {}: {e}", i + 1)))?;
        predictions.push(match splits.labels.problem_type {
            ProblemType::SingleLabel => Prediction::Single(id(&record["label"], i + 1)?),
            ProblemType::MultiLabel => {
                let mut flags = vec![false; names.len()];
                for name in record["labels"].as_array().into_iter().flatten() {
                    flags[id(name, i + 1)?] = true;
                }
                Prediction::Multi(flags)
            }
        });
    }
    if predictions.len() != splits.test.len() {
        return Err(AugmentEvalError::output(
            &path,
            format!("{} predictions for {} test rows", predictions.len(), splits.test.len()),
        ));
    }
    Ok(predictions)
}

fn condition_report(results: &[&ItemResult]) -> ConditionReport {
    let mean = |f: &dyn Fn(&ItemResult) -> f64| results.iter().map(|r| f(r)).sum::<f64>() / results.len() as f64;
    let macro_f1: Vec<f64> = results.iter().map(|r| r.test.macro_f1).collect();
    let accuracy: Vec<f64> = results.iter().map(|r| r.test.accuracy).collect();
    ConditionReport {
        runs: results.len(),
        macro_f1: MeanStd::of(&macro_f1),
        accuracy: MeanStd::of(&accuracy),
        macro_f1_per_seed: macro_f1,
        accuracy_per_seed: accuracy,
        train_rows: mean(&|r| (r.train_rows + r.augmented_rows) as f64),
        augmented_rows: mean(&|r| r.augmented_rows as f64),
        steps: mean(&|r| r.steps as f64),
        epochs: mean(&|r| f64::from(r.epochs_run)),
        augment_s: mean(&|r| r.augment_s),
        train_s: mean(&|r| r.train_s),
        test_s: mean(&|r| r.test_s),
    }
}

/// The paired bootstrap of augmented − original, for macro-F1 and accuracy: per resample of
/// the test rows, the mean over seeds of the two conditions' difference.
fn bootstrap(
    pairs: &[(Vec<Prediction>, Vec<Prediction>)],
    gold: &Targets,
    num_labels: usize,
    samples: u32,
    seed: u64,
) -> [Vec<f64>; 2] {
    let n = pairs.first().map_or(0, |p| p.0.len());
    let mut differences = [
        Vec::with_capacity(samples as usize),
        Vec::with_capacity(samples as usize),
    ];
    for sample in 0..u64::from(samples) {
        let mut rng = SplitMix64::for_sample(seed, u64::MAX - 12, sample);
        let rows: Vec<usize> = (0..n).map(|_| rng.below(n as u64) as usize).collect();
        let resampled_gold = gold.select(&rows);
        let (mut f1, mut accuracy) = (0.0, 0.0);
        for (original, augmented) in pairs {
            let pick = |p: &[Prediction]| -> Vec<Prediction> { rows.iter().map(|&r| p[r].clone()).collect() };
            let a = metrics_of(&resampled_gold, &pick(augmented), num_labels);
            let o = metrics_of(&resampled_gold, &pick(original), num_labels);
            f1 += a.macro_f1 - o.macro_f1;
            accuracy += a.accuracy - o.accuracy;
        }
        differences[0].push(f1 / pairs.len() as f64);
        differences[1].push(accuracy / pairs.len() as f64);
    }
    differences
}

fn difference(original: &[f64], augmented: &[f64], mut resampled: Vec<f64>) -> Difference {
    let per_seed: Vec<f64> = augmented.iter().zip(original).map(|(a, o)| a - o).collect();
    resampled.sort_by(f64::total_cmp);
    let tail = (1.0 - CONFIDENCE) / 2.0;
    Difference {
        mean: per_seed.iter().sum::<f64>() / per_seed.len() as f64,
        ci_low: percentile(&resampled, tail),
        ci_high: percentile(&resampled, 1.0 - tail),
        resamples_not_better: resampled.iter().filter(|d| **d <= 0.0).count() as f64 / resampled.len() as f64,
        per_seed,
    }
}

/// Builds the report from every item's result (`results` in plan order, one per item).
pub fn build(
    dir: &Path,
    items: &[Item],
    results: &[ItemResult],
    splits: &Splits,
    bootstrap_samples: u32,
    bootstrap_seed: u64,
) -> Result<Report, AugmentEvalError> {
    let mut fractions: Vec<f64> = items.iter().map(|i| i.fraction).collect();
    fractions.dedup();
    let mut seeds: Vec<u64> = items.iter().map(|i| i.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    let mut reports = Vec::new();
    for &fraction in &fractions {
        let of = |condition: Condition| -> Vec<(&Item, &ItemResult)> {
            items
                .iter()
                .zip(results)
                .filter(|(i, _)| i.fraction == fraction && i.condition == condition)
                .collect()
        };
        let (original, augmented) = (of(Condition::Original), of(Condition::Augmented));
        let mut pairs = Vec::new();
        for ((oi, _), (ai, _)) in original.iter().zip(&augmented) {
            pairs.push((read_predictions(dir, oi, splits)?, read_predictions(dir, ai, splits)?));
        }
        let [f1s, accuracies] = bootstrap(
            &pairs,
            &splits.test.targets,
            splits.labels.len(),
            bootstrap_samples,
            bootstrap_seed,
        );
        let o: Vec<&ItemResult> = original.iter().map(|(_, r)| *r).collect();
        let a: Vec<&ItemResult> = augmented.iter().map(|(_, r)| *r).collect();
        let (o, a) = (condition_report(&o), condition_report(&a));
        reports.push(FractionReport {
            fraction,
            difference_macro_f1: difference(&o.macro_f1_per_seed, &a.macro_f1_per_seed, f1s),
            difference_accuracy: difference(&o.accuracy_per_seed, &a.accuracy_per_seed, accuracies),
            original: o,
            augmented: a,
        });
    }
    Ok(Report {
        labels: splits.labels.names.clone(),
        problem_type: splits.labels.problem_type.as_str(),
        seeds,
        train_pool_rows: splits.train.len(),
        dev_rows: splits.dev.len(),
        dev_split_off: splits.dev_split_off,
        test_rows: splits.test.len(),
        bootstrap_samples,
        confidence: CONFIDENCE,
        fractions: reports,
        runs: results.to_vec(),
    })
}

fn pm(v: &MeanStd) -> String {
    match v.std {
        Some(std) => format!("{:.4} ± {:.4}", v.mean, std),
        None => format!("{:.4}", v.mean),
    }
}

/// The report as a Markdown table (what `report.md` holds and the command prints).
pub fn markdown(report: &Report) -> String {
    let mut out = format!(
        "Test macro-F1 and accuracy, mean ± std over {} seed(s) ({:?}); difference augmented − original with a \
         {:.0} % paired bootstrap interval ({} resamples of the {} test rows). Labels: {}.\n\n",
        report.seeds.len(),
        report.seeds,
        report.confidence * 100.0,
        report.bootstrap_samples,
        report.test_rows,
        report.labels.join(", ")
    );
    out.push_str("| train fraction | condition | rows trained on | macro-F1 | accuracy | train s/run |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for f in &report.fractions {
        for (name, c) in [("original", &f.original), ("augmented", &f.augmented)] {
            out.push_str(&format!(
                "| {} | {name} | {:.0} | {} | {} | {:.1} |\n",
                f.fraction,
                c.train_rows,
                pm(&c.macro_f1),
                pm(&c.accuracy),
                c.augment_s + c.train_s
            ));
        }
        let (d, a) = (&f.difference_macro_f1, &f.difference_accuracy);
        out.push_str(&format!(
            "| {} | **difference** | | {:+.4} [{:+.4}, {:+.4}] | {:+.4} [{:+.4}, {:+.4}] | |\n",
            f.fraction, d.mean, d.ci_low, d.ci_high, a.mean, a.ci_low, a.ci_high
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_are_numpys() {
        // numpy: np.std([0.5, 0.7, 0.6], ddof=1) = 0.1; np.percentile([1,2,3,4], 2.5) = 1.075.
        let m = MeanStd::of(&[0.5, 0.7, 0.6]);
        assert!(
            (m.mean - 0.6).abs() < 1e-15 && (m.std.unwrap() - 0.1).abs() < 1e-15,
            "{m:?}"
        );
        assert_eq!(MeanStd::of(&[0.5]).std, None);
        assert!((percentile(&[1.0, 2.0, 3.0, 4.0], 0.025) - 1.075).abs() < 1e-12);
        assert!((percentile(&[1.0, 2.0, 3.0, 4.0], 0.975) - 3.925).abs() < 1e-12);
    }

    #[test]
    fn multi_label_predictions_are_read_back_by_name() {
        use crate::classify::data::LabelledSet;
        use crate::model::sequence_classification::Labels;
        let dir = tempfile::tempdir().unwrap();
        let item = Item {
            index: 0,
            fraction: 1.0,
            seed: 1,
            condition: Condition::Original,
        };
        let set = |rows: usize| LabelledSet {
            path: "t.tsv".into(),
            texts: vec!["x".into(); rows],
            targets: Targets::Multi(vec![vec![true, false, true]; rows]),
        };
        let splits = Splits {
            labels: Labels {
                names: vec!["a".into(), "b".into(), "c".into()],
                problem_type: ProblemType::MultiLabel,
            },
            train: set(1),
            dev: set(1),
            test: set(2),
            dev_split_off: false,
        };
        let item_path = item_dir(dir.path(), &item);
        std::fs::create_dir_all(&item_path).unwrap();
        let file = item_path.join(PREDICTIONS_FILE);
        std::fs::write(&file, "{\"labels\": [\"a\", \"c\"]}\n{\"labels\": []}\n").unwrap();
        assert_eq!(
            read_predictions(dir.path(), &item, &splits).unwrap(),
            [
                Prediction::Multi(vec![true, false, true]),
                Prediction::Multi(vec![false; 3])
            ]
        );
        std::fs::write(&file, "{\"labels\": [\"d\"]}\n{\"labels\": []}\n").unwrap();
        let err = read_predictions(dir.path(), &item, &splits).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("\"d\""), "{err}");
        std::fs::write(&file, "{\"labels\": []}\n").unwrap();
        let err = read_predictions(dir.path(), &item, &splits).unwrap_err().to_string();
        assert!(err.contains("1 predictions for 2 test rows"), "{err}");
    }

    #[test]
    fn the_paired_bootstrap_brackets_a_clear_gain_and_a_tie() {
        // Gold 0/1; the augmented run gets 18 of 20 right, the original 10 of 20.
        let gold = Targets::Single((0..20).map(|i| i % 2).collect());
        let original: Vec<Prediction> = (0..20).map(|i| Prediction::Single(usize::from(i < 10))).collect();
        let augmented: Vec<Prediction> = (0..20)
            .map(|i| Prediction::Single(if i < 2 { 1 - i % 2 } else { i % 2 }))
            .collect();
        let [f1, accuracy] = bootstrap(&[(original.clone(), augmented)], &gold, 2, 400, 1);
        let d = difference(&[0.5], &[0.9], accuracy);
        assert!(
            d.ci_low > 0.1 && d.ci_low < 0.4 && d.ci_high > 0.4 && d.ci_high < 0.7,
            "{d:?}"
        );
        assert!(d.resamples_not_better < 0.01);
        assert!(f1.iter().all(|v| v.is_finite()));
        let [same, _] = bootstrap(&[(original.clone(), original)], &gold, 2, 50, 1);
        assert!(same.iter().all(|v| *v == 0.0));
    }
}
