//! The contract between kormlm's coordinator and its workers.
//!
//! * [`v1`]: generated gRPC types and services (`kormlm.v1`). `JobService` is what users, the
//!   `coordinator status|watch|list|kill|resume` commands and any generic gRPC client talk to;
//!   `WorkerService` is what `worker` daemons talk to.
//! * [`ds_config`]: the DeepSpeed config, validated by the coordinator and resolved for workers.
//! * [`train_args`]: the original project's training flags; [`augment_args`]: augmentation's;
//!   [`augment_eval_args`]: the downstream experiment's; [`classify_args`]: a classifier's data.
//! * [`job_plan`]: a job spec resolved for a world size (config, batch rule, flags).
//! * [`auth`]: the token every client call carries; [`secret`]: the token on disk and in the
//!   environment; [`tls`]: the client side of TLS.
//! * [`failure`]: the kinds of failure workers report and the coordinator decides on.
//! * [`durable`]: files written whole or not at all (temporary name, flush, rename).

pub mod augment_args;
pub mod augment_eval_args;
pub mod augment_parts;
pub mod auth;
pub mod classify_args;
pub mod ds_config;
pub mod durable;
pub mod failure;
mod flag_map;
pub mod job_plan;
pub mod run_file;
pub mod secret;
pub mod tls;
pub mod train_args;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("kormlm.v1");
}

/// Encoded `FileDescriptorSet` of `kormlm.proto`, served through gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kormlm_descriptor");

/// Wire-protocol version, sent by workers on registration and checked by the coordinator.
pub const PROTOCOL_VERSION: u32 = 1;

/// gRPC metadata key carrying the shared secret on `JobService` calls.
pub const TOKEN_METADATA: &str = "x-kormlm-token";

/// Milliseconds since the Unix epoch (0 if the clock is before it), the unit of every timestamp
/// in the API.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
