//! Command lines built from the flag structs (`TrainArgs`, `AugmentArgs` and their `to_argv`)
//! rather than typed by hand: a test says which values it chooses, the rest are the defaults.

use crate::data::{shared_data, text};
use crate::oracle::tiny_model;
use kormlm_proto::augment_args::AugmentArgs;
use kormlm_proto::train_args::TrainArgs;
use std::path::Path;

/// Training of the tiny model on `data_path` into `output_dir`, 32 tokens a sequence, every
/// other flag at its default; a test changes what it needs with `TrainArgs { …, ..tiny_training(…) }`
/// and passes `to_argv()` to `coordinator` or `worker train`.
pub fn tiny_training(data_path: &Path, output_dir: &Path) -> TrainArgs {
    TrainArgs {
        model_name_or_path: text(&tiny_model()),
        data_path: text(data_path),
        output_dir: Some(text(output_dir)),
        max_seq_len: 32,
        ..Default::default()
    }
}

/// Training flags for a long-running job on the tiny model (Korean HateSpeech train set, many
/// epochs, a log record every step), so a test can act on a job that is busy.
pub fn busy_training_flags(output_dir: &Path) -> Vec<String> {
    let data = shared_data().join("korean-hate-speech/labeled/train.tsv");
    TrainArgs {
        num_train_epochs: 100,
        logging_steps: 1,
        ..tiny_training(&data, output_dir)
    }
    .to_argv()
}

/// The flags of `worker augment` (and `worker augment-report`) for `options`, run with the
/// model, revision, seed and window of `run` (the training flags an augmentation job takes).
pub fn worker_augment_flags(run: &TrainArgs, options: &AugmentArgs) -> Vec<String> {
    let mut argv = vec!["--model".to_string(), run.model_name_or_path.clone()];
    if let Some(revision) = &run.revision {
        argv.extend(["--revision".to_string(), revision.clone()]);
    }
    argv.extend([
        "--seed".to_string(),
        run.seed.to_string(),
        "--max_seq_len".to_string(),
        run.max_seq_len.to_string(),
    ]);
    argv.extend(options.to_argv());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The `--name value` pairs of a command line.
    fn pairs(argv: &[String]) -> BTreeMap<String, String> {
        argv.chunks(2)
            .map(|pair| (pair[0].trim_start_matches("--").to_string(), pair[1].clone()))
            .collect()
    }

    #[test]
    fn busy_flags_are_the_long_tiny_run() {
        let flags = busy_training_flags(Path::new("/tmp/out"));
        let data = shared_data().join("korean-hate-speech/labeled/train.tsv");
        let map = pairs(&flags);
        assert_eq!(map["model_name_or_path"], text(&tiny_model()));
        assert_eq!(map["data_path"], text(&data));
        assert_eq!(map["output_dir"], "/tmp/out");
        assert_eq!(map["max_seq_len"], "32");
        assert_eq!(map["logging_steps"], "1");
        // A hundred epochs, the default the busy job relies on, and nothing else set.
        let parsed = TrainArgs::from_map(&map).unwrap();
        assert_eq!(parsed.num_train_epochs, 100);
        assert_eq!(map.len(), 5, "{flags:?}");
    }

    #[test]
    fn worker_augment_flags_carry_the_run_and_the_changed_options() {
        let run = TrainArgs {
            model_name_or_path: "/m".into(),
            revision: Some("v1".into()),
            seed: 5,
            ..Default::default()
        };
        let options = AugmentArgs {
            threshold: 0.3,
            ..Default::default()
        };
        assert_eq!(
            worker_augment_flags(&run, &options),
            [
                "--model",
                "/m",
                "--revision",
                "v1",
                "--seed",
                "5",
                "--max_seq_len",
                "100",
                "--threshold",
                "0.3"
            ]
        );
    }
}
