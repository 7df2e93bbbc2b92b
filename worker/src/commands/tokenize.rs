//! `worker tokenize`: the ids of each stdin line (optionally decoded back) as JSON, one line
//! per line, like the transformers tokenizer.

use crate::cli::TokenizeCommand;
use crate::error::WorkerError;
use crate::lines::map_lines;
use crate::tokenizer::MlmTokenizer;
use std::path::Path;

pub fn run(command: &TokenizeCommand) -> Result<(), WorkerError> {
    let tokenizer = MlmTokenizer::from_dir(Path::new(&command.model))?;
    let max_len = command.max_seq_len.unwrap_or(tokenizer.model_max_length());
    map_lines(
        &mut std::io::stdin().lock(),
        std::io::stdout().lock(),
        "stdin",
        "stdout",
        |lines| {
            let texts: Vec<&str> = lines.iter().map(String::as_str).collect();
            let mut out = Vec::with_capacity(lines.len());
            for ids in tokenizer.encode_batch(&texts, Some(max_len))? {
                let line = if command.decode {
                    serde_json::json!({ "input_ids": ids, "decoded": tokenizer.decode(&ids, true)? })
                } else {
                    serde_json::json!({ "input_ids": ids })
                };
                out.push(line.to_string());
            }
            Ok(out)
        },
    )
}
