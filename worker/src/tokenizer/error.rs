//! The tokenizer's errors.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{dir}: no tokenizer.json or vocab.txt")]
    Missing { dir: String },
    #[error(
        "the tokenizer has no {token} token; add it to the vocabulary (special tokens: [PAD] [UNK] [CLS] [SEP] [MASK])"
    )]
    NoSpecialToken { token: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
}

impl TokenizerError {
    pub(super) fn file(path: &Path, message: impl ToString) -> Self {
        Self::File {
            path: path.display().to_string(),
            message: message.to_string(),
        }
    }
}
