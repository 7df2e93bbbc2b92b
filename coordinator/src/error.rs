//! The coordinator's error type, and its one mapping to gRPC status codes at the service edge.

use kormlm_proto::ds_config::ConfigError;
use kormlm_proto::job_plan::PlanError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A job spec that cannot run (config, batch rule, flags).
    #[error(transparent)]
    InvalidSpec(#[from] PlanError),
    /// A request that names something out of range or asks for what cannot be done.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but the job or worker is not in a state that allows it.
    #[error("{0}")]
    Refused(String),
    /// A rank is already held by a live worker.
    #[error("{0}")]
    RankHeld(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// A wait ran past its deadline.
    #[error("{0}")]
    Timeout(String),
    /// The job ended while the caller waited for it.
    #[error("{0}")]
    Aborted(String),
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
    #[error("cannot take over SIGINT/SIGTERM: {0}")]
    Signal(String),
    /// The operating system's random source failed.
    #[error("cannot draw a random secret: {0}")]
    Random(String),
}

/// What a client of the `coordinator status|…` commands got back from the server.
impl From<tonic::Status> for CoordinatorError {
    fn from(status: tonic::Status) -> Self {
        CoordinatorError::Rpc(format!("{:?}: {}", status.code(), status.message()))
    }
}

/// The one place domain errors become gRPC status codes.
impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        use CoordinatorError as E;
        let message = e.to_string();
        match e {
            E::Config(_) | E::InvalidSpec(_) | E::InvalidRequest(_) | E::Flag { .. } => {
                tonic::Status::invalid_argument(message)
            }
            E::NotFound(_) => tonic::Status::not_found(message),
            E::Refused(_) => tonic::Status::failed_precondition(message),
            E::RankHeld(_) => tonic::Status::already_exists(message),
            E::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            E::Timeout(_) => tonic::Status::deadline_exceeded(message),
            E::Aborted(_) => tonic::Status::aborted(message),
            E::Store { .. } | E::Record { .. } => {
                tracing::error!(error = %message, "state store failure");
                tonic::Status::internal(message)
            }
            E::Listen { .. } | E::Connect { .. } | E::Rpc(_) | E::Spawn { .. } | E::Signal(_) | E::Random(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_map_to_grpc_codes() {
        let cases = [
            (CoordinatorError::NotFound("no job".into()), tonic::Code::NotFound),
            (
                CoordinatorError::Refused("stopping".into()),
                tonic::Code::FailedPrecondition,
            ),
            (CoordinatorError::RankHeld("held".into()), tonic::Code::AlreadyExists),
            (
                CoordinatorError::InvalidRequest("rank 9".into()),
                tonic::Code::InvalidArgument,
            ),
            (
                CoordinatorError::InvalidSpec(PlanError::NoRanks),
                tonic::Code::InvalidArgument,
            ),
            (
                CoordinatorError::Unauthenticated("token".into()),
                tonic::Code::Unauthenticated,
            ),
            (CoordinatorError::Timeout("late".into()), tonic::Code::DeadlineExceeded),
            (CoordinatorError::Aborted("ended".into()), tonic::Code::Aborted),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let status = tonic::Status::from(error);
            assert_eq!((status.code(), status.message()), (code, text.as_str()));
        }
    }
}
