//! The experiment's labelled sets: the training pool, the dev set (its own file, or a seeded
//! share of the training file held out before anything is sampled or augmented) and the test
//! set, all in the training file's label space; and the seeded training subset of a fraction.

use crate::classify::data::{self, Columns, LabelledSet};
use crate::classify::ClassifyError;
use crate::model::sequence_classification::Labels;
use crate::train::plan::epoch_order;
use kormlm_proto::augment_eval_args::AugmentEvalArgs;

/// Streams of the seeded permutations (`epoch_order`'s epoch argument), apart from any
/// training epoch's.
const DEV_SPLIT_STREAM: u64 = u64::MAX - 10;
const SUBSET_STREAM: u64 = u64::MAX - 11;

/// The three sets.
#[derive(Debug, Clone)]
pub struct Splits {
    pub labels: Labels,
    /// What the training subsets are drawn from (the dev rows removed when they were split off).
    pub train: LabelledSet,
    pub dev: LabelledSet,
    pub test: LabelledSet,
    /// The dev set is `--dev_split` of the training file.
    pub dev_split_off: bool,
}

/// Reads the sets (`AugmentEvalArgs::check` has made sure the files are named).
pub fn read(args: &AugmentEvalArgs) -> Result<Splits, ClassifyError> {
    let columns = Columns::of_args(&args.data)?;
    let missing = |flag: &str| ClassifyError::Usage(format!("{flag} is required by augment-eval"));
    let train_file = args.data.train_file.as_ref().ok_or_else(|| missing("--train_file"))?;
    let test_file = args.test_file.as_ref().ok_or_else(|| missing("--test_file"))?;
    let labels = data::label_space(train_file, &columns, args.data.label_names().as_deref())?;
    let whole = data::read_labelled(train_file, &columns, &labels)?;
    let test = data::read_labelled(test_file, &columns, &labels)?;
    let (train, dev, dev_split_off) = match &args.data.dev_file {
        Some(dev_file) => (whole, data::read_labelled(dev_file, &columns, &labels)?, false),
        None => {
            let order = epoch_order(whole.len(), args.split_seed, DEV_SPLIT_STREAM);
            let held = ((whole.len() as f64 * args.dev_split).round() as usize).clamp(1, whole.len().saturating_sub(1));
            let mut dev_rows: Vec<usize> = order[..held].iter().map(|&r| r as usize).collect();
            let mut train_rows: Vec<usize> = order[held..].iter().map(|&r| r as usize).collect();
            dev_rows.sort_unstable();
            train_rows.sort_unstable();
            (whole.select(&train_rows), whole.select(&dev_rows), true)
        }
    };
    for (set, what) in [(&train, "training"), (&dev, "dev"), (&test, "test")] {
        if set.is_empty() {
            return Err(ClassifyError::Data {
                path: set.path.display().to_string(),
                message: format!("no labelled rows for the {what} set"),
            });
        }
    }
    Ok(Splits {
        labels,
        train,
        dev,
        test,
        dev_split_off,
    })
}

/// The training rows of `fraction` for `seed`, ascending: the first rows of the seed's
/// permutation, so a seed's smaller fractions are subsets of its larger ones.
pub fn subset(rows: usize, fraction: f64, seed: u64) -> Vec<usize> {
    let take = super::plan::fraction_rows(rows, fraction);
    if take >= rows {
        return (0..rows).collect();
    }
    let mut chosen: Vec<usize> = epoch_order(rows, seed, SUBSET_STREAM)[..take]
        .iter()
        .map(|&r| r as usize)
        .collect();
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use kormlm_proto::classify_args::ClassifyArgs;

    #[test]
    fn subsets_are_seeded_nested_and_whole_at_one() {
        assert_eq!(subset(10, 1.0, 3), (0..10).collect::<Vec<_>>());
        let small = subset(100, 0.1, 3);
        let large = subset(100, 0.25, 3);
        assert_eq!((small.len(), large.len()), (10, 25));
        assert!(small.iter().all(|r| large.contains(r)));
        assert_eq!(subset(100, 0.1, 3), small);
        assert_ne!(subset(100, 0.1, 4), small);
    }

    #[test]
    fn a_held_out_dev_set_never_meets_the_training_rows() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("train.tsv");
        let test = dir.path().join("test.tsv");
        let mut text = String::from("comments\thate\n");
        for i in 0..40 {
            text.push_str(&format!("문장 {i}\t{}\n", if i % 2 == 0 { "none" } else { "hate" }));
        }
        std::fs::write(&train, &text).unwrap();
        std::fs::write(&test, "comments\thate\n시험\tnone\n").unwrap();
        let args = AugmentEvalArgs {
            data: ClassifyArgs {
                train_file: Some(train),
                dataset: Some("khs-hate".into()),
                ..Default::default()
            },
            test_file: Some(test),
            dev_split: 0.25,
            ..Default::default()
        };
        let splits = read(&args).unwrap();
        assert!(splits.dev_split_off);
        assert_eq!((splits.train.len(), splits.dev.len(), splits.test.len()), (30, 10, 1));
        assert!(splits.dev.texts.iter().all(|t| !splits.train.texts.contains(t)));
        assert_eq!(splits.labels.names, ["hate", "none"]);
        let again = read(&args).unwrap();
        assert_eq!(again.dev.texts, splits.dev.texts);
        let mut bad = args;
        bad.data.dataset = Some("imdb".into());
        assert!(read(&bad).unwrap_err().to_string().contains("--dataset imdb"));
    }
}
