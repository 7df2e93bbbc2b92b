//! The coordinator's error type.

use kormlm_proto::ds_config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("state directory {path}: {message}")]
    Store { path: String, message: String },
    #[error("state record `{key}` cannot be read: {message}; the state directory was written by another kormlm version or is damaged; nothing was changed")]
    Record { key: String, message: String },
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("cannot reach the coordinator at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("{0}")]
    Rpc(String),
    #[error("cannot start worker {what}: {message}")]
    Spawn { what: String, message: String },
}

impl From<tonic::Status> for CoordinatorError {
    fn from(status: tonic::Status) -> Self {
        CoordinatorError::Rpc(format!("{:?}: {}", status.code(), status.message()))
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
