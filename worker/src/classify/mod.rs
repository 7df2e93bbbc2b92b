//! Sequence classification on top of the ELECTRA encoder (`model::sequence_classification`):
//! labelled corpora (`data`), accuracy and F1 (`metrics`), batched inference (`infer`) and the
//! standalone training loop (`train`), which reuses the masked-LM path's DeepSpeed config, batch
//! rule, optimizer, schedules, loss scaler, early stopping and run files.

pub mod data;
pub mod infer;
pub mod metrics;
pub mod objective;
pub mod train;

use crate::corpus::CorpusError;
use crate::model::ModelError;
use crate::train::TrainError;

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Config(#[from] kormlm_proto::ds_config::ConfigError),
    #[error(transparent)]
    Plan(#[from] kormlm_proto::job_plan::PlanError),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A row or column of a labelled file that cannot be used.
    #[error("{path}: {message}")]
    Data { path: String, message: String },
    /// Flags that do not fit together.
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {message}")]
    Output { path: String, message: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl ClassifyError {
    pub(crate) fn output(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::Output {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}
