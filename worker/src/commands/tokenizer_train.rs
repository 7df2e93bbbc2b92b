//! `worker tokenizer-train`: a cased BERT WordPiece vocabulary trained on text files, saved with
//! the tokenizer configs.

use crate::cli::TokenizerTrainCommand;
use crate::error::WorkerError;
use crate::tokenizer::train_wordpiece;

pub fn run(command: &TokenizerTrainCommand) -> Result<(), WorkerError> {
    let tokenizer = train_wordpiece(&command.input, command.vocab_size, command.min_frequency)?;
    std::fs::create_dir_all(&command.output).map_err(|error| WorkerError::Io {
        path: command.output.clone(),
        error,
    })?;
    tokenizer.save(&command.output)?;
    eprintln!(
        "vocabulary of {} tokens written to {}",
        tokenizer.vocab_size(),
        command.output.display()
    );
    Ok(())
}
