//! Resolves `--model_name_or_path`: a local directory, or a Hugging Face hub id downloaded (at
//! `--revision`) into the standard cache (`HF_HOME`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` apply).

use super::ModelError;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Files fetched besides the weights when present; missing ones are fine.
const OPTIONAL_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];
const WEIGHT_FILES: &[&str] = &[
    super::weights::SAFETENSORS,
    super::weights::SAFETENSORS_INDEX,
    super::weights::PYTORCH_BIN,
];

fn looks_like_hub_id(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    !name.is_empty()
        && parts.len() <= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        && !name.starts_with('.')
}

/// A directory holding the model's files.
pub fn resolve(name_or_path: &str, revision: Option<&str>) -> Result<PathBuf, ModelError> {
    let path = Path::new(name_or_path);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(name_or_path) {
        return Err(ModelError::MissingFile {
            dir: name_or_path.to_string(),
            wanted: "a model directory (or a Hugging Face hub id like beomi/KcELECTRA-base)".into(),
        });
    }
    let revision = revision.unwrap_or("main").to_string();
    let repo = Repo::with_revision(name_or_path.to_string(), RepoType::Model, revision.clone());
    let hub_error = |message: String| ModelError::Hub {
        id: name_or_path.to_string(),
        revision: revision.clone(),
        message,
    };
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if offline {
        let cached = Cache::from_env().repo(repo);
        let config = cached
            .get("config.json")
            .ok_or_else(|| hub_error("HF_HUB_OFFLINE is set and the model is not in the local cache".into()))?;
        return Ok(config.parent().unwrap_or(Path::new(".")).to_path_buf());
    }
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| hub_error(e.to_string()))?;
    let remote = api.repo(repo);
    let config = remote.get("config.json").map_err(|e| hub_error(e.to_string()))?;
    let dir = config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut have_weights = false;
    for file in WEIGHT_FILES {
        if let Ok(path) = remote.get(file) {
            have_weights = true;
            if *file == super::weights::SAFETENSORS_INDEX {
                let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
                let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| hub_error(e.to_string()))?;
                let mut shards: Vec<String> = index["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                for shard in shards {
                    remote.get(&shard).map_err(|e| hub_error(format!("{shard}: {e}")))?;
                }
            }
            break;
        }
    }
    if !have_weights {
        return Err(hub_error(format!(
            "the repository has none of {}",
            WEIGHT_FILES.join(", ")
        )));
    }
    for file in OPTIONAL_FILES {
        let _ = remote.get(file);
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths() {
        assert!(looks_like_hub_id("beomi/KcELECTRA-base"));
        assert!(looks_like_hub_id("gpt2"));
        assert!(!looks_like_hub_id("./model/"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
    }

    #[test]
    fn unreachable_hub_tells_the_user_to_pass_a_local_path() {
        let cache = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HOME", cache.path());
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
        let err = resolve("nobody/no-model", Some("abc123")).unwrap_err().to_string();
        assert!(err.contains("nobody/no-model@abc123"), "{err}");
        assert!(err.contains("pass a local model directory"), "{err}");
    }
}
