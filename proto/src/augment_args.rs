//! Augmentation options, shared by `worker augment` and augmentation jobs
//! (`coordinator --task augment`). In a job spec they travel as `augment.<name>` keys.

use clap::{Args, Parser};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const KEY_PREFIX: &str = "augment.";

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Augmentation")]
pub struct AugmentArgs {
    /// Input file: text, CSV/TSV, or one of the shared corpora's files.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Output file (written to a temporary name, then renamed).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Input format: text, csv, tsv, nsmc, khs, khs-unlabeled, unsmile (default: from the file name).
    #[arg(long)]
    pub format: Option<String>,
    /// Text column of CSV/TSV input (default: comments; 문장 for UnSmile; document for NSMC).
    #[arg(long)]
    pub column: Option<String>,
    /// csv or jsonl (default: from the output file's extension).
    #[arg(long)]
    pub output_format: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub num_augmentations: usize,
    /// Probability of masking each token.
    #[arg(long, default_value_t = 0.15)]
    pub mlm_prob: f64,
    /// Candidates considered per mask.
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Take the best candidate when its probability reaches this.
    #[arg(long, default_value_t = 0.95)]
    pub threshold: f64,
    /// Retry unchanged sentences with a lower threshold (0.05 less each time, 3 times).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub require_change: bool,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Compute precision of the model: fp32, or bf16 (autocast; CUDA or a CPU with AVX-512 BF16/AMX).
    #[arg(long, value_enum, default_value_t = ComputeDtype::Fp32)]
    pub dtype: ComputeDtype,
}

/// The precision a model computes in for inference (`--dtype`); weights stay fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    Fp32,
    Bf16,
}

impl ComputeDtype {
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::Fp32 => "fp32",
            ComputeDtype::Bf16 => "bf16",
        }
    }
}

#[derive(Debug, Parser)]
#[command(name = "augment-args", no_binary_name = true)]
struct FromMap {
    #[command(flatten)]
    args: AugmentArgs,
}

impl Default for AugmentArgs {
    fn default() -> Self {
        FromMap::try_parse_from(Vec::<String>::new())
            .expect("the defaults of every augmentation flag parse")
            .args
    }
}

impl AugmentArgs {
    /// The command line of these options: `--name value` for each one that differs from its
    /// default, in declaration order (`worker augment` and `coordinator --task augment` parse it
    /// back to `self`).
    pub fn to_argv(&self) -> Vec<String> {
        crate::flag_map::changed_argv(self, &Self::default())
    }

    /// `augment.<name> -> value` entries.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        crate::flag_map::to_map(self, KEY_PREFIX)
    }

    /// Parses the `augment.` entries of a job's arguments.
    pub fn from_map<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Self, String> {
        let argv = crate::flag_map::to_argv(map, |name| name.strip_prefix(KEY_PREFIX));
        FromMap::try_parse_from(argv)
            .map(|p| p.args)
            .map_err(|e| e.render().to_string().trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip() {
        let mut map = AugmentArgs::from_map(&BTreeMap::new()).unwrap().to_map();
        map.insert("augment.input".into(), "in.csv".into());
        map.insert("augment.require_change".into(), "true".into());
        map.insert("seed".into(), "3".into());
        let args = AugmentArgs::from_map(&map).unwrap();
        assert_eq!(args.input, Some(PathBuf::from("in.csv")));
        assert!(args.require_change);
        assert_eq!(AugmentArgs::from_map(&args.to_map()).unwrap(), args);
    }

    #[test]
    fn argv_names_the_changed_options_and_parses_back() {
        let args = AugmentArgs {
            input: Some(PathBuf::from("in.tsv")),
            output: Some(PathBuf::from("out.csv")),
            threshold: 0.3,
            require_change: true,
            k: AugmentArgs::default().k,
            ..Default::default()
        };
        assert_eq!(
            args.to_argv(),
            [
                "--input",
                "in.tsv",
                "--output",
                "out.csv",
                "--threshold",
                "0.3",
                "--require_change",
                "true"
            ]
        );
        assert_eq!(FromMap::try_parse_from(args.to_argv()).unwrap().args, args);
        assert_eq!(AugmentArgs::default(), AugmentArgs::from_map(&BTreeMap::new()).unwrap());
    }
}
