//! The training flags of the original project (`ds_main.py`), shared by `coordinator` (which
//! forwards them to the workers inside the job spec) and `worker train` (one process).
//!
//! Flag names keep the original's snake_case spelling so existing command lines keep working.

use clap::{Args, Parser};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(
    rename_all = "snake_case",
    next_help_heading = "Training flags (names of the original ds_main.py)"
)]
pub struct TrainArgs {
    /// Local model directory or Hugging Face hub id.
    #[arg(long, default_value = "beomi/KcELECTRA-base")]
    pub model_name_or_path: String,
    /// Hub revision (branch, tag or commit) when --model_name_or_path is a hub id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Corpus location: a directory holding mlm_train.csv / mlm_dev.csv, or a corpus spec.
    #[arg(long, default_value = "./data/")]
    pub data_path: String,
    /// Output root; each run writes to a sub-directory of it.
    #[arg(long, default_value = "./model/")]
    pub model_dir: String,
    /// The run's output directory (default: MODEL_DIR/YYMMDD_HHMMSS, or MODEL_DIR/JOB_ID for jobs).
    #[arg(long)]
    pub output_dir: Option<String>,
    /// `linear`: warm-up over --warmup_proportion of the steps, then linear decay to 0
    /// (the original's non-DeepSpeed path). Without it the config's scheduler is used.
    #[arg(long)]
    pub scheduler_name: Option<String>,
    /// Early-stopping patience, in evaluations without a better dev loss.
    #[arg(long, default_value_t = 5)]
    pub max_stop_number: u32,
    #[arg(long, default_value_t = 128)]
    pub eval_batch_size: u32,
    /// Maximum tokens per sequence, [CLS] and [SEP] included.
    #[arg(long, default_value_t = 100)]
    pub max_seq_len: u32,
    #[arg(long, default_value_t = 100)]
    pub num_train_epochs: u32,
    #[arg(long, default_value_t = 50)]
    pub logging_steps: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.1)]
    pub warmup_proportion: f64,
    /// Used only when the DeepSpeed config has no `optimizer` section.
    #[arg(long, default_value_t = 2e-4)]
    pub learning_rate: f64,
    /// Used only when the DeepSpeed config has no `optimizer` section.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Used only when the DeepSpeed config has no `optimizer` section.
    #[arg(long, default_value_t = 1e-6)]
    pub eps: f64,
    /// Exclude biases and LayerNorm weights from weight decay (the original decays everything).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub decay_exclude_bias_layernorm: bool,
    /// Also checkpoint every N optimizer steps (0: only at the end of each epoch and on a stop).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_steps: u64,
    /// Complete checkpoints kept besides the best one.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Start afresh in an output directory that holds another run's checkpoints or log (they are
    /// removed), as the Hugging Face example scripts' flag; without it such a directory is refused.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overwrite_output_dir: bool,
    /// Stop after this many optimizer steps (-1: no limit).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    /// Batch samples of similar length (the Hugging Face Trainer's group_by_length): each epoch's
    /// shuffled order is cut into megabatches of up to 50 optimizer batches, each sorted by length.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub group_by_length: bool,
    /// TF32 for fp32 matmuls and convolutions on CUDA GPUs of compute capability 8.0+ (the Hugging
    /// Face Trainer's tf32): true enables it (refused elsewhere), false keeps full fp32, unset
    /// keeps libtorch's default.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub tf32: Option<bool>,
}

/// Parses flags out of a `name -> value` map, as carried by `JobSpec.args`.
#[derive(Debug, Parser)]
#[command(name = "job-args", no_binary_name = true)]
struct FromMap {
    #[command(flatten)]
    args: TrainArgs,
}

impl Default for TrainArgs {
    fn default() -> Self {
        FromMap::try_parse_from(Vec::<String>::new())
            .expect("the defaults of every training flag parse")
            .args
    }
}

impl TrainArgs {
    /// Refuses `--data_path` (the masked LM's corpus) for a task that trains on labelled files;
    /// `instead` says which.
    pub fn refuse_corpus(&self, instead: &str) -> Result<(), String> {
        if self.data_path != Self::default().data_path {
            return Err(format!("--data_path is a masked-LM training flag; {instead}"));
        }
        Ok(())
    }

    /// The run's output directory: `--output_dir`, else `MODEL_DIR/RUN_NAME` (the job id for a
    /// job, `YYMMDD_HHMMSS` for `worker train`).
    pub fn output_dir_or(&self, run_name: &str) -> std::path::PathBuf {
        match &self.output_dir {
            Some(dir) => std::path::PathBuf::from(dir),
            None => std::path::Path::new(&self.model_dir).join(run_name),
        }
    }

    /// The flags as `name -> value` text (absent options are left out).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        crate::flag_map::to_map(self, "")
    }

    /// The command line of these flags: `--name value` for each one that differs from its
    /// default, in declaration order (`worker train` and `coordinator` parse it back to `self`).
    pub fn to_argv(&self) -> Vec<String> {
        crate::flag_map::changed_argv(self, &Self::default())
    }

    /// Parses a `name -> value` map with the same rules as the command line; errors name the
    /// flag and what it accepts. Augmentation entries (`augment.…`) and the downstream
    /// experiment's (`eval.…`) are not training flags.
    pub fn from_map<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Self, String> {
        let argv = crate::flag_map::to_argv(map, |name| {
            let other = [
                crate::augment_args::KEY_PREFIX,
                crate::augment_eval_args::KEY_PREFIX,
                crate::classify_args::KEY_PREFIX,
            ];
            (!other.iter().any(|prefix| name.starts_with(prefix))).then_some(name)
        });
        FromMap::try_parse_from(argv)
            .map(|parsed| parsed.args)
            .map_err(|e| e.render().to_string().trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_original_ones() {
        let args = TrainArgs::default();
        assert_eq!(args.model_name_or_path, "beomi/KcELECTRA-base");
        assert_eq!(
            (args.max_stop_number, args.max_seq_len, args.logging_steps),
            (5, 100, 50)
        );
        assert_eq!(args.max_steps, -1);
    }

    #[test]
    fn map_round_trip() {
        let args = TrainArgs {
            decay_exclude_bias_layernorm: true,
            revision: Some("686333e".into()),
            max_steps: 7,
            learning_rate: 3.5e-5,
            ..Default::default()
        };
        let map = args.to_map();
        assert_eq!(map["max_steps"], "7");
        assert!(!TrainArgs::default().to_map().contains_key("revision"));
        assert_eq!(TrainArgs::from_map(&map).unwrap(), args);
    }

    #[test]
    fn argv_names_the_changed_flags_in_order_and_parses_back() {
        let args = TrainArgs {
            model_name_or_path: "/models/tiny".into(),
            output_dir: Some("out dir".into()),
            max_seq_len: 32,
            learning_rate: 3.5e-5,
            decay_exclude_bias_layernorm: true,
            max_steps: -7,
            num_train_epochs: TrainArgs::default().num_train_epochs,
            ..Default::default()
        };
        assert_eq!(
            args.to_argv(),
            [
                "--model_name_or_path",
                "/models/tiny",
                "--output_dir",
                "out dir",
                "--max_seq_len",
                "32",
                "--learning_rate",
                "0.000035",
                "--decay_exclude_bias_layernorm",
                "true",
                "--max_steps",
                "-7",
            ]
        );
        assert_eq!(FromMap::try_parse_from(args.to_argv()).unwrap().args, args);
        assert!(TrainArgs::default().to_argv().is_empty());
    }

    #[test]
    fn output_dir_rule() {
        let args = TrainArgs {
            model_dir: "runs".into(),
            ..Default::default()
        };
        assert_eq!(args.output_dir_or("job-3"), std::path::Path::new("runs/job-3"));
        let args = TrainArgs {
            output_dir: Some("here".into()),
            ..args
        };
        assert_eq!(args.output_dir_or("job-3"), std::path::Path::new("here"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let mut map = BTreeMap::new();
        map.insert("max_seq_len".to_string(), "long".to_string());
        let err = TrainArgs::from_map(&map).unwrap_err();
        assert!(err.contains("--max_seq_len"), "{err}");
        let mut map = BTreeMap::new();
        map.insert("no_such_flag".to_string(), "1".to_string());
        assert!(TrainArgs::from_map(&map).unwrap_err().contains("--no_such_flag"));
    }
}
