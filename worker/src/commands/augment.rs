//! `worker augment`: every row of the input plus its variants, in this one process (with a
//! progress bar on a terminal), written atomically; a summary on stderr and as JSON on stdout.

use crate::augment::io::write_output;
use crate::augment::parts::CHUNK_ROWS;
use crate::augment::{AugmentSummary, Augmenter};
use crate::cli::AugmentCommand;
use crate::error::WorkerError;
use crate::work::AugmentJob;

pub fn run(command: &AugmentCommand) -> Result<(), WorkerError> {
    let job = AugmentJob::from_command(command)?;
    crate::device::check(job.device)?;
    let (table, output_format, output, options) = job.setup()?;
    let model = job.load_model()?;
    let n = options.num_augmentations;
    let augmenter = Augmenter::new(&model, options, job.device);
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
    write_output(&output, output_format, &table, &variants, n).map_err(|error| WorkerError::Io {
        path: output.clone(),
        error,
    })?;
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
