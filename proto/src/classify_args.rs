//! A classifier's data flags (`worker classify train`, `coordinator --task classify`, and the
//! labelled files of `augment-eval`): the labelled training and dev files, where their text and
//! labels are, and the label order. The classifier's training flags are the training flags
//! (`TrainArgs`). In a job spec these travel as `classify.<name>` keys.

use clap::{Args, Parser};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const KEY_PREFIX: &str = "classify.";

#[derive(Debug, Clone, PartialEq, Default, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Classification data")]
pub struct ClassifyArgs {
    /// Labelled training file (CSV/TSV with a header, NSMC ratings*.txt, UnSmile TSV).
    #[arg(long)]
    pub train_file: Option<PathBuf>,
    /// Labelled dev file for evaluation and early stopping, in the same columns (augment-eval:
    /// default --dev_split of the training file).
    #[arg(long)]
    pub dev_file: Option<PathBuf>,
    /// Columns of a known corpus: nsmc (`document`, `label`), khs-hate / khs-bias (`comments`,
    /// `hate` / `bias`), unsmile (`문장`, every other column a label: multi-label).
    #[arg(long)]
    pub dataset: Option<String>,
    /// The text column of a CSV/TSV file (default: the dataset's, else `comments`).
    #[arg(long)]
    pub text_column: Option<String>,
    /// The label column, or comma-separated 0/1 columns of a multi-label task.
    #[arg(long)]
    pub label_column: Option<String>,
    /// Each label column is a 0/1 flag (sigmoid + BCE), even when only one is given.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub multi_label: bool,
    /// Comma-separated single-label names in id order (default: the training file's values, sorted).
    #[arg(long)]
    pub labels: Option<String>,
}

#[derive(Debug, Parser)]
#[command(name = "classify-args", no_binary_name = true)]
struct FromMap {
    #[command(flatten)]
    args: ClassifyArgs,
}

fn comma_list(text: Option<&str>) -> Vec<String> {
    text.iter()
        .flat_map(|c| c.split(','))
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

impl ClassifyArgs {
    /// `classify.<name> -> value` entries.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        crate::flag_map::to_map(self, KEY_PREFIX)
    }

    /// Parses the `classify.` entries of a job's arguments.
    pub fn from_map<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Self, String> {
        let argv = crate::flag_map::to_argv(map, |name| name.strip_prefix(KEY_PREFIX));
        FromMap::try_parse_from(argv)
            .map(|p| p.args)
            .map_err(|e| e.render().to_string().trim().to_string())
    }

    /// The label columns of --label_column.
    pub fn label_columns(&self) -> Vec<String> {
        comma_list(self.label_column.as_deref())
    }

    /// The label names of --labels, when given.
    pub fn label_names(&self) -> Option<Vec<String>> {
        self.labels.as_deref().map(|l| comma_list(Some(l)))
    }

    /// Checks what classifier training needs: both files.
    pub fn check(&self) -> Result<(), String> {
        for (flag, missing) in [
            ("--train_file", self.train_file.is_none()),
            ("--dev_file", self.dev_file.is_none()),
        ] {
            if missing {
                return Err(format!("{flag} is required by classifier training"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip_and_checks() {
        let args = ClassifyArgs {
            train_file: Some("train.tsv".into()),
            dev_file: Some("dev.tsv".into()),
            dataset: Some("khs-hate".into()),
            label_column: Some("a, b".into()),
            multi_label: true,
            labels: Some("none,hate".into()),
            ..Default::default()
        };
        assert_eq!(ClassifyArgs::from_map(&args.to_map()).unwrap(), args);
        assert!(args.to_map().keys().all(|k| k.starts_with(KEY_PREFIX)));
        assert_eq!(args.label_columns(), ["a", "b"]);
        assert_eq!(args.label_names().unwrap(), ["none", "hate"]);
        assert_eq!(args.check(), Ok(()));
        let missing = ClassifyArgs { dev_file: None, ..args };
        assert!(missing.check().unwrap_err().contains("--dev_file"));
        assert_eq!(
            ClassifyArgs::from_map(&BTreeMap::new()).unwrap(),
            ClassifyArgs::default()
        );
    }
}
