//! Learning-rate schedules: DeepSpeed's `WarmupLR`, `WarmupDecayLR` and `WarmupCosineLR`
//! (`deepspeed/runtime/lr_schedules.py`), the original project's `--scheduler_name linear`
//! (transformers' linear warm-up and decay), and a constant rate.
//!
//! `lr(k)` is the rate of the k-th optimizer step (k = 0 first). DeepSpeed sets the rate of
//! iteration -1 when the scheduler is built (`warmup_min_lr`; 0 for `WarmupCosineLR`) and steps
//! the scheduler after every optimizer step, so step k runs at iteration k − 1. transformers'
//! `LambdaLR` runs step k at `lambda(k)`.

use kormlm_proto::ds_config::{SchedulerConfig, WarmupType};

#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Constant {
        lr: f64,
    },
    Warmup {
        min_lr: f64,
        max_lr: f64,
        warmup_steps: u64,
        warmup_type: WarmupType,
        /// `Some(total)`: WarmupDecayLR's linear decay to 0 at `total`.
        decay_total: Option<u64>,
    },
    WarmupCosine {
        base_lr: f64,
        total_steps: u64,
        warmup_min_ratio: f64,
        warmup_steps: u64,
        cos_min_ratio: f64,
        warmup_type: WarmupType,
    },
    /// transformers' `get_linear_schedule_with_warmup`.
    Linear {
        base_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    },
}

fn warmup_gamma(it: u64, warmup_steps: u64, warmup_type: WarmupType) -> f64 {
    match warmup_type {
        WarmupType::Log => ((it + 1) as f64).ln() / (warmup_steps as f64).ln(),
        WarmupType::Linear => it as f64 / warmup_steps as f64,
    }
}

impl Schedule {
    /// The schedule of a DeepSpeed config; `base_lr` is the optimizer's lr.
    pub fn from_config(config: Option<&SchedulerConfig>, base_lr: f64) -> Self {
        match config {
            None => Schedule::Constant { lr: base_lr },
            Some(SchedulerConfig::WarmupLR {
                warmup_min_lr,
                warmup_max_lr,
                warmup_num_steps,
                warmup_type,
            }) => Schedule::Warmup {
                min_lr: *warmup_min_lr,
                max_lr: warmup_max_lr.unwrap_or(base_lr),
                warmup_steps: *warmup_num_steps,
                warmup_type: *warmup_type,
                decay_total: None,
            },
            Some(SchedulerConfig::WarmupDecayLR {
                warmup_min_lr,
                warmup_max_lr,
                warmup_num_steps,
                warmup_type,
                total_num_steps,
            }) => Schedule::Warmup {
                min_lr: *warmup_min_lr,
                max_lr: warmup_max_lr.unwrap_or(base_lr),
                warmup_steps: *warmup_num_steps,
                warmup_type: *warmup_type,
                decay_total: Some(*total_num_steps),
            },
            Some(SchedulerConfig::WarmupCosineLR {
                total_num_steps,
                warmup_min_ratio,
                warmup_num_steps,
                cos_min_ratio,
                warmup_type,
            }) => Schedule::WarmupCosine {
                base_lr,
                total_steps: *total_num_steps,
                warmup_min_ratio: *warmup_min_ratio,
                warmup_steps: *warmup_num_steps,
                cos_min_ratio: *cos_min_ratio,
                warmup_type: *warmup_type,
            },
        }
    }

    pub fn lr(&self, step: u64) -> f64 {
        match *self {
            Schedule::Linear { .. } | Schedule::Constant { .. } => self.at_iteration(step),
            Schedule::Warmup { min_lr, .. } if step == 0 => min_lr,
            Schedule::WarmupCosine { .. } if step == 0 => 0.0,
            _ => self.at_iteration(step - 1),
        }
    }

    /// The rate at scheduler iteration `it` (DeepSpeed's `last_batch_iteration`).
    fn at_iteration(&self, it: u64) -> f64 {
        match *self {
            Schedule::Constant { lr } => lr,
            Schedule::Warmup {
                min_lr,
                max_lr,
                warmup_steps,
                warmup_type,
                decay_total,
            } => {
                let gamma = if it < warmup_steps {
                    warmup_gamma(it, warmup_steps, warmup_type)
                } else {
                    match decay_total {
                        None => 1.0,
                        Some(total) => {
                            ((total as f64 - it as f64) / (total.saturating_sub(warmup_steps) as f64).max(1.0)).max(0.0)
                        }
                    }
                };
                min_lr + (max_lr - min_lr) * gamma
            }
            Schedule::WarmupCosine {
                base_lr,
                total_steps,
                warmup_min_ratio,
                warmup_steps,
                cos_min_ratio,
                warmup_type,
            } => {
                let ratio = if it < warmup_steps {
                    let r = warmup_gamma(it, warmup_steps, warmup_type);
                    warmup_min_ratio + r * (1.0 - warmup_min_ratio)
                } else {
                    let real_last = (it - warmup_steps + 1) as f64;
                    let real_total = total_steps as f64 - warmup_steps as f64;
                    let r = (1.0 + (std::f64::consts::PI * real_last / real_total).cos()) / 2.0;
                    (cos_min_ratio + (1.0 - cos_min_ratio) * r).max(0.0)
                };
                base_lr * ratio
            }
            Schedule::Linear {
                base_lr,
                warmup_steps,
                total_steps,
            } => {
                let factor = if it < warmup_steps {
                    it as f64 / warmup_steps.max(1) as f64
                } else {
                    ((total_steps as f64 - it as f64) / (total_steps.saturating_sub(warmup_steps) as f64).max(1.0))
                        .max(0.0)
                };
                base_lr * factor
            }
        }
    }
}
