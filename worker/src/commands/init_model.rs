//! `worker init-model`: a randomly initialised ELECTRA masked-LM in Hugging Face layout for a
//! tokenizer, to train from scratch.

use crate::cli::InitModelCommand;
use crate::error::WorkerError;
use crate::model::{ElectraConfig, LoadedModel};
use crate::tokenizer::MlmTokenizer;

pub fn run(command: &InitModelCommand) -> Result<(), WorkerError> {
    let tokenizer = MlmTokenizer::from_dir(&command.tokenizer)?;
    let config: ElectraConfig = serde_json::from_value(serde_json::json!({
        "embedding_size": command.embedding_size,
        "hidden_size": command.hidden_size,
        "num_hidden_layers": command.num_hidden_layers,
        "num_attention_heads": command.num_attention_heads,
        "intermediate_size": command.intermediate_size,
        "max_position_embeddings": command.max_position_embeddings,
        "hidden_dropout_prob": command.dropout,
        "attention_probs_dropout_prob": command.dropout,
        "vocab_size": tokenizer.vocab_size() as i64,
        "pad_token_id": i64::from(tokenizer.special().pad),
    }))?;
    let model = LoadedModel::random(config, tokenizer, tch::Device::Cpu, command.seed);
    model.save(&command.output)?;
    eprintln!("random ELECTRA masked-LM written to {}", command.output.display());
    Ok(())
}
