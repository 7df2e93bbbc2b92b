//! The contract between kormlm's coordinator and its workers.
//!
//! * [`v1`]: generated gRPC types and services (`kormlm.v1`). `JobService` is what users, the
//!   `coordinator status|watch|list|kill|resume` commands and any generic gRPC client talk to;
//!   `WorkerService` is what `worker` daemons talk to.
//! * [`ds_config`]: the DeepSpeed config, validated by the coordinator and resolved for workers.
//! * [`train_args`]: the original project's training flags.

pub mod augment_args;
pub mod augment_parts;
pub mod ds_config;
mod flag_map;
pub mod train_args;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("kormlm.v1");
}

/// Encoded `FileDescriptorSet` of `kormlm.proto`, served through gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kormlm_descriptor");

/// Wire-protocol version, sent by workers on registration and checked by the coordinator.
pub const PROTOCOL_VERSION: u32 = 1;
