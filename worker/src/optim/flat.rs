//! All trainable parameters as views into one contiguous fp32 buffer, with a matching gradient
//! buffer, so optimizers and collectives work on flat ranges.

use tch::nn::VarStore;
use tch::{Kind, Tensor};

extern "C" {
    fn kormlm_set_grad(var: *mut std::ffi::c_void, grad: *const std::ffi::c_void) -> std::ffi::c_int;
}

/// One parameter's place in the flat buffers.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub offset: i64,
    pub numel: i64,
    pub shape: Vec<i64>,
}

pub struct FlatParams {
    /// `[padded_numel]`; parameters are views into it.
    pub params: Tensor,
    /// `[padded_numel]`; gradients are gathered here before a step.
    pub grads: Tensor,
    pub slots: Vec<Slot>,
    variables: Vec<Tensor>,
    /// Real elements (without padding).
    pub numel: i64,
    /// Parameter gradients are views into `grads` (set after the first backward), so backward
    /// accumulates straight into the flat buffer and no copy is needed.
    grads_aliased: bool,
}

impl FlatParams {
    /// Moves every trainable variable of `vs` into one buffer padded to a multiple of `align`
    /// (the world size times a small alignment under ZeRO). Variables are ordered by name, so
    /// every rank lays them out identically.
    pub fn new(vs: &VarStore, align: i64) -> Self {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let numel: i64 = named.iter().map(|(_, t)| t.numel() as i64).sum();
        let align = align.max(1);
        let padded = (numel + align - 1) / align * align;
        let device = vs.device();
        let params = Tensor::zeros([padded], (Kind::Float, device));
        let grads = Tensor::zeros([padded], (Kind::Float, device));
        let mut slots = Vec::with_capacity(named.len());
        let mut variables = Vec::with_capacity(named.len());
        let mut offset = 0;
        tch::no_grad(|| {
            for (name, mut var) in named {
                let n = var.numel() as i64;
                let shape = var.size();
                let view = params.narrow(0, offset, n).view(shape.as_slice());
                view.shallow_clone().copy_(&var);
                var.set_data(&view);
                slots.push(Slot {
                    name,
                    offset,
                    numel: n,
                    shape,
                });
                variables.push(var);
                offset += n;
            }
        });
        let mut flat = Self {
            params,
            grads,
            slots,
            variables,
            numel,
            grads_aliased: false,
        };
        flat.alias_grads();
        flat
    }

    /// Makes every parameter's gradient a view of the flat gradient buffer before any backward
    /// pass, so libtorch accumulates there in place and no second set of gradients (the size of
    /// the model) is ever allocated.
    fn alias_grads(&mut self) {
        for (slot, var) in self.slots.iter().zip(&mut self.variables) {
            let view = self
                .grads
                .narrow(0, slot.offset, slot.numel)
                .view(slot.shape.as_slice());
            // SAFETY: both pointers are live at::Tensor handles owned by tch for the duration of
            // the call; the shim assigns the gradient (a reference-counted copy of the view).
            let rc = unsafe { kormlm_set_grad(var.as_mut_ptr().cast(), view.as_ptr().cast()) };
            if rc != 0 {
                tracing::warn!(parameter = %slot.name, "could not alias the gradient into the flat buffer");
            }
        }
        self.grads_aliased = self.grads_in_place();
    }

    pub fn padded_numel(&self) -> i64 {
        self.params.size()[0]
    }

    /// Clears the gradients of every parameter.
    pub fn zero_grad(&mut self) {
        let _ = self.grads.zero_();
        if !self.grads_aliased {
            for v in &mut self.variables {
                v.zero_grad();
            }
        }
    }

    /// Whether every parameter's gradient still lives in the flat buffer.
    fn grads_in_place(&self) -> bool {
        let base = self.grads.data_ptr() as usize;
        self.slots.iter().zip(&self.variables).all(|(slot, var)| {
            let g = var.grad();
            g.defined() && g.data_ptr() as usize == base + slot.offset as usize * 4
        })
    }

    /// Makes the accumulated parameter gradients available in the flat gradient buffer. The
    /// first call moves each gradient into the buffer (libtorch then accumulates there in
    /// place); should a gradient ever be re-allocated, it is copied and moved back.
    pub fn gather_grads(&mut self) {
        if self.grads_aliased && self.grads_in_place() {
            return;
        }
        tch::no_grad(|| {
            for (slot, var) in self.slots.iter().zip(&self.variables) {
                let mut grad = var.grad();
                let target = self.grads.narrow(0, slot.offset, slot.numel);
                if grad.defined() {
                    target.shallow_clone().copy_(&grad.view([-1]));
                    grad.set_data(&target.view(slot.shape.as_slice()));
                } else {
                    let _ = target.shallow_clone().zero_();
                }
            }
        });
        let aliased = self.grads_in_place();
        if self.grads_aliased && !aliased {
            tracing::warn!("parameter gradients left the flat buffer; copying them back each step");
        }
        self.grads_aliased = aliased;
    }

    /// A per-element weight-decay factor: 1 for decayed parameters, 0 for biases and LayerNorm
    /// weights (the common "no decay" groups).
    pub fn decay_mask(&self) -> Tensor {
        let mut mask = vec![0f32; self.padded_numel() as usize];
        for slot in &self.slots {
            let no_decay = slot.name.ends_with(".bias") || slot.name.contains("LayerNorm");
            if !no_decay {
                for m in &mut mask[slot.offset as usize..(slot.offset + slot.numel) as usize] {
                    *m = 1.0;
                }
            }
        }
        Tensor::from_slice(&mask).to_device(self.params.device())
    }
}
