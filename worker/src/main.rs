use clap::{Args, Parser, Subcommand};
use kormlm_worker::daemon::{self, DaemonOptions};
use kormlm_worker::device::DeviceInfo;
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
enum Command {
    /// Show libtorch, CUDA and NCCL as this worker sees them.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
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
