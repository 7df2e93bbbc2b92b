//! The `worker` binary: wiring only. It sets up logging, parses the command line and hands the
//! command to the library; an error is printed as `worker: error: …` with exit status 1. The
//! daemon and `worker train` end with 143/130 after SIGTERM/SIGINT.

use clap::Parser;
use kormlm_worker::cli::{Cli, Command};
use kormlm_worker::{commands, daemon};
use tracing_subscriber::EnvFilter;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("KORMLM_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Some(Command::Info(command)) => commands::info::run(&command).map_err(Into::into),
        Some(Command::Train(command)) => match commands::train::run(&command) {
            Ok(0) => Ok(()),
            Ok(stopped) => std::process::exit(stopped),
            Err(e) => Err(e.into()),
        },
        Some(Command::Augment(command)) => commands::augment::run(&command).map_err(Into::into),
        Some(Command::AugmentReport(command)) => commands::augment_report::run(&command).map_err(Into::into),
        Some(Command::TokenizerTrain(command)) => commands::tokenizer_train::run(&command).map_err(Into::into),
        Some(Command::InitModel(command)) => commands::init_model::run(&command).map_err(Into::into),
        Some(Command::Tokenize(command)) => commands::tokenize::run(&command).map_err(Into::into),
        Some(Command::FillMask(command)) => commands::fill_mask::run(&command).map_err(Into::into),
        Some(Command::Classify(command)) => match commands::classify::run(&command) {
            Ok(0) => Ok(()),
            Ok(stopped) => std::process::exit(stopped),
            Err(e) => Err(e.into()),
        },
        Some(Command::AugmentEval(command)) => commands::augment_eval::run(&command).map_err(Into::into),
        None => {
            let code = match daemon::run_blocking(cli.daemon) {
                Ok(outcome) => {
                    if let daemon::Outcome::Stopped(signal) = outcome {
                        eprintln!("worker: stopped by {}", signal.name());
                    }
                    outcome.exit_code()
                }
                Err(e) => {
                    eprintln!("worker: error: {e:#}");
                    1
                }
            };
            daemon::exit_now(code)
        }
    };
    if let Err(e) = result {
        eprintln!("worker: error: {e:#}");
        std::process::exit(1);
    }
}
