//! The downstream experiment's options (`worker augment-eval`, `coordinator --task augment-eval`):
//! the labelled files and their columns, the masked LM that augments, the seeds and the training
//! fractions. The classifier's own training flags are the training flags (`TrainArgs`), the
//! augmentation's are `AugmentArgs`. In a job spec these travel as `eval.<name>` keys.

use crate::classify_args::ClassifyArgs;
use clap::{Args, Parser};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const KEY_PREFIX: &str = "eval.";

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Augment-eval")]
pub struct AugmentEvalArgs {
    /// The labelled training (and dev) files, their columns and labels.
    #[command(flatten)]
    #[serde(flatten)]
    pub data: ClassifyArgs,
    /// Labelled test file the conditions are compared on.
    #[arg(long)]
    pub test_file: Option<PathBuf>,
    /// Without --dev_file: the fraction of the training file held out as the dev set (by
    /// --split_seed, the same rows for every seed and condition; never augmented).
    #[arg(long, default_value_t = 0.1)]
    pub dev_split: f64,
    #[arg(long, default_value_t = 42)]
    pub split_seed: u64,
    /// The masked LM that augments the training set (local directory or hub id); the classifier
    /// starts from --model_name_or_path.
    #[arg(long)]
    pub augment_model: Option<String>,
    /// Seeds per condition: --seed, --seed+1, ….
    #[arg(long, default_value_t = 3)]
    pub seeds: u32,
    /// Comma-separated fractions of the training set (the low-resource curve), e.g. 0.1,0.25,1.
    #[arg(long, default_value = "1")]
    pub train_fractions: String,
    /// Resamples of the test set for the paired bootstrap confidence interval.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap_samples: u32,
    /// Keep every run's best and final classifier (default: removed once the run is scored).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub keep_models: bool,
}

#[derive(Debug, Parser)]
#[command(name = "augment-eval-args", no_binary_name = true)]
struct FromMap {
    #[command(flatten)]
    args: AugmentEvalArgs,
}

impl Default for AugmentEvalArgs {
    fn default() -> Self {
        FromMap::try_parse_from(Vec::<String>::new())
            .expect("the defaults of every augment-eval flag parse")
            .args
    }
}

impl AugmentEvalArgs {
    /// The command line of these options: `--name value` for each one that differs from its default.
    pub fn to_argv(&self) -> Vec<String> {
        crate::flag_map::changed_argv(self, &Self::default())
    }

    /// `eval.<name> -> value` entries.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        crate::flag_map::to_map(self, KEY_PREFIX)
    }

    /// Parses the `eval.` entries of a job's arguments.
    pub fn from_map<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Self, String> {
        let argv = crate::flag_map::to_argv(map, |name| name.strip_prefix(KEY_PREFIX));
        FromMap::try_parse_from(argv)
            .map(|p| p.args)
            .map_err(|e| e.render().to_string().trim().to_string())
    }

    /// The training fractions, each in (0, 1], ascending and without repeats.
    pub fn fractions(&self) -> Result<Vec<f64>, String> {
        let mut fractions = Vec::new();
        for part in self.train_fractions.split(',') {
            let value: f64 = part.trim().parse().map_err(|_| {
                format!("--train_fractions: {part:?} is not a number (accepted: comma-separated fractions in (0, 1], e.g. 0.1,0.25,1)")
            })?;
            if !(value > 0.0 && value <= 1.0) {
                return Err(format!("--train_fractions: {value} is outside (0, 1]"));
            }
            fractions.push(value);
        }
        fractions.sort_by(f64::total_cmp);
        fractions.dedup();
        Ok(fractions)
    }

    /// Checks what an experiment needs: its files, its augmentation model, at least one seed, a
    /// dev split in (0, 1) when no dev file is given, and fractions in (0, 1].
    pub fn check(&self) -> Result<(), String> {
        for (flag, missing) in [
            ("--train_file", self.data.train_file.is_none()),
            ("--test_file", self.test_file.is_none()),
            ("--augment_model", self.augment_model.is_none()),
        ] {
            if missing {
                return Err(format!("{flag} is required by augment-eval"));
            }
        }
        if self.seeds == 0 {
            return Err("--seeds must be at least 1".into());
        }
        if self.data.dev_file.is_none() && !(self.dev_split > 0.0 && self.dev_split < 1.0) {
            return Err(format!(
                "--dev_split {} must be in (0, 1) when no --dev_file is given",
                self.dev_split
            ));
        }
        if self.bootstrap_samples == 0 {
            return Err("--bootstrap_samples must be at least 1".into());
        }
        self.fractions().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip_and_checks() {
        let args = AugmentEvalArgs {
            data: ClassifyArgs {
                train_file: Some("train.tsv".into()),
                label_column: Some("a, b".into()),
                multi_label: true,
                ..Default::default()
            },
            test_file: Some("test.tsv".into()),
            augment_model: Some("mlm".into()),
            train_fractions: "1,0.25,0.1,0.25".into(),
            ..Default::default()
        };
        assert_eq!(AugmentEvalArgs::from_map(&args.to_map()).unwrap(), args);
        assert!(args.to_map().keys().all(|k| k.starts_with(KEY_PREFIX)));
        assert_eq!(args.fractions().unwrap(), [0.1, 0.25, 1.0]);
        assert_eq!(args.data.label_columns(), ["a", "b"]);
        assert_eq!(args.check(), Ok(()));
        let err = AugmentEvalArgs::default().check().unwrap_err();
        assert!(err.contains("--train_file"), "{err}");
        let bad = AugmentEvalArgs {
            train_fractions: "0.5,1.5".into(),
            ..args.clone()
        };
        assert!(bad.check().unwrap_err().contains("1.5 is outside (0, 1]"));
        let bad = AugmentEvalArgs { dev_split: 1.0, ..args };
        assert!(bad.check().unwrap_err().contains("--dev_split"));
    }
}
