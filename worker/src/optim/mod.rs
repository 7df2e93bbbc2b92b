//! Optimisation: parameters in one flat buffer, its partition over the ranks, AdamW over this
//! rank's range of it (the whole buffer on one rank or at ZeRO stage 0, a shard at stage 1/2),
//! DeepSpeed's learning-rate schedules and fp16 loss scaler.

pub mod adamw;
pub mod flat;
pub mod loss_scale;
pub mod partition;
pub mod schedule;
