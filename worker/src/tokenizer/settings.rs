//! The settings of a BERT tokenizer that live beside its vocabulary: `tokenizer_config.json`
//! and `special_tokens_map.json`.

use super::error::TokenizerError;
use super::special::BERT_SPECIAL_TOKENS;
use std::path::Path;

/// Settings from `tokenizer_config.json` and `special_tokens_map.json`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Settings {
    pub do_lower_case: bool,
    pub strip_accents: Option<bool>,
    pub tokenize_chinese_chars: bool,
    pub clean_up_tokenization_spaces: bool,
    pub model_max_length: usize,
    pub tokens: [String; 5],
}

impl Settings {
    /// A cased BERT tokenizer with the standard special tokens (`from_vocab`, `tokenizer-train`).
    pub fn cased_bert() -> Self {
        Self {
            do_lower_case: false,
            strip_accents: None,
            tokenize_chinese_chars: true,
            clean_up_tokenization_spaces: false,
            model_max_length: 512,
            tokens: BERT_SPECIAL_TOKENS.map(str::to_string),
        }
    }

    /// Reads the settings of a tokenizer directory; missing files and keys take transformers'
    /// defaults.
    pub fn read(dir: &Path) -> Result<Self, TokenizerError> {
        let read_json = |name: &str| -> Result<serde_json::Value, TokenizerError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => serde_json::from_str(&text)
                    .map_err(|e| TokenizerError::file(&path, format!("line {}, column {}: {e}", e.line(), e.column()))),
                Err(_) => Ok(serde_json::Value::Null),
            }
        };
        let config = read_json("tokenizer_config.json")?;
        let map = read_json("special_tokens_map.json")?;
        let token = |key: &str, default: &str| -> String {
            let from = |v: &serde_json::Value| match &v[key] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
                _ => None,
            };
            from(&map)
                .or_else(|| from(&config))
                .unwrap_or_else(|| default.to_string())
        };
        let max_len = config["model_max_length"].as_f64().unwrap_or(512.0);
        Ok(Self {
            do_lower_case: config["do_lower_case"].as_bool().unwrap_or(true),
            strip_accents: config["strip_accents"].as_bool(),
            tokenize_chinese_chars: config["tokenize_chinese_chars"].as_bool().unwrap_or(true),
            clean_up_tokenization_spaces: config["clean_up_tokenization_spaces"].as_bool().unwrap_or(false),
            model_max_length: if max_len > 0.0 && max_len < 1e12 {
                max_len as usize
            } else {
                512
            },
            tokens: [
                token("pad_token", "[PAD]"),
                token("unk_token", "[UNK]"),
                token("cls_token", "[CLS]"),
                token("sep_token", "[SEP]"),
                token("mask_token", "[MASK]"),
            ],
        })
    }
}
