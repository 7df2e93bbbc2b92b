//! Optimisation: parameters in one flat buffer, AdamW over a range of it (the whole buffer on
//! one rank, a partition under ZeRO), DeepSpeed's learning-rate schedules and fp16 loss scaler.

pub mod adamw;
pub mod flat;
pub mod loss_scale;
pub mod schedule;
