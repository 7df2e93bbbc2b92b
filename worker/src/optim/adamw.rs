//! AdamW over a range of the flat buffers, with the arithmetic of `torch.optim.AdamW`.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

/// State for elements `[start, start + len)` of the flat buffers.
pub struct AdamW {
    pub params: AdamWParams,
    pub start: i64,
    pub len: i64,
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Per-element decay factor (0 or 1) for this range; `None`: decay everything.
    decay_mask: Option<Tensor>,
}

impl AdamW {
    pub fn new(params: AdamWParams, start: i64, len: i64, device: tch::Device, decay_mask: Option<Tensor>) -> Self {
        Self {
            params,
            start,
            len,
            step: 0,
            exp_avg: Tensor::zeros([len], (Kind::Float, device)),
            exp_avg_sq: Tensor::zeros([len], (Kind::Float, device)),
            decay_mask: decay_mask.map(|m| m.narrow(0, start, len).contiguous()),
        }
    }

    /// Bytes of optimizer state this instance holds (moments; the fp32 weights live in the
    /// flat buffer and are counted by the caller).
    pub fn state_bytes(&self) -> u64 {
        (self.exp_avg.numel() + self.exp_avg_sq.numel()) as u64 * 4
    }

    /// One step at learning rate `lr` on `flat_params[start..]` with `flat_grads[start..]`.
    pub fn step(&mut self, flat_params: &Tensor, flat_grads: &Tensor, lr: f64) {
        let AdamWParams {
            betas: (b1, b2),
            eps,
            weight_decay,
        } = self.params;
        self.step += 1;
        tch::no_grad(|| {
            let mut p = flat_params.narrow(0, self.start, self.len);
            let g = flat_grads.narrow(0, self.start, self.len);
            match &self.decay_mask {
                None => {
                    let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                Some(mask) => {
                    let factor = mask.g_mul_scalar(-lr * weight_decay).g_add_scalar(1.0);
                    let _ = p.g_mul_(&factor);
                }
            }
            let _ = self.exp_avg.lerp_(&g, 1.0 - b1);
            let _ = self.exp_avg_sq.g_mul_scalar_(b2);
            let _ = self.exp_avg_sq.g_add_(&(&g * &g).g_mul_scalar(1.0 - b2));
            let bias_correction1 = 1.0 - b1.powi(self.step as i32);
            let bias_correction2 = 1.0 - b2.powi(self.step as i32);
            let step_size = lr / bias_correction1;
            let denom = (self.exp_avg_sq.sqrt() / bias_correction2.sqrt()).g_add_scalar(eps);
            let _ = p.g_sub_(&(&self.exp_avg / denom).g_mul_scalar(step_size));
        });
    }
}
