//! The ELECTRA masked-LM: its config (`config`, `activation`), the tch model in candle's
//! `bert.rs` shape (`embeddings`, `encoder`, `electra` with the generator head), the masked-LM
//! inference path (`masked_lm`), checkpoint formats (`weights`, `torch_pickle`), the hub and
//! `LoadedModel` (load, random initialisation, save).

pub mod activation;
pub mod config;
pub mod electra;
pub mod embeddings;
pub mod encoder;
pub mod hub;
mod init;
pub mod masked_lm;
pub mod sequence_classification;
pub mod torch_pickle;
pub mod weights;

pub use activation::HiddenAct;
pub use config::ElectraConfig;
pub use electra::ElectraForMaskedLM;
pub use sequence_classification::{ElectraForSequenceClassification, LoadedClassifier};
pub use weights::LoadReport;

use crate::tokenizer::{MlmTokenizer, TokenizerError};
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: invalid model config: {message}")]
    Config { path: String, message: String },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    #[error("{dir}: no {wanted}")]
    MissingFile { dir: String, wanted: String },
    #[error("{path}: weight `{key}` has shape {found:?}, the model expects {expected:?}")]
    Shape {
        path: String,
        key: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{path}: required weights missing: {}", keys.join(", "))]
    MissingWeights { path: String, keys: Vec<String> },
    #[error(
        "cannot get {id}@{revision} from the Hugging Face hub: {message}. If this machine is offline, \
         pass a local model directory instead of a hub id"
    )]
    Hub {
        id: String,
        revision: String,
        message: String,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

impl ModelError {
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// A model with its variables and tokenizer, ready for inference or training.
pub struct LoadedModel {
    pub vs: VarStore,
    pub model: ElectraForMaskedLM,
    pub tokenizer: MlmTokenizer,
    pub report: LoadReport,
}

impl LoadedModel {
    /// Loads a local directory or hub id (`revision` for hub ids) onto `device`. Missing MLM-head
    /// weights (a discriminator checkpoint) are initialised like transformers and listed.
    pub fn load(name_or_path: &str, revision: Option<&str>, device: Device) -> Result<Self, ModelError> {
        let dir = hub::resolve(name_or_path, revision)?;
        let config = ElectraConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = MlmTokenizer::from_dir(&dir)?;
        let files = weights::WeightFiles::find(&dir)?;
        let source = match &files {
            weights::WeightFiles::Safetensors(p) | weights::WeightFiles::PytorchBin(p) => p.display().to_string(),
            weights::WeightFiles::Sharded { index, .. } => index.display().to_string(),
        };
        let vs = VarStore::new(device);
        let model = ElectraForMaskedLM::new(&vs.root(), &config);
        let report = weights::load_into(&vs, files.read()?, &source)?;
        if !report.newly_initialized.is_empty() {
            tracing::warn!(
                model = %dir.display(),
                keys = ?report.newly_initialized,
                "some weights of ElectraForMaskedLM were not in the checkpoint and are newly initialized"
            );
        }
        if !report.unused.is_empty() {
            tracing::info!(model = %dir.display(), keys = ?report.unused, "checkpoint weights not used by ElectraForMaskedLM");
        }
        Ok(Self {
            vs,
            model,
            tokenizer,
            report,
        })
    }

    /// A randomly initialised model (for training from scratch).
    pub fn random(config: ElectraConfig, tokenizer: MlmTokenizer, device: Device, seed: u64) -> Self {
        tch::manual_seed(seed as i64);
        let vs = VarStore::new(device);
        let model = ElectraForMaskedLM::new(&vs.root(), &config);
        Self {
            vs,
            model,
            tokenizer,
            report: LoadReport::default(),
        }
    }

    /// Saves in Hugging Face layout (`config.json`, `model.safetensors`, tokenizer files), into a
    /// temporary directory that is flushed to disk and renamed over `dir` at the end: `dir` holds
    /// either the previous complete model or the new one. On failure (a full disk) the temporary
    /// directory is removed and the error names the file and the OS error.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let tensors: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, _)| name != "generator_lm_head.weight")
            .collect();
        save_model_dir(dir, &self.model.config().to_hf_json(), tensors, &self.tokenizer)
    }
}

/// Saves a model in Hugging Face layout (`config.json`, `model.safetensors` with `tensors`,
/// tokenizer files) into a temporary directory that is flushed to disk and renamed over `dir`
/// at the end: `dir` holds either the previous complete model or the new one. On failure (a
/// full disk) the temporary directory is removed and the error names the file and the OS error.
pub fn save_model_dir(
    dir: &Path,
    config: &serde_json::Value,
    tensors: Vec<(String, Tensor)>,
    tokenizer: &MlmTokenizer,
) -> Result<(), ModelError> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    if let Err(e) = write_files(&tmp, config, tensors, tokenizer) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| ModelError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))?;
    kormlm_proto::durable::sync_dir(parent).map_err(|e| ModelError::io(parent, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The model's files, written into a new directory `dir` and flushed to disk.
fn write_files(
    dir: &Path,
    config: &serde_json::Value,
    mut tensors: Vec<(String, Tensor)>,
    tokenizer: &MlmTokenizer,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let config = serde_json::to_string_pretty(config).expect("config serialises");
    let config_path = dir.join("config.json");
    kormlm_proto::durable::write(&config_path, config + "\n").map_err(|e| ModelError::io(&config_path, e.error))?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    weights::write_safetensors(&tensors, &dir.join(weights::SAFETENSORS))?;
    tokenizer.save(dir)?;
    sync_dir_and_files(dir).map_err(|e| ModelError::io(dir, e))
}

/// Flushes a freshly written model directory to disk before it is renamed into place, so a
/// model reported as saved survives a crash of the machine.
fn sync_dir_and_files(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}
