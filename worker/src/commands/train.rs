//! `worker train`: the training loop of a job in this one process (world size 1), with a
//! summary on stderr and the summary as JSON on stdout. The first SIGTERM or SIGINT stops the
//! run after the current step with a checkpoint (exit 143/130, continue with `--resume_from`);
//! a second one ends the process at once.

use crate::cli::TrainCommand;
use crate::comm::SingleRank;
use crate::error::WorkerError;
use crate::train::ProgressEvent;
use crate::work::train_job_from_command;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The first stop signal, once one came.
pub(crate) struct StopSignals {
    stopping: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
}

impl StopSignals {
    pub(crate) fn install() -> Result<Self, WorkerError> {
        let stopping = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        for (signal, code) in [(SIGTERM, 143), (SIGINT, 130)] {
            // Registered first, so that it sees the flag as it was before this signal: only a
            // second signal ends the process.
            signal_hook::flag::register_conditional_shutdown(signal, code, Arc::clone(&stopping))
                .and_then(|_| signal_hook::flag::register_usize(signal, Arc::clone(&received), signal as usize))
                .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&stopping)))
                .map_err(WorkerError::Signals)?;
        }
        Ok(Self { stopping, received })
    }

    pub(crate) fn stop_requested(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// After a run that `stopped_by_request` at `global_steps`: when a stop signal stopped it,
    /// says so on stderr with the `--resume_from` to continue with (`checkpoint`, the last one
    /// the run reported), and returns the exit status a shell reports for that signal.
    pub(crate) fn stopped(
        &self,
        stopped_by_request: bool,
        global_steps: u64,
        checkpoint: Option<(String, u64)>,
    ) -> Option<i32> {
        let (signal, code) = self.received().filter(|_| stopped_by_request)?;
        let resume = checkpoint.map_or_else(
            || "no checkpoint was written".to_string(),
            |(path, _)| format!("continue with --resume_from {path}"),
        );
        eprintln!("worker: stopped by {signal} after step {global_steps}; {resume}");
        Some(code)
    }

    /// The signal's name and the exit status a shell reports for it.
    fn received(&self) -> Option<(&'static str, i32)> {
        match self.received.load(Ordering::SeqCst) {
            s if s == SIGTERM as usize => Some(("SIGTERM", 143)),
            s if s == SIGINT as usize => Some(("SIGINT", 130)),
            _ => None,
        }
    }
}

/// Runs the training; returns the exit status (0, or 143/130 after a stop signal).
pub fn run(command: &TrainCommand) -> Result<i32, WorkerError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let job = train_job_from_command(command, now)?;
    crate::device::check(job.device)?;
    let signals = StopSignals::install()?;
    let mut checkpoint = None;
    let mut on_progress = |event: &ProgressEvent| checkpoint.clone_from(&event.checkpoint);
    let summary = crate::train::train(&job, &mut SingleRank, &mut on_progress, &|| signals.stop_requested())?;
    println!("{}", serde_json::to_string(&summary)?);
    if let Some(code) = signals.stopped(summary.stopped_by_request, summary.global_steps, checkpoint) {
        return Ok(code);
    }
    eprintln!(
        "training finished: {} epoch(s), {} step(s), best val_loss {}{}; output in {}",
        summary.epochs_run,
        summary.global_steps,
        summary.best_val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        if summary.early_stopped { " (EARLY STOPPED)" } else { "" },
        job.output_dir.display()
    );
    Ok(0)
}
