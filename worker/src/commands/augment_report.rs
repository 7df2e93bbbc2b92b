//! `worker augment-report`: augmentation quality on a dev set for a grid of masking
//! probabilities × thresholds; a table on stderr and the report as JSON on stdout.

use crate::augment::report::quality_report;
use crate::cli::AugmentReportCommand;
use crate::error::WorkerError;
use crate::work::AugmentJob;
use std::path::PathBuf;

pub fn run(command: &AugmentReportCommand) -> Result<(), WorkerError> {
    let mut job = AugmentJob::from_command(&command.run)?;
    crate::device::check(job.device)?;
    // The report writes nothing; the shared set-up only wants an output name.
    job.args.output.get_or_insert_with(|| PathBuf::from("unused.csv"));
    let (table, _, _, options) = job.setup()?;
    let model = job.load_model()?;
    let texts: Vec<String> = table
        .texts()
        .into_iter()
        .filter(|t| !t.trim().is_empty())
        .take(command.limit)
        .collect();
    let report = quality_report(
        &model,
        &texts,
        &options,
        &command.mlm_probs,
        &command.thresholds,
        job.device,
    )?;
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
