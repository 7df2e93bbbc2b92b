//! `worker fill-mask`: the transformers fill-mask pipeline's JSON for each stdin line.

use crate::cli::FillMaskCommand;
use crate::device::{check, parse_device};
use crate::error::WorkerError;
use crate::fill_mask::{fill_mask, FillMaskError, FillMaskOptions};
use crate::lines::map_lines;
use crate::model::LoadedModel;

pub fn run(command: &FillMaskCommand) -> Result<(), WorkerError> {
    let device = parse_device(&command.device)?;
    check(device)?;
    let options = FillMaskOptions {
        top_k: command.top_k,
        targets: command.targets.clone(),
        batch_size: command.batch_size,
        precision: command.dtype.into(),
    };
    crate::autocast::check(options.precision, device, "--dtype bf16", "--dtype fp32").map_err(FillMaskError::from)?;
    let model = LoadedModel::load(&command.model, command.revision.as_deref(), device)?;
    map_lines(
        &mut std::io::stdin().lock(),
        std::io::stdout().lock(),
        "stdin",
        "stdout",
        |lines| {
            let results = fill_mask(&model, lines, &options, device)?;
            Ok(results.iter().map(ToString::to_string).collect())
        },
    )
}
