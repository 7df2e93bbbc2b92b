//! Why a training run failed.

use super::checkpoint::CheckpointError;
use super::trainer::StepError;
use crate::comm::CommError;
use crate::corpus::CorpusError;
use crate::dataset::DatasetError;
use crate::model::ModelError;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{path}: {message}")]
    Output { path: String, message: String },
    #[error("training: {0}")]
    Step(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("the training set is empty after reading {0}")]
    EmptyCorpus(String),
    /// The checkpoint to resume from cannot be read: damaged, incomplete, of another run or of
    /// another model. A job's coordinator then assigns the previous complete checkpoint.
    #[error("cannot resume from checkpoint {path}: {message}")]
    UnreadableCheckpoint { path: String, message: String },
    /// The output directory holds another run's files (`other` names that run).
    #[error(
        "{dir} holds the output of {other}; pass --overwrite_output_dir to remove that run's files and start \
         afresh, or choose another --output_dir"
    )]
    OutputDirInUse { dir: String, other: String },
    /// The config asks for a precision this device cannot compute in.
    #[error(transparent)]
    Precision(#[from] crate::autocast::PrecisionError),
}

impl TrainError {
    /// The checkpoint at `path` cannot be resumed from.
    pub(crate) fn unreadable(path: &Path, e: impl std::fmt::Display) -> Self {
        TrainError::UnreadableCheckpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// A file or directory of the run's output could not be written.
    pub(crate) fn output(path: &Path, e: impl std::fmt::Display) -> Self {
        TrainError::Output {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// A collective that fails inside a step is a communication failure like any other.
impl From<StepError> for TrainError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Comm(e) => TrainError::Comm(e),
            StepError::LossScale(e) => TrainError::Step(e.to_string()),
        }
    }
}
