//! DeepSpeed's dynamic fp16 loss scaler (`runtime/fp16/loss_scaler.py`, `DynamicLossScaler`):
//! on overflow the step is skipped and, once hysteresis is used up, the scale halves (not below
//! `min_scale`); after `scale_window` clean iterations it doubles.

use kormlm_proto::ds_config::Fp16Config;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LossScaleError {
    #[error("Current loss scale already at minimum - cannot decrease scale anymore")]
    AtMinimum,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DynamicLossScaler {
    pub cur_scale: f64,
    pub cur_iter: u64,
    pub last_overflow_iter: i64,
    pub scale_factor: f64,
    pub scale_window: u64,
    pub min_scale: f64,
    pub delayed_shift: u32,
    pub cur_hysteresis: u32,
    pub consecutive_hysteresis: bool,
    /// Static scaling (`loss_scale` > 0 in the config): the scale never changes.
    pub dynamic: bool,
}

impl DynamicLossScaler {
    pub fn from_config(c: &Fp16Config) -> Self {
        let dynamic = c.loss_scale == 0.0;
        Self {
            cur_scale: if dynamic {
                2f64.powi(c.initial_scale_power as i32)
            } else {
                c.loss_scale
            },
            cur_iter: 0,
            last_overflow_iter: -1,
            scale_factor: 2.0,
            scale_window: c.loss_scale_window,
            min_scale: c.min_loss_scale,
            delayed_shift: c.hysteresis,
            cur_hysteresis: c.hysteresis,
            consecutive_hysteresis: c.consecutive_hysteresis,
            dynamic,
        }
    }

    /// Records one iteration; `overflow` means the step must be skipped. Like DeepSpeed, an
    /// overflow at the minimum scale is an error.
    pub fn update_scale(&mut self, overflow: bool) -> Result<(), LossScaleError> {
        if !self.dynamic {
            self.cur_iter += 1;
            return Ok(());
        }
        if overflow {
            if self.delayed_shift == 1 || self.cur_hysteresis == 1 {
                if self.cur_scale == self.min_scale {
                    return Err(LossScaleError::AtMinimum);
                }
                self.cur_scale = (self.cur_scale / self.scale_factor).max(self.min_scale);
            } else {
                self.cur_hysteresis -= 1;
            }
            self.last_overflow_iter = self.cur_iter as i64;
        } else {
            if self.consecutive_hysteresis {
                self.cur_hysteresis = self.delayed_shift;
            }
            let stable_interval = (self.cur_iter as i64 - self.last_overflow_iter) - 1;
            if stable_interval > 0 && stable_interval % self.scale_window as i64 == 0 {
                if !self.consecutive_hysteresis {
                    self.cur_hysteresis = self.delayed_shift;
                }
                self.cur_scale *= self.scale_factor;
            }
        }
        self.cur_iter += 1;
        Ok(())
    }
}
