//! The `worker` command line: every flag, default and help text of the daemon and the standalone
//! commands. Only definitions live here; `main.rs` parses and dispatches, the library runs.

use crate::classify::data::{Columns, Dataset};
use clap::{Args, Parser, Subcommand};
use kormlm_proto::augment_args::{AugmentArgs, ComputeDtype};
use kormlm_proto::tls::ClientTlsArgs;
use kormlm_proto::train_args::TrainArgs;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "kormlm worker: one process per GPU (or CPU slot); standalone model commands",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The daemon's flags (`worker --rank K --coordinator URL`).
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Global rank to claim in the coordinator's active job.
    #[arg(long)]
    pub rank: Option<u32>,
    /// Rank on this host (default: chosen by the coordinator).
    #[arg(long = "local_rank", visible_alias = "local-rank")]
    pub local_rank: Option<u32>,
    /// Coordinator URL, e.g. http://127.0.0.1:50051 (https://… when it serves TLS).
    #[arg(long, env = "KORMLM_COORDINATOR")]
    pub coordinator: Option<String>,
    /// A file holding the coordinator's token (its STATE_DIR/token), when KORMLM_TOKEN is not set.
    #[arg(long = "token-file", env = "KORMLM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Deprecated (visible in `ps`): the coordinator's token. Use KORMLM_TOKEN or --token-file.
    #[arg(long)]
    pub token: Option<String>,
    /// Read the coordinator's token from the first line of stdin (how `coordinator --launcher
    /// ssh` hands it over); it takes precedence over KORMLM_TOKEN and --token-file.
    #[arg(long = "token-stdin")]
    pub token_stdin: bool,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// Exit when the coordinator stays unreachable this many seconds.
    #[arg(long = "reconnect-timeout-s", default_value_t = 60)]
    pub reconnect_timeout_s: u64,
    /// IP address the CPU ring listens on (default: this host's address towards the
    /// coordinator; never every interface).
    #[arg(long = "ring-bind", env = "KORMLM_RING_BIND", value_name = "ADDR")]
    pub ring_bind: Option<std::net::IpAddr>,
}

#[derive(Debug, Subcommand)]
#[command(rename_all = "kebab-case")]
pub enum Command {
    /// Tokenize stdin, one line per line: prints {"input_ids": [...]} per line.
    Tokenize(TokenizeCommand),
    /// Fill [MASK] tokens of each stdin line; prints the transformers fill-mask pipeline's JSON
    /// per line ({"error": ...} for a line without a mask).
    FillMask(FillMaskCommand),
    /// Augment sentences with a masked-LM: writes the input rows plus N variants each.
    Augment(Box<AugmentCommand>),
    /// Report augmentation quality on a dev set for a grid of --mlm_probs × --thresholds.
    AugmentReport(Box<AugmentReportCommand>),
    /// Train a cased BERT WordPiece vocabulary on text files (one sentence per line).
    TokenizerTrain(TokenizerTrainCommand),
    /// Create a randomly initialised ELECTRA masked-LM (Hugging Face layout) for a tokenizer,
    /// to train from scratch.
    InitModel(InitModelCommand),
    /// Train in this one process (world size 1), like the original ds_main.py.
    Train(Box<TrainCommand>),
    /// Show libtorch, CUDA and NCCL as this worker sees them.
    Info(InfoCommand),
    /// Sequence classification (ElectraForSequenceClassification): train, eval, predict.
    Classify(Box<ClassifyCommand>),
    /// Does augmentation help a classifier? Fine-tunes classifiers on the training set with and
    /// without its masked-LM copies (--seeds seeds, --train_fractions), scores them on the test
    /// set and reports the difference with a paired bootstrap interval, in this one process.
    AugmentEval(Box<AugmentEvalCommand>),
}

/// `worker augment-eval`: the experiment's, the classifier's training and the augmentation's flags.
#[derive(Debug, Args)]
pub struct AugmentEvalCommand {
    /// DeepSpeed config of the classifiers' training (batch sizes, optimizer, scheduler, precision).
    #[arg(long)]
    pub config: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub eval: kormlm_proto::augment_eval_args::AugmentEvalArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub augment: AugmentArgs,
}

/// `worker tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeCommand {
    /// Model directory (only the tokenizer files are read).
    #[arg(long)]
    pub model: String,
    /// Truncate to this many tokens, [CLS] and [SEP] included (default: the tokenizer's
    /// model_max_length).
    #[arg(long = "max_seq_len")]
    pub max_seq_len: Option<usize>,
    /// Also print the ids decoded back to text (special tokens skipped) as "decoded".
    #[arg(long)]
    pub decode: bool,
}

/// `worker fill-mask`.
#[derive(Debug, Args)]
pub struct FillMaskCommand {
    /// Model directory or Hugging Face hub id.
    #[arg(long)]
    pub model: String,
    /// Hub revision for a hub id.
    #[arg(long)]
    pub revision: Option<String>,
    #[arg(long = "top_k", default_value_t = 5)]
    pub top_k: usize,
    /// Comma-separated candidate tokens to restrict predictions to.
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long = "batch_size", default_value_t = 32)]
    pub batch_size: usize,
    /// Compute precision: fp32, or bf16 (autocast; CUDA or a CPU with AVX-512 BF16/AMX).
    #[arg(long, value_enum, default_value_t = ComputeDtype::Fp32)]
    pub dtype: ComputeDtype,
}

/// `worker augment`; its seed and window default to the training flags' (`--seed`, `--max_seq_len`),
/// as for an augmentation job (`coordinator --task augment`), so both give the same output.
#[derive(Debug, Clone, Args)]
pub struct AugmentCommand {
    /// Model directory or Hugging Face hub id.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub revision: Option<String>,
    #[arg(long, default_value_t = TrainArgs::default().seed)]
    pub seed: u64,
    /// Model window in tokens, [CLS] and [SEP] included; text beyond it is kept unchanged.
    #[arg(long = "max_seq_len", default_value_t = TrainArgs::default().max_seq_len as usize)]
    pub max_seq_len: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub augment: AugmentArgs,
}

/// `worker augment-report`: the augmentation flags plus the grid.
#[derive(Debug, Args)]
pub struct AugmentReportCommand {
    #[command(flatten)]
    pub run: AugmentCommand,
    /// Masking probabilities to try.
    #[arg(long = "mlm_probs", value_delimiter = ',', default_value = "0.1,0.15,0.2")]
    pub mlm_probs: Vec<f64>,
    /// Thresholds to try.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9,0.95")]
    pub thresholds: Vec<f64>,
    /// Use at most this many sentences of the input.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
}

/// `worker tokenizer-train`.
#[derive(Debug, Args)]
pub struct TokenizerTrainCommand {
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    #[arg(long = "vocab_size", default_value_t = 8000)]
    pub vocab_size: usize,
    #[arg(long = "min_frequency", default_value_t = 2)]
    pub min_frequency: u64,
    /// Directory for vocab.txt, tokenizer.json and the tokenizer configs.
    #[arg(long)]
    pub output: PathBuf,
}

/// `worker init-model`.
#[derive(Debug, Args)]
pub struct InitModelCommand {
    /// Directory with the tokenizer (from tokenizer-train).
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long = "embedding_size", default_value_t = 64)]
    pub embedding_size: i64,
    #[arg(long = "hidden_size", default_value_t = 128)]
    pub hidden_size: i64,
    #[arg(long = "num_hidden_layers", default_value_t = 2)]
    pub num_hidden_layers: i64,
    #[arg(long = "num_attention_heads", default_value_t = 4)]
    pub num_attention_heads: i64,
    #[arg(long = "intermediate_size", default_value_t = 256)]
    pub intermediate_size: i64,
    #[arg(long = "max_position_embeddings", default_value_t = 128)]
    pub max_position_embeddings: i64,
    /// Dropout of hidden states and attention probabilities.
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `worker train`.
#[derive(Debug, Args)]
pub struct TrainCommand {
    /// DeepSpeed config (batch sizes, optimizer, scheduler, precision).
    #[arg(long)]
    pub config: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where tokenised corpora are cached (default: ~/.cache/kormlm/tokens).
    #[arg(long = "cache_dir")]
    pub cache_dir: Option<PathBuf>,
    /// Continue from this checkpoint directory (OUTPUT_DIR/checkpoints/step-N).
    #[arg(long = "resume_from")]
    pub resume_from: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainArgs,
}

/// `worker classify`.
#[derive(Debug, Args)]
pub struct ClassifyCommand {
    #[command(subcommand)]
    pub action: ClassifyAction,
}

#[derive(Debug, Subcommand)]
pub enum ClassifyAction {
    /// Fine-tune a classifier from an MLM, discriminator or classifier checkpoint (world size 1;
    /// `coordinator --task classify` for several workers), with early stopping on the dev
    /// macro-F1, checkpoints and --resume_from like `worker train`.
    Train(Box<ClassifyTrainCommand>),
    /// Accuracy, macro-F1 and per-label F1 of a classifier on a labelled file.
    Eval(ClassifyEvalCommand),
    /// Label every text of a file: one JSON line per input with the label(s) and probabilities.
    Predict(ClassifyPredictCommand),
}

/// Where a labelled file's text and labels are.
#[derive(Debug, Clone, Args)]
pub struct LabelColumns {
    /// Columns of a known corpus: nsmc (`document`, `label`), khs-hate / khs-bias (`comments`,
    /// `hate` / `bias`), unsmile (`문장`, every other column a label: multi-label).
    #[arg(long, value_enum)]
    pub dataset: Option<Dataset>,
    /// The text column of a CSV/TSV file (default: the dataset's, else `comments`).
    #[arg(long = "text_column")]
    pub text_column: Option<String>,
    /// The label column, or comma-separated 0/1 columns of a multi-label task.
    #[arg(long = "label_column", value_delimiter = ',')]
    pub label_column: Vec<String>,
    /// Each label column is a 0/1 flag (sigmoid + BCE), even when only one is given.
    #[arg(long = "multi_label")]
    pub multi_label: bool,
}

impl LabelColumns {
    pub fn columns(&self) -> Columns {
        Columns::resolve(
            self.dataset,
            self.text_column.clone(),
            self.label_column.clone(),
            self.multi_label,
        )
    }
}

/// `worker classify train`.
#[derive(Debug, Args)]
pub struct ClassifyTrainCommand {
    /// DeepSpeed config (batch sizes, optimizer, scheduler, precision).
    #[arg(long)]
    pub config: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Continue from this checkpoint directory (OUTPUT_DIR/checkpoints/step-N).
    #[arg(long = "resume_from")]
    pub resume_from: Option<PathBuf>,
    #[command(flatten)]
    pub data: kormlm_proto::classify_args::ClassifyArgs,
    #[command(flatten)]
    pub train: TrainArgs,
}

/// `worker classify eval`.
#[derive(Debug, Args)]
pub struct ClassifyEvalCommand {
    /// Classifier directory (from `worker classify train`, or any Hugging Face ELECTRA classifier).
    #[arg(long)]
    pub model: String,
    /// Labelled file to evaluate on.
    #[arg(long)]
    pub input: PathBuf,
    #[command(flatten)]
    pub columns: LabelColumns,
    #[arg(long = "batch_size", default_value_t = 32)]
    pub batch_size: usize,
    /// Truncate texts to this many tokens, [CLS] and [SEP] included.
    #[arg(long = "max_seq_len", default_value_t = TrainArgs::default().max_seq_len as usize)]
    pub max_seq_len: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the metrics as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `worker classify predict`.
#[derive(Debug, Args)]
pub struct ClassifyPredictCommand {
    #[arg(long)]
    pub model: String,
    /// File of texts (CSV/TSV with a header, NSMC ratings*.txt, UnSmile TSV).
    #[arg(long)]
    pub input: PathBuf,
    /// Where the predictions go: one JSON line per input row.
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub columns: LabelColumns,
    #[arg(long = "batch_size", default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long = "max_seq_len", default_value_t = TrainArgs::default().max_seq_len as usize)]
    pub max_seq_len: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print a JSON summary (count, output, labels).
    #[arg(long)]
    pub json: bool,
}

/// `worker info`.
#[derive(Debug, Args)]
pub struct InfoCommand {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Also measure this machine: matmul peak in fp32 and bf16 (GFLOP/s), and the AdamW step's
    /// memory bandwidth against a copy of the same bytes (a few seconds).
    #[arg(long)]
    pub bench: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn augmentation_defaults_are_the_training_flags() {
        let cli = Cli::try_parse_from(["worker", "augment", "--model", "m"]).unwrap();
        let Some(Command::Augment(augment)) = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!((augment.seed, augment.max_seq_len), (1, 100));
    }
}
