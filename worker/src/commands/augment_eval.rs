//! `worker augment-eval`: the whole experiment in this one process (a progress bar over the
//! runs on a terminal); the report's table on stdout (`--json`: the report), its files in
//! `--output_dir`. Re-running the same command continues an interrupted experiment.

use crate::augment_eval::{self, report, AugmentEvalJob};
use crate::cli::AugmentEvalCommand;
use crate::device::parse_device;
use crate::error::WorkerError;
use kormlm_proto::job_plan::JobPlan;
use kormlm_proto::v1::TaskKind;

pub fn run(command: &AugmentEvalCommand) -> Result<(), WorkerError> {
    let device = parse_device(&command.device)?;
    crate::device::check(device)?;
    let mut args = command.train.to_map();
    args.extend(command.augment.to_map());
    args.extend(command.eval.to_map());
    let plan = JobPlan::resolve_file(&command.config, TaskKind::AugmentEval, args)?;
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }
    let job = AugmentEvalJob::new(plan, device)?;
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| indicatif::ProgressBar::new(0));
    let outcome = augment_eval::run(&job, (0, 1), &|| false, &mut |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let dir = job.output_dir();
    eprintln!(
        "augment-eval: {} run(s), {} reused from an earlier try; report in {}",
        outcome.items,
        outcome.reused,
        dir.join(report::REPORT_JSON).display()
    );
    let shown = if command.json {
        dir.join(report::REPORT_JSON)
    } else {
        dir.join(report::REPORT_MD)
    };
    let text = std::fs::read_to_string(&shown).map_err(|error| WorkerError::Io { path: shown, error })?;
    print!("{text}");
    Ok(())
}
