//! Collective communication between ranks. This issue only probes NCCL; the collectives
//! (NCCL and the CPU TCP ring) arrive with distributed training.

pub mod nccl;
