//! AdamW over a range of the flat buffers, with the arithmetic of `torch.optim.AdamW` — or, for
//! DeepSpeed's `Adam` with `adam_w_mode: false`, of `torch.optim.Adam` (L2 weight decay added to
//! the gradient).

use super::partition::PartitionRange;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled decay of the weights; false: L2, `weight_decay · p` added to the gradient.
    pub decoupled: bool,
}

/// State for one range of the flat buffers (this rank's partition).
pub struct AdamW {
    pub params: AdamWParams,
    start: i64,
    len: i64,
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Per-element decay factor (0 or 1) for this range; `None`: decay everything.
    decay_mask: Option<Tensor>,
    /// Workspace of the range's size, reused every step (no per-step allocation).
    scratch: Tensor,
}

impl AdamW {
    /// `decay_mask` covers the whole flat buffer; the optimizer keeps its `range` of it.
    pub fn new(params: AdamWParams, range: PartitionRange, device: tch::Device, decay_mask: Option<Tensor>) -> Self {
        let PartitionRange { start, len, .. } = range;
        Self {
            params,
            start,
            len,
            step: 0,
            exp_avg: Tensor::zeros([len], (Kind::Float, device)),
            exp_avg_sq: Tensor::zeros([len], (Kind::Float, device)),
            decay_mask: decay_mask.map(|m| m.narrow(0, start, len).contiguous()),
            scratch: Tensor::zeros([len], (Kind::Float, device)),
        }
    }

    /// Bytes of optimizer state this instance holds (moments; the fp32 weights live in the
    /// flat buffer and are counted by the caller).
    pub fn state_bytes(&self) -> u64 {
        (self.exp_avg.numel() + self.exp_avg_sq.numel()) as u64 * 4
    }

    /// One step at learning rate `lr` on this range of `flat_params` with that of `flat_grads`,
    /// entirely in place.
    pub fn step(&mut self, flat_params: &Tensor, flat_grads: &Tensor, lr: f64) {
        let AdamWParams {
            betas: (b1, b2),
            eps,
            weight_decay,
            decoupled,
        } = self.params;
        self.step += 1;
        let bias_correction1 = 1.0 - b1.powi(self.step as i32);
        let bias_correction2 = 1.0 - b2.powi(self.step as i32);
        let step_size = lr / bias_correction1;
        tch::no_grad(|| {
            let mut p = flat_params.narrow(0, self.start, self.len);
            let mut g = flat_grads.narrow(0, self.start, self.len);
            let tmp = &mut self.scratch;
            match &self.decay_mask {
                _ if weight_decay == 0.0 => {}
                _ if !decoupled => {
                    tmp.copy_(&p);
                    let _ = tmp.g_mul_scalar_(weight_decay);
                    if let Some(mask) = &self.decay_mask {
                        let _ = tmp.g_mul_(mask);
                    }
                    // The gradient partition is consumed by this step and zeroed before the next.
                    let _ = g.g_add_(tmp);
                }
                None => {
                    let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                Some(mask) => {
                    tmp.copy_(mask);
                    let _ = tmp.g_mul_scalar_(-lr * weight_decay);
                    let _ = tmp.g_add_scalar_(1.0);
                    let _ = p.g_mul_(tmp);
                }
            }
            let _ = self.exp_avg.lerp_(&g, 1.0 - b1);
            // v = b2·v + (1 − b2)·g²
            tmp.copy_(&g);
            let _ = tmp.g_mul_scalar_(1.0 - b2);
            let _ = self.exp_avg_sq.g_mul_scalar_(b2);
            let _ = self.exp_avg_sq.addcmul_(&g, tmp);
            // p −= step_size · m / (√v / √bc2 + eps), as p += m / (denominator · (−1/step_size))
            let _ = self.exp_avg_sq.sqrt_out(tmp);
            let _ = tmp.g_mul_scalar_(1.0 / bias_correction2.sqrt());
            let _ = tmp.g_add_scalar_(eps);
            let _ = tmp.g_mul_scalar_(-1.0 / step_size);
            let _ = p.addcdiv_(&self.exp_avg, tmp);
        });
    }
}
