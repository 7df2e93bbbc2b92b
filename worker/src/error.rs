//! The worker's one error type: every module's error enum, wrapped as it is, and the one
//! classification of each into the `FailureKind` the coordinator decides restarts by. Messages
//! stay the modules' own (they name the file, flag or rank); the kind is derived from the
//! variants, never from the text — except libtorch's errors, whose only description of an
//! out-of-memory condition is its message.

use crate::augment::AugmentError;
use crate::augment_eval::AugmentEvalError;
use crate::classify::ClassifyError;
use crate::comm::CommError;
use crate::corpus::CorpusError;
use crate::dataset::DatasetError;
use crate::device::DeviceError;
use crate::fill_mask::FillMaskError;
use crate::lines::InputError;
use crate::model::ModelError;
use crate::tokenizer::TokenizerError;
use crate::train::checkpoint::CheckpointError;
use crate::train::TrainError;
use kormlm_proto::augment_parts::PartsError;
use kormlm_proto::ds_config::ConfigError;
use kormlm_proto::failure::FailureKind;
use kormlm_proto::job_plan::PlanError;
use std::path::PathBuf;

/// Forming the collective group failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The coordinator's rendezvous refused or timed out.
    #[error("rendezvous: {}", .0.message())]
    Rendezvous(tonic::Status),
    /// The blocking set-up of the group (NCCL init, ring connect) panicked or was cancelled.
    #[error("rendezvous: {0}")]
    GroupSetUp(tokio::task::JoinError),
    #[error(transparent)]
    Comm(#[from] CommError),
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The config or the flags of `worker train`.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The assignment's flags or resolved config cannot be decoded (a coordinator of another
    /// version).
    #[error("assignment: {0}")]
    Assignment(PlanError),
    /// A task this worker does not know (a coordinator of another version).
    #[error("task {0} is not supported by this worker")]
    UnsupportedTask(i32),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Augment(#[from] AugmentError),
    #[error(transparent)]
    AugmentEval(#[from] AugmentEvalError),
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    #[error(transparent)]
    FillMask(#[from] FillMaskError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Input(#[from] InputError),
    /// A file or directory the worker writes.
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    /// A result that cannot be written as JSON.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The work thread panicked (libtorch reports most of its errors, out-of-memory included,
    /// as panics of the tensor operations).
    #[error("the work panicked: {0}")]
    Panicked(String),
    #[error("cannot start the work thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(std::io::Error),
    #[error("the start-up task failed: {0}")]
    StartUp(tokio::task::JoinError),
    /// A stop signal (SIGTERM: preemption, a time limit, an eviction; SIGINT) stopped the work
    /// before it was complete; `detail` says where it can continue from.
    #[error("preempted: {signal}; {detail}")]
    Preempted { signal: &'static str, detail: String },
}

impl WorkerError {
    /// What kind of failure this is, for the coordinator's restart decision.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Plan(e) | Self::Assignment(e) => plan_kind(e),
            Self::UnsupportedTask(_) => FailureKind::Internal,
            Self::Device(e) => device_kind(e),
            Self::Model(e) => model_kind(e),
            Self::Tokenizer(e) => tokenizer_kind(e),
            Self::Train(e) => train_kind(e),
            Self::Augment(e) => augment_kind(e),
            Self::AugmentEval(e) => augment_eval_kind(e),
            Self::Classify(e) => classify_kind(e),
            Self::FillMask(e) => fill_mask_kind(e),
            Self::Job(e) => job_kind(e),
            Self::Input(e) => input_kind(e),
            Self::Io { .. } => FailureKind::Io,
            Self::Json(_) | Self::Thread(_) | Self::Signals(_) | Self::StartUp(_) => FailureKind::Internal,
            Self::Panicked(message) => torch_kind(message),
            Self::Preempted { .. } => FailureKind::Preempted,
        }
    }

    /// A panic payload of the work thread as an error.
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "no message".into());
        Self::Panicked(message)
    }
}

/// libtorch's own errors: out of memory is told apart only by its message.
fn torch_kind(message: &str) -> FailureKind {
    const OUT_OF_MEMORY: [&str; 3] = [
        "out of memory",
        "CUDA out of memory",
        "DefaultCPUAllocator: can't allocate",
    ];
    if OUT_OF_MEMORY.iter().any(|m| message.contains(m)) {
        FailureKind::OutOfMemory
    } else {
        FailureKind::Internal
    }
}

fn config_kind(e: &ConfigError) -> FailureKind {
    match e {
        ConfigError::Read { .. } => FailureKind::Io,
        ConfigError::Json { .. } | ConfigError::Key { .. } | ConfigError::Batch { .. } => FailureKind::BadInput,
    }
}

fn plan_kind(e: &PlanError) -> FailureKind {
    match e {
        PlanError::Config(e) => config_kind(e),
        PlanError::NoRanks | PlanError::Flags(_) => FailureKind::BadInput,
        PlanError::WorkingDirectory(_) => FailureKind::Io,
    }
}

fn device_kind(e: &DeviceError) -> FailureKind {
    match e {
        DeviceError::Unknown(_) | DeviceError::Libraries { .. } => FailureKind::BadInput,
        DeviceError::Unavailable { message, .. } => torch_kind(message),
    }
}

fn tokenizer_kind(e: &TokenizerError) -> FailureKind {
    match e {
        TokenizerError::File { .. } | TokenizerError::Missing { .. } | TokenizerError::NoSpecialToken { .. } => {
            FailureKind::BadInput
        }
        TokenizerError::Encode(_) => FailureKind::Internal,
    }
}

fn model_kind(e: &ModelError) -> FailureKind {
    match e {
        ModelError::Io { .. } => FailureKind::Io,
        // The hub may be unreachable only for a while: another attempt can succeed.
        ModelError::Hub { .. } => FailureKind::Io,
        ModelError::Config { .. }
        | ModelError::Format { .. }
        | ModelError::MissingFile { .. }
        | ModelError::Shape { .. }
        | ModelError::MissingWeights { .. } => FailureKind::BadInput,
        ModelError::Tokenizer(e) => tokenizer_kind(e),
    }
}

fn corpus_kind(e: &CorpusError) -> FailureKind {
    match e {
        CorpusError::Io { .. } => FailureKind::Io,
        CorpusError::Row { .. }
        | CorpusError::Column { .. }
        | CorpusError::Spec { .. }
        | CorpusError::DataPath { .. } => FailureKind::BadInput,
    }
}

fn dataset_kind(e: &DatasetError) -> FailureKind {
    match e {
        DatasetError::Tokenizer(e) => tokenizer_kind(e),
        DatasetError::Cache { .. } => FailureKind::Io,
    }
}

fn comm_kind(e: &CommError) -> FailureKind {
    match e {
        CommError::PeerLost { .. } => FailureKind::PeerLost,
        CommError::Timeout { .. } => FailureKind::CollectiveTimeout,
        // Only a worker that drops its own work aborts its group; that failure is not reported.
        CommError::Failed { .. } | CommError::Aborted { .. } => FailureKind::Internal,
    }
}

fn checkpoint_kind(e: &CheckpointError) -> FailureKind {
    match e {
        CheckpointError::Io { .. } => FailureKind::Io,
        // Read back while resuming, a damaged checkpoint stays damaged: the coordinator picks the
        // previous complete one (a checkpoint that could not be completed is equally unusable).
        CheckpointError::Invalid { .. } => FailureKind::CheckpointUnreadable,
        // A rank could not write its part (a full disk): a later attempt may succeed.
        CheckpointError::NotWritten { .. } => FailureKind::Io,
        CheckpointError::Comm(e) => comm_kind(e),
    }
}

fn train_kind(e: &TrainError) -> FailureKind {
    match e {
        TrainError::Model(e) => model_kind(e),
        TrainError::Corpus(e) => corpus_kind(e),
        TrainError::Dataset(e) => dataset_kind(e),
        TrainError::Comm(e) => comm_kind(e),
        TrainError::Checkpoint(e) => checkpoint_kind(e),
        TrainError::Output { .. } => FailureKind::Io,
        TrainError::UnreadableCheckpoint { .. } => FailureKind::CheckpointUnreadable,
        TrainError::Step(message) => torch_kind(message),
        TrainError::EmptyCorpus(_) => FailureKind::BadInput,
        TrainError::OutputDirInUse { .. } => FailureKind::BadInput,
        TrainError::Precision(_) => FailureKind::BadInput,
        TrainError::Torch(e) => torch_kind(&e.to_string()),
        TrainError::Tokenizer(e) => tokenizer_kind(e),
    }
}

fn classify_kind(e: &ClassifyError) -> FailureKind {
    match e {
        ClassifyError::Corpus(e) => corpus_kind(e),
        ClassifyError::Model(e) => model_kind(e),
        ClassifyError::Train(e) => train_kind(e),
        ClassifyError::Config(_) | ClassifyError::Plan(_) | ClassifyError::Data { .. } | ClassifyError::Usage(_) => {
            FailureKind::BadInput
        }
        ClassifyError::Device(e) => device_kind(e),
        ClassifyError::Tokenizer(e) => tokenizer_kind(e),
        ClassifyError::Output { .. } => FailureKind::Io,
        ClassifyError::Torch(e) => torch_kind(&e.to_string()),
    }
}

fn augment_eval_kind(e: &AugmentEvalError) -> FailureKind {
    match e {
        AugmentEvalError::Classify(e) => classify_kind(e),
        AugmentEvalError::Augment(e) => augment_kind(e),
        AugmentEvalError::Model(e) => model_kind(e),
        AugmentEvalError::Tokenizer(e) => tokenizer_kind(e),
        AugmentEvalError::Torch(e) => torch_kind(&e.to_string()),
        AugmentEvalError::Plot(_) | AugmentEvalError::Output { .. } => FailureKind::Io,
        AugmentEvalError::Usage(_) => FailureKind::BadInput,
    }
}

fn augment_kind(e: &AugmentError) -> FailureKind {
    match e {
        AugmentError::Tokenizer(e) => tokenizer_kind(e),
        AugmentError::Torch(e) => torch_kind(&e.to_string()),
        AugmentError::Output { .. } => FailureKind::Io,
        AugmentError::MissingFlag { .. } | AugmentError::InvalidFlag { .. } => FailureKind::BadInput,
        AugmentError::Input(e) => corpus_kind(e),
        AugmentError::Model(e) => model_kind(e),
        AugmentError::Parts(e) => parts_kind(e),
        AugmentError::Precision(_) => FailureKind::BadInput,
    }
}

fn parts_kind(e: &PartsError) -> FailureKind {
    match e {
        PartsError::Read { .. } | PartsError::Write(_) => FailureKind::Io,
        // Only the coordinator's merge meets these; a worker never does.
        PartsError::NoManifest { .. } | PartsError::MissingPart { .. } => FailureKind::Internal,
    }
}

fn fill_mask_kind(e: &FillMaskError) -> FailureKind {
    match e {
        FillMaskError::Tokenizer(e) => tokenizer_kind(e),
        FillMaskError::NoTargets => FailureKind::BadInput,
        FillMaskError::Torch(e) => torch_kind(&e.to_string()),
        FillMaskError::Precision(_) => FailureKind::BadInput,
    }
}

fn job_kind(e: &JobError) -> FailureKind {
    match e {
        JobError::Rendezvous(status) if status.code() == tonic::Code::DeadlineExceeded => {
            FailureKind::CollectiveTimeout
        }
        JobError::Rendezvous(_) | JobError::GroupSetUp(_) => FailureKind::Internal,
        JobError::Comm(e) => comm_kind(e),
    }
}

fn input_kind(e: &InputError) -> FailureKind {
    match e {
        InputError::Utf8 { .. } => FailureKind::BadInput,
        InputError::Io { .. } | InputError::Output { .. } => FailureKind::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailureKind::*;

    fn s() -> String {
        "x".into()
    }

    fn tokenizer_missing() -> TokenizerError {
        TokenizerError::Missing { dir: s() }
    }

    fn comm_timeout() -> CommError {
        CommError::Timeout {
            op: "all_gather",
            seconds: 120,
        }
    }

    fn peer_lost() -> CommError {
        CommError::PeerLost {
            op: "reduce_scatter",
            reason: s(),
        }
    }

    fn io_error() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full")
    }

    #[test]
    fn every_module_error_has_its_kind() {
        let oom = "CUDA out of memory. Tried to allocate 2.00 GiB";
        let cpu_oom = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory";
        let table: Vec<(WorkerError, FailureKind)> = vec![
            // Config and flags.
            (
                PlanError::Config(ConfigError::Read {
                    path: s(),
                    message: s(),
                })
                .into(),
                Io,
            ),
            (
                PlanError::Config(ConfigError::Json {
                    source_name: s(),
                    line: 1,
                    column: 2,
                    message: s(),
                })
                .into(),
                BadInput,
            ),
            (
                PlanError::Config(ConfigError::Key {
                    source_name: s(),
                    key: s(),
                    message: s(),
                })
                .into(),
                BadInput,
            ),
            (
                PlanError::Config(ConfigError::Batch {
                    source_name: s(),
                    message: s(),
                })
                .into(),
                BadInput,
            ),
            (PlanError::NoRanks.into(), BadInput),
            (PlanError::Flags(s()).into(), BadInput),
            (WorkerError::Assignment(PlanError::Flags(s())), BadInput),
            (WorkerError::UnsupportedTask(9), Internal),
            // Devices.
            (DeviceError::Unknown(s()).into(), BadInput),
            (
                DeviceError::Unavailable {
                    name: s(),
                    message: "this process sees 0 CUDA device(s)".into(),
                }
                .into(),
                Internal,
            ),
            (
                DeviceError::Unavailable {
                    name: s(),
                    message: format!("libtorch failed to compute there: {oom}"),
                }
                .into(),
                OutOfMemory,
            ),
            // Model files and the tokenizer.
            (
                ModelError::Io {
                    path: s(),
                    message: s(),
                }
                .into(),
                Io,
            ),
            (
                ModelError::Hub {
                    id: s(),
                    revision: s(),
                    message: s(),
                }
                .into(),
                Io,
            ),
            (
                ModelError::Config {
                    path: s(),
                    message: s(),
                }
                .into(),
                BadInput,
            ),
            (
                ModelError::Format {
                    path: s(),
                    message: s(),
                }
                .into(),
                BadInput,
            ),
            (ModelError::MissingFile { dir: s(), wanted: s() }.into(), BadInput),
            (
                ModelError::Shape {
                    path: s(),
                    key: s(),
                    expected: vec![1],
                    found: vec![2],
                }
                .into(),
                BadInput,
            ),
            (
                ModelError::MissingWeights {
                    path: s(),
                    keys: vec![s()],
                }
                .into(),
                BadInput,
            ),
            (ModelError::Tokenizer(tokenizer_missing()).into(), BadInput),
            (
                TokenizerError::File {
                    path: s(),
                    message: s(),
                }
                .into(),
                BadInput,
            ),
            (tokenizer_missing().into(), BadInput),
            (TokenizerError::NoSpecialToken { token: s() }.into(), BadInput),
            (TokenizerError::Encode(s()).into(), Internal),
            // Training.
            (
                TrainError::Model(ModelError::Io {
                    path: s(),
                    message: s(),
                })
                .into(),
                Io,
            ),
            (
                TrainError::Corpus(CorpusError::Io {
                    path: s(),
                    message: s(),
                })
                .into(),
                Io,
            ),
            (
                TrainError::Corpus(CorpusError::Row {
                    path: s(),
                    line: 3,
                    message: s(),
                })
                .into(),
                BadInput,
            ),
            (
                TrainError::Corpus(CorpusError::Column {
                    path: s(),
                    column: s(),
                    found: vec![],
                })
                .into(),
                BadInput,
            ),
            (
                TrainError::Corpus(CorpusError::Spec {
                    path: s(),
                    message: s(),
                })
                .into(),
                BadInput,
            ),
            (
                TrainError::Corpus(CorpusError::DataPath {
                    path: s(),
                    message: s(),
                })
                .into(),
                BadInput,
            ),
            (
                TrainError::Dataset(DatasetError::Tokenizer(tokenizer_missing())).into(),
                BadInput,
            ),
            (
                TrainError::Dataset(DatasetError::Cache {
                    path: s(),
                    message: s(),
                })
                .into(),
                Io,
            ),
            (TrainError::Comm(peer_lost()).into(), PeerLost),
            (TrainError::Comm(comm_timeout()).into(), CollectiveTimeout),
            (
                TrainError::Comm(CommError::Failed {
                    op: "nccl_init",
                    message: s(),
                })
                .into(),
                Internal,
            ),
            (
                TrainError::Comm(CommError::Aborted { op: "all_gather" }).into(),
                Internal,
            ),
            (
                TrainError::Checkpoint(CheckpointError::Io {
                    path: s(),
                    message: s(),
                })
                .into(),
                Io,
            ),
            (
                TrainError::Checkpoint(CheckpointError::Invalid {
                    path: s(),
                    message: s(),
                })
                .into(),
                CheckpointUnreadable,
            ),
            (
                TrainError::UnreadableCheckpoint {
                    path: "out/checkpoints/step-40".into(),
                    message: "trainer_state.json: No such file or directory".into(),
                }
                .into(),
                CheckpointUnreadable,
            ),
            (
                TrainError::Checkpoint(CheckpointError::Comm(peer_lost())).into(),
                PeerLost,
            ),
            (
                TrainError::Checkpoint(CheckpointError::NotWritten {
                    path: s(),
                    ranks: vec![1],
                    message: s(),
                })
                .into(),
                Io,
            ),
            (TrainError::OutputDirInUse { dir: s(), other: s() }.into(), BadInput),
            (
                AugmentError::Parts(PartsError::Read {
                    path: "out/.parts/manifest.json".into(),
                    message: s(),
                })
                .into(),
                Io,
            ),
            (
                TrainError::Output {
                    path: s(),
                    message: s(),
                }
                .into(),
                Io,
            ),
            (TrainError::Step("loss scale underflow".into()).into(), Internal),
            (TrainError::Step(oom.into()).into(), OutOfMemory),
            (TrainError::EmptyCorpus(s()).into(), BadInput),
            // Augmentation and fill-mask.
            (AugmentError::Tokenizer(tokenizer_missing()).into(), BadInput),
            (
                AugmentError::Torch(tch::TchError::Torch(cpu_oom.into())).into(),
                OutOfMemory,
            ),
            (AugmentError::Torch(tch::TchError::Torch(s())).into(), Internal),
            (
                AugmentError::Output {
                    path: "out.csv".into(),
                    error: std::io::Error::other("disk full"),
                }
                .into(),
                Io,
            ),
            (
                AugmentError::MissingFlag {
                    flag: "--input",
                    purpose: "the file to augment",
                }
                .into(),
                BadInput,
            ),
            (
                AugmentError::InvalidFlag {
                    flag: "--format",
                    value: "x".into(),
                    accepted: "text, csv",
                }
                .into(),
                BadInput,
            ),
            (FillMaskError::Tokenizer(tokenizer_missing()).into(), BadInput),
            (FillMaskError::NoTargets.into(), BadInput),
            (
                FillMaskError::Torch(tch::TchError::Torch(oom.into())).into(),
                OutOfMemory,
            ),
            // Forming the group.
            (
                JobError::Rendezvous(tonic::Status::deadline_exceeded("not every rank joined")).into(),
                CollectiveTimeout,
            ),
            (
                JobError::Rendezvous(tonic::Status::failed_precondition("attempt over")).into(),
                Internal,
            ),
            (JobError::Comm(comm_timeout()).into(), CollectiveTimeout),
            (JobError::Comm(peer_lost()).into(), PeerLost),
            // Lines, files, threads.
            (
                InputError::Utf8 {
                    source_name: s(),
                    line: 1,
                    byte: 0,
                }
                .into(),
                BadInput,
            ),
            (
                InputError::Io {
                    source_name: s(),
                    message: s(),
                }
                .into(),
                Io,
            ),
            (
                InputError::Output {
                    sink_name: s(),
                    message: s(),
                }
                .into(),
                Io,
            ),
            (
                WorkerError::Io {
                    path: "out.csv".into(),
                    error: io_error(),
                },
                Io,
            ),
            (WorkerError::Thread(io_error()), Internal),
            (WorkerError::Signals(io_error()), Internal),
            (WorkerError::Panicked("index out of range".into()), Internal),
            (WorkerError::Panicked(format!("Torch(\"{oom}\")")), OutOfMemory),
            // Stopped by a signal.
            (
                WorkerError::Preempted {
                    signal: "SIGTERM",
                    detail: "checkpoint at step 12".into(),
                },
                Preempted,
            ),
        ];
        for (error, kind) in &table {
            assert_eq!(error.kind(), *kind, "{error:?}");
        }
        let covered: std::collections::HashSet<_> = table.iter().map(|(_, k)| *k).collect();
        for kind in FailureKind::ALL {
            assert!(covered.contains(&kind), "no error of kind {kind} in the table");
        }
    }

    #[test]
    fn messages_are_the_modules_own() {
        let e = WorkerError::from(TrainError::Comm(comm_timeout()));
        assert_eq!(
            e.to_string(),
            "collective all_gather timed out after 120 s: a peer is gone or stuck"
        );
        let e = WorkerError::Assignment(PlanError::Flags("error: unexpected argument '--x' found".into()));
        assert_eq!(e.to_string(), "assignment: error: unexpected argument '--x' found");
        let e = WorkerError::from_panic(&"boom");
        assert_eq!(e.to_string(), "the work panicked: boom");
        let e = WorkerError::Preempted {
            signal: "SIGTERM",
            detail: "checkpoint at step 12".into(),
        };
        assert_eq!(e.to_string(), "preempted: SIGTERM; checkpoint at step 12");
    }
}
