//! One rank's optimisation state and its two operations: accumulate the gradient of a
//! micro-batch, and take an optimizer step (exchange the gradients with the other ranks, clip,
//! AdamW on this rank's partition, schedule, fp16 loss scaling, share the updated weights).

use crate::autocast::PrecisionError;
use crate::batch::MaskedBatch;
use crate::comm::{Collective, CommError};
use crate::model::{LoadedClassifier, LoadedModel};
use crate::optim::adamw::{AdamW, AdamWParams};
use crate::optim::flat::FlatParams;
use crate::optim::loss_scale::{DynamicLossScaler, LossScaleError};
use crate::optim::partition::{Exchange, Partition};
use crate::optim::schedule::Schedule;
use kormlm_proto::ds_config::{OptimizerKind, ResolvedConfig, Toggle};
use kormlm_proto::train_args::TrainArgs;
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};

pub use crate::autocast::Precision;

/// Decides the precision from the config and the device. `"auto"` means on with CUDA; on the
/// CPU, `"bf16": {"enabled": true}` trains with CPU autocast in bfloat16 (an error on a CPU
/// without AVX-512 BF16/AMX), and fp16 (CUDA only) falls back to fp32 with a warning, as before.
pub fn precision(config: &ResolvedConfig, device: Device) -> Result<Precision, PrecisionError> {
    let cuda = device.is_cuda();
    let wanted = |t: Toggle| match t {
        Toggle::On => true,
        Toggle::Auto => cuda,
        Toggle::Off => false,
    };
    if config.config.bf16 == Toggle::On {
        let setting = "\"bf16\": {\"enabled\": true} in the DeepSpeed config";
        crate::autocast::check(Precision::Bf16, device, setting, "\"bf16\": {\"enabled\": false}")?;
        return Ok(Precision::Bf16);
    }
    if config.config.fp16.enabled == Toggle::On && !cuda {
        tracing::warn!("fp16 needs CUDA; training in fp32 on the CPU (bf16 runs on CPUs with AVX-512 BF16/AMX)");
    }
    Ok(if cuda && wanted(config.config.fp16.enabled) {
        Precision::Fp16
    } else if cuda && wanted(config.config.bf16) {
        Precision::Bf16
    } else {
        Precision::Fp32
    })
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    LossScale(#[from] LossScaleError),
}

/// What an optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub lr: f64,
    pub grad_norm: f64,
    /// fp16 overflow: the step was skipped.
    pub skipped: bool,
}

/// A model the trainer can optimise: its variables, and how it is saved (Hugging Face layout).
pub trait TrainableModel {
    fn var_store(&self) -> &VarStore;
    fn save(&self, dir: &std::path::Path) -> Result<(), crate::model::ModelError>;
}

impl TrainableModel for LoadedModel {
    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn save(&self, dir: &std::path::Path) -> Result<(), crate::model::ModelError> {
        LoadedModel::save(self, dir)
    }
}

impl TrainableModel for LoadedClassifier {
    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn save(&self, dir: &std::path::Path) -> Result<(), crate::model::ModelError> {
        LoadedClassifier::save(self, dir)
    }
}

/// The optimisation state of one rank over a model `M` (the masked-LM unless said otherwise).
pub struct Trainer<M = LoadedModel> {
    pub loaded: M,
    pub flat: FlatParams,
    /// This rank's range of `flat`, which `optimizer` steps.
    pub partition: Partition,
    pub optimizer: AdamW,
    pub schedule: Schedule,
    pub scaler: Option<DynamicLossScaler>,
    pub precision: Precision,
    pub clip: f64,
    pub device: Device,
    /// Optimizer steps taken (the scheduler's iteration).
    pub steps: u64,
    pub skipped_steps: u64,
}

/// The AdamW hyper-parameters and learning rate of a config (or of the training flags when
/// the config has no optimizer section).
pub fn optimizer_settings(config: &ResolvedConfig, args: &TrainArgs) -> (AdamWParams, f64) {
    match &config.config.optimizer {
        Some(o) => (
            AdamWParams {
                betas: o.betas,
                eps: o.eps,
                weight_decay: o.weight_decay,
                decoupled: o.kind != OptimizerKind::Adam { adam_w_mode: false },
            },
            o.lr,
        ),
        None => (
            AdamWParams {
                betas: (0.9, 0.999),
                eps: args.eps,
                weight_decay: args.weight_decay,
                decoupled: true,
            },
            args.learning_rate,
        ),
    }
}

/// The schedule: `--scheduler_name linear` (warm-up over `--warmup_proportion` of
/// `total_steps`), else the config's.
pub fn schedule(config: &ResolvedConfig, args: &TrainArgs, base_lr: f64, total_steps: u64) -> Schedule {
    match args.scheduler_name.as_deref() {
        Some("linear") => Schedule::Linear {
            base_lr,
            warmup_steps: (total_steps as f64 * args.warmup_proportion) as u64,
            total_steps,
        },
        _ => Schedule::from_config(config.config.scheduler.as_ref(), base_lr),
    }
}

impl<M: TrainableModel> Trainer<M> {
    /// The trainer of rank `group.rank()` of `group`; the config's ZeRO stage decides whether
    /// the optimizer state is sharded over the ranks.
    pub fn new(
        loaded: M,
        config: &ResolvedConfig,
        args: &TrainArgs,
        total_steps: u64,
        group: &dyn Collective,
    ) -> Result<Self, PrecisionError> {
        let device = loaded.var_store().device();
        let (rank, world) = (group.rank(), group.world_size());
        let flat = FlatParams::new(loaded.var_store(), Partition::alignment(world));
        let partition = Partition::new(flat.padded_numel(), rank, world, config.config.zero.stage);
        let (params, base_lr) = optimizer_settings(config, args);
        let mask = args.decay_exclude_bias_layernorm.then(|| flat.decay_mask());
        let optimizer = AdamW::new(params, partition.local(), device, mask);
        let precision = precision(config, device)?;
        Ok(Self {
            schedule: schedule(config, args, base_lr, total_steps),
            scaler: (precision == Precision::Fp16).then(|| DynamicLossScaler::from_config(&config.config.fp16)),
            precision,
            clip: config.config.gradient_clipping,
            device,
            flat,
            partition,
            optimizer,
            loaded,
            steps: 0,
            skipped_steps: 0,
        })
    }

    /// Forward and backward of one micro-batch: `loss_sum` computes the batch's summed loss
    /// (f32) from the model, under the training precision's autocast; its gradient is taken
    /// divided by `divisor` (the count the global batch's mean divides by, so gradients
    /// accumulated over micro-batches and ranks are those of the global mean) and times the fp16
    /// loss scale. Returns the sum.
    pub fn backward_loss(&mut self, divisor: f64, loss_sum: impl FnOnce(&M) -> Tensor) -> f64 {
        let model = &self.loaded;
        let loss_sum = crate::autocast::with(self.precision, self.device, || loss_sum(model));
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.cur_scale);
        (&loss_sum * (scale / divisor)).backward();
        loss_sum.double_value(&[])
    }

    /// Bytes of optimizer state this rank holds: the moments and its fp32 weights.
    pub fn optimizer_state_bytes(&self) -> u64 {
        self.optimizer.state_bytes() + self.partition.local().len as u64 * 4
    }

    /// The optimizer step on the gradients accumulated since the last one: gathered into the
    /// flat buffer, exchanged with the other ranks as the partition says, the global gradient
    /// norm taken, then clipping, AdamW and the schedule; under ZeRO the updated shards are
    /// all-gathered.
    pub fn step(&mut self, group: &mut dyn Collective) -> Result<StepReport, StepError> {
        self.flat.gather_grads();
        let exchange = self.partition.exchange();
        let grads = &self.flat.grads;
        let whole_norm_sq = || tch::no_grad(|| grads.norm().double_value(&[])).powi(2);
        let norm_sq = match exchange {
            Exchange::None => whole_norm_sq(),
            Exchange::AllReduce => {
                group.all_reduce_sum(grads)?;
                whole_norm_sq()
            }
            Exchange::ReduceScatter => {
                group.reduce_scatter_sum(grads)?;
                let local = self.partition.local();
                let mut norm_sq = [tch::no_grad(|| {
                    grads
                        .narrow(0, local.start, local.len)
                        .square()
                        .sum(Kind::Double)
                        .double_value(&[])
                })];
                group.all_reduce_scalars(&mut norm_sq)?;
                norm_sq[0]
            }
        };
        let report = self.apply(norm_sq)?;
        if exchange == Exchange::ReduceScatter {
            group.all_gather(&self.flat.params)?;
        }
        Ok(report)
    }

    /// Gradient clipping, AdamW and the schedule, on the gradients in `flat.grads` (already
    /// summed over ranks on this rank's range). `grad_norm_sq` is the squared global gradient
    /// norm (all ranks' partitions).
    fn apply(&mut self, grad_norm_sq: f64) -> Result<StepReport, LossScaleError> {
        let mut norm = grad_norm_sq.sqrt();
        let mut overflow = !norm.is_finite();
        // Unscaling and clipping are folded into the optimizer's one pass over the gradients.
        let mut grad_scale = 1.0;
        if let Some(scaler) = &mut self.scaler {
            let scale = scaler.cur_scale;
            norm /= scale;
            overflow = !norm.is_finite();
            scaler.update_scale(overflow)?;
            grad_scale = 1.0 / scale;
        }
        if overflow {
            self.skipped_steps += 1;
            self.flat.zero_grad();
            return Ok(StepReport {
                lr: self.schedule.lr(self.steps),
                grad_norm: norm,
                skipped: true,
            });
        }
        if self.clip > 0.0 {
            let coef = self.clip / (norm + 1e-6);
            if coef < 1.0 {
                grad_scale *= coef;
            }
        }
        let lr = self.schedule.lr(self.steps);
        self.optimizer.step(&self.flat.params, &self.flat.grads, lr, grad_scale);
        self.steps += 1;
        self.flat.zero_grad();
        Ok(StepReport {
            lr,
            grad_norm: norm,
            skipped: false,
        })
    }
}

impl Trainer<LoadedModel> {
    /// Forward and backward of one masked-LM micro-batch; the loss is the masked-token
    /// cross-entropy sum divided by `divisor` (the masked-token count of the whole global
    /// batch), so gradients accumulated over micro-batches and ranks are those of the global
    /// mean. Returns the sum.
    pub fn backward(&mut self, batch: &MaskedBatch, divisor: f64) -> f64 {
        if batch.masked == 0 {
            return 0.0;
        }
        self.backward_loss(divisor, |loaded| {
            let logits = loaded
                .model
                .logits_at(&batch.input_ids, &batch.attention_mask, &batch.positions, true);
            logits
                .to_kind(Kind::Float)
                .cross_entropy_loss::<Tensor>(&batch.labels, None, Reduction::Sum, -100, 0.0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kormlm_proto::ds_config::DsConfig;

    fn resolved(json: &str) -> ResolvedConfig {
        DsConfig::parse(json, "t.json")
            .unwrap()
            .config
            .resolve(1, "t.json")
            .unwrap()
    }

    #[test]
    fn precision_follows_config_and_device() {
        let fp16_auto = resolved(r#"{"train_batch_size": 8, "fp16": {"enabled": "auto"}}"#);
        let bf16 = resolved(r#"{"train_batch_size": 8, "bf16": {"enabled": true}}"#);
        let fp16_on = resolved(r#"{"train_batch_size": 8, "fp16": {"enabled": true}}"#);
        assert_eq!(precision(&fp16_auto, Device::Cpu).unwrap(), Precision::Fp32);
        assert_eq!(precision(&fp16_on, Device::Cpu).unwrap(), Precision::Fp32);
        match precision(&bf16, Device::Cpu) {
            Ok(p) => {
                assert!(crate::autocast::CpuBf16::probe().supported());
                assert_eq!(p, Precision::Bf16);
            }
            Err(e) => {
                assert!(!crate::autocast::CpuBf16::probe().supported());
                assert!(e.to_string().contains("\"bf16\""), "{e}");
            }
        }
        assert_eq!(precision(&fp16_auto, Device::Cuda(0)).unwrap(), Precision::Fp16);
        assert_eq!(precision(&bf16, Device::Cuda(0)).unwrap(), Precision::Bf16);
    }
}
