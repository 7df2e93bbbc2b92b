//! `config.json` of an ELECTRA checkpoint, with `ElectraConfig`'s defaults for missing keys.

use super::activation::HiddenAct;
use super::ModelError;
use serde::{Deserialize, Serialize};
use std::path::Path;

fn d_vocab() -> i64 {
    30522
}
fn d_embedding() -> i64 {
    128
}
fn d_hidden() -> i64 {
    256
}
fn d_layers() -> i64 {
    12
}
fn d_heads() -> i64 {
    4
}
fn d_intermediate() -> i64 {
    1024
}
fn d_dropout() -> f64 {
    0.1
}
fn d_positions() -> i64 {
    512
}
fn d_type_vocab() -> i64 {
    2
}
fn d_init_range() -> f64 {
    0.02
}
fn d_ln_eps() -> f64 {
    1e-12
}
fn d_pad() -> i64 {
    0
}
fn d_position_type() -> String {
    "absolute".into()
}
fn d_true() -> bool {
    true
}

/// The fields of `transformers.ElectraConfig` the model uses. Unknown keys are kept so a saved
/// config round-trips.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ElectraConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: i64,
    #[serde(default = "d_embedding")]
    pub embedding_size: i64,
    #[serde(default = "d_hidden")]
    pub hidden_size: i64,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i64,
    /// Parsed when the config is read: an unknown name fails there, naming the key.
    #[serde(default)]
    pub hidden_act: HiddenAct,
    #[serde(default = "d_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "d_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "d_type_vocab")]
    pub type_vocab_size: i64,
    #[serde(default = "d_init_range")]
    pub initializer_range: f64,
    #[serde(default = "d_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_pad")]
    pub pad_token_id: i64,
    #[serde(default = "d_position_type")]
    pub position_embedding_type: String,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for ElectraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl ElectraConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| {
            let position = format!(" at line {} column {}", e.line(), e.column());
            let text = e.to_string();
            ModelError::Config {
                path: path.display().to_string(),
                message: format!(
                    "line {}, column {}: {}",
                    e.line(),
                    e.column(),
                    text.strip_suffix(&position).unwrap_or(&text)
                ),
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let fail = |message: String| ModelError::Config {
            path: path.display().to_string(),
            message,
        };
        if let Some(model_type) = self.extra.get("model_type").and_then(|v| v.as_str()) {
            if model_type != "electra" {
                return Err(fail(format!(
                    "model_type is {model_type:?}; kormlm runs ELECTRA checkpoints (\"electra\")"
                )));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(fail(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.position_embedding_type != "absolute" {
            return Err(fail(format!(
                "position_embedding_type {:?} is not supported; accepted: \"absolute\"",
                self.position_embedding_type
            )));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("embedding_size", self.embedding_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v <= 0 {
                return Err(fail(format!("{name} must be positive, got {v}")));
            }
        }
        Ok(())
    }

    /// The config as saved next to the weights, in Hugging Face's form.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("config serialises");
        let map = value.as_object_mut().expect("an object");
        map.insert("model_type".into(), "electra".into());
        map.insert("architectures".into(), serde_json::json!(["ElectraForMaskedLM"]));
        map.entry("torch_dtype").or_insert("float32".into());
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<ElectraConfig, ModelError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        ElectraConfig::from_file(&path)
    }

    #[test]
    fn hidden_act_is_parsed_when_the_config_is_read() {
        assert_eq!(read("{}").unwrap().hidden_act, HiddenAct::Gelu);
        let config = read(r#"{"hidden_act": "gelu_new"}"#).unwrap();
        assert_eq!(config.hidden_act, HiddenAct::GeluNew);
        assert_eq!(config.to_hf_json()["hidden_act"], "gelu_new");
        let err = read("{\n  \"hidden_act\": \"swishy\"\n}").unwrap_err().to_string();
        assert!(
            err.contains("config.json: invalid model config: line 3, column 1: hidden_act"),
            "{err}"
        );
        assert!(
            err.ends_with(
                "hidden_act \"swishy\" is not supported; accepted: gelu, gelu_python, gelu_new, gelu_fast, \
             gelu_pytorch_tanh, gelu_python_tanh, gelu_10, quick_gelu, relu, relu2, relu6, leaky_relu, silu, swish, \
             sigmoid, tanh, mish, linear"
            ),
            "{err}"
        );
    }
}
