use clap::Parser;
use kormlm_coordinator::cli::{Cli, Command};
use kormlm_coordinator::{client, run};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("KORMLM_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result: anyhow::Result<i32> = match cli.command {
        None => run::serve(cli.serve).await.map_err(Into::into),
        Some(Command::Status(args)) => client::status(args).await.map_err(Into::into),
        Some(Command::Watch(args)) => client::watch(args).await.map_err(Into::into),
        Some(Command::List(args)) => client::list(args).await.map_err(Into::into),
        Some(Command::Kill(args)) => client::kill(args).await.map_err(Into::into),
        Some(Command::Resume(args)) => client::resume(args).await.map_err(Into::into),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("coordinator: error: {e:#}");
            std::process::exit(2);
        }
    }
}
