use clap::{Args, Parser, Subcommand};
use kormlm_proto::augment_args::AugmentArgs;
use kormlm_proto::ds_config::DsConfig;
use kormlm_proto::train_args::TrainArgs;
use kormlm_worker::comm::SingleRank;
use kormlm_worker::daemon::{self, DaemonOptions};
use kormlm_worker::device::{parse_device, DeviceInfo};
use kormlm_worker::fill_mask::FillMaskOptions;
use kormlm_worker::lines::read_chunk;
use kormlm_worker::model::LoadedModel;
use kormlm_worker::tokenizer::MlmTokenizer;
use kormlm_worker::train::{run_dir_name, TrainJob};
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "kormlm worker: one process per GPU (or CPU slot); standalone model commands",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Args)]
struct DaemonArgs {
    /// Global rank to claim in the coordinator's active job.
    #[arg(long)]
    rank: Option<u32>,
    /// Rank on this host (default: chosen by the coordinator).
    #[arg(long = "local_rank", visible_alias = "local-rank")]
    local_rank: Option<u32>,
    /// Coordinator URL, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "KORMLM_COORDINATOR")]
    coordinator: Option<String>,
    /// Shared secret, when the coordinator requires one.
    #[arg(long, env = "KORMLM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Exit when the coordinator stays unreachable this many seconds.
    #[arg(long = "reconnect-timeout-s", default_value_t = 60)]
    reconnect_timeout_s: u64,
}

#[derive(Debug, Subcommand)]
#[command(rename_all = "kebab-case")]
enum Command {
    /// Tokenize stdin, one line per line: prints {"input_ids": [...]} per line.
    Tokenize {
        /// Model directory (only the tokenizer files are read).
        #[arg(long)]
        model: String,
        /// Truncate to this many tokens, [CLS] and [SEP] included (default: the tokenizer's
        /// model_max_length).
        #[arg(long = "max_seq_len")]
        max_seq_len: Option<usize>,
        /// Also print the ids decoded back to text (special tokens skipped) as "decoded".
        #[arg(long)]
        decode: bool,
    },
    /// Fill [MASK] tokens of each stdin line; prints the transformers fill-mask pipeline's JSON
    /// per line ({"error": ...} for a line without a mask).
    FillMask {
        /// Model directory or Hugging Face hub id.
        #[arg(long)]
        model: String,
        /// Hub revision for a hub id.
        #[arg(long)]
        revision: Option<String>,
        #[arg(long = "top_k", default_value_t = 5)]
        top_k: usize,
        /// Comma-separated candidate tokens to restrict predictions to.
        #[arg(long, value_delimiter = ',')]
        targets: Option<Vec<String>>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long = "batch_size", default_value_t = 32)]
        batch_size: usize,
    },
    /// Augment sentences with a masked-LM: writes the input rows plus N variants each.
    Augment(Box<AugmentCommand>),
    /// Report augmentation quality on a dev set for a grid of --mlm_probs × --thresholds.
    AugmentReport(Box<AugmentReportCommand>),
    /// Train a cased BERT WordPiece vocabulary on text files (one sentence per line).
    TokenizerTrain {
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        #[arg(long = "vocab_size", default_value_t = 8000)]
        vocab_size: usize,
        #[arg(long = "min_frequency", default_value_t = 2)]
        min_frequency: u64,
        /// Directory for vocab.txt, tokenizer.json and the tokenizer configs.
        #[arg(long)]
        output: PathBuf,
    },
    /// Create a randomly initialised ELECTRA masked-LM (Hugging Face layout) for a tokenizer,
    /// to train from scratch.
    InitModel {
        /// Directory with the tokenizer (from tokenizer-train).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long = "embedding_size", default_value_t = 64)]
        embedding_size: i64,
        #[arg(long = "hidden_size", default_value_t = 128)]
        hidden_size: i64,
        #[arg(long = "num_hidden_layers", default_value_t = 2)]
        num_hidden_layers: i64,
        #[arg(long = "num_attention_heads", default_value_t = 4)]
        num_attention_heads: i64,
        #[arg(long = "intermediate_size", default_value_t = 256)]
        intermediate_size: i64,
        #[arg(long = "max_position_embeddings", default_value_t = 128)]
        max_position_embeddings: i64,
        /// Dropout of hidden states and attention probabilities.
        #[arg(long, default_value_t = 0.1)]
        dropout: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Train in this one process (world size 1), like the original ds_main.py.
    Train(Box<TrainCommand>),
    /// Show libtorch, CUDA and NCCL as this worker sees them.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct AugmentCommand {
    /// Model directory or Hugging Face hub id.
    #[arg(long)]
    model: String,
    #[arg(long)]
    revision: Option<String>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Model window in tokens, [CLS] and [SEP] included; text beyond it is kept unchanged.
    #[arg(long = "max_seq_len", default_value_t = 128)]
    max_seq_len: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    augment: AugmentArgs,
}

#[derive(Debug, Args)]
struct AugmentReportCommand {
    #[command(flatten)]
    run: AugmentCommand,
    /// Masking probabilities to try.
    #[arg(long = "mlm_probs", value_delimiter = ',', default_value = "0.1,0.15,0.2")]
    mlm_probs: Vec<f64>,
    /// Thresholds to try.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9,0.95")]
    thresholds: Vec<f64>,
    /// Use at most this many sentences of the input.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

#[derive(Debug, Args)]
struct TrainCommand {
    /// DeepSpeed config (batch sizes, optimizer, scheduler, precision).
    #[arg(long)]
    config: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Where tokenised corpora are cached (default: ~/.cache/kormlm/tokens).
    #[arg(long = "cache_dir")]
    cache_dir: Option<PathBuf>,
    /// Continue from this checkpoint directory (OUTPUT_DIR/checkpoints/step-N).
    #[arg(long = "resume_from")]
    resume_from: Option<PathBuf>,
    #[command(flatten)]
    train: TrainArgs,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("KORMLM_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Info { json }) => info(json),
        Some(Command::Train(command)) => train(*command),
        Some(Command::Augment(command)) => augment(*command),
        Some(Command::TokenizerTrain {
            input,
            vocab_size,
            min_frequency,
            output,
        }) => tokenizer_train(&input, vocab_size, min_frequency, &output),
        Some(Command::InitModel {
            tokenizer,
            output,
            embedding_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size,
            max_position_embeddings,
            dropout,
            seed,
        }) => {
            let config = serde_json::json!({
                "embedding_size": embedding_size,
                "hidden_size": hidden_size,
                "num_hidden_layers": num_hidden_layers,
                "num_attention_heads": num_attention_heads,
                "intermediate_size": intermediate_size,
                "max_position_embeddings": max_position_embeddings,
                "hidden_dropout_prob": dropout,
                "attention_probs_dropout_prob": dropout,
            });
            init_model(&tokenizer, &output, config, seed)
        }
        Some(Command::AugmentReport(command)) => augment_report(*command),
        Some(Command::Tokenize {
            model,
            max_seq_len,
            decode,
        }) => tokenize(&model, max_seq_len, decode),
        Some(Command::FillMask {
            model,
            revision,
            top_k,
            targets,
            device,
            batch_size,
        }) => fill_mask(
            &model,
            revision.as_deref(),
            &device,
            FillMaskOptions {
                top_k,
                targets,
                batch_size,
            },
        ),
        None => run_daemon(cli.daemon),
    };
    if let Err(e) = result {
        eprintln!("worker: error: {e:#}");
        std::process::exit(1);
    }
}

fn info(json: bool) -> anyhow::Result<()> {
    let info = DeviceInfo::probe();
    if json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        println!("torch {}", info.torch_version);
        println!(
            "cuda available: {} ({} device(s))",
            info.cuda_available, info.cuda_device_count
        );
        match info.nccl_version {
            Some(v) => println!("nccl {}.{}.{}", v / 10000, (v / 100) % 100, v % 100),
            None => println!("nccl not loadable"),
        }
    }
    Ok(())
}

fn augment(c: AugmentCommand) -> anyhow::Result<()> {
    use kormlm_worker::augment::io::write_output;
    use kormlm_worker::augment::parts::CHUNK_ROWS;
    use kormlm_worker::augment::{setup, AugmentSummary, Augmenter};
    let (table, output_format, output, options) =
        setup(&c.augment, c.seed, c.max_seq_len).map_err(|e| anyhow::anyhow!(e))?;
    let device = parse_device(&c.device)?;
    let model = LoadedModel::load(&c.model, c.revision.as_deref(), device)?;
    let n = options.num_augmentations;
    let augmenter = Augmenter::new(&model, options, device);
    let texts = table.texts();
    let bar =
        std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| indicatif::ProgressBar::new(texts.len() as u64));
    let mut variants = Vec::with_capacity(texts.len());
    let mut summary = AugmentSummary::default();
    for (n, chunk) in texts.chunks(CHUNK_ROWS).enumerate() {
        for (text, result) in chunk.iter().zip(augmenter.augment(chunk, (n * CHUNK_ROWS) as u64)?) {
            summary.add(text, &result);
            variants.push(result.variants);
        }
        if let Some(bar) = &bar {
            bar.inc(chunk.len() as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    write_output(&output, output_format, &table, &variants, n)
        .map_err(|e| anyhow::anyhow!("{}: {e}", output.display()))?;
    let summary = summary.finish();
    eprintln!(
        "augmented {} sentences ({} variants): {:.1}% changed, {:.2} tokens changed on average, {} unchanged, {} skipped (no maskable token); wrote {}",
        summary.sentences,
        summary.variants,
        summary.changed_percent,
        summary.mean_tokens_changed,
        summary.unchanged,
        summary.skipped,
        output.display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn augment_report(c: AugmentReportCommand) -> anyhow::Result<()> {
    use kormlm_worker::augment::report::quality_report;
    use kormlm_worker::augment::setup;
    let mut args = c.run.augment.clone();
    args.output.get_or_insert_with(|| PathBuf::from("unused.csv"));
    let (table, _, _, options) = setup(&args, c.run.seed, c.run.max_seq_len).map_err(|e| anyhow::anyhow!(e))?;
    let device = parse_device(&c.run.device)?;
    let model = LoadedModel::load(&c.run.model, c.run.revision.as_deref(), device)?;
    let texts: Vec<String> = table
        .texts()
        .into_iter()
        .filter(|t| !t.trim().is_empty())
        .take(c.limit)
        .collect();
    let report = quality_report(&model, &texts, &options, &c.mlm_probs, &c.thresholds, device)?;
    eprintln!(
        "{} sentences, masked-token top-1 accuracy {:.4} over {} tokens",
        report.sentences, report.masked_token_top1_accuracy, report.masked_tokens
    );
    eprintln!(
        "{:>8} {:>9} {:>8} {:>11}  edits 0/1/2/3/4+",
        "mlm_prob", "threshold", "changed", "mean edits"
    );
    for g in &report.grid {
        eprintln!(
            "{:>8} {:>9} {:>7.1}% {:>11.2}  {:?}",
            g.mlm_prob,
            g.threshold,
            100.0 * g.changed_share,
            g.mean_tokens_changed,
            g.edits_histogram
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn tokenizer_train(input: &[PathBuf], vocab_size: usize, min_frequency: u64, output: &Path) -> anyhow::Result<()> {
    let tokenizer = kormlm_worker::tokenizer::train_wordpiece(input, vocab_size, min_frequency)?;
    std::fs::create_dir_all(output).map_err(|e| anyhow::anyhow!("{}: {e}", output.display()))?;
    tokenizer.save(output)?;
    eprintln!(
        "vocabulary of {} tokens written to {}",
        tokenizer.vocab_size(),
        output.display()
    );
    Ok(())
}

fn init_model(tokenizer: &Path, output: &Path, mut config: serde_json::Value, seed: u64) -> anyhow::Result<()> {
    use kormlm_worker::model::ElectraConfig;
    let tokenizer = MlmTokenizer::from_dir(tokenizer)?;
    config["vocab_size"] = (tokenizer.vocab_size() as i64).into();
    config["pad_token_id"] = i64::from(tokenizer.special().pad).into();
    let config: ElectraConfig = serde_json::from_value(config)?;
    let model = LoadedModel::random(config, tokenizer, tch::Device::Cpu, seed);
    model.save(output)?;
    eprintln!("random ELECTRA masked-LM written to {}", output.display());
    Ok(())
}

fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("KORMLM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kormlm")))
        .map(|d| d.join("tokens"))
}

fn train(command: TrainCommand) -> anyhow::Result<()> {
    let source = command.config.display().to_string();
    let parsed = DsConfig::from_file(&command.config)?;
    for warning in &parsed.warnings {
        tracing::warn!("{warning}");
    }
    let resolved = parsed.config.resolve(1, &source)?;
    let device = parse_device(&command.device)?;
    let output_dir = command.train.output_dir.clone().map(PathBuf::from).unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Path::new(&command.train.model_dir).join(run_dir_name(now))
    });
    let job = TrainJob {
        args: command.train,
        config: resolved,
        device,
        output_dir: output_dir.clone(),
        cache_dir: command.cache_dir.or_else(default_cache_dir),
        resume_from: command.resume_from,
    };
    let summary = kormlm_worker::train::train(&job, &mut SingleRank, &mut |_| {}, &|| false)?;
    eprintln!(
        "training finished: {} epoch(s), {} step(s), best val_loss {}{}; output in {}",
        summary.epochs_run,
        summary.global_steps,
        summary.best_val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        if summary.early_stopped { " (EARLY STOPPED)" } else { "" },
        output_dir.display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// Lines are read and processed in chunks of this many, so input of any size streams.
const CHUNK_LINES: usize = 4096;

/// Streams stdin in chunks of lines through `per_chunk`, which returns one output line per
/// input line; the output goes to stdout.
fn map_stdin_lines(mut per_chunk: impl FnMut(&[String]) -> anyhow::Result<Vec<String>>) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut line_no = 1;
    loop {
        let lines = read_chunk(&mut input, CHUNK_LINES, line_no, "stdin")?;
        if lines.is_empty() {
            break;
        }
        line_no += lines.len();
        for line in per_chunk(&lines)? {
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    Ok(())
}

fn tokenize(model: &str, max_seq_len: Option<usize>, decode: bool) -> anyhow::Result<()> {
    let tokenizer = MlmTokenizer::from_dir(Path::new(model))?;
    let max_len = max_seq_len.unwrap_or(tokenizer.model_max_length());
    map_stdin_lines(|lines| {
        let texts: Vec<&str> = lines.iter().map(String::as_str).collect();
        let mut out = Vec::with_capacity(lines.len());
        for ids in tokenizer.encode_batch(&texts, Some(max_len))? {
            let line = if decode {
                serde_json::json!({ "input_ids": ids, "decoded": tokenizer.decode(&ids, true)? })
            } else {
                serde_json::json!({ "input_ids": ids })
            };
            out.push(line.to_string());
        }
        Ok(out)
    })
}

fn fill_mask(model: &str, revision: Option<&str>, device: &str, options: FillMaskOptions) -> anyhow::Result<()> {
    let device = parse_device(device)?;
    let loaded = LoadedModel::load(model, revision, device)?;
    map_stdin_lines(|lines| {
        let results = kormlm_worker::fill_mask::fill_mask(&loaded, lines, &options, device)?;
        Ok(results.iter().map(ToString::to_string).collect())
    })
}

fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let (Some(rank), Some(coordinator)) = (args.rank, args.coordinator) else {
        anyhow::bail!("the daemon needs --rank K and --coordinator URL (or a subcommand; see `worker --help`)");
    };
    let options = DaemonOptions {
        rank,
        local_rank: args.local_rank,
        coordinator,
        token: args.token,
        reconnect_timeout: Duration::from_secs(args.reconnect_timeout_s),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(daemon::run(options))?;
    Ok(())
}
