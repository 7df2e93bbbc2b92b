//! `worker train`: the training loop of a job in this one process (world size 1), with a
//! summary on stderr and the summary as JSON on stdout.

use crate::cli::TrainCommand;
use crate::comm::SingleRank;
use crate::error::WorkerError;
use crate::work::train_job_from_command;

pub fn run(command: &TrainCommand) -> Result<(), WorkerError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let job = train_job_from_command(command, now)?;
    crate::device::check(job.device)?;
    let summary = crate::train::train(&job, &mut SingleRank, &mut |_| {}, &|| false)?;
    eprintln!(
        "training finished: {} epoch(s), {} step(s), best val_loss {}{}; output in {}",
        summary.epochs_run,
        summary.global_steps,
        summary.best_val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        if summary.early_stopped { " (EARLY STOPPED)" } else { "" },
        job.output_dir.display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
