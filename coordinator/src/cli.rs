//! Command-line definitions of the `coordinator` binary.

use clap::{Args, Parser, Subcommand, ValueEnum};
use kormlm_proto::augment_args::AugmentArgs;
use kormlm_proto::augment_eval_args::AugmentEvalArgs;
use kormlm_proto::tls::ClientTlsArgs;
use kormlm_proto::train_args::TrainArgs;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "kormlm coordinator: assigns ranks, devices and data shards to workers and tracks jobs",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a job's status (the newest job unless --job is given).
    Status(StatusArgs),
    /// Follow a job's progress live until it ends.
    Watch(StatusArgs),
    /// List all jobs.
    List(ListArgs),
    /// Stop a job: workers finish the current step and exit (--force: at once).
    Kill(KillArgs),
    /// Continue a killed or failed job from its latest checkpoint.
    Resume(ResumeArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA when a GPU is visible, else CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// DeepSpeed config (ds_config.json). With it, the coordinator starts a job; without it, it
    /// only serves the jobs already in --state-dir.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on. Port 0 picks a free port (written to STATE_DIR/coordinator.addr).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Where jobs, workers, events and logs are kept.
    #[arg(long = "state-dir", visible_alias = "state_dir", default_value = "./kormlm-state")]
    pub state_dir: PathBuf,
    /// Number of ranks; without a spawn flag the coordinator waits for this many
    /// `worker --rank K --coordinator URL` processes.
    #[arg(long = "world_size", visible_alias = "world-size")]
    pub world_size: Option<u32>,
    /// Start N local CPU workers (use with --device cpu).
    #[arg(long = "num_workers", visible_alias = "num-workers")]
    pub num_workers: Option<u32>,
    /// Start one worker per GPU on the first N GPUs of each host (like `deepspeed --num_gpus`).
    #[arg(long = "num_gpus", visible_alias = "num-gpus")]
    pub num_gpus: Option<u32>,
    /// Use only these hosts/GPUs: NAME[:SLOT[,SLOT…]][@NAME…], e.g. localhost:0,2.
    #[arg(long, short = 'i')]
    pub include: Option<String>,
    /// Use all but these hosts/GPUs (same syntax as --include).
    #[arg(long, short = 'e')]
    pub exclude: Option<String>,
    /// MPI-style hostfile (`HOST slots=N` per line); workers for this host are started here,
    /// those for the other hosts through --launcher.
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
    /// How workers on the other hosts of --hostfile are started: ssh, pdsh (PDSH_RCMD_TYPE=ssh),
    /// slurm (one srun step per rank inside the allocation) or none (log the commands to run
    /// there). Default: pdsh when it is installed, else ssh.
    #[arg(long, value_enum)]
    pub launcher: Option<crate::remote::LauncherKind>,
    /// The ssh port of the other hosts (ssh `-p`; pdsh through PDSH_SSH_ARGS_APPEND).
    #[arg(long = "ssh_port", visible_alias = "ssh-port")]
    pub ssh_port: Option<u16>,
    /// Extra arguments for the launcher, split as a shell would (ssh: before the host; pdsh:
    /// after `-w HOST`), e.g. "-o ConnectTimeout=10".
    #[arg(long = "launcher_args", visible_alias = "launcher-args", allow_hyphen_values = true)]
    pub launcher_args: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Exit when the job has ended: status 0 if it succeeded, 1 otherwise (130/143 when a
    /// SIGINT/SIGTERM stopped it).
    #[arg(long = "exit-when-done", visible_alias = "exit_when_done")]
    pub exit_when_done: bool,
    /// Restart a failed job from its latest checkpoint up to this many times.
    #[arg(long = "max_restarts", visible_alias = "max-restarts", default_value_t = 0)]
    pub max_restarts: u32,
    /// Elastic continuation (torchrun's --nnodes=MIN:MAX): when a rank is lost and no automatic
    /// restart is left, continue from the latest checkpoint on the surviving ranks if at least
    /// this many survive and the batch rule holds for them (0: never).
    #[arg(long = "min_workers", visible_alias = "min-workers", default_value_t = 0)]
    pub min_workers: u32,
    /// Continue the killed or failed job of --state-dir that writes to the same output
    /// directory, instead of refusing to start (as a rerun of the same command would).
    #[arg(long)]
    pub resume: bool,
    /// On SIGINT/SIGTERM the running jobs stop gracefully (every rank finishes its step and
    /// checkpoints); after this many seconds, or on a second signal, they are stopped at once.
    #[arg(long = "stop-timeout-s", visible_alias = "stop_timeout_s", default_value_t = 120)]
    pub stop_timeout_s: u64,
    /// Heartbeat interval asked of workers, in milliseconds.
    #[arg(long = "heartbeat-ms", default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// A worker silent for this long is marked LOST, in milliseconds.
    #[arg(long = "worker-timeout-ms", default_value_t = 5000)]
    pub worker_timeout_ms: u64,
    /// Deprecated (visible in `ps`): the shared secret every call must present. Set KORMLM_TOKEN
    /// instead; without either, the token of STATE_DIR/token is used, or a new random one is
    /// written there (mode 0600).
    #[arg(long)]
    pub token: Option<String>,
    /// Let status, watch and list answer without the token (submit, kill, resume and workers
    /// still need it).
    #[arg(long = "open-status")]
    pub open_status: bool,
    /// Serve TLS with this certificate chain (PEM); workers and clients then use https:// URLs.
    #[arg(long = "tls-cert", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long = "tls-key", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients and workers presenting a certificate signed by this CA (PEM).
    #[arg(long = "tls-client-ca", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// The CA (PEM) the workers this coordinator starts verify it with (handed to them as
    /// KORMLM_TLS_CA; default: the --tls-cert file, enough when it holds the full chain).
    #[arg(long = "tls-ca", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Serve Prometheus metrics (text format 0.0.4) at http://ADDR/metrics: HOST:PORT, or a bare
    /// PORT on 127.0.0.1; port 0 picks a free port (written to STATE_DIR/metrics.addr). Read-only,
    /// open unless --metrics-token-file is given; beyond loopback without a token it warns.
    #[arg(long = "metrics-listen", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Require `Authorization: Bearer TOKEN` on /metrics, the token read from this file (one
    /// line, not world-readable; e.g. a mounted Kubernetes Secret).
    #[arg(long = "metrics-token-file", value_name = "FILE", requires = "metrics_listen")]
    pub metrics_token_file: Option<PathBuf>,
    /// The worker binary to start (default: `worker` next to this binary).
    #[arg(long = "worker-bin")]
    pub worker_bin: Option<PathBuf>,
    /// Check the flags, the config and the launch plan, print them as JSON and exit without
    /// starting anything.
    #[arg(long = "dry-run", visible_alias = "dry_run")]
    pub dry_run: bool,
    /// What the job does: train (fine-tune the masked LM), classify (fine-tune a sequence
    /// classifier on --train_file/--dev_file, like train over the ranks), augment (--input rows,
    /// split across workers), or augment-eval (classifiers with and without augmented training
    /// data, seed × condition × fraction runs spread over the workers; --config is the
    /// classifiers' training config). classify and augment-eval share the labelled-data flags.
    #[arg(long, value_enum, default_value = "train")]
    pub task: TaskArg,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub augment: AugmentArgs,
    #[command(flatten)]
    pub augment_eval: AugmentEvalArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    Train,
    Classify,
    Augment,
    AugmentEval,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Coordinator address (https://… when it serves TLS).
    #[arg(long, env = "KORMLM_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The coordinator's state directory; its `token` file is read when neither KORMLM_TOKEN
    /// nor --token-file is given.
    #[arg(long = "state-dir", visible_alias = "state_dir", default_value = "./kormlm-state")]
    pub state_dir: PathBuf,
    /// A file holding the shared secret (e.g. a copy of STATE_DIR/token).
    #[arg(long = "token-file", env = "KORMLM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Deprecated (visible in `ps`): the shared secret. Use KORMLM_TOKEN, --token-file or --state-dir.
    #[arg(long)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Job id (e.g. job-1); default: the newest job.
    #[arg(long)]
    pub job: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    #[arg(long)]
    pub job: String,
    /// SIGTERM then SIGKILL instead of a clean stop after the current step.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    #[arg(long)]
    pub job: String,
    /// Resume with a different number of ranks (re-partitions the optimizer state).
    #[arg(long = "world_size", visible_alias = "world-size")]
    pub world_size: Option<u32>,
    #[command(flatten)]
    pub client: ClientArgs,
}
